"""Checkpoints through real runs of configs/tiny.py: exact resume, other meshes, damaged
steps, retention, and a graceful stop on a real signal to a real training process."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from maxlite.train import train
from tests.test_train import tiny_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# tiny, smaller still: what is under test is the checkpoint, not the model.
SMALL_MODEL = {'num_layers': 2, 'max_seq_len': 64}


def losses(history) -> dict[int, float]:
  return {h['step']: h['loss'] for h in history if 'loss' in h}


def logged_losses(run_dir) -> dict[int, float]:
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in records if 'loss' in r}


def step_dirs(run_dir) -> list[int]:
  return sorted(int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit())


def resume_copy(run_dir, name: str, drop_steps) -> pathlib.Path:
  """A copy of the run that "died" after its earlier checkpoints."""
  copy = run_dir.parent / name
  shutil.copytree(run_dir, copy)
  for step in drop_steps:
    shutil.rmtree(copy / 'checkpoints' / str(step))
  return copy


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """20 steps on fsdp=8 with checkpoints every 5 steps, kept forever every 10."""
  run_dir = tmp_path_factory.mktemp('straight') / 'run'
  config = tiny_config(run_dir, steps=20, log_interval=1, eval_steps=0)
  config.model.update(SMALL_MODEL)
  config.parallel.data, config.parallel.fsdp = 1, 8
  config.checkpoint.interval, config.checkpoint.max_to_keep, config.checkpoint.keep_every = 5, 2, 10
  return config, run_dir, losses(train(config))


def test_the_newest_are_kept_plus_every_kth_forever(straight_run):
  _, run_dir, _ = straight_run
  assert step_dirs(run_dir) == [10, 15, 20]


def test_ten_steps_then_a_resume_repeat_the_straight_losses_exactly(straight_run, capsys):
  config, run_dir, straight = straight_run
  resumed_dir = resume_copy(run_dir, 'resumed', [15, 20])
  config = config.copy_and_resolve_references()
  config.train.run_dir = str(resumed_dir)
  resumed = losses(train(config))
  assert resumed == {step: straight[step] for step in range(11, 21)}
  out = capsys.readouterr().out
  assert 'from its checkpoint at step 10' in out and 'loader continues from its state at step 10' in out


def test_a_muon_run_resumes_exactly_on_a_sharded_mesh(tmp_path):
  # Muon's state (momentum of the matrices, Adam's moments of the rest, under
  # optax.partition's masks) is sharded like the params and restored exactly.
  config = tiny_config(tmp_path / 'run', steps=6, log_interval=1, eval_steps=0, eval_interval=0)
  config.model.update(SMALL_MODEL)
  config.optim.name = 'muon'
  config.parallel.data, config.parallel.fsdp, config.parallel.tensor = 2, 2, 2
  config.checkpoint.interval = 3
  straight = losses(train(config))
  resumed_dir = resume_copy(tmp_path / 'run', 'resumed', [6])
  config.train.run_dir = str(resumed_dir)
  assert losses(train(config)) == {step: straight[step] for step in range(4, 7)}


def test_loader_state_for_another_number_of_shards_gives_a_fresh_shuffle(straight_run, capsys):
  # A loader shard's state covers its own slice of the documents, so the one
  # shard of the straight run does not restore onto two: the loader reshuffles
  # and says so. (Two default processes make two shards.)
  config, run_dir, straight = straight_run
  config = config.copy_and_resolve_references()
  config.train.run_dir = str(resume_copy(run_dir, 'regrouped', [15, 20]))
  config.data.loader_shards = 2
  regrouped = losses(train(config))
  assert sorted(regrouped) == list(range(11, 21))
  assert regrouped != {step: straight[step] for step in range(11, 21)}
  assert 'has 1 loader shards, this run 2; starting a fresh shuffle' in capsys.readouterr().out


def test_a_checkpoint_from_fsdp8_resumes_on_data4_tensor2(straight_run):
  config, run_dir, straight = straight_run
  config = config.copy_and_resolve_references()
  config.train.run_dir = str(resume_copy(run_dir, 'data4_tensor2', [15, 20]))
  config.parallel.update({'data': 4, 'fsdp': 1, 'tensor': 2})
  resumed = losses(train(config))
  # Another mesh reduces in another order: equal up to float32 rounding.
  np.testing.assert_allclose([resumed[s] for s in range(11, 21)],
                             [straight[s] for s in range(11, 21)], rtol=2e-5)


def run_cli(run_dir, *overrides, devices: int = 8, **popen):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  command = [sys.executable, '-m', 'maxlite.train', '--config=configs/tiny.py',
             f'--config.train.run_dir={run_dir}', '--config.train.eval_steps=0',
             '--config.train.log_interval=1', '--config.optim.warmup_steps=1',
             *[f'--config.model.{field}={value}' for field, value in SMALL_MODEL.items()], *overrides]
  return subprocess.Popen(command, **{'cwd': REPO_ROOT, 'env': env, 'text': True,
                                      'stdout': subprocess.PIPE, 'stderr': subprocess.STDOUT, **popen})


def test_a_checkpoint_from_fsdp8_resumes_on_one_device(straight_run):
  _, run_dir, straight = straight_run
  one_device = resume_copy(run_dir, 'one_device', [15, 20])
  process = run_cli(one_device, '--config.train.steps=20', '--config.parallel.data=-1', devices=1)
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, out
  assert "mesh: {'data': 1, 'fsdp': 1, 'context': 1, 'expert': 1, 'tensor': 1, 'pipeline': 1} over 1 x cpu" in out
  resumed = logged_losses(one_device)
  np.testing.assert_allclose([resumed[s] for s in range(11, 21)],
                             [straight[s] for s in range(11, 21)], rtol=2e-5)


def damage_truncate(step_dir):
  """Cuts the biggest array file of the state to half its size."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])


