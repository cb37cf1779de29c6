"""The Pallas flash-attention kernels (interpret mode) against dense float32 and float64
references, the tile schedule against the dense mask, and the CUDA lowering."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlite.kernels.flash_attention import (FULL, PARTIAL, SKIP, BlockSizes, block_schedule,
                                             flash_attention, flash_attention_reference)

# Interpret mode compiles the kernels' loops as plain XLA; optimising that
# code costs more time than running it at these sizes.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def packed_segments(rng, batch, length, mean_document, padding=0):
  """Segment ids of many short documents per row, ids increasing, then `padding` zeros."""
  starts = rng.random((batch, length)) < 1 / mean_document
  starts[:, 0] = True
  segment_ids = np.cumsum(starts, axis=1)
  if padding:
    segment_ids[:, -padding:] = 0
  return segment_ids.astype(np.int32)


def outputs_and_grads(fn, q, k, v, segment_ids, cotangent, **kw):
  """(out, lse, dq, dk, dv) of a loss that depends on both the output and the lse, jitted."""
  return jax.jit(functools.partial(_outputs_and_grads, fn, **kw),
                 compiler_options=FAST_COMPILE)(q, k, v, segment_ids, cotangent)


def _outputs_and_grads(fn, q, k, v, segment_ids, cotangent, **kw):
  def loss(q, k, v):
    out, lse = fn(q, k, v, segment_ids, return_lse=True, **kw)
    return jnp.sum(out.astype(jnp.float32) * cotangent) + 0.1 * jnp.sum(jnp.sin(lse)), (out, lse)
  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, *grads


def as_float64(arrays):
  return [np.asarray(x, np.float64) for x in arrays]


CASES = {
    # name: (batch, length, heads, kv_heads, head_dim, causal, mean document, padding, blocks)
    'causal_gqa4_hd64_short_docs': (2, 96, 8, 2, 64, True, 12, 5, BlockSizes(32, 16, 16, 32)),
    'noncausal_mqa_hd128': (1, 80, 4, 1, 128, False, 30, 0, BlockSizes(64, 32, 32, 32)),
    'causal_mha_hd48_many_docs': (2, 200, 2, 2, 48, True, 8, 0, BlockSizes(32, 32, 32, 32)),
    'noncausal_gqa2_hd80_one_doc': (2, 50, 4, 2, 80, False, None, 0, BlockSizes(32, 16, 16, 16)),
}


@pytest.mark.parametrize('case', CASES)
def test_float32_matches_float32_and_float64_references(case):
  batch, length, heads, kv_heads, head_dim, causal, mean_document, padding, blocks = CASES[case]
  rng = np.random.default_rng()
  q = rng.standard_normal((batch, length, heads, head_dim))
  k = rng.standard_normal((batch, length, kv_heads, head_dim))
  v = rng.standard_normal((batch, length, kv_heads, head_dim))
  cotangent = rng.standard_normal((batch, length, heads, head_dim))
  segment_ids = (None if mean_document is None
                 else packed_segments(rng, batch, length, mean_document, padding))
  inputs = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  # A softmax scale other than the default, so a dropped scale would show.
  kw = dict(causal=causal, softmax_scale=0.7 / np.sqrt(head_dim))
  got = as_float64(outputs_and_grads(flash_attention, *inputs, segment_ids,
                                     jnp.asarray(cotangent, jnp.float32), block_sizes=blocks,
                                     interpret=True, **kw))
  expected32 = as_float64(outputs_and_grads(flash_attention_reference, *inputs, segment_ids,
                                 jnp.asarray(cotangent, jnp.float32), **kw))
  with jax.enable_x64(True):
    expected64 = as_float64(outputs_and_grads(flash_attention_reference, *map(jnp.asarray, (q, k, v)),
                                   segment_ids, jnp.asarray(cotangent), **kw))
  for name, a, b32, b64 in zip(('out', 'lse', 'dq', 'dk', 'dv'), got, expected32, expected64):
    assert np.isfinite(a).all(), name
    scale = np.abs(b64).max()
    np.testing.assert_allclose(a, b64, atol=2e-5 * scale, rtol=1e-4, err_msg=f'{name} vs float64')
    np.testing.assert_allclose(a, b32, atol=2e-5 * scale, rtol=1e-4, err_msg=f'{name} vs float32')


def test_bfloat16_matches_float32_reference():
  """bf16 inputs: the kernel rounds probabilities and dS to bf16 before each matmul."""
  rng = np.random.default_rng()
  batch, length, heads, kv_heads, head_dim = 2, 112, 4, 1, 64
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, n, head_dim)), jnp.bfloat16)
             for n in (heads, kv_heads, kv_heads))
  cotangent = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
  segment_ids = packed_segments(rng, batch, length, 20, padding=7)
  got = as_float64(outputs_and_grads(flash_attention, q, k, v, segment_ids, cotangent, causal=True,
                                     interpret=True, block_sizes=BlockSizes(32, 32, 32, 32)))
  # The reference sees the same bf16-rounded inputs, in float32.
  expected = as_float64(outputs_and_grads(flash_attention_reference, *(x.astype(jnp.float32) for x in (q, k, v)),
                               segment_ids, cotangent, causal=True))
  for name, a, b in zip(('out', 'lse', 'dq', 'dk', 'dv'), got, expected):
    assert np.isfinite(a).all(), name
    error = np.abs(a - b).max() / np.abs(b).max()
    assert error < 3e-2, f'{name}: relative error {error:.3g}'


@pytest.mark.parametrize('padding', [0, 9])
@pytest.mark.parametrize('causal', [True, False])
def test_schedule_classes_agree_with_the_dense_mask(causal, padding):
  """SKIP tiles have no visible pair and FULL tiles only visible pairs; with
  ids that never decrease (no padding after them) PARTIAL tiles have some."""
  rng = np.random.default_rng()
  block_q, block_k, length = 16, 8, 256
  segment_ids = packed_segments(rng, 3, length, 24, padding)
  classes = np.asarray(block_schedule(jnp.asarray(segment_ids), block_q, block_k, causal))
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    mask &= np.tri(length, dtype=bool)
  tiles = mask.reshape(3, length // block_q, block_q, length // block_k, block_k)
  any_visible, all_visible = tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))
  assert not any_visible[classes == SKIP].any()
  assert all_visible[classes == FULL].all()
  if not padding:
    assert any_visible[classes == PARTIAL].all()
    assert (classes == FULL).sum() == (all_visible & (any_visible == all_visible)).sum()
  assert (classes == SKIP).mean() > 0.5


def test_lowers_for_cuda_forward_and_backward():
  """The Triton lowering (Pallas -> Triton IR) of all three kernels, from this CPU machine."""
  batch, length, heads, kv_heads, head_dim = 2, 300, 8, 2, 80
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(flash_attention(q, k, v, s).astype(jnp.float32))
  step = jax.value_and_grad(loss, argnums=(0, 1, 2))
  hlo = jax.jit(step).trace(q, kv, kv, segment_ids).lower(lowering_platforms=('cuda',)).as_text()
  assert hlo.count('__gpu$xla.gpu.triton') == 3
  assert set(re.findall(r'name = \\?"(flash_attention_\w+)', hlo)) == {
      'flash_attention_forward', 'flash_attention_dq', 'flash_attention_dkv'}


def test_rejects_mismatched_inputs():
  q = jnp.zeros((1, 32, 4, 64), jnp.float32)
  with pytest.raises(ValueError, match='query heads are not a multiple'):
    flash_attention(q, jnp.zeros((1, 32, 3, 64)), jnp.zeros((1, 32, 3, 64)), interpret=True)
  with pytest.raises(ValueError, match='dtypes'):
    flash_attention(q, q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match='power of two'):
    flash_attention(q, q, q, block_sizes=BlockSizes(block_q=48), interpret=True)
