"""Weights & Biases logging of a run (config.logging.wandb_*), process 0 only.

The W&B run's id is kept in <run_dir>/wandb_id, written on the first start, so
that a resumed run_dir continues the same W&B run (wandb.init(resume='allow')).
The run records the resolved config and the run directory, and every scalar
that metrics.jsonl gets, at the same step. WANDB_MODE=offline writes it under
<run_dir>/wandb/ for a later `wandb sync`.
"""
import json
import pathlib
import secrets
import string

import jax

ID_FILE = 'wandb_id'


def run_id(run_dir: pathlib.Path) -> str:
  """The W&B run id of run_dir, created (and saved) on first use."""
  path = pathlib.Path(run_dir) / ID_FILE
  if path.is_file():
    return path.read_text().strip()
  # W&B's own id format: 8 lowercase letters and digits.
  new = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  path.write_text(new + '\n')
  return new


class WandbLogger:
  """Sends scalars to W&B; a no-op on processes other than 0."""

  def __init__(self, run_dir: pathlib.Path, config, logging_cfg):
    self.run = None
    if jax.process_index() != 0:
      return
    try:
      import wandb
    except ImportError:
      raise ImportError("logging.wandb_project is set but wandb is not installed: "
                        "pip install 'maxlite[wandb]'") from None
    run_dir = pathlib.Path(run_dir)
    tags = [t.strip() for t in logging_cfg.wandb_tags.split(',') if t.strip()]
    self.run = wandb.init(
        project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity or None,
        name=logging_cfg.wandb_run_name or run_dir.name, tags=tags or None,
        id=run_id(run_dir), resume='allow', dir=str(run_dir),
        config={**json.loads(config.to_json_best_effort()), 'run_dir': str(run_dir.resolve())})

  def log(self, step: int, scalars: dict):
    if self.run is not None:
      self.run.log(dict(scalars), step=step)

  def close(self):
    if self.run is not None:
      self.run.finish()
      self.run = None
