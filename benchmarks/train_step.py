"""maxlite's compiled train step against a plain PyTorch peer (benchmarks/torch_peer.py),
on the same batch from the same initial parameters.

    python benchmarks/train_step.py [--config=configs/tiny.py] [--config.model.attention=pallas]
        [--backends=xla,pallas] [--nopeer] [--steps=10] [--windows=3] [--documents=1] [--threads=1]
        [--rounds=1]

Prints, per implementation: tokens/s, ms/step, MFU in both of maxlite.metrics'
conventions (PaLM, and with attention's causal half not counted; '-' where the
device's peak is unknown, as on CPU), peak memory (the device allocator's peak
on GPUs, the process's peak RSS on CPU), CPU seconds (user + system) and minor
page faults per step, the step-1 loss, and the speed of maxlite over the peer's.

Each implementation runs in a process of its own, one after the other, so
neither sees the other's thread pools, allocator or compile caches. maxlite's
process runs the step that train.py compiles (maxlite.step.build) on one
device, with the XLA flags maxlite.xla_flags sets; it saves its initial
parameters, and the peer's process starts from them, so the step-1 losses
must agree (to ~1e-6 in float32; bfloat16 rounds differently on each side).
The batch is synthetic (seeded random tokens, `--documents` equal documents
per row); speed does not depend on its contents. A step is timed as the
loop runs it: `--steps` steps dispatched back to back, then one wait, over
`--windows` windows after `--warmup` steps; the median window counts.

A shared or virtual machine's speed drifts by tens of percent over minutes,
more than the difference being measured. `--rounds=N` runs every side N
times, interleaved, the order reversed each round; each row is then that
side's median round, and "vs peer" is the median of the N ratios taken within
a round (each against the peer's run beside it), with their range.
"""
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.batches import make_batch  # noqa: E402
from benchmarks.rounds import median_round, paired_ratios  # noqa: E402
from maxlite import config as config_lib, metrics as metrics_lib  # noqa: E402  (no backend starts)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config file.',
                                          lock_config=True)
_BACKENDS = flags.DEFINE_list('backends', [], "model.attention values to run; empty: the config's")
_PEER = flags.DEFINE_bool('peer', True, 'also run the PyTorch peer')
_STEPS = flags.DEFINE_integer('steps', 10, 'steps per timed window')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'timed windows; the median counts')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps after the first')
_DOCUMENTS = flags.DEFINE_integer('documents', 1, 'equal documents per row of the batch')
_THREADS = flags.DEFINE_integer(
    'threads', 0, 'CPU only: 1 runs each side on one core (the process pinned to one CPU; XLA '
    'without its Eigen pool, torch with one intra-op thread), a comparison of work that a '
    "loaded machine distorts less; 0: each library's own default")
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'run every side this many times, interleaved; '
                               'the median round counts')
_RESULTS = flags.DEFINE_string('results', '', 'append one JSON line per row to this file')
_SIDE_TIMEOUT = flags.DEFINE_integer('side_timeout', 0, 'seconds each side may take; 0: no limit')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'check the config and print the commands; run nothing')
_SIDE = flags.DEFINE_enum('side', '', ['', 'maxlite', 'torch'], 'internal: run one side')
_WORKDIR = flags.DEFINE_string('workdir', '', 'internal: where the sides exchange files')

RESULT_PREFIX = 'RESULT '


def timed_windows(step, wait, steps: int, windows: int) -> tuple[float, list[float]]:
  """(median seconds per step, [user CPU seconds, system CPU seconds, minor page faults] per
  step over all windows)."""
  times = []
  usage_start = _usage()
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = step()
    wait(out)
    times.append((time.perf_counter() - start) / steps)
  usage = [(end - begin) / (steps * windows) for begin, end in zip(usage_start, _usage())]
  return statistics.median(times), usage


