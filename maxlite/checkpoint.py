"""Orbax checkpoints in <run_dir>/checkpoints: train state, data loader state, resolved config.

A checkpoint step holds four items:
  state          params, optimizer state and step (the train step draws no
                 random numbers, so there is no RNG state beyond config.seed
                 and the data loader's own state)
  data           the Grain loader state of each loader shard, one JSON file per process
  data_progress  tokens read per source, summed over processes
  config         the resolved config as JSON, so a run directory stands alone

Saves are asynchronous: the loop goes on while a background thread writes.
Orbax writes each step into a temporary folder and renames it into place only
when it is complete, so a crash mid-save leaves the previous step as the
latest. A step that is complete on disk but unreadable (truncated or deleted
files) is moved aside to <run_dir>/unreadable_checkpoints/ and the step before
it is used.
"""
import contextlib
import json
import logging
import pathlib
import shutil
import sys
import threading
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from maxlite import distributed


class _FrozenState:
  """What Grain's checkpoint handler saves: the loader state as JSON bytes."""

  def __init__(self, state: bytes):
    self.state = state

  def get_state(self) -> bytes:
    return self.state


def checkpoint_dir(run_dir) -> pathlib.Path:
  return pathlib.Path(run_dir).absolute() / 'checkpoints'


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _as_saved(target, metadata):
  """The restore target in the shapes the checkpoint holds (its Orbax metadata).

  Only the vocabulary's padding (maxlite.config.padded_vocab_size) changes
  shapes between meshes; such an array is read whole in its saved shape,
  replicated wherever its saved size does not divide, and then padded with
  zeros or cut by `_to_target`. The metadata tree spells containers its own
  way (dicts and lists for the optimizer's named tuples), so arrays are
  matched by their key paths.
  """
  def name(entry):
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        return str(getattr(entry, attribute))
    return str(entry)

  saved_shapes = {tuple(map(name, path)): tuple(m.shape) for path, m in
                  jax.tree_util.tree_flatten_with_path(metadata, is_leaf=lambda m: hasattr(m, 'shape'))[0]
                  if hasattr(m, 'shape')}

  def saved(path, x):
    shape = saved_shapes.get(tuple(map(name, path)), tuple(x.shape))
    if shape == tuple(x.shape) or len(shape) != len(x.shape):
      return x
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = [axes if axes is None or dim % _split(sharding.mesh, axes) == 0 else None
              for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * len(shape))]
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)
  return jax.tree_util.tree_map_with_path(saved, target)


def _split(mesh, axes) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _to_target(restored, target):
  """Pads with zeros or cuts each restored array to its target's shape and sharding."""
  def fit(x, want):
    if x.shape == want.shape:
      return x
    def resize(x):
      x = x[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, want.shape))]
      return jnp.pad(x, [(0, b - a) for a, b in zip(x.shape, want.shape)])
    return jax.jit(resize, out_shardings=want.sharding)(x)
  return jax.tree.map(fit, restored, target)


class CheckpointError(RuntimeError):
  """A save that failed (no space, no permission) or a checkpoint that does not fit
  this run; the entry point prints it as one line."""


