"""Orbax checkpoints in <run_dir>/checkpoints: train state, data loader state, resolved config.

Saves are asynchronous: the loop goes on while a background thread writes, and
Orbax only makes a step visible once it is complete, so a crash mid-save leaves
the previous checkpoint as the latest.

The data loader's state is captured when `save` is called (not when the
background write happens), one JSON file per process, so a resumed run reads
exactly the batches the uninterrupted run would have read.
"""
import json
import pathlib

import grain
import jax
import orbax.checkpoint as ocp


class _FrozenState:
  """What Grain's checkpoint handler saves and restores: the loader state as JSON bytes."""

  def __init__(self, state: bytes = b''):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes):
    self.state = state

  def start_prefetch(self):
    pass


class Checkpointer:

  def __init__(self, run_dir: pathlib.Path, interval: int, max_to_keep: int):
    self.interval = interval
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(run_dir.absolute() / 'checkpoints', options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.interval > 0 and step % self.interval == 0)

  def save(self, step: int, state, config_json: str, data_state: dict, data_progress: dict):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_FrozenState(json.dumps(data_state).encode())),
        data_progress=ocp.args.JsonSave(data_progress),
        config=ocp.args.JsonSave(config_json)), force=True)

  def restore(self, step: int, state, shardings):
    """Restores onto `shardings`, whatever mesh wrote the checkpoint."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored.state

  def restore_data(self, step: int) -> tuple[dict | None, dict | None]:
    """(this process's loader state, the global data progress) saved at `step`.

    The loader state is None when the checkpoint was written by a different
    number of processes (or holds none): each process's state describes its
    own slice of the documents and does not carry over to another split.
    """
    folder = pathlib.Path(self.manager.directory) / str(step)
    own_file = folder / 'data' / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not (folder / 'data_progress').is_dir():
      return None, None
    args = {'data_progress': ocp.args.JsonRestore()}
    if own_file.is_file():
      args['data'] = grain.checkpoint.CheckpointRestore(_FrozenState())
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    loader_state = json.loads(restored.data.state) if own_file.is_file() else None
    return loader_state, restored.data_progress

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
