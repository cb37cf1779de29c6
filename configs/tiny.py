"""The embedded default: a byte-level Llama on the Python standard library's source.

    python -m maxlite.train --config=configs/tiny.py

No download and no prepared files. On a 2-core laptop CPU it runs 300 steps in
about a minute; the train loss falls from ~5.6 (ln 264) to about 2.3 and the
validation loss follows it.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.model.num_kv_heads = 2  # exercise grouped-query attention
  config.train.run_dir = 'runs/tiny'
  config.train.steps = 300
  config.train.eval_interval = 100
  config.checkpoint.interval = 150
  return config
