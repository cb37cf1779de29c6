"""benchmarks/gpu_check.sh: its dry run checks every part and prints every command, and its
summary turns the parts' JSON lines into one table."""
import os
import pathlib
import subprocess
import sys

from benchmarks import gpu_summary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'benchmarks' / 'gpu_check.sh'


def test_dry_run_checks_the_parts_and_prints_the_commands(tmp_path):
  subprocess.run(['bash', '-n', str(SCRIPT)], check=True, timeout=10)
  env = {**os.environ, 'DRY_RUN': '1', 'PYTHON': sys.executable, 'OUT_DIR': str(tmp_path)}
  result = subprocess.run(['bash', str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  commands = [line[2:] for line in result.stdout.splitlines() if line.startswith('+ ')]
  assert len(commands) == 5, result.stdout
  assert '--no-index' in commands[0] and '.whl/*.whl' in commands[0]
  assert 'flash_check.py --lengths=512,2048,8192' in commands[1]
  assert 'attention.py' in commands[2]
  assert all(f'--config.{field}' in commands[3] for field in (
      'model.max_seq_len=2048', 'train.micro_batch_size=16')) and 'llama_109m.py' in commands[3]
  assert 'gpu_summary.py' in commands[4]
  assert all(str(tmp_path / 'results.jsonl') in c for c in commands[1:])
  # The train step's own dry run: the config validates and each side's command.
  sides = [line for line in result.stdout.splitlines() if '--side=' in line]
  assert [s.split('--side=')[1].split()[0] for s in sides] == ['maxlite'] * 3 + ['torch']
  assert 'batch 16 x 2048' in result.stdout and not list(tmp_path.iterdir())  # nothing ran


def test_summary_is_one_table_of_every_part():
  step = dict(impl='maxlite', attention='pallas', shape='12x768', seconds_per_step=0.1,
              tokens_per_second=327680.0, mfu=0.4, mfu_causal=0.35, peak_bytes=2**31,
              first_loss=10.9)
  results = [
      dict(check='flash', length=512, documents=1, tensor='out', relative=1e-3, ok=True),
      dict(check='flash', length=512, documents=1, tensor='dq', relative=5e-2, ok=False),
      dict(check='attention', backend='cudnn', head_dim=128, length=2048, documents=8, ms='-',
           tflops='-', note='cannot mask packed documents', **{'pass': '-'}),
      step, {**step, 'impl': 'torch', 'attention': 'sdpa', 'seconds_per_step': 0.12},
      dict(impl='maxlite', attention='cudnn', error='ValueError: cannot mask packed documents'),
  ]
  rows = gpu_summary.rows(results)
  assert rows[0] == ('flash vs reference', 'T=512 docs=1', 'FAIL: worst dq 5.00e-02 of max |ref|')
  assert rows[1][2] == 'cannot mask packed documents'
  assert rows[2][2].endswith('x1.20 the peer') and 'MFU 40.0% / 35.0%' in rows[2][2]
  assert 'the peer' not in rows[3][2] and rows[4][2].startswith('ValueError')
