"""Faults and bad input, as a new user meets them: each gets one line naming what went
wrong, nothing the user had is lost, and "run the same command again" works after a
crash. (Bad data files: tests/test_pipeline.py; damaged checkpoints: test_checkpoint.py.)
"""
import hashlib
import os
import resource
import signal
import subprocess

import jax
import numpy as np
import pytest

from maxlite import checkpoint, config as config_lib, state as state_lib
from maxlite.model.llama import LlamaConfig
from maxlite.train import TrainingError, train
from tests.test_checkpoint import logged_losses, run_cli, step_dirs
from tests.test_train import tiny_config


def small(run_dir, **train_overrides):
  """tiny, smaller still: these tests are about what happens around the steps."""
  config = tiny_config(run_dir, eval_steps=0, log_interval=1, **train_overrides)
  config.model.num_layers, config.model.max_seq_len = 2, 64
  return config


def saved_params(run_dir, step):
  _, saved = checkpoint.read_config(run_dir, step)
  cfg = LlamaConfig.from_config(saved.model)
  return checkpoint.load_params(run_dir, step, state_lib.abstract_model(cfg)[1],
                                jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_a_nonfinite_update_is_never_saved_and_a_sane_rerun_resumes(tmp_path, capsys):
  """lr=1e6: the loss of step 2 is still finite but its gradients are not; the
  check looks at the state the update left, so step 2 is never saved."""
  run_dir = tmp_path / 'run'
  config = small(run_dir, steps=6)
  config.optim.lr, config.optim.warmup_steps, config.optim.min_lr = 1e6, 0, 0.0
  config.checkpoint.interval = 1
  with pytest.raises(TrainingError, match=r'the update of step (\d+) .* left the parameters or optimizer '
                                          r'state non-finite; stopping before anything is saved'):
    train(config)
  saved = step_dirs(run_dir)
  assert saved, 'the first, finite steps are saved'
  for step in saved:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(run_dir, step))), step

  # The same run with a sane learning rate resumes from the last finite step.
  config = config.copy_and_resolve_references()
  config.optim.lr, config.optim.warmup_steps = 3e-3, 0
  capsys.readouterr()
  try:
    train(config)
  except TrainingError:  # the weights of that step may still be too large to go on from
    pass
  assert f'from its checkpoint at step {saved[-1]}' in capsys.readouterr().out
  for step in step_dirs(run_dir):
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(run_dir, step))), step


def digest(folder) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('finished') / 'run'
  config = small(run_dir, steps=2)
  train(config)
  return config, run_dir


@pytest.mark.parametrize('override,named', [
    ({'model.hidden_size': 64}, r'model\.hidden_size=64 \(the checkpoint has 128\)'),
    ({'model.num_kv_heads': 4}, r'model\.num_kv_heads=4 \(the checkpoint has 2\)'),
    ({'optim.grad_clip': 0.0}, r'optim\.grad_clip=0\.0 \(the checkpoint has 1\.0'),
], ids=['hidden_size', 'num_kv_heads', 'grad_clip'])
def test_a_changed_model_or_optimizer_is_refused_and_the_run_dir_is_untouched(
    finished_run, override, named):
  config, run_dir = finished_run
  config = config.copy_and_resolve_references()
  config.train.steps = 4
  for field, value in override.items():
    group, name = field.split('.')
    config[group][name] = value
  before = digest(run_dir)
  with pytest.raises(config_lib.ConfigError, match=f'holds checkpoint 2 of another model or '
                                                   f'optimizer: .*{named}'):
    train(config)
  assert digest(run_dir) == before


def _limit_file_size():
  # Files past 1 MiB fail with EFBIG, as on a full disk, instead of killing the process.
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_save_that_fails_is_one_line_and_the_earlier_steps_stay(tmp_path, capsys):
  run_dir = tmp_path / 'run'
  config = small(run_dir, steps=2)
  config.checkpoint.interval = 2
  train(config)
  flags = ('--config.train.steps=4', '--config.model.num_layers=2', '--config.model.max_seq_len=64',
           '--config.checkpoint.interval=2')
  process = run_cli(run_dir, *flags, preexec_fn=_limit_file_size, stderr=subprocess.PIPE)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 1, out + err
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith('error: saving checkpoint 4 into ') and 'steps [2] are intact' in err, err
  assert 'Traceback' not in out, out
  assert step_dirs(run_dir) == [2]
  assert 'saving checkpoint 4 failed' in (run_dir / 'maxlite.log').read_text()

  config = config.copy_and_resolve_references()  # space again: the same run resumes
  config.train.steps = 4
  capsys.readouterr()
  train(config)
  assert 'from its checkpoint at step 2' in capsys.readouterr().out
  assert step_dirs(run_dir) == [2, 4]


def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path):
  run_dir = tmp_path / 'run'
  flags = ('--config.train.steps=4', '--config.model.num_layers=2', '--config.model.max_seq_len=64',
           '--config.checkpoint.interval=0')
  process = run_cli(run_dir, *flags)
  for line in process.stdout:
    if line.startswith('step      1/4'):
      os.kill(process.pid, signal.SIGKILL)
      break
  process.communicate(timeout=60)
  assert not step_dirs(run_dir) and (run_dir / 'metrics.jsonl').is_file()

  process = run_cli(run_dir, *flags)
  out = process.communicate(timeout=300)[0]
  assert process.returncode == 0, out
  assert f'{run_dir} stopped before its first checkpoint; starting it again' in out
  assert sorted(logged_losses(run_dir)) == [1, 2, 3, 4] and step_dirs(run_dir) == [4]
  moved = [p.name for p in run_dir.iterdir() if p.name.startswith('metrics.jsonl.old-')]
  assert len(moved) == 1  # the killed run's metrics, kept

  # Anything else in the run dir still stops a start without a checkpoint.
  (run_dir / 'notes.txt').write_text('mine')
  for step in step_dirs(run_dir):
    os.rename(run_dir / 'checkpoints' / str(step), tmp_path / f'step-{step}')
  with pytest.raises(TrainingError, match='holds no checkpoint to resume'):
    train(small(run_dir, steps=4))
