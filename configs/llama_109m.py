"""Llama 109M: the CSCS tutorial model, 12 layers x 768, GPT-2 vocabulary size.

    python -m maxlite.train --config=configs/llama_109m.py

Meant for one or more GPUs (bfloat16 compute, float32 master weights). Until a
prepared dataset is configured it trains on the embedded byte corpus, whose ids
all fit the 50257-entry vocabulary.
"""
from configs import base


def get_config():
  config = base.get_config()
  model = config.model
  model.vocab_size = 50257
  model.hidden_size = 768
  model.num_layers = 12
  model.num_heads = 12
  model.num_kv_heads = 12
  model.intermediate_size = 1536
  model.max_seq_len = 512
  model.tie_embeddings = True
  model.compute_dtype = 'bfloat16'

  config.train.run_dir = 'runs/llama_109m'
  config.train.steps = 1500
  config.train.micro_batch_size = 64
  config.train.eval_interval = 250
  config.train.eval_steps = 8
  config.train.log_interval = 25

  optim = config.optim
  optim.lr = 1e-3
  optim.min_lr = 1e-5
  optim.warmup_steps = 150
  optim.decay = 'cosine'
  optim.weight_decay = 0.01
  optim.b1, optim.b2, optim.eps = 0.9, 0.95, 1e-8
  optim.grad_clip = 1.0

  config.checkpoint.interval = 500
  return config
