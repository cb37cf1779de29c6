"""The tiny model on rows of 8192 tokens, each split over 8 devices (context parallelism).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m maxlite.train --config=configs/long_context_tiny.py

Runs on a laptop CPU's 8 fake devices: every row of 8192 tokens is cut into
16 chunks, and each device holds two of them (1024 tokens: chunks c and 15 - c,
so that the causal mask gives all devices the same attention work), gathering
the row's keys and values in each layer. Packed documents of the Python
standard library attend only within themselves across the devices' chunks.
The train step compiles in about 2.5 minutes on a 2-core CPU and holds 612
MiB of temporaries per fake device; the loss is about 5.4 at step 1 (ln 264
= 5.58) and 4.95 at step 2. A step of 8192 tokens took 6-9 minutes there,
on a machine shared with other jobs: this config checks that long rows run,
not how fast.
"""
from configs import tiny


def get_config():
  config = tiny.get_config()
  config.model.max_seq_len = 8192  # data.seq_len follows
  config.model.rope_theta = 500_000.0  # long rows: slower-turning rotary frequencies (as Llama 3)
  config.parallel.data = 1
  config.parallel.context = 8
  config.train.run_dir = 'runs/long_context_tiny'
  config.train.micro_batch_size = 1
  config.train.steps = 40
  config.train.eval_interval = 20
  config.train.eval_steps = 2
  config.train.log_interval = 5
  config.checkpoint.interval = 20
  config.optim.warmup_steps = 5
  return config