def pin_to_one_cpu():
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _usage() -> tuple[float, float, int]:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# -- maxlite's side --------------------------------------------------------------------------

def run_maxlite(config, workdir: pathlib.Path) -> dict:
  from maxlite import xla_flags
  if _THREADS.value == 1:
    # XLA has no thread count: its Eigen pool can be off, but its executor still runs
    # independent operations side by side on threads of its own; the pin stops that.
    pin_to_one_cpu()
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false').strip()
  print(xla_flags.apply(config.platform), file=sys.stderr)  # before the backend starts, as in train.py
  import jax
  from maxlite import mesh as mesh_lib, optim, state as state_lib, step as step_lib
  from maxlite.model.attention import resolve_backend
  from maxlite.model.llama import LlamaConfig

  if config.platform:
    jax.config.update('jax_platforms', config.platform)
  config.parallel.data = 1  # one device: the peer's setting
  devices = jax.devices()[:1]
  sizes = config_lib.validate(config, 1)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  model_cfg = dataclasses.replace(model_cfg, attention=resolve_backend(
      config.model.attention, jax.default_backend()))
  mesh = mesh_lib.make_mesh(sizes, devices)
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  rows, length = config.train.micro_batch_size * config.train.grad_accum_steps, config.data.seq_len
  batch = make_batch(rows, length, config.model.vocab_size, _DOCUMENTS.value, config.seed)
  with jax.set_mesh(mesh):
    steps = step_lib.build(config, model_cfg, mesh, tx)
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, config.seed, False)
    params = workdir / 'params.npz'
    if not params.exists():  # the first backend's process saves them for the peer
      flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
      np.savez(params, **{jax.tree_util.keystr(path): np.asarray(x) for path, x in flat})
    device_batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = steps.train.lower(state, device_batch).compile()
    compile_seconds = time.perf_counter() - start
    state, first = compiled(state, device_batch)
    first_loss = float(first['loss'])

    def one_step():
      nonlocal state
      state, metrics = compiled(state, device_batch)
      return metrics['loss']

    for _ in range(_WARMUP.value):
      one_step()
    seconds, cpu = timed_windows(one_step, jax.block_until_ready, _STEPS.value, _WINDOWS.value)
  stats = devices[0].memory_stats() or {}
  return dict(impl='maxlite', attention=model_cfg.attention, seconds_per_step=seconds,
              cpu_per_step=cpu, first_loss=first_loss, compile_seconds=compile_seconds,
              peak_bytes=stats.get('peak_bytes_in_use') or _peak_rss_bytes(),
              peak_kind='device' if 'peak_bytes_in_use' in stats else 'rss',
              device_kind=devices[0].device_kind, platform=jax.default_backend())


# -- the peer's side -------------------------------------------------------------------------

def run_torch(config, workdir: pathlib.Path) -> dict:
  import torch
  from benchmarks import torch_peer
  if _THREADS.value:
    pin_to_one_cpu()
    torch.set_num_threads(_THREADS.value)

  on_gpu = torch.cuda.is_available() and config.platform != 'cpu'
  device = 'cuda' if on_gpu else 'cpu'
  total_steps = config.train.steps
  peer = torch_peer.Peer(config, total_steps, device, seed=config.seed)
  params = workdir / 'params.npz'
  if params.exists():
    peer.load_maxlite_params(_unflatten(np.load(params)))
  rows, length = config.train.micro_batch_size * config.train.grad_accum_steps, config.data.seq_len
  batch = peer.batch(make_batch(rows, length, config.model.vocab_size, _DOCUMENTS.value, config.seed))
  start = time.perf_counter()
  first_loss = float(peer.train_step(batch)[0])  # torch.compile compiles here, on GPUs
  compile_seconds = time.perf_counter() - start
  wait = (lambda _: torch.cuda.synchronize()) if on_gpu else (lambda out: float(out))
  for _ in range(_WARMUP.value):
    peer.train_step(batch)
  seconds, cpu = timed_windows(lambda: peer.train_step(batch)[0], wait, _STEPS.value, _WINDOWS.value)
  return dict(impl='torch', attention='sdpa', seconds_per_step=seconds, cpu_per_step=cpu,
              first_loss=first_loss, compile_seconds=compile_seconds,
              peak_bytes=torch.cuda.max_memory_allocated() if on_gpu else _peak_rss_bytes(),
              peak_kind='device' if on_gpu else 'rss',
              device_kind=torch.cuda.get_device_name() if on_gpu else 'cpu',
              platform=device, threads=torch.get_num_threads())


