"""The FLOP count behind MFU: hand-computed for a small model under both conventions,
and in agreement with XLA's cost analysis of the compiled step."""
import functools

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from maxlite import mesh as mesh_lib, metrics, optim, state as state_lib, step as step_lib
from maxlite.model.llama import LlamaConfig


def test_flops_per_token_by_hand_under_both_conventions():
  model = ml_collections.ConfigDict(dict(
      vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=0,
      intermediate_size=16))
  seq_len = 32
  # Per layer: q 8x(2x4) + k, v 8x(1x4) each + o (2x4)x8 = 64 + 64 + 64 = 192, and the
  # MLP's gate, up, down 3 x 8x16 = 384; two layers and the 10x8 LM head: 1232.
  assert metrics.matmul_params(model) == 2 * (192 + 384) + 80 == 1232
  matmuls = 6 * 1232  # 7392
  attention = 12 * 2 * 32 * 2 * 4  # 12 x layers x seq x heads x head_dim = 6144
  assert metrics.flops_per_token(model, seq_len) == matmuls + attention == 13536  # PaLM
  assert metrics.flops_per_token(model, seq_len, causal=True) == matmuls + attention / 2 == 10464
  # 1e6 tokens/s on 2 devices of 1e10 FLOP/s peak.
  assert metrics.mfu(13536, 1e6, 2, 1e10) == pytest.approx(0.6768)
  assert metrics.mfu(10464, 1e6, 2, 1e10) == pytest.approx(0.5232)


def test_flops_per_token_matches_xla_cost_analysis():
  config = base.get_config()
  model = config.model
  model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads = 256, 2, 4, 2
  model.intermediate_size, model.max_seq_len = 768, 256
  model.scan_layers = False  # XLA's cost analysis counts a while-loop body once
  model.remat = 'none'
  batch = 4
  mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'pipeline': 1}, jax.devices()[:1])
  model_cfg = LlamaConfig.from_config(model)
  _, abstract, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, 10, logical)
  layout = step_lib.Layout.create(mesh, logical, abstract)
  with jax.set_mesh(mesh):
    graphdef, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, False)
    tokens = np.zeros((batch, model.max_seq_len), np.int32)
    batch_arrays = {'inputs': tokens, 'targets': tokens, 'segment_ids': tokens + 1,
                    'positions': np.broadcast_to(np.arange(model.max_seq_len), tokens.shape),
                    'loss_mask': tokens + 1}
    compiled = jax.jit(functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx,
        schedule=optim.learning_rate_schedule(config.optim, 10),
        settings=step_lib.StepSettings(), layout=layout)).lower(state, batch_arrays).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  xla_flops = analysis['flops']
  ours = metrics.flops_per_token(model, model.max_seq_len) * batch * model.max_seq_len
  print(f"maxlite {ours:.4g} vs XLA {xla_flops:.4g} FLOPs: ratio {ours / xla_flops:.3f}")
  assert abs(ours - xla_flops) / xla_flops < 0.15, (ours, xla_flops)


def test_mfu_uses_the_peak_table_and_override():
  assert metrics.peak_flops_per_device('NVIDIA H100 80GB HBM3') == 989e12
  assert metrics.peak_flops_per_device('NVIDIA H100 PCIe') == 756e12
  assert metrics.peak_flops_per_device('cpu') is None
  assert metrics.peak_flops_per_device('cpu', override=1e12) == 1e12
  assert metrics.mfu(1e9, 1e3, 2, 1e12) == 0.5
  assert metrics.mfu(1e9, 1e3, 2, None) is None