class Checkpointer:
  """Saves every `interval` steps and at the end; keeps the newest `max_to_keep`
  plus, permanently, every step that is a multiple of `keep_every` (0: none).

  A failed save (the disk full, say) raises CheckpointError naming the step and
  the folder; Orbax writes a step into a temporary folder and renames it into
  place only when complete, so the steps saved before stay intact.
  """

  def __init__(self, run_dir: pathlib.Path, interval: int, max_to_keep: int, keep_every: int = 0,
               async_save: bool = True):
    self.interval = interval
    self.run_dir = pathlib.Path(run_dir)
    keep = [policies.LatestN(max_to_keep)]
    if keep_every:
      keep.append(policies.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=policies.AnyPreservationPolicy(keep))
    self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)
    self.saving = None  # the step whose asynchronous save may still be under way
    self._stderr = sys.stderr
    sys.stderr = _WithoutClosedLoopTracebacks(sys.stderr)

  def steps(self) -> list[int]:
    """Complete steps on disk, oldest first."""
    return sorted(self.manager.all_steps())

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.interval > 0 and step % self.interval == 0)

  def save(self, step: int, state, config_json: str, data_state: dict, data_progress: dict):
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    with self._failure_named(self.saving):  # the previous save's background error, if any
      self.manager.check_for_errors()
    with self._failure_named(step):
      self.saving = step
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(_FrozenState(json.dumps(data_state).encode())),
          data_progress=ocp.args.JsonSave(data_progress),
          config=ocp.args.JsonSave(json.loads(config_json))), force=True)

  def wait(self):
    """Blocks until the last save is on disk."""
    with self._failure_named(self.saving):
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _failure_named(self, step):
    try:
      yield
    except Exception as error:  # OSError from Python, ValueError/RuntimeError from TensorStore
      logging.error('saving checkpoint %s failed', step, exc_info=True)
      kept = self.steps()
      raise CheckpointError(
          f'saving checkpoint {step} into {checkpoint_dir(self.run_dir)} failed '
          f'({type(error).__name__}: {_first_line(error)}); '
          + (f'steps {kept} are intact' if kept else 'no earlier checkpoint')
          + ' (details in the run directory\'s maxlite.log)') from None

  def restore(self, step: int, state, shardings):
    """Restores onto `shardings`, whatever mesh wrote the checkpoint."""
    target = _abstract(state, shardings)
    saved = _as_saved(target, self.manager.item_metadata(step)['state'])
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(saved)))
    return _to_target(restored.state, target)

  def restore_latest(self, state, shardings, warn: Callable[[str], None]):
    """(step, state) from the newest readable checkpoint, or (None, state) when there is none.

    Unreadable steps are moved aside (never deleted) so that later saves of the
    same step number do not collide with them.
    """
    for step in reversed(self.steps()):
      try:
        return step, self.restore(step, state, shardings)
      except Exception as error:  # Orbax and TensorStore raise many types for damaged files
        logging.warning('checkpoint %s is unreadable', step, exc_info=True)
        aside = self._move_aside(step)
        warn(f'warning: checkpoint {step} is unreadable ({type(error).__name__}: '
             f'{_first_line(error)}); moved it to {aside} and trying the one before')
    return None, state

  def _move_aside(self, step: int) -> pathlib.Path:
    folder = pathlib.Path(self.manager.directory) / str(step)
    aside = self.run_dir / 'unreadable_checkpoints' / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(folder, aside)
    distributed.barrier(f'maxlite_move_aside_{step}')
    self.manager.reload()
    return aside

  def restore_data(self, step: int) -> tuple[dict | None, dict | None]:
    """(the loader state of every shard, the global data progress) saved at `step`.

    Each process saved the states of its own loader shards; they are merged
    here, so a process can pick up shards that another process count ran.
    """
    folder = pathlib.Path(self.manager.directory) / str(step)
    if not (folder / 'data_progress').is_dir():
      return None, None
    restored = self.manager.restore(step, args=ocp.args.Composite(data_progress=ocp.args.JsonRestore()))
    merged = None
    # Grain's handler writes one process_<i>-of-<n>.json per process; it only
    # reads back the caller's own, so the files are read here directly.
    for state_file in sorted((folder / 'data').glob('process_*-of-*.json')):
      state = json.loads(state_file.read_text())
      if 'shards' not in state:
        return None, restored.data_progress
      merged = merged or {'num_shards': state['num_shards'], 'shards': {}}
      if state['num_shards'] == merged['num_shards']:
        merged['shards'].update(state['shards'])
    return merged, restored.data_progress

  def close(self, report_failure: bool = True):
    """Waits for the last save to be on disk; raises CheckpointError if it failed,
    unless report_failure=False (another error is already on its way)."""
    try:
      self.wait()
      failed = False
    except CheckpointError:
      failed = True
      if report_failure:
        raise
    finally:
      try:
        self.manager.close()
      except Exception:  # a failed save is reported by wait(); do not mask that report
        logging.error('closing the checkpoint manager failed', exc_info=True)
    if not failed:  # after a failure, TensorStore may still call back into the closed loop
      sys.stderr = self._stderr


class _WithoutClosedLoopTracebacks:
  """sys.stderr, less the tracebacks of 'Event loop is closed' from other threads.

  When a write fails (a full disk), Orbax's event loop ends while TensorStore
  still completes the save's other writes; each completion then calls into
  the closed loop and TensorStore prints the error from its own thread, once
  per array. The failure itself is reported once, by Checkpointer.save or
  close, so these go to the log instead of the console.
  """

  def __init__(self, stream):
    self.stream = stream
    self.pending = {}  # thread id -> the lines of a traceback being printed

  def write(self, text: str):
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    lines = self.pending.setdefault(threading.get_ident(), [''])
    lines[-1] += text
    *complete, lines[-1] = lines[-1].split('\n')
    for line in complete:
      self._line(line, lines)
    return len(text)

  def _line(self, line: str, lines: list):
    held = lines[:-1]
    if not held and not line.startswith('Traceback (most recent call last):'):
      self.stream.write(line + '\n')
    elif not held or line.startswith(' '):
      lines.insert(-1, line)
    else:  # the exception line ends the traceback
      del lines[:-1]
      if line == 'RuntimeError: Event loop is closed':
        logging.debug('a write completed after its event loop closed:\n%s', '\n'.join(held + [line]))
      else:
        self.stream.write('\n'.join(held + [line]) + '\n')

  def __getattr__(self, name):
    return getattr(self.stream, name)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:200] if text else ''


def _step_folder(run_dir, step: int | None) -> tuple[int, pathlib.Path]:
  """The folder of `step`, or of the newest complete step; a one-line error otherwise."""
  folder = checkpoint_dir(run_dir)
  steps = sorted(int(p.name) for p in folder.glob('*') if p.name.isdigit()) if folder.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'{folder} holds no checkpoint')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'{folder} has no checkpoint at step {step} (it has {steps})')
  return step, folder / str(step)


def read_config(run_dir, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
  """(step, the resolved config the run saved with that step's checkpoint)."""
  step, folder = _step_folder(run_dir, step)
  config_file = folder / 'config' / 'metadata'
  if not config_file.is_file():
    raise FileNotFoundError(f'{config_file} is missing: checkpoint {step} has no config')
  return step, ml_collections.ConfigDict(json.loads(config_file.read_text()))


def load_params(run_dir, step: int, abstract_params, shardings):
  """Only the parameters of checkpoint `step` (no optimizer state), in the
  shapes of `abstract_params`, placed by `shardings` (a matching tree, or one
  Sharding for every array)."""
  _, folder = _step_folder(run_dir, step)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract_params)
  target = {'params': _abstract(abstract_params, shardings)}
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(folder / 'state')
    metadata = getattr(metadata, 'item_metadata', metadata) or metadata
    saved = {'params': _as_saved(target['params'], metadata['params'])}
    restored = checkpointer.restore(folder / 'state', args=ocp.args.PyTreeRestore(
        item=saved, restore_args=ocp.checkpoint_utils.construct_restore_args(saved),
        partial_restore=True))
  return _to_target(restored['params'], target['params'])
