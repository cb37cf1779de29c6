"""maxlite.model.remat: what each policy saves shows in how many matmuls the train step
runs (the backward pass recomputes the rest); saving less trains the same numbers in less
memory; and offload_attention places the attention outputs in pinned host memory on GPUs."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.batches import make_batch
from configs import base
from maxlite import config as config_lib, mesh as mesh_lib, optim, state as state_lib, step as step_lib
from maxlite.model import remat
from maxlite.model.llama import LlamaConfig

ONE_DEVICE = {'data': 1, 'fsdp': 1, 'tensor': 1, 'pipeline': 1}


def build(policy: str, compute_dtype: str = 'float32'):
  """(the jitted steps, the mesh, the model config) of a 2-layer model under `policy`, on one device."""
  config = base.get_config()
  config.model.remat, config.model.num_layers, config.model.max_seq_len = policy, 2, 64
  config.model.compute_dtype = compute_dtype
  config.train.micro_batch_size = 4
  mesh = mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1])
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, ONE_DEVICE))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, 10, logical)
  with jax.set_mesh(mesh):
    return step_lib.build(config, model_cfg, mesh, tx), mesh, model_cfg, tx


def test_policies_train_alike_and_recompute_what_they_do_not_save():
  steps, mesh, model_cfg, tx = build('none')
  with jax.set_mesh(mesh):  # one initial state for every policy: remat changes no parameter
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, False)
    batch = {k: jax.device_put(v, steps.batch_sharding)
             for k, v in make_batch(4, 64, 264, documents=2).items()}
  dots, temps, metrics = {}, {}, {}
  for policy in remat.POLICIES:
    steps, mesh, _, _ = build(policy)
    with jax.set_mesh(mesh):
      lowered = steps.train.lower(state, batch)
      # jax.checkpoint writes the recomputation into the program XLA receives;
      # the layer loop's body appears once, so these are per-layer counts plus the rest.
      dots[policy] = lowered.as_text().count('stablehlo.dot_general')
      if policy in ('none', 'full', 'offload_attention'):  # compiling every policy takes long
        # Unoptimised machine code compiles fast, and computes the same numbers.
        compiled = lowered.compile({'xla_backend_optimization_level': 0})
        _, m = compiled(jax.tree.map(jnp.copy, state), batch)  # the step donates its state
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
        metrics[policy] = (float(m['loss']), float(m['grad_norm']))
  for policy, values in metrics.items():
    np.testing.assert_allclose(values, metrics['none'], rtol=1e-5, err_msg=policy)
  # A block runs 7 weight matmuls and attention's 2 (scores, weighted values);
  # no gradient needs the output of the last (down), so it is never recomputed.
  # full recomputes the other 8; save_qkv the 5 after q, k, v; save_attention
  # o, gate, up and the scores (for the softmax's gradient); save_matmuls the 2
  # of attention; offloading saves what save_attention saves.
  recomputed = {policy: count - dots['none'] for policy, count in dots.items()}
  assert recomputed == {'none': 0, 'full': 8, 'save_matmuls': 2, 'save_qkv': 5, 'save_attention': 4,
                        'offload_attention': 4}
  assert dots['offload_attention'] == dots['save_attention']
  assert temps['full'] < temps['none']


def test_offload_attention_moves_the_attention_outputs_to_pinned_host_memory_on_gpus():
  """On CPU host memory is the device's, so there is nothing to move; the CUDA
  lowering (from this machine) shows the placements a GPU run gets."""
  placements = {}
  for policy in ('save_attention', 'offload_attention'):
    steps, mesh, _, _ = build(policy, 'bfloat16')
    with jax.set_mesh(mesh):
      lowered = steps.train.trace(steps.abstract_state, steps.batch_shapes(4, 64)).lower(
          lowering_platforms=('cuda',))
    placements[policy] = re.findall(
        r'annotate_device_placement\(\S+\) \{[^}]*_xla_buffer_placement = "pinned_host"\}.*'
        r'-> tensor<(\S+)>', lowered.as_text())
  assert placements['save_attention'] == []
  # [batch, length, heads, head_dim] of attention's output, in bf16, inside the layer loop.
  assert placements['offload_attention'] == ['4x64x4x32xbf16']
