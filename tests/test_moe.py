"""Mixture of Experts (maxlite.model.moe): the layer against a per-expert loop,
its auxiliary losses against their formulas, and expert parallelism against one device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from maxlite import config as config_lib, hlo, mesh as mesh_lib, metrics as metrics_lib, optim
from maxlite import state as state_lib, step as step_lib
from maxlite.model import moe
from maxlite.model.llama import LlamaConfig

SEQ_LEN, BATCH = 16, 8


# -- the layer against a per-expert loop in float64 --------------------------------------

def choices(params, x_ND, k):
  """Each token's top-k experts by probability plus bias, from concrete values (NumPy)."""
  probs = np.asarray(jax.nn.softmax(x_ND @ params['router']['kernel'], axis=-1))
  return np.argsort(-(probs + np.asarray(params['bias'])), axis=-1, kind='stable')[:, :k]


def loop_reference(params, x_ND, chosen, mask_N, capacity=None):
  """The MoE layer written as a loop over experts over every token, in float64.

  Returns (y, balance, router_z, dropped assignments). With `capacity`, an
  expert takes first choices before second ones, each in token order.
  """
  k = chosen.shape[1]
  logits = x_ND @ params['router']['kernel']
  probs = jax.nn.softmax(logits, axis=-1)
  num_tokens, num_experts = probs.shape
  weights = jnp.take_along_axis(probs, chosen, axis=-1)
  weights = weights / weights.sum(-1, keepdims=True)
  kept = np.ones(chosen.shape, bool)
  if capacity is not None:
    taken = np.zeros(num_experts, int)
    for choice in range(k):
      for n in range(num_tokens):
        e = chosen[n, choice]
        kept[n, choice] = taken[e] < capacity
        taken[e] += 1
  y = jnp.zeros_like(x_ND)
  for e in range(num_experts):
    h = jax.nn.silu(x_ND @ params['gate'][e]) * (x_ND @ params['up'][e])
    out = h @ params['down'][e]
    w = jnp.sum(jnp.where((chosen == e) & kept, weights, 0.0), axis=-1)
    y = y + w[:, None] * out
  if 'shared' in params:
    s = params['shared']
    shared = (jax.nn.silu(x_ND @ s['gate']['kernel']) * (x_ND @ s['up']['kernel'])) @ s['down']['kernel']
    y = y + jax.nn.sigmoid(x_ND @ params['shared_gate']['kernel']) * shared
  m = mask_N.astype(np.float64)
  tokens = m.sum()
  share = np.array([np.sum(m[:, None] * (chosen == e)) for e in range(num_experts)]) / (k * tokens)
  mean_prob = jnp.sum(probs * m[:, None], axis=0) / tokens
  balance = num_experts * jnp.sum(share * mean_prob)
  router_z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * m) / tokens
  dropped = np.sum(~kept * m[:, None])
  return y, balance, router_z, dropped


def _layer(k, shared=0, capacity_factor=0.0, dispatch='gather'):
  settings = moe.MoeSettings(hidden_size=16, num_experts=4, experts_per_token=k, expert_width=8,
                             shared_width=shared, capacity_factor=capacity_factor, dispatch=dispatch)
  with jax.enable_x64():
    layer = moe.MoE(settings, std=0.5, dtype='float64', rngs=nnx.Rngs(3), reduce_dtype='float64')
  return layer


