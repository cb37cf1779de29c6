"""The XLA flags maxlite runs with, in one place.

train.py, generate.py, evaluate.py and benchmarks/train_step.py call `apply`
before anything starts a JAX backend; the launchers (launch/) set no XLA flags
of their own and rely on it. XLA reads XLA_FLAGS once, when the first backend
starts, and aborts the process on a flag it does not know, so `apply`:

  1. guesses the platform the run will start: config.platform, else
     JAX_PLATFORMS, else a GPU when jax has a CUDA plugin and a GPU is visible;
  2. takes maxlite's defaults for that platform (below), leaving out every flag
     the user's XLA_FLAGS already sets: the user's value wins, flag by flag;
  3. keeps only the flags the installed jaxlib knows. A subprocess starts a CPU
     backend with them and reports the unknown ones; the answer is cached per
     jaxlib version in maxlite's cache folder, so this costs ~2 s once. (The
     CUDA plugin parses XLA_FLAGS with its own copy of XLA's flag table, but
     jax pins it to the jaxlib's version, so the two tables agree.);
  4. puts them in XLA_FLAGS, before the user's own entries;
  5. on CPU, also sets glibc's malloc to keep freed memory (maxlite.host_memory).

MAXLITE_XLA_FLAGS=none turns maxlite's defaults off altogether (XLA flags and
malloc settings).
"""
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

from maxlite import host_memory

ENV_SWITCH = 'MAXLITE_XLA_FLAGS'
GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')

# Flags for GPU runs. Each acts on collectives, so a one-GPU run gives them
# nothing to do. Sources: openxla.org/xla/gpu_optimization_levels (the set that
# XLA's own -O1 turns on) and NVIDIA JAX-Toolbox's rosetta/docs/GPU_performance.md.
GPU_FLAGS = {
    # Schedule collectives asynchronously and overlap them with the matmuls
    # around them, by a cost model of both instead of program order.
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
    # Merge the many small per-parameter collectives (the gradient all-reduce
    # over `data`, the weight all-gathers and gradient reduce-scatters over
    # `fsdp`) into messages of up to 128 MiB: NCCL reaches its bandwidth only on
    # large messages, and fewer launches cost less latency per step.
    'xla_gpu_all_reduce_combine_threshold_bytes': str(128 * 2**20),
    'xla_gpu_all_gather_combine_threshold_bytes': str(128 * 2**20),
    'xla_gpu_reduce_scatter_combine_threshold_bytes': str(128 * 2**20),
    # With scanned layers (model.scan_layers) each layer's collectives sit in a
    # while loop; pipelining moves each into the previous iteration, so that it
    # overlaps that layer's compute instead of stalling the next one.
    'xla_gpu_enable_pipelined_all_gather': 'true',
    'xla_gpu_enable_pipelined_reduce_scatter': 'true',
    'xla_gpu_enable_pipelined_all_reduce': 'true',
}
# Worth trying per workload (put them in XLA_FLAGS); the tests check that the
# installed jaxlib knows them too.
SUGGESTED_GPU_FLAGS = {
    # Unrolls the layer loop by two so that one copy's collectives overlap the
    # other's compute; longer compiles.
    'xla_gpu_enable_while_loop_double_buffering': 'true',
    # Runs collectives on a high-priority stream so compute cannot starve them.
    'xla_gpu_enable_highest_priority_async_stream': 'true',
    # Combine collectives over different dimensions too: fewer, larger messages.
    'xla_gpu_enable_all_gather_combine_by_dim': 'false',
    'xla_gpu_enable_reduce_scatter_combine_by_dim': 'false',
    # Empty: CUDA graphs off, to read kernels one by one in a profiler.
    'xla_gpu_enable_command_buffer': '',
}

# Flags for CPU runs (benchmarks/NOTES.md, "configs/tiny.py on CPU: threads").
CPU_FLAGS: dict[str, str] = {}

_UNKNOWN = re.compile(r'Unknown flags? in XLA_FLAGS: (.*)')


def guess_platform(configured: str = '') -> str:
  """'gpu' or the named platform ('cpu', 'tpu'), without starting a backend."""
  requested = (configured or os.environ.get('JAX_PLATFORMS', '')).split(',')[0].strip().lower()
  if requested:
    return 'gpu' if requested in GPU_PLATFORMS else requested
  return 'gpu' if _cuda_plugin_installed() and _gpu_visible() else 'cpu'


