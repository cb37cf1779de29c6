"""A tiny Mixture of Experts: configs/tiny.py with every MLP made 4 experts, top-2.

    python -m maxlite.train --config=configs/moe_tiny.py
    python -m maxlite.train --config=configs/moe_tiny.py --config.parallel.expert=4   # 4+ devices

Each expert is half the dense MLP's width, so a token's active parameters
equal tiny.py's (and its FLOPs per token); the experts hold twice its MLP
weights. On a CPU a step takes about twice tiny.py's (XLA:CPU runs each
ragged_dot group as a masked dense matmul; benchmarks/NOTES.md), so a couple
of minutes; --config.model.moe_capacity_factor=1.25
--config.model.moe_dispatch=all_to_all comes close to tiny.py's speed. The
log line adds the balance loss and the load (the most loaded expert's
assignments over the mean).
"""
from configs import tiny


def get_config():
  config = tiny.get_config()
  model = config.model
  model.num_experts = 4
  model.experts_per_token = 2
  model.moe_intermediate_size = model.intermediate_size // 2
  config.train.run_dir = 'runs/moe_tiny'
  return config
