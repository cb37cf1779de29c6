"""End-to-end runs of configs/tiny.py through maxlite.train.train on 8 fake devices."""
import json
import math
import shutil

import pytest

from configs import tiny
from maxlite.config import ConfigError
from maxlite.data import embedded
from maxlite.data.pipeline import DataError
from maxlite.metrics import flops_per_token
from maxlite.train import TrainingError, train


def tiny_config(run_dir, **train_overrides):
  config = tiny.get_config()
  config.train.run_dir = str(run_dir)
  config.train.update(train_overrides)
  config.optim.warmup_steps = 1
  return config


def test_tiny_loss_falls_and_a_finished_run_is_left_alone(tmp_path, capsys):
  run_dir = tmp_path / 'run'
  config = tiny_config(run_dir, steps=60, log_interval=5, eval_interval=0, eval_steps=2,
                       micro_batch_size=16)
  history = train(config)
  out = capsys.readouterr().out
  assert 'compiled the train step in' in out and 'compiled the eval step in' in out  # both ahead of time
  losses = [h['loss'] for h in history if 'loss' in h]
  # Single steps are noisy: compare the first two logged losses with the last three.
  assert sum(losses[:2]) / 2 - sum(losses[-3:]) / 3 > 0.7, losses
  val_losses = [h['val_loss'] for h in history if 'val_loss' in h]
  # ln(264) = 5.58 is the loss of a uniform guess.
  assert len(val_losses) == 1 and val_losses[0] < math.log(264) - 2.0, val_losses
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == list(range(5, 61, 5))
  assert all(r['tokens_per_second'] > 0 for r in records if 'loss' in r)
  assert (run_dir / 'checkpoints' / '60').is_dir()

  # A second start finds the final checkpoint and does nothing to the run.
  before = sorted(p.relative_to(run_dir) for p in run_dir.rglob('*'))
  assert train(config) == []
  assert sorted(p.relative_to(run_dir) for p in run_dir.rglob('*')) == before


def test_existing_run_dir_is_never_overwritten(tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  (run_dir / 'notes.txt').write_text('mine')
  with pytest.raises(TrainingError, match='fresh_start'):
    train(tiny_config(run_dir, steps=2, eval_steps=0))
  assert (run_dir / 'notes.txt').read_text() == 'mine'

  train(tiny_config(run_dir, steps=2, eval_steps=0, fresh_start=True))
  moved = [p for p in tmp_path.iterdir() if p.name.startswith('run.old-')]
  assert len(moved) == 1 and (moved[0] / 'notes.txt').read_text() == 'mine'
  assert (run_dir / 'checkpoints' / '2').is_dir()


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
  config = tiny_config(tmp_path / 'run', steps=6, log_interval=3, eval_steps=0)
  config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 1e30, 0, 0.0
  # The update of step 2 already has non-finite gradients, before any loss overflows.
  with pytest.raises(TrainingError, match=r'loss is (nan|inf) at step [23]\b|the update of step [12] '):
    train(config)
  assert not (tmp_path / 'run' / 'checkpoints' / '3').exists()


def test_nonfinite_skip_policy_skips_updates_then_stops_after_too_many(tmp_path, capsys):
  config = tiny_config(tmp_path / 'run', steps=8, log_interval=1, eval_steps=0,
                       nonfinite='skip', max_skipped_in_a_row=3)
  # Step 1's update (finite gradients, lr 1e30) leaves finite but huge weights;
  # from step 2 on the loss overflows and every update is skipped.
  config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 1e30, 0, 0.0
  config.optim.min_lr = 0.0
  with pytest.raises(TrainingError, match=r'3 updates in a row were skipped at step 4 '
                                          r'\(train\.max_skipped_in_a_row=3\); stopping'):
    train(config)
  out = capsys.readouterr().out
  for step in (2, 3, 4):
    assert f'warning: step {step}: loss' in out and 'the update was skipped' in out
  assert 'warning: step 1:' not in out


def test_bad_data_fails_before_the_run_dir_is_touched(tmp_path):
  config = tiny_config(tmp_path / 'run', steps=2, eval_steps=0)
  config.data.source = str(tmp_path / 'missing')
  with pytest.raises(DataError, match=r'missing/metadata\.json does not exist'):
    train(config)
  config = tiny_config(tmp_path / 'run', steps=2, eval_steps=0)
  config.model.vocab_size = 200
  with pytest.raises(ConfigError, match=r'model\.vocab_size=200 is smaller than the vocabulary \(264\) '
                                        r'of the byte tokenizer of '):
    train(config)
  assert not (tmp_path / 'run').exists()


def test_a_weighted_mixture_trains_and_logs_tokens_per_source(tmp_path):
  prepared = embedded.prepare('', tiny.get_config().data.embedded_max_bytes, 0.02)
  for name in ('code', 'more_code'):
    shutil.copytree(prepared, tmp_path / name)
  config = tiny_config(tmp_path / 'run', steps=4, log_interval=2, eval_steps=1)
  config.data.source = f'{tmp_path / "code"}:0.75,{tmp_path / "more_code"}:0.25'
  config.logging.peak_flops_per_device = 1e12  # a peak, so that MFU is logged on CPU too
  history = train(config)
  logged = [h for h in history if 'loss' in h]
  assert [h['step'] for h in logged] == [2, 4]
  # Both conventions, in the ratio of their FLOPs per token.
  flops, causal = (flops_per_token(config.model, config.data.seq_len, causal=c) for c in (False, True))
  assert logged[-1]['mfu'] / logged[-1]['mfu_causal'] == pytest.approx(flops / causal)
  assert logged[-1]['mfu'] == pytest.approx(flops * logged[-1]['tokens_per_second'] / (8 * 1e12))
  # Concat packing leaves no padding: every token of every row is counted once.
  assert logged[-1]['tokens/code'] + logged[-1]['tokens/more_code'] == 4 * 8 * 128
  assert any('val_loss' in h for h in history)
