"""Attention backends: which one runs where, and that pallas gives xla's results,
down to a sharded training step's loss and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlite import mesh as mesh_lib, state as state_lib
from maxlite.kernels.flash_attention import flash_attention_reference
from maxlite.model.attention import attention, resolve_backend, xla_attention
from maxlite.model.llama import Llama, LlamaConfig
from maxlite.state import init_params
from maxlite.step import Layout, StepSettings, gradients

# Interpret-mode kernels compile to plain XLA loops that are not worth optimising here.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@pytest.mark.parametrize('name, platform, segment_ids, kv_cache, expected', [
    ('auto', 'cpu', True, False, 'xla'),
    ('auto', 'gpu', True, False, 'pallas'),
    ('auto', 'gpu', False, False, 'cudnn'),
    ('auto', 'gpu', True, True, 'xla'),
    ('pallas', 'cpu', True, False, 'pallas'),
    ('pallas', 'gpu', True, True, 'xla'),
    ('cudnn', 'gpu', False, False, 'cudnn'),
    ('cudnn', 'gpu', True, True, 'xla'),
    ('xla', 'gpu', True, False, 'xla'),
])
def test_resolve_backend(name, platform, segment_ids, kv_cache, expected):
  assert resolve_backend(name, platform, segment_ids=segment_ids, kv_cache=kv_cache) == expected


@pytest.mark.parametrize('name, platform, segment_ids, message', [
    ('cudnn', 'cpu', False, r"model\.attention='cudnn' needs an NVIDIA GPU; the platform is cpu"),
    ('cudnn', 'gpu', True, r"model\.attention='cudnn' cannot mask packed documents"),
    ('flash', 'gpu', True, r"model\.attention='flash' is not one of"),
])
def test_unsupported_combinations_are_errors(name, platform, segment_ids, message):
  with pytest.raises(ValueError, match=message):
    resolve_backend(name, platform, segment_ids=segment_ids)


def packed_batch(rng, batch, length):
  """Segment ids of a few documents per row with trailing padding, and positions restarting per document."""
  cuts = np.sort(rng.integers(1, length - 4, size=(batch, 3)), axis=1)
  segment_ids = 1 + (np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1)
  segment_ids[:, -3:] = 0
  positions = np.zeros_like(segment_ids)
  for row in range(batch):
    for t in range(1, length):
      same = segment_ids[row, t] == segment_ids[row, t - 1]
      positions[row, t] = positions[row, t - 1] + 1 if same else 0
  return segment_ids, positions


def test_pallas_and_the_kernel_reference_match_xla_with_positions():
  """The kernels' index-causal mask equals xla's position-causal one on packed rows."""
  rng = np.random.default_rng()
  q = jnp.asarray(rng.standard_normal((2, 40, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 40, 2, 16)), jnp.float32) for _ in range(2))
  segment_ids, positions = packed_batch(rng, 2, 40)
  expected = xla_attention(q, k, v, segment_ids, positions, segment_ids, positions, causal=True)
  run = jax.jit(attention, static_argnames='backend', compiler_options=FAST_COMPILE)
  np.testing.assert_allclose(run(q, k, v, segment_ids, positions, backend='pallas'), expected, atol=1e-5)
  np.testing.assert_allclose(flash_attention_reference(q, k, v, segment_ids), expected, atol=1e-5)
  # Without segment ids: one document per row, index-causal.
  expected = attention(q, k, v, None, None, backend='xla')
  np.testing.assert_allclose(run(q, k, v, None, None, backend='pallas'), expected, atol=1e-5)


def test_kv_cache_path_runs_xla_for_every_backend():
  rng = np.random.default_rng()
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 8, 2, 16)), jnp.float32) for _ in range(2))
  slots = jnp.broadcast_to(jnp.arange(8), (2, 8))
  cache = dict(kv_segment_ids_BS=jnp.ones_like(slots), kv_positions_BS=slots)
  step = (jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 5))
  expected = attention(q, k, v, *step, backend='xla', **cache)
  for backend in ('pallas', 'auto'):
    np.testing.assert_array_equal(attention(q, k, v, *step, backend=backend, **cache), expected)


def test_cudnn_on_cpu_is_an_error():
  x = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="model.attention='cudnn' needs an NVIDIA GPU"):
    attention(x, x, x, None, None, backend='cudnn')


def test_training_step_with_pallas_equals_xla():
  """Loss and gradients of a sharded step (data=2, tensor=2) agree between backends."""
  rng = np.random.default_rng()
  values = dict(vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=96, rope_theta=10_000.0, norm_eps=1e-5,
                tie_embeddings=True, init_std=0.2, param_dtype='float32')
  segment_ids, positions = packed_batch(rng, 4, 48)
  tokens = rng.integers(0, 61, size=(4, 49))
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segment_ids,
           'positions': positions, 'loss_mask': (segment_ids > 0).astype(np.int32)}
  batch = jax.tree.map(jnp.asarray, batch)
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 2, 'pipeline': 1}, jax.devices()[:4])
  results = {}
  for backend in ('xla', 'pallas'):
    cfg = LlamaConfig(**values, attention=backend)
    params = init_params(cfg, seed=3)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    _, abstract, logical = state_lib.abstract_model(cfg)
    layout = Layout.create(mesh, logical, abstract, batch_shape=(4, 48))
    step = jax.jit(lambda p, b: gradients(p, graphdef, b, StepSettings(), layout),
                   compiler_options=FAST_COMPILE)
    with jax.set_mesh(mesh):
      results[backend] = jax.tree.map(np.asarray, step(params, batch))
  (grads_xla, loss_xla, _), (grads_pallas, loss_pallas, _) = results['xla'], results['pallas']
  assert np.isfinite(loss_pallas)
  np.testing.assert_allclose(loss_pallas, loss_xla, rtol=1e-5)
  for path, g_xla in jax.tree_util.tree_leaves_with_path(grads_xla):
    g_pallas = dict(jax.tree_util.tree_leaves_with_path(grads_pallas))[path]
    np.testing.assert_allclose(g_pallas, g_xla, atol=2e-5 * np.abs(g_xla).max(), rtol=1e-3,
                               err_msg=jax.tree_util.keystr(path))
