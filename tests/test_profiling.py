"""train.profile_steps writes a jax.profiler trace into the run dir, and
train.compile_cache_dir fills a persistent compilation cache: one CLI run of configs/tiny.py."""
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_run_writes_its_trace_and_its_compilation_cache(tmp_path):
  run_dir, cache = tmp_path / 'run', tmp_path / 'compile_cache'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)  # one CPU device, as the command line runs
  result = subprocess.run(
      [sys.executable, '-m', 'maxlite.train', '--config=configs/tiny.py',
       f'--config.train.run_dir={run_dir}', '--config.train.steps=4', '--config.optim.warmup_steps=1',
       '--config.train.eval_steps=0',
       '--config.checkpoint.interval=0', '--config.train.profile_steps=2:4',
       f'--config.train.compile_cache_dir={cache}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  traces = list((run_dir / 'profile').glob('plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((run_dir / 'profile').glob('plugins/profile/*/*.trace.json.gz'))
  assert any(path.is_file() for path in cache.rglob('*'))  # at least the train step
  # CPU runs log maxlite's CPU settings (maxlite.xla_flags).
  assert 'XLA flags (cpu)' in result.stdout and 'glibc malloc' in result.stdout
