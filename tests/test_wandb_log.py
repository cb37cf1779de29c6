"""maxlite.wandb_log offline (WANDB_MODE=offline): a resumed run directory continues
its W&B run, and only process 0 logs. tests/test_lm_eval.py runs it inside training."""
import pathlib

import jax
import ml_collections
import pytest

from maxlite import wandb_log

wandb = pytest.importorskip('wandb')


def logging_cfg(**fields):
  return ml_collections.ConfigDict(dict(wandb_project='maxlite-test', wandb_entity='',
                                        wandb_run_name='', wandb_tags='x, y', **fields))


def test_a_resumed_run_dir_continues_the_same_wandb_run(tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = ml_collections.ConfigDict({'train': {'run_dir': str(tmp_path)}, 'seed': 3})
  ids = []
  for first_step in (1, 3):  # a first start, then a resume
    logger = wandb_log.WandbLogger(tmp_path, config, logging_cfg())
    assert logger.run.name == tmp_path.name and list(logger.run.tags) == ['x', 'y']
    assert logger.run.config['seed'] == 3 and logger.run.config['run_dir'] == str(tmp_path.resolve())
    ids.append(logger.run.id)
    for step in (first_step, first_step + 1):
      logger.log(step, {'loss': 1.0 / step})
    logger.close()
  assert ids[0] == ids[1] == (tmp_path / 'wandb_id').read_text().strip()
  runs = sorted((tmp_path / 'wandb').glob(f'offline-run-*-{ids[0]}'))
  # wandb names an offline run's folder by its start time to the second and the
  # run id: a resume within the same second appends to the first folder.
  assert 1 <= len(runs) <= 2 and all((r / f'run-{ids[0]}.wandb').stat().st_size > 0 for r in runs)


def test_only_process_zero_logs(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  logger = wandb_log.WandbLogger(tmp_path, ml_collections.ConfigDict(), logging_cfg())
  logger.log(1, {'loss': 1.0})
  logger.close()
  assert logger.run is None and not any(pathlib.Path(tmp_path).iterdir())
