"""Multi-host runs as real processes on loopback: process layouts from SLURM and
explicit variables, 2 processes x 4 CPU devices against 1 x 8, checkpoints that
cross process counts both ways, a killed process, an unreachable coordinator."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from maxlite import distributed
from maxlite.config import ConfigError
from maxlite.distributed import DistributedError, resolve_layout
from maxlite.train import loader_shards

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SLURM_ONE_TASK_PER_NODE = {
    'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'nid[002,005-007]', 'SLURM_NTASKS': '4',
    'SLURM_PROCID': '3', 'SLURM_LOCALID': '0', 'SLURM_STEP_NUM_NODES': '4',
    'CUDA_VISIBLE_DEVICES': '0,1,2,3'}


def test_no_cluster_variables_mean_a_single_process():
  assert resolve_layout('auto', {}) is None
  assert resolve_layout('none', SLURM_ONE_TASK_PER_NODE) is None
  # An interactive SLURM shell (one task) is not a multi-process run either.
  assert resolve_layout('auto', {**SLURM_ONE_TASK_PER_NODE, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}) is None


def test_slurm_layouts():
  layout = resolve_layout('auto', SLURM_ONE_TASK_PER_NODE)
  # Coordinator: the first node, on a port derived from the job id.
  assert layout.coordinator_address == f'nid002:{20000 + 4242}'
  assert (layout.num_processes, layout.process_id, layout.source) == (4, 3, 'slurm')
  assert layout.local_device_ids == (0, 1, 2, 3)  # one task per node: all its GPUs
  per_gpu = {**SLURM_ONE_TASK_PER_NODE, 'SLURM_NTASKS': '16', 'SLURM_PROCID': '6', 'SLURM_LOCALID': '2',
             'SLURM_STEP_NODELIST': 'gpu7,gpu9', 'SLURM_STEP_NUM_NODES': '2',
             distributed.ENV_COORDINATOR_PORT: '1234'}
  layout = resolve_layout('slurm', per_gpu)
  assert (layout.coordinator_address, layout.process_id, layout.local_device_ids) == ('gpu7:1234', 6, (2,))
  # SLURM bound one GPU to the task: it is the task's device 0.
  assert resolve_layout('slurm', {**per_gpu, 'CUDA_VISIBLE_DEVICES': '2'}).local_device_ids == (0,)
  # srun --gpus-per-task=2: the task's own GPUs, whatever their node-wide numbers.
  bound = {**per_gpu, 'CUDA_VISIBLE_DEVICES': '4,5', 'SLURM_GPUS_PER_TASK': '2'}
  assert resolve_layout('slurm', bound).local_device_ids == (0, 1)
  unbound = {**bound, 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}  # the site does not bind
  assert resolve_layout('slurm', unbound).local_device_ids == (4, 5)
  assert resolve_layout('slurm', {**per_gpu, distributed.ENV_LOCAL_DEVICE_IDS: '1,3'}).local_device_ids == (1, 3)
  assert distributed.first_host('node[001-0015],host2') == 'node001'
  assert distributed.first_host('a01,b02') == 'a01'


def test_explicit_variables_win_and_bad_ones_are_named():
  env = {distributed.ENV_COORDINATOR: 'maxlite-0.maxlite:8476', distributed.ENV_NUM_PROCESSES: '2',
         distributed.ENV_PROCESS_ID: '1', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  layout = resolve_layout('auto', {**SLURM_ONE_TASK_PER_NODE, **env})
  assert (layout.coordinator_address, layout.num_processes, layout.process_id, layout.source) == (
      'maxlite-0.maxlite:8476', 2, 1, 'env')
  assert layout.local_device_ids == tuple(range(8))
  cases = [
      ({**env, distributed.ENV_PROCESS_ID: 'one'}, "MAXLITE_PROCESS_ID='one' must be an integer"),
      ({**env, distributed.ENV_PROCESS_ID: '2'}, 'process id 2 is not in [0, 2)'),
      ({**env, distributed.ENV_COORDINATOR: 'maxlite-0'}, "MAXLITE_COORDINATOR_ADDRESS='maxlite-0' must be host:port"),
      ({distributed.ENV_COORDINATOR: 'h:1'}, 'MAXLITE_NUM_PROCESSES, MAXLITE_PROCESS_ID are not set'),
      ({**env, distributed.ENV_LOCAL_DEVICE_IDS: '0;1'}, 'MAXLITE_LOCAL_DEVICE_IDS'),
  ]
  for environ, message in cases:
    with pytest.raises(DistributedError, match=re.escape(message)):
      resolve_layout('auto', environ)
  with pytest.raises(DistributedError, match='SLURM_JOB_ID, SLURM_STEP_NODELIST'):
    resolve_layout('slurm', {'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'})
  with pytest.raises(DistributedError, match="distributed.mode='mpi' is not one of"):
    resolve_layout('mpi', {})


def test_loader_shards_follow_the_rows_each_process_holds():
  # This process is process 0; the dicts give every process's rows of a batch of 16.
  two_blocks = {0: (0, 8), 1: (8, 16)}
  assert loader_shards(two_blocks, 16, 0) == ([0], 2)  # default: one per process
  assert loader_shards(two_blocks, 16, 4) == ([0, 1], 4)
  # tensor across the two processes: both hold every row, and read the same shards.
  assert loader_shards({0: (0, 16), 1: (0, 16)}, 16, 0) == ([0], 1)
  with pytest.raises(ConfigError, match=re.escape('data.loader_shards=3 does not fit the batch')):
    loader_shards(two_blocks, 16, 3)
  with pytest.raises(ConfigError, match=re.escape('data.loader_shards=1 does not fit the batch')):
    loader_shards(two_blocks, 16, 1)  # one shard cannot be split between two processes


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_waiting_for_the_coordinator_gives_up_after_the_timeout():
  port = free_port()  # nothing listens here
  start = time.monotonic()
  with pytest.raises(DistributedError, match=f'could not reach the coordinator 127.0.0.1:{port} within '
                                            r'distributed.init_timeout_s=2s'):
    distributed.wait_for_coordinator(f'127.0.0.1:{port}', 2)
  assert 1.5 < time.monotonic() - start < 10
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    distributed.wait_for_coordinator(f'127.0.0.1:{server.getsockname()[1]}', 2)  # returns at once


# -- real processes ---------------------------------------------------------------------

STEPS = 8
TRAIN_FLAGS = [
    '--config=configs/tiny.py', f'--config.train.steps={STEPS}', '--config.train.log_interval=1',
    '--config.train.eval_steps=1', '--config.train.eval_interval=4', '--config.checkpoint.interval=4',
    '--config.optim.warmup_steps=1', '--config.parallel.data=1', '--config.parallel.fsdp=4',
    '--config.parallel.tensor=2',
    # A smaller model than tiny's: the processes are what is under test.
    '--config.model.num_layers=2', '--config.model.max_seq_len=64',
    # Two loader shards, so that 1 and 2 processes see the same batches.
    '--config.data.loader_shards=2',
]


def clean_env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('MAXLITE_', 'SLURM_'))}
  return dict(env, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def one_process(run_dir, *flags, timeout=300) -> str:
  result = subprocess.run([sys.executable, '-m', 'maxlite.train', *TRAIN_FLAGS,
                           f'--config.train.run_dir={run_dir}', *flags],
                          cwd=REPO_ROOT, env=clean_env(8), text=True, capture_output=True, timeout=timeout)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def launch(run_dir, *flags, via='env', grace_s=30, extra=()) -> subprocess.Popen:
  """2 processes x 4 CPU devices through the local launcher."""
  command = [sys.executable, 'launch/local.py', '--processes=2', '--cpu_devices=4', f'--via={via}',
             f'--grace_s={grace_s}', *extra, '--', sys.executable, '-m', 'maxlite.train', *TRAIN_FLAGS,
             f'--config.train.run_dir={run_dir}', *flags]
  return subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(1), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def two_processes(run_dir, *flags, via='env', timeout=400) -> str:
  process = launch(run_dir, *flags, via=via)
  out = process.communicate(timeout=timeout)[0]
  assert process.returncode == 0, out
  return out


def metrics(run_dir) -> tuple[dict, dict]:
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  train_losses = {r['step']: r['loss'] for r in records if 'loss' in r}
  assert len(train_losses) == len([r for r in records if 'loss' in r])  # one writer, no repeats
  return train_losses, {r['step']: r['val_loss'] for r in records if 'val_loss' in r}


def assert_same_losses(got: dict, expected: dict, steps):
  # Gloo sums across processes in another order than XLA within one process:
  # equal up to float32 rounding (a few ulp were measured), not bit for bit.
  assert sorted(got) == list(steps), got
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)


def resume_copy(run_dir, name: str, drop_step: int) -> pathlib.Path:
  copy = run_dir.parent / name
  shutil.copytree(run_dir, copy)
  shutil.rmtree(copy / 'checkpoints' / str(drop_step))
  # Keep only the records up to the remaining checkpoint, as a run that died there would.
  records = [line for line in (copy / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['step'] <= STEPS // 2]
  (copy / 'metrics.jsonl').write_text('\n'.join(records) + '\n')
  return copy


def test_two_processes_train_like_one_and_checkpoints_cross_process_counts(tmp_path):
  one_dir, two_dir = tmp_path / 'one', tmp_path / 'two'
  one_process(one_dir)
  # The SLURM code path, with srun's variables emulated on one machine.
  out = two_processes(two_dir, via='slurm')
  assert 'distributed: process 1 of 2 (slurm), coordinator 127.0.0.1:' in out
  assert 'in 2 process(es)' in out
  one_losses, one_val = metrics(one_dir)
  two_losses, two_val = metrics(two_dir)
  assert_same_losses(two_losses, one_losses, range(1, STEPS + 1))
  assert_same_losses(two_val, one_val, [4, STEPS])
  # Only process 0 logs; both take part in the checkpoint, each with its loader shard.
  assert not [line for line in out.splitlines() if line.startswith('[1] step ')]
  data_files = sorted(p.name for p in (two_dir / 'checkpoints' / str(STEPS) / 'data').glob('*.json'))
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']

  # 2 processes wrote step 4; 1 process resumes from it, and the other way round.
  resumed = resume_copy(two_dir, 'two_then_one', STEPS)
  out = one_process(resumed)
  assert 'from its checkpoint at step 4' in out and 'loader continues from its state at step 4' in out
  assert_same_losses(metrics(resumed)[0], one_losses, range(1, STEPS + 1))
  resumed = resume_copy(one_dir, 'one_then_two', STEPS)
  out = two_processes(resumed, via='env')
  assert 'loader continues from its state at step 4' in out
  assert_same_losses(metrics(resumed)[0], one_losses, range(1, STEPS + 1))


@pytest.mark.parametrize('killed', [1, 0])  # 0 also runs the coordinator
def test_a_killed_process_makes_the_other_exit(tmp_path, killed):
  # The launcher is told to wait 10 minutes before it steps in, so the time
  # measured is the surviving trainer's own.
  process = launch(tmp_path / 'run', '--config.train.steps=1000', '--config.distributed.heartbeat_timeout_s=10',
                   grace_s=600)
  pids, lines = {}, []
  for line in process.stdout:
    lines.append(line)
    if found := re.search(r'process (\d+): pid (\d+)', line):
      pids[int(found[1])] = int(found[2])
    if line.startswith('[0] step      2/'):
      break
  assert set(pids) == {0, 1}, ''.join(lines)
  os.kill(pids[killed], signal.SIGKILL)
  killed_at = time.monotonic()
  out = process.communicate(timeout=180)[0]
  waited = time.monotonic() - killed_at
  assert process.returncode != 0, out
  survivor = 1 - killed
  assert re.search(rf'process {survivor} exited with code -?[1-9]', out), out
  assert waited < 60, f'the surviving process took {waited:.0f}s to exit'
  print(f'process {survivor} exited {waited:.1f}s after process {killed} was killed')


def test_an_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
  port = free_port()
  env = dict(clean_env(4), **{distributed.ENV_COORDINATOR: f'127.0.0.1:{port}',
                               distributed.ENV_NUM_PROCESSES: '2', distributed.ENV_PROCESS_ID: '1'})
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, '-m', 'maxlite.train', '--config=configs/tiny.py',
       f'--config.train.run_dir={tmp_path / "run"}', '--config.distributed.init_timeout_s=3'],
      cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=120)
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: could not reach the coordinator 127.0.0.1:{port} within distributed.init_timeout_s=3s '
      f'(ConnectionRefusedError: [Errno 111] Connection refused); is process 0 running?')
  assert time.monotonic() - start < 60
  assert not (tmp_path / 'run').exists()


# The local launcher (launch/local.py) ------------------------------------------------------------

def load_launcher():
  spec = importlib.util.spec_from_file_location('local_launcher', REPO_ROOT / 'launch' / 'local.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_launcher_gives_each_process_its_cluster_variables_and_nothing_inherited():
  local = load_launcher()
  base = {'PATH': '/bin', 'XLA_FLAGS': '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8',
          'MAXLITE_PROCESS_ID': '7', 'SLURM_PROCID': '5'}
  env = local.child_env(base, process_id=1, num_processes=2, port=1234, via='env', cpu_devices=4)
  assert env['XLA_FLAGS'] == '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4'
  assert env['JAX_PLATFORMS'] == 'cpu' and env['PATH'] == '/bin'
  assert env[distributed.ENV_COORDINATOR] == '127.0.0.1:1234'
  assert (env[distributed.ENV_NUM_PROCESSES], env[distributed.ENV_PROCESS_ID]) == ('2', '1')
  assert not [k for k in env if k.startswith('SLURM_')]
  # What it sets is what maxlite.distributed reads back.
  layout = distributed.resolve_layout('auto', env)
  assert (layout.num_processes, layout.process_id, layout.source) == (2, 1, 'env')

  env = local.child_env(base, process_id=1, num_processes=2, port=1234, via='slurm', gpus_per_process=2)
  assert env['CUDA_VISIBLE_DEVICES'] == '2,3' and 'JAX_PLATFORMS' not in env
  assert not [k for k in env if k.startswith('MAXLITE_') and k != distributed.ENV_COORDINATOR_PORT]
  layout = distributed.resolve_layout('auto', env)
  assert (layout.coordinator_address, layout.num_processes, layout.process_id, layout.source) == (
      '127.0.0.1:1234', 2, 1, 'slurm')
  assert layout.local_device_ids == (0, 1)

  env = local.child_env(base, process_id=1, num_processes=3, port=1234, via='env', gpus_per_process=2)
  assert env[distributed.ENV_LOCAL_DEVICE_IDS] == '2,3'
  assert distributed.resolve_layout('env', env).local_device_ids == (2, 3)


def run_launcher(*args, script: str, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'launch/local.py', *args, '--', sys.executable, '-c', script],
                        cwd=REPO_ROOT, env=clean_env(1), text=True, capture_output=True, timeout=timeout)


def test_launcher_relays_output_and_exits_with_the_failing_code():
  script = ('import os, sys; i = int(os.environ["MAXLITE_PROCESS_ID"]); '
            'print("hello from", i, "of", os.environ["MAXLITE_NUM_PROCESSES"]); sys.exit(6 if i == 2 else 0)')
  result = run_launcher('--processes=3', script=script)
  assert result.returncode == 6, result.stdout + result.stderr
  assert sorted(result.stdout.splitlines()) == ['[0] hello from 0 of 3', '[1] hello from 1 of 3',
                                                '[2] hello from 2 of 3']
  assert '[launch] process 2 exited with code 6' in result.stderr


def test_launcher_stops_the_survivors_after_the_grace_period():
  script = ('import os, sys, time; i = int(os.environ["MAXLITE_PROCESS_ID"]); '
            'sys.exit(5) if i == 1 else time.sleep(120)')
  start = time.monotonic()
  result = run_launcher('--processes=2', '--grace_s=1', script=script)
  assert time.monotonic() - start < 30
  assert result.returncode == 5, result.stderr
  assert '[launch] process 1 exited with code 5' in result.stderr
  assert '[launch] process 0 exited with code -15' in result.stderr  # SIGTERM


def test_launcher_passes_sigterm_on_to_every_process():
  script = ('import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (print("stopping"), '
            'sys.exit(0))); print("ready"); time.sleep(120)')
  process = subprocess.Popen([sys.executable, 'launch/local.py', '--processes=2', '--', sys.executable, '-c',
                              script], cwd=REPO_ROOT, env=clean_env(1), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  ready = 0
  for line in process.stdout:
    ready += line.endswith('ready\n')
    if ready == 2:
      break
  process.send_signal(signal.SIGTERM)
  out = process.communicate(timeout=30)[0]
  assert process.returncode == 0
  assert sorted(out.splitlines()) == ['[0] stopping', '[1] stopping']


def test_launcher_dry_run_and_usage_errors():
  result = run_launcher('--processes=2', '--via=slurm', '--cpu_devices=4', '--port=4321', '--dry_run',
                        script='raise SystemExit(1)')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('process 0: ') and 'SLURM_PROCID=0' in lines[0]
  assert 'SLURM_NTASKS=2' in lines[1] and 'SLURM_PROCID=1' in lines[1]
  assert f'{distributed.ENV_COORDINATOR_PORT}=4321' in lines[1]
  assert lines[2].startswith('command: ') and lines[2].endswith('-c raise SystemExit(1)')
  result = subprocess.run([sys.executable, 'launch/local.py', '--processes=2'], cwd=REPO_ROOT,
                          env=clean_env(1), text=True, capture_output=True, timeout=60)
  assert result.returncode == 2 and 'give the command to run after --' in result.stderr