@pytest.mark.parametrize('k,shared,capacity_factor', [(1, 0, 0.0), (2, 8, 0.0), (2, 0, 0.75)])
def test_layer_matches_per_expert_loop(k, shared, capacity_factor):
  """Forward, auxiliary losses and every gradient, top-1 and top-2, dropless
  and with a capacity that drops."""
  with jax.enable_x64():
    layer = _layer(k, shared, capacity_factor, 'all_to_all' if capacity_factor else 'gather')
    layer.bias[...] = jnp.asarray([0.0, 0.05, -0.05, 0.0])  # the bias moves choices, not weights
    graphdef, params = nnx.split(layer)
    x_BTD = jax.random.normal(jax.random.key(0), (2, 12, 16), jnp.float64)
    mask_BT = jnp.ones((2, 12), bool).at[1, 9:].set(False)  # padding is not counted
    cotangent = jax.random.normal(jax.random.key(1), x_BTD.shape, jnp.float64)
    capacity = None
    if capacity_factor:
      capacity = int(np.ceil(capacity_factor * 24 * k / 4))

    chosen = choices(nnx.to_pure_dict(params), x_BTD.reshape(24, 16), k)

    def ours(params, x):
      y, stats = nnx.merge(graphdef, params)(x, mask_BT)
      stats = jax.tree.map(lambda s: s[None], stats)
      aux = moe.aux_losses(stats, k)
      return jnp.sum(y * cotangent) + aux['balance'] + 0.5 * aux['router_z'], (y, aux)

    def reference(params, x):
      y, balance, router_z, dropped = loop_reference(nnx.to_pure_dict(params), x.reshape(24, 16), chosen,
                                                     np.asarray(mask_BT).reshape(-1), capacity)
      y = y.reshape(x.shape)
      return jnp.sum(y * cotangent) + balance + 0.5 * router_z, (y, balance, router_z, dropped)

    (_, (y, aux)), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(params, x_BTD)
    (_, (y_ref, balance, router_z, dropped)), grads_ref = jax.value_and_grad(
        reference, argnums=(0, 1), has_aux=True)(params, x_BTD)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(aux['balance'], balance, rtol=1e-10)
    np.testing.assert_allclose(aux['router_z'], router_z, rtol=1e-10)
    np.testing.assert_allclose(aux['dropped'] * k * 21, dropped, rtol=1e-10)
    if capacity_factor:
      assert dropped > 0  # the case exercises dropping
    grads = jax.tree.map(np.asarray, (nnx.to_pure_dict(grads[0]), grads[1]))
    grads_ref = jax.tree.map(np.asarray, (nnx.to_pure_dict(grads_ref[0]), grads_ref[1]))
    np.testing.assert_allclose(grads[0]['bias'], 0.0)  # choices carry no gradient
    del grads[0]['bias'], grads_ref[0]['bias']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), grads, grads_ref)


def test_flops_count_active_parameters_only():
  config = base.get_config()
  model = config.model
  dense = metrics_lib.matmul_params(model)
  # 8 experts of half the dense width, top-2: the dense MLP's matmuls plus the router's.
  model.num_experts, model.experts_per_token, model.moe_intermediate_size = 8, 2, model.intermediate_size // 2
  assert metrics_lib.matmul_params(model) == dense + model.num_layers * model.hidden_size * 8
  model.moe_every, model.moe_shared_expert_size = 2, 64  # half the layers, plus a gated shared expert
  per_layer = model.hidden_size * 8 + 3 * model.hidden_size * 64 + model.hidden_size
  assert metrics_lib.matmul_params(model) == dense + model.num_layers // 2 * per_layer


# -- expert parallelism against one device ---------------------------------------------------

def small_config(**parallel):
  config = base.get_config()
  model = config.model
  model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads = 32, 2, 4, 2
  model.intermediate_size, model.max_seq_len = 64, SEQ_LEN
  model.num_experts, model.experts_per_token, model.moe_intermediate_size = 8, 2, 16
  # Two MoE layers with a shared expert (a dense layer between MoE ones: test_generate.py).
  model.moe_every, model.moe_shared_expert_size = 1, 16
  config.train.steps, config.train.micro_batch_size = 10, BATCH
  config.optim.warmup_steps = 2
  config.parallel.data = 1
  config.parallel.update(parallel)
  return config


@functools.cache
def batch():
  tokens = np.random.default_rng(0).integers(0, 256, (BATCH, SEQ_LEN + 1), dtype=np.int32)
  segments = np.ones((BATCH, SEQ_LEN), np.int32)
  segments[:, -3:] = 0  # padding: neither routed statistics nor loss
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segments,
          'positions': np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)),
          'loss_mask': segments}