def damage_delete_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').unlink()


@pytest.mark.parametrize('damage', [damage_truncate, damage_delete_metadata])
def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_used(
    straight_run, damage, capsys):
  config, run_dir, straight = straight_run
  damaged_dir = resume_copy(run_dir, damage.__name__, [20])
  damage(damaged_dir / 'checkpoints' / '15')
  # A save that died before Orbax renamed it into place is not a checkpoint at all.
  (damaged_dir / 'checkpoints' / '20.orbax-checkpoint-tmp-1234').mkdir()
  config = config.copy_and_resolve_references()
  config.train.run_dir = str(damaged_dir)
  resumed = losses(train(config))
  assert resumed == {step: straight[step] for step in range(11, 21)}
  captured = capsys.readouterr()
  out = captured.out
  assert 'warning: checkpoint 15 is unreadable' in out and 'from its checkpoint at step 10' in out
  # One line on the console; the libraries' tracebacks go to the run's log file.
  console = out + captured.err
  assert 'Traceback' not in console and sum('checkpoint 15' in line for line in console.splitlines()) == 1
  assert 'checkpoint 15 is unreadable' in (damaged_dir / 'maxlite.log').read_text()
  moved = list((damaged_dir / 'unreadable_checkpoints').iterdir())
  assert len(moved) == 1 and moved[0].name.startswith('15-')
  assert step_dirs(damaged_dir) == [10, 15, 20]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_exits_zero(straight_run, tmp_path, sig):
  config, _, straight = straight_run
  run_dir = tmp_path / 'run'
  # No periodic checkpoints: the only save before step 20 is the one the signal asks for.
  process = run_cli(run_dir, '--config.train.steps=20', '--config.parallel.data=1',
                    '--config.parallel.fsdp=8', '--config.checkpoint.interval=0')
  for line in process.stdout:
    if line.startswith('step      3/20'):
      process.send_signal(sig)
      break
  out = process.communicate(timeout=120)[0]
  assert process.returncode == 0, out
  stopped_at = step_dirs(run_dir)
  assert len(stopped_at) == 1 and 3 <= stopped_at[0] < 20, stopped_at
  assert f'{sig.name} received: saved step {stopped_at[0]} of 20' in out
  if sig == signal.SIGINT:
    return  # the stop is the same for both signals; resume once

  # Resumed, the run repeats the uninterrupted run's losses exactly.
  process = run_cli(run_dir, '--config.train.steps=20', '--config.parallel.data=1',
                    '--config.parallel.fsdp=8', '--config.checkpoint.interval=0')
  out = process.communicate(timeout=300)[0]
  assert process.returncode == 0, out
  assert logged_losses(run_dir) == {step: straight[step] for step in range(1, 21)}