def _cuda_plugin_installed() -> bool:
  plugins = importlib.metadata.entry_points(group='jax_plugins')
  return (any('cuda' in p.name or 'cuda' in p.value for p in plugins)
          or any(importlib.util.find_spec(f'jax_cuda{v}_plugin') for v in (12, 13)))


def _gpu_visible() -> bool:
  if os.environ.get('CUDA_VISIBLE_DEVICES', 'all').strip() in ('', '-1'):
    return False
  return any(pathlib.Path('/dev').glob('nvidia[0-9]*'))


def switched_off() -> bool:
  return os.environ.get(ENV_SWITCH, '').lower() in ('none', 'off', '0', 'false')


def defaults(platform: str) -> dict[str, str]:
  if switched_off():
    return {}
  return dict(GPU_FLAGS if platform == 'gpu' else CPU_FLAGS if platform == 'cpu' else {})


def flag_names(xla_flags: str) -> set[str]:
  """The names of the flags an XLA_FLAGS string sets ('--xla_a=1 --xla_b' -> {'xla_a', 'xla_b'})."""
  return {word.lstrip('-').split('=', 1)[0] for word in xla_flags.split() if word.startswith('--')}


def merged(user_flags: str, wanted: dict[str, str]) -> str:
  """maxlite's flags that the user does not set, then the user's own."""
  ours = [f'--{name}={value}' for name, value in wanted.items() if name not in flag_names(user_flags)]
  return ' '.join(ours + user_flags.split())


def unknown_flags(flags: dict[str, str]) -> set[str]:
  """The names among `flags` ({name: value}) that the installed jaxlib rejects,
  cached per jaxlib version."""
  from maxlite.data.embedded import default_cache_dir  # maxlite's one cache folder
  import jaxlib
  cache = default_cache_dir() / f'xla_flags-jaxlib-{jaxlib.__version__}.json'
  try:
    known = json.loads(cache.read_text())
  except (OSError, ValueError):
    known = {}
  missing = {name: value for name, value in flags.items() if name not in known}
  if missing:
    answers = probe(missing)
    known.update(answers)
    if answers:
      try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f'.{os.getpid()}.tmp')
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        partial.replace(cache)  # atomic: processes starting together never read half a file
      except OSError:  # a read-only home: probe again next time
        pass
  return {name for name in flags if not known.get(name, False)}


def probe(flags: dict[str, str]) -> dict[str, bool]:
  """{name: accepted}, from a subprocess that starts a CPU backend with all of `flags`;
  {} when that fails for another reason than unknown flags (then none is passed).

  XLA names every unknown flag in one message before it aborts.
  """
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': ' '.join(f'--{name}={value}' for name, value in flags.items())}
  result = subprocess.run([sys.executable, '-c', 'import jax; jax.devices("cpu")'], env=env,
                          capture_output=True, text=True, timeout=300)
  if result.returncode == 0:
    return dict.fromkeys(flags, True)
  found = _UNKNOWN.search(result.stderr)
  if not found:
    print(f'warning: maxlite sets no XLA flags: checking them failed: '
          f'{" ".join(result.stderr.split())[-300:]}', file=sys.stderr)
    return {}
  rejected = flag_names(found.group(1))
  return {name: name not in rejected for name in flags}


def backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a jax without it: assume not, as at start-up
    return False


def apply(configured_platform: str = '') -> str:
  """Adds maxlite's XLA flags for the coming platform to XLA_FLAGS; returns a line for the log."""
  if backend_started():
    return 'XLA flags: the backend had already started; XLA_FLAGS left as it was'
  platform = guess_platform(configured_platform)
  user_flags = os.environ.get('XLA_FLAGS', '')
  wanted = {k: v for k, v in defaults(platform).items() if k not in flag_names(user_flags)}
  dropped = unknown_flags(wanted) if wanted else set()
  wanted = {k: v for k, v in wanted.items() if k not in dropped}
  os.environ['XLA_FLAGS'] = merged(user_flags, wanted)
  line = f'XLA flags ({platform}): ' + (os.environ['XLA_FLAGS'] or 'none')
  if dropped:
    line += f' (not known to this jaxlib, left out: {", ".join(sorted(dropped))})'
  if platform == 'cpu' and not switched_off():
    line += f'; {host_memory.keep_freed_memory()}'
  return line