def run(config, devices=None):
  """(loss, MoE metrics, gradients) of one batch at the initial parameters: one compile per mesh.

  The train step itself (and the bias update from these counts) runs in the
  end-to-end test below, on a data x expert mesh.
  """
  devices = jax.devices() if devices is None else devices
  sizes = config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(sizes, devices)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, abstract, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  settings = step_lib.StepSettings(**step_lib.moe_settings(config.model))
  batch_sharding = mesh_lib.named_sharding(mesh, step_lib.BATCH, (BATCH, SEQ_LEN))
  layout = step_lib.Layout.create(mesh, logical, abstract, zero1=config.parallel.zero1,
                                  schedule=model_cfg.pipeline_schedule, batch_shape=(BATCH, SEQ_LEN))
  with jax.set_mesh(mesh):
    graphdef, logical, state, _ = state_lib.create_train_state(
        model_cfg, tx, mesh, seed=0, zero1=config.parallel.zero1)
    placed = jax.device_put(batch(), batch_sharding)
    compiled = jax.jit(
        lambda p, b: step_lib.gradients(p, graphdef, b, settings, layout, with_moe=True)).lower(
            state.params, placed).compile()
    grads, loss, _, metrics = compiled(state.params, placed)
  grads = state_lib.resize_vocab(jax.tree.map(np.asarray, grads), logical, config.model.vocab_size)
  found = hlo.collectives(compiled.as_text(), dict(mesh.shape))
  return float(loss), jax.tree.map(np.asarray, metrics), grads, found


@functools.cache
def reference():
  return run(small_config(), devices=jax.devices()[:1])


def relative_error(a, b):
  return np.linalg.norm(np.ravel(a - b)) / max(np.linalg.norm(np.ravel(b)), 1e-30)


# Few meshes, each combining several axes: every one is a compile.
MESHES = {
    'expert2_tensor2_data2_zero1': dict(expert=2, tensor=2, data=2, zero1=True),
    'expert4_fsdp2': dict(expert=4, fsdp=2),
    'expert8': dict(expert=8),
}


@pytest.mark.parametrize('name', MESHES)
def test_expert_parallel_matches_one_device(name):
  """Loss, auxiliary losses, tokens per expert and layer, and every gradient."""
  loss, metrics, grads, found = run(small_config(**MESHES[name]))
  ref_loss, ref_metrics, ref_grads, _ = reference()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ('balance', 'router_z'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(metrics['counts_LE'], ref_metrics['counts_LE'])
  # Per MoE layer, k assignments per non-padding token.
  np.testing.assert_array_equal(ref_metrics['counts_LE'].sum(-1), [BATCH * (SEQ_LEN - 3) * 2] * 2)
  errors = jax.tree.map(relative_error, grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= 1e-5, errors
  if name == 'expert8':  # the gather dispatch, as compiled
    over_expert = [c for c in found if c.axes == ('expert',)]
    assert not [c for c in found if c.kind == 'all-to-all']
    # Forward: the group's tokens [B T, D] gathered, each device's sums [B T / 8, D]
    # reduce-scattered back; backward: the transposes. Float32, once per MoE layer.
    for kind, shape in (('all-gather', (BATCH * SEQ_LEN, 32)), ('reduce-scatter', (BATCH * SEQ_LEN // 8, 32))):
      moved = [c for c in over_expert if c.kind == kind and shape in c.shapes]
      assert len(moved) == 2 and all(c.dtype == 'f32' and c.runs == 2 for c in moved), (kind, moved)
    # The gradients of the weights replicated over `expert` are summed once, outside every loop.
    assert all(c.runs == 1 and not c.loops for c in over_expert if c.kind == 'all-reduce')

# -- a run: the loss falls, the log shows the balance, a resume is exact --------------------

def test_moe_tiny_trains_logs_its_balance_and_resumes_exactly(tmp_path, capsys):
  import shutil

  from configs import moe_tiny
  from maxlite.train import train
  config = moe_tiny.get_config()
  config.model.update(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_layers=2,
                      moe_bias_update_rate=1e-3)
  config.data.seq_len = 32
  config.parallel.update(data=2, expert=4)
  config.train.update(run_dir=str(tmp_path / 'run'), steps=10, log_interval=1, eval_steps=0,
                      micro_batch_size=8)
  config.optim.update(warmup_steps=1, lr=1e-2)
  config.checkpoint.interval = 5
  straight = {h['step']: h for h in train(config) if 'loss' in h}
  losses = [straight[s]['loss'] for s in sorted(straight)]
  assert sum(losses[:2]) / 2 - sum(losses[-3:]) / 3 > 0.3, losses
  assert all(1.0 <= straight[s]['moe_load'] <= 4.0 for s in straight)
  assert 'balance ' in capsys.readouterr().out

  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'run', resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '10')
  config.train.run_dir = str(resumed_dir)
  resumed = {h['step']: h['loss'] for h in train(config) if 'loss' in h}
  assert resumed == {s: straight[s]['loss'] for s in range(6, 11)}
