"""The Pallas flash-attention kernels (interpret mode) against dense float32 and float64
references, the tile schedule against the dense mask, the kernels' loops against the
schedule, and the Triton IR of the CUDA lowering."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.mlir import ir
from jaxlib.triton import dialect as tt_dialect

from maxlite.kernels.flash_attention import (FULL, LAUNCH_TABLE, PARTIAL, SKIP, BlockSizes,
                                             block_schedule, flash_attention,
                                             flash_attention_reference, launches, loop_pieces)

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


def interleaved_segments(batch, length, run):
  """Ids 1, 2, 1, 3, 1, 4, ... in runs of `run` tokens: document 1 resumes after
  each other one, so ids decrease, and a block row of document 1 has SKIP
  tiles between its FULL ones, which then form several pieces."""
  runs = np.arange(-(-length // run))
  ids = np.where(runs % 2 == 0, 1, 2 + runs // 2)
  return np.broadcast_to(np.repeat(ids, run)[:length], (batch, length)).astype(np.int32)


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
    # name: (batch, length, heads, kv_heads, head_dim, causal, documents, padding, blocks);
    # documents: mean length of packed ones, 'interleaved', or None (one per row).
    'causal_gqa4_hd64_short_docs': (2, 96, 8, 2, 64, True, 12, 5, BlockSizes(32, 16, 16, 32)),
    'noncausal_mqa_hd128': (1, 80, 4, 1, 128, False, 30, 0, BlockSizes(64, 32, 32, 32)),
    'causal_mha_hd48_many_docs': (2, 200, 2, 2, 48, True, 8, 0, BlockSizes(32, 32, 32, 32)),
    'noncausal_gqa2_hd80_one_doc': (2, 50, 4, 2, 80, False, None, 0, BlockSizes(32, 16, 16, 16)),
    'causal_gqa2_hd32_interleaved_docs': (1, 120, 4, 2, 32, True, 'interleaved', 0,
                                          BlockSizes(16, 16, 16, 16)),
}


@pytest.mark.parametrize('case', CASES)
def test_float32_matches_float32_and_float64_references(case):
  batch, length, heads, kv_heads, head_dim, causal, documents, padding, blocks = CASES[case]
  rng = np.random.default_rng()
  q = rng.standard_normal((batch, length, heads, head_dim))
  k = rng.standard_normal((batch, length, kv_heads, head_dim))
  v = rng.standard_normal((batch, length, kv_heads, head_dim))
  cotangent = rng.standard_normal((batch, length, heads, head_dim))
  if documents == 'interleaved':
    segment_ids = interleaved_segments(batch, length, 16)
  elif documents is not None:
    segment_ids = packed_segments(rng, batch, length, documents, padding)
  else:
    segment_ids = None
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


@pytest.mark.parametrize('documents', ['packed', 'padded', 'interleaved'])
@pytest.mark.parametrize('causal', [True, False])
def test_loop_pieces_visit_each_tile_once_by_class(causal, documents):
  """The kernels' loops visit every PARTIAL tile once with the mask, every FULL
  tile once without, and no SKIP tile, along query rows and key rows alike."""
  rng = np.random.default_rng()
  segment_ids = {'packed': lambda: packed_segments(rng, 3, 256, 24),
                 'padded': lambda: packed_segments(rng, 3, 256, 24, padding=9),
                 'interleaved': lambda: interleaved_segments(3, 256, 16)}[documents]()
  classes = np.asarray(block_schedule(jnp.asarray(segment_ids), 16, 8, causal))
  for class_BXY in (classes, classes.swapaxes(1, 2)):
    pieces = np.asarray(loop_pieces(jnp.asarray(class_BXY)))
    visits = {PARTIAL: np.zeros(class_BXY.shape, int), FULL: np.zeros(class_BXY.shape, int)}
    for kind, table in ((PARTIAL, pieces[:, :, 0]), (FULL, pieces[:, :, 1])):
      for b, x in np.ndindex(table.shape[:2]):
        count, bounds = table[b, x, 0], table[b, x, 1:].reshape(-1, 2)
        for start, end in bounds[:count]:
          visits[kind][b, x, start:end] += 1
    np.testing.assert_array_equal(visits[PARTIAL], class_BXY == PARTIAL)
    np.testing.assert_array_equal(visits[FULL], class_BXY == FULL)
    if documents == 'packed':  # one document interior, at most a start and a diagonal
      assert pieces[:, :, 1, 0].max() <= 1 and pieces[:, :, 0, 0].max() <= 2


def triton_kernels(fn, *args):
  """{name: (Triton IR module, backend config)} of each Pallas kernel in fn's CUDA lowering.

  Lowers from this CPU machine. With jaxlib up to 0.10.2 the Triton backend
  serialises each kernel's `tt` module as MLIR bytecode into the `ir` field
  of its `__gpu$xla.gpu.triton` custom call's backend config; parsing it back
  needs the tt dialect registered. (Later jaxlibs compile the module while
  lowering and emit `triton_kernel_call_ffi`, the module text inside a
  zlib-compressed proto; then this finds no kernels and the test says so.)
  """
  module = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).compiler_ir('stablehlo')
  tt_dialect.register_dialect(module.context)
  kernels = {}
  for op, _ in nested_ops(module.operation):
    if op.name == 'stablehlo.custom_call' and 'xla.gpu.triton' in str(op.attributes['call_target_name']):
      config = op.attributes['mhlo.backend_config']
      with module.context:
        kernels[config['name'].value] = ir.Module.parse(config['ir'].value_bytes), config
  return kernels


def nested_ops(op, enclosing=()):
  """Every operation inside op, with the names of the operations that enclose it."""
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield child.operation, enclosing
        yield from nested_ops(child.operation, enclosing + (child.operation.name,))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_cuda_lowering_loads_tiles_outside_branches(dtype):
  """Each kernel's tile loops load unconditionally (Triton's software pipeliner
  can prefetch only such loads), with the table's launch parameters, and
  float32 dots are exact (IEEE, not TF32)."""
  batch, length, heads, kv_heads, head_dim = 2, 300, 8, 2, 80
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype)
  segment_ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(flash_attention(q, k, v, s).astype(jnp.float32))
  kernels = triton_kernels(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv, segment_ids)
  forward, backward = launches(128, dtype, BlockSizes(), length)  # head_dim 80 pads to 128
  expected = {'flash_attention_forward': forward, 'flash_attention_dq': backward,
              'flash_attention_dkv': backward}
  assert set(kernels) == set(expected)
  for name, (module, config) in kernels.items():
    launch = (ir.IntegerAttr(config['num_warps']).value, ir.IntegerAttr(config['num_stages']).value)
    assert launch == (expected[name].num_warps, expected[name].num_stages), name
    ops = list(nested_ops(module.operation))
    tile_loads = [enclosing for op, enclosing in ops if op.name == 'tt.load' and 'scf.for' in enclosing
                  and isinstance(op.results[0].type, ir.RankedTensorType)
                  and op.results[0].type.rank == 2]
    assert tile_loads, f'{name}: no tile loads inside a loop'
    for enclosing in tile_loads:
      assert 'scf.if' not in enclosing, f'{name}: a tile load inside a branch: {enclosing}'
    if dtype == jnp.float32:
      precisions = {ir.IntegerAttr(op.attributes['inputPrecision']).value
                    for op, _ in ops if op.name == 'tt.dot'}
      assert precisions == {int(tt_dialect.InputPrecision.IEEE)}, f'{name}: {precisions}'


def test_rejects_mismatched_inputs():
  q = jnp.zeros((1, 32, 4, 64), jnp.float32)
  with pytest.raises(ValueError, match='query heads are not a multiple'):
    flash_attention(q, jnp.zeros((1, 32, 3, 64)), jnp.zeros((1, 32, 3, 64)), interpret=True)
  with pytest.raises(ValueError, match='dtypes'):
    flash_attention(q, q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match='power of two'):
    flash_attention(q, q, q, block_sizes=BlockSizes(block_q=48), interpret=True)
  q = jnp.zeros((1, 32, 1, 320), jnp.bfloat16)
  with pytest.raises(ValueError, match='head_dim 320 is above 256'):
    flash_attention(q, q, q, interpret=True)


def test_launches_take_the_table_and_the_given_blocks():
  forward, backward = launches(128, jnp.bfloat16, BlockSizes(), 4096)
  assert (forward, backward) == LAUNCH_TABLE[128, 2]
  # float16 shares bfloat16's row; head_dim 32 takes the 64 row; a given block
  # replaces the table's; blocks are cut to the (power-of-two) length.
  forward, backward = launches(32, jnp.float16, BlockSizes(backward_k=16), 40)
  assert forward == dataclasses.replace(LAUNCH_TABLE[64, 2][0], block_q=64)
  assert backward == dataclasses.replace(LAUNCH_TABLE[64, 2][1], block_k=16)
