"""Llama 109M on rows of 32,768 tokens over 8 GPUs: context=8, one row per micro-step.

    python -m maxlite.train --config=configs/llama_109m_32k.py

Each GPU holds 4096 tokens of every row (chunks c and 15 - c of 16, which
balances the causal attention work) and all-gathers the row's keys and values
over `context` in each layer: per micro-step 12 layers x K and V x 32768
tokens x 768 (12 kv heads) in bfloat16, 7/8 of 1.2 GB received forward, the
same again in the backward's recompute, and dK, dV reduce-scattered. The
Pallas flash kernel takes each query's place in the row, so
causal and document masks stay exact. 8 micro-steps of one row make a step
of 262,144 tokens, the batch of the 512-token config (64 x 512 = 32,768) x 8.
"""
from configs import llama_109m


def get_config():
  config = llama_109m.get_config()
  config.model.max_seq_len = 32_768  # data.seq_len follows
  config.model.rope_theta = 500_000.0  # as Llama 3 for long rows
  config.model.attention = 'pallas'  # skips the masked tiles: half the causal work, and documents
  config.parallel.data = 1
  config.parallel.context = 8
  config.train.run_dir = 'runs/llama_109m_32k'
  config.train.micro_batch_size = 1
  config.train.grad_accum_steps = 8
  config.train.steps = 500
  config.optim.warmup_steps = 50
  config.checkpoint.interval = 100
  return config
