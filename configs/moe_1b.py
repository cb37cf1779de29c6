"""A GPU-shaped Mixture of Experts: 16 layers x 1024, 8 experts, top-2.

    python -m maxlite.train --config=configs/moe_1b.py --config.parallel.expert=8   # 8 GPUs

About 1.1B parameters in total (1.0B of them in the experts) and 0.35B active
per token (attention, embedding, 2 of 8 experts), so FLOPs and MFU count 0.35B
(maxlite.metrics). Experts are split over `expert`; on GPUs the dropless
all-to-all dispatch (jax.lax.ragged_all_to_all) moves only routed rows.
"""
from configs import llama_109m


def get_config():
  config = llama_109m.get_config()
  model = config.model
  model.hidden_size = 1024
  model.num_layers = 16
  model.num_heads = 16
  model.num_kv_heads = 8
  model.intermediate_size = 2560
  model.num_experts = 8
  model.experts_per_token = 2
  model.moe_intermediate_size = 2560
  model.moe_dispatch = 'all_to_all'
  model.remat = 'save_matmuls'
  config.train.run_dir = 'runs/moe_1b'
  config.train.micro_batch_size = 32
  return config