def _unflatten(npz) -> dict:
  """The params.npz that maxlite's side wrote ("['a']['b']" keys) -> a nested dict."""
  tree = {}
  for key in npz.files:
    path = [part.strip("'\"") for part in key.strip('[]').split('][')]
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = npz[key]
  return tree


# -- the parent: one process per row, one table ------------------------------------------------

def side_command(side: str, backend: str, workdir: str) -> list[str]:
  """This script's command line for one side: the same flags, one side, one backend."""
  args = [a for a in sys.argv[1:] if not a.startswith(('--side', '--workdir', '--backends',
                                                         '--dry_run'))]
  command = [sys.executable, __file__, *args, f'--side={side}', f'--workdir={workdir}']
  return command + ([f'--config.model.attention={backend}'] if backend else [])


def run_side(side: str, backend: str, workdir: str, timeout: float | None = None) -> dict:
  """Runs this script for one side in a fresh process; its result, or the error it ended with."""
  try:
    process = subprocess.run(side_command(side, backend, workdir), capture_output=True, text=True,
                             timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(impl=side, attention=backend or ('sdpa' if side == 'torch' else '-'), error=f'took more than {timeout:g} s')
  for line in process.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  lines = [line for line in (process.stderr + process.stdout).splitlines() if line.strip()]
  reason = next((line for line in reversed(lines) if 'Error' in line or 'error' in line),
                lines[-1] if lines else f'exit code {process.returncode}')
  return dict(impl=side, attention=backend or ('sdpa' if side == 'torch' else '-'), error=reason.strip()[:150])


def add_rates(result: dict, config):
  """Adds tokens/s and the MFU of both conventions (None where the peak is unknown)."""
  if 'error' in result:
    return
  tokens = config.train.micro_batch_size * config.train.grad_accum_steps * config.data.seq_len
  result['tokens_per_second'] = tokens / result['seconds_per_step']
  peak = metrics_lib.peak_flops_per_device(result['device_kind'],
                                           config.logging.peak_flops_per_device)
  for name, causal in (('mfu', False), ('mfu_causal', True)):
    flops = metrics_lib.flops_per_token(config.model, config.data.seq_len, causal=causal)
    result[name] = metrics_lib.mfu(flops, result['tokens_per_second'], 1, peak)


def row(result: dict, ratios: list[float]) -> str:
  """One table row; `ratios`: this side's speed over the peer's, one per round (none for the peer)."""
  if 'error' in result:
    return f'| {result["impl"]:7} | {result["attention"]:9} | {result["error"]}'
  mfus = ['-' if result[k] is None else f'{100 * result[k]:.1f}%' for k in ('mfu', 'mfu_causal')]
  versus = '-'
  if ratios:
    versus = f'{statistics.median(ratios):.2f}'
    if len(ratios) > 1:
      versus += f' ({min(ratios):.2f}-{max(ratios):.2f})'
  user, system, faults = result['cpu_per_step']
  return (f'| {result["impl"]:7} | {result["attention"]:9} | {result["tokens_per_second"]:10,.0f} | '
          f'{1e3 * result["seconds_per_step"]:8.2f} | {mfus[0]:>6} | {mfus[1]:>6} | '
          f'{result["peak_bytes"] / 2**20:8,.0f} {result["peak_kind"]:6} | '
          f'{user:5.3f}+{system:5.3f} | {faults:8,.0f} | {result["first_loss"]:.6f} | '
          f'{result["compile_seconds"]:9.1f} | {versus}')


def main(argv):
  del argv
  config = _CONFIG.value
  if _SIDE.value:
    run = run_maxlite if _SIDE.value == 'maxlite' else run_torch
    print(RESULT_PREFIX + json.dumps(run(config, pathlib.Path(_WORKDIR.value))), flush=True)
    return
  model = config.model
  rows = config.train.micro_batch_size * config.train.grad_accum_steps
  config_lib.validate(config, 1)  # a mistake is one line here, not one per side
  if _THREADS.value not in (0, 1):
    raise app.UsageError(f'--threads={_THREADS.value} must be 0 or 1')
  print(f'{model.num_layers} layers x {model.hidden_size} wide, {model.num_heads} heads '
        f'({model.num_kv_heads} kv), vocab {model.vocab_size}; batch {rows} x {config.data.seq_len}, '
        f'{_DOCUMENTS.value} document(s) per row; compute {model.compute_dtype}, '
        f'params {model.param_dtype}; {os.cpu_count()} CPUs'
        + ('; one thread per side' if _THREADS.value else ''))
  if _DRY_RUN.value:
    for backend in _BACKENDS.value or ['']:
      print(' '.join(side_command('maxlite', backend, 'WORKDIR')))
    if _PEER.value:
      print(' '.join(side_command('torch', '', 'WORKDIR')))
    return
  shape = f'{model.num_layers}x{model.hidden_size} {rows}x{config.data.seq_len} {model.compute_dtype}'
  plan = [('maxlite', backend) for backend in _BACKENDS.value or ['']]
  plan += [('torch', '')] if _PEER.value else []
  if _ROUNDS.value < 1:
    raise app.UsageError(f'--rounds={_ROUNDS.value} must be at least 1')
  runs = {key: [] for key in plan}
  with tempfile.TemporaryDirectory() as workdir:
    for round_index in range(_ROUNDS.value):
      # maxlite's first backend first in round one: it saves the initial parameters
      for side, backend in plan if round_index % 2 == 0 else plan[::-1]:
        result = run_side(side, backend, workdir, _SIDE_TIMEOUT.value or None)
        add_rates(result, config)
        runs[side, backend].append(result)
        print(f'{side} {backend or ""}: ' + ('done' if 'error' not in result else result['error']),
              file=sys.stderr, flush=True)
        if _RESULTS.value:  # as each side ends: a time limit on the whole run loses no finished side
          with open(_RESULTS.value, 'a') as out:
            out.write(json.dumps({'shape': shape, 'round': round_index, **result}) + '\n')
  peers = runs.get(('torch', ''))
  everything = [median_round(results) for results in runs.values()]
  device = next((r['device_kind'] for r in everything if 'device_kind' in r), '?')
  rounds = f'median of {_ROUNDS.value} interleaved rounds, each ' if _ROUNDS.value > 1 else ''
  print(f'device: {device}; ms/step: {rounds}median of {_WINDOWS.value} windows of {_STEPS.value} '
        'steps; CPU s/step: user+system seconds per step; faults: minor page faults per step; '
        'vs peer: maxlite speed / peer speed' + (' (median of the rounds, range)' if rounds else ''))
  print('| impl    | attention |   tokens/s |  ms/step |    MFU | causal |        peak MiB | '
        ' CPU s/step | faults/step | step-1 loss | compile s | vs peer')
  print('|---------|-----------|------------|----------|--------|--------|-----------------|'
        '-------------|-------------|-------------|-----------|--------')
  for key, results in runs.items():
    ratios = paired_ratios(results, peers) if peers and key[0] != 'torch' else []
    print(row(median_round(results), ratios), flush=True)


if __name__ == '__main__':
  app.run(main)
