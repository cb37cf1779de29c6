"""The embedded default: a byte-level Llama on the Python standard library's source.

    python -m maxlite.train --config=configs/tiny.py

No download: the first run tokenizes the stdlib into ~/.cache/maxlite (a few
seconds) and later runs reuse it. On a 2-core CPU it takes about a minute
(200 steps at ~0.2 s, plus ~15 s of start-up and compiling); the train loss
falls from ~5.6 (ln 264) to about 2.5 and the validation loss to about 2.7.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.model.num_kv_heads = 2  # exercise grouped-query attention
  # Unrolled: on a CPU the layers' independent matmuls then run side by side,
  # which cut the step's CPU time by ~13% (benchmarks/NOTES.md); 4 layers
  # compile as fast either way. The parameters are stacked the same.
  config.model.scan_layers = False
  config.train.run_dir = 'runs/tiny'
  config.train.steps = 200
  config.train.micro_batch_size = 8
  config.train.eval_interval = 100
  config.checkpoint.interval = 100
  return config
