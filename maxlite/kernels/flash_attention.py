"""Flash attention in Pallas (Triton on GPUs): causal, grouped-query, packed documents.

Shape legend: B batch, T length (self-attention: queries and keys alike), N
query heads, K kv heads, G = N // K query heads per kv head, H head dim, I
query blocks, J key blocks.

A query attends to a key when their segment ids are equal and, if causal, the
key's index is not after the query's. Within a packed row whose positions
restart at each document and increase by one inside it, this equals the
position-causal mask of `maxlite.model.attention.xla_attention`.

The attention matrix is visited in tiles of block_q x block_k. Before a kernel
runs, `block_schedule` classifies each tile from the min and max segment id
of its query and key blocks (and from the diagonal, if causal): SKIP (no pair
can attend: disjoint id ranges, or wholly above the diagonal), FULL (one
document on both sides and wholly below the diagonal: no mask needed) or
PARTIAL (element mask). Each block row then loops only over the span of tiles
that are not SKIP, and skips the SKIP ones inside it; with packed rows, whose
ids never decrease, the span is exactly the document's tiles.

Lengths are padded to a multiple of the block size with a segment id that no
token has, and head dims to a power of two (64 and 128 need no padding).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

SKIP, PARTIAL, FULL = 0, 1, 2
# Padding tokens get an id no real token has, so they attend only to each other.
PAD_SEGMENT = np.iinfo(np.int32).min
# Finite, so that a row whose first tiles are all masked gives exp2(0) = 1
# instead of NaN; the next visible tile rescales that away by exp2(MASK - m) = 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16 for the tensor cores) of the three kernels."""
  block_q: int = 128
  block_k: int = 64
  backward_q: int = 64
  backward_k: int = 64


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  softmax_scale: float
  blocks: BlockSizes
  interpret: bool


def triton_compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params; passing them selects the Triton backend explicitly,
  since the default GPU backend of `pallas_call` changes between JAX versions."""
  cls = getattr(pl_triton, 'CompilerParams', None) or getattr(pl_triton, 'TritonCompilerParams')
  return cls(num_warps=num_warps, num_stages=num_stages)


def flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, *, causal: bool = True,
                    softmax_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    return_lse: bool = False, interpret: bool = False):
  """Softmax(q k^T * scale, masked) v, without materialising the scores.

  segment_ids_BT: int document id per token (None: one document); any value
  but int32's minimum, which marks padding. softmax_scale defaults to
  head_dim ** -0.5. With return_lse, also returns the natural-log
  log-sum-exp of the masked scaled scores, [B, N, T] float32; both outputs
  are differentiable. interpret=True runs the kernels as plain JAX (CPU).
  """
  batch, length, num_heads, head_dim = q_BTNH.shape
  _check_inputs(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  blocks = _fit_blocks(block_sizes or BlockSizes(), length)
  static = _Static(causal, head_dim ** -0.5 if softmax_scale is None else float(softmax_scale),
                   blocks, interpret)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((batch, length), jnp.int32)
  multiple = max(dataclasses.astuple(blocks))
  padded_length = -(-length // multiple) * multiple
  # 16: the smallest dot the tensor cores take.
  padded_dim = max(16, pl.next_power_of_2(head_dim))
  # Zero head-dim padding adds nothing to q.k and yields zero output columns.
  pad = ((0, 0), (0, padded_length - length), (0, 0), (0, padded_dim - head_dim))
  segment_ids_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, padded_length - length)),
                           constant_values=PAD_SEGMENT)
  out_BTNH, lse_BNT = _flash(static, jnp.pad(q_BTNH, pad), jnp.pad(k_BTKH, pad),
                             jnp.pad(v_BTKH, pad), segment_ids_BT)
  out_BTNH = out_BTNH[:, :length, :, :head_dim]
  if return_lse:
    return out_BTNH, lse_BNT[:, :, :length]
  return out_BTNH


def flash_attention_reference(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, *, causal: bool = True,
                              softmax_scale: float | None = None,
                              block_sizes: BlockSizes | None = None, return_lse: bool = False,
                              interpret: bool = False):
  """The same function with dense scores in float32 (float64 for float64 inputs)."""
  del block_sizes, interpret
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BTKH.shape[2]
  scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH.astype(dtype), k_BTKH.astype(dtype)) * scale
  mask_BTS = jnp.ones((batch, length, length), bool)
  if segment_ids_BT is not None:
    mask_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  if causal:
    mask_BTS &= jnp.tril(jnp.ones((length, length), bool))
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  lse_BKGT = jax.nn.logsumexp(scores_BKGTS, axis=-1)
  probs_BKGTS = jnp.exp(scores_BKGTS - lse_BKGT[..., None])
  out_BTKGH = jnp.einsum('bkgts,bskh->btkgh', probs_BKGTS, v_BTKH.astype(dtype))
  out_BTNH = out_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype)
  if return_lse:
    return out_BTNH, lse_BKGT.reshape(batch, num_heads, length)
  return out_BTNH


def _check_inputs(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
  if q_BTNH.ndim != 4 or k_BTKH.shape != v_BTKH.shape:
    raise ValueError(f'flash_attention: q {q_BTNH.shape}, k {k_BTKH.shape}, v {v_BTKH.shape} '
                     'must be [batch, length, heads, head_dim] with k and v alike')
  batch, length, num_heads, head_dim = q_BTNH.shape
  if k_BTKH.shape[:2] != (batch, length) or k_BTKH.shape[3] != head_dim:
    raise ValueError(f'flash_attention: k {k_BTKH.shape} does not match q {q_BTNH.shape} '
                     '(self-attention: same batch, length and head_dim)')
  if num_heads % k_BTKH.shape[2]:
    raise ValueError(f'flash_attention: {num_heads} query heads are not a multiple of '
                     f'{k_BTKH.shape[2]} kv heads')
  if q_BTNH.dtype not in KERNEL_DTYPES or k_BTKH.dtype != q_BTNH.dtype or v_BTKH.dtype != q_BTNH.dtype:
    raise ValueError(f'flash_attention: dtypes {q_BTNH.dtype}, {k_BTKH.dtype}, {v_BTKH.dtype}; '
                     'q, k and v must share one of bfloat16, float16, float32')
  if segment_ids_BT is not None and segment_ids_BT.shape != (batch, length):
    raise ValueError(f'flash_attention: segment_ids {segment_ids_BT.shape} must be {(batch, length)}')


def _fit_blocks(blocks: BlockSizes, length: int) -> BlockSizes:
  """Blocks no longer than the (power-of-two rounded) length, so short inputs pad little."""
  for name, size in dataclasses.asdict(blocks).items():
    if size < 1 or size & (size - 1):
      raise ValueError(f'flash_attention: {name}={size} must be a power of two')
  longest = max(16, pl.next_power_of_2(length))
  return BlockSizes(*(min(size, longest) for size in dataclasses.astuple(blocks)))


def block_schedule(segment_ids_BT, block_q: int, block_k: int, causal: bool):
  """[B, I, J] int32 tile classes (SKIP, PARTIAL, FULL) from per-block min/max segment ids."""
  batch, length = segment_ids_BT.shape
  q_BIt = segment_ids_BT.reshape(batch, length // block_q, block_q)
  k_BJt = segment_ids_BT.reshape(batch, length // block_k, block_k)
  q_min_BI1, q_max_BI1 = q_BIt.min(-1)[:, :, None], q_BIt.max(-1)[:, :, None]
  k_min_B1J, k_max_B1J = k_BJt.min(-1)[:, None, :], k_BJt.max(-1)[:, None, :]
  # Disjoint id ranges: no equal ids, whatever their order within the blocks.
  visible_BIJ = (q_min_BI1 <= k_max_B1J) & (k_min_B1J <= q_max_BI1)
  one_document_BIJ = (q_min_BI1 == q_max_BI1) & (k_min_B1J == k_max_B1J) & (q_min_BI1 == k_min_B1J)
  if causal:
    first_row_I1 = jnp.arange(length // block_q)[:, None] * block_q
    first_col_1J = jnp.arange(length // block_k)[None, :] * block_k
    visible_BIJ &= first_col_1J <= first_row_I1 + block_q - 1
    one_document_BIJ &= first_col_1J + block_k - 1 <= first_row_I1
  return jnp.where(visible_BIJ, jnp.where(one_document_BIJ, FULL, PARTIAL), SKIP).astype(jnp.int32)


def _spans(class_BXY):
  """[B, X, 2] int32: the first and one past the last tile of each row that is not SKIP.

  Never empty: every block row sees the tile on the diagonal."""
  visible_BXY = class_BXY != SKIP
  last = class_BXY.shape[-1]
  first_BX = jnp.argmax(visible_BXY, axis=-1)
  end_BX = last - jnp.argmax(visible_BXY[..., ::-1], axis=-1)
  return jnp.stack([first_BX, end_BX], axis=-1).astype(jnp.int32)


def _masked_scores(q_tH, k_tH, scale2, segments_q_t, segments_k_t, rows_t, cols_t, causal, masked):
  """Scores in log2 units (exp2 is the cheap exponential on GPUs), masked where asked."""
  scores_tt = pl_triton.dot(q_tH, k_tH, trans_b=True) * scale2
  if not masked:
    return scores_tt
  mask_tt = segments_q_t[:, None] == segments_k_t[None, :]
  if causal:
    mask_tt &= rows_t[:, None] >= cols_t[None, :]
  return jnp.where(mask_tt, scores_tt, MASK_VALUE)


def _loop_tiles(span_ref, class_ref, visit, carry):
  """Runs visit(index, carry, masked) over the span's tiles, by class."""
  def body(index, carry):
    return lax.switch(class_ref[index], (lambda c: c, functools.partial(visit, index, masked=True),
                                         functools.partial(visit, index, masked=False)), carry)
  return lax.fori_loop(span_ref[0], span_ref[1], body, carry)


# -- forward -------------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, segments_q_ref, segments_k_ref, span_ref, class_ref,
                    out_ref, lse_ref, *, scale2, causal, block_k):
  block_q, head_dim = q_ref.shape
  q_tH = q_ref[...]
  segments_q_t = segments_q_ref[...]
  rows_t = pl.program_id(0) * block_q + jnp.arange(block_q)

  def visit(j, carry, masked):
    acc_tH, max_t, sum_t = carry
    cols = pl.ds(j * block_k, block_k)
    scores_tt = _masked_scores(q_tH, k_ref[cols, :], scale2, segments_q_t, segments_k_ref[cols],
                               rows_t, j * block_k + jnp.arange(block_k), causal, masked)
    new_max_t = jnp.maximum(max_t, scores_tt.max(axis=1))
    rescale_t = jnp.exp2(max_t - new_max_t)
    probs_tt = jnp.exp2(scores_tt - new_max_t[:, None])
    v_tH = v_ref[cols, :]
    acc_tH = acc_tH * rescale_t[:, None] + pl_triton.dot(probs_tt.astype(v_tH.dtype), v_tH)
    return acc_tH, new_max_t, sum_t * rescale_t + probs_tt.sum(axis=1)

  init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc_tH, max_t, sum_t = _loop_tiles(span_ref, class_ref, visit, init)
  out_ref[...] = (acc_tH / sum_t[:, None]).astype(out_ref.dtype)
  lse_ref[...] = max_t + jnp.log2(sum_t)


def _forward(static: _Static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
  """(out [B, T, N, H], log2-sum-exp2 of the log2-unit scores [B, N, T] float32)."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  groups = num_heads // k_BTKH.shape[2]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  class_BIJ = block_schedule(segment_ids_BT, block_q, block_k, static.causal)
  kernel = functools.partial(_forward_kernel, scale2=static.softmax_scale * LOG2_E,
                             causal=static.causal, block_k=block_k)
  # Grid (I, B, N): one program per query block and head; K and V of the
  # head's group are read in place, never repeated per query head.
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, length, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0))
  return pl.pallas_call(
      kernel, grid=(length // block_q, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, block_q), lambda i, b, n: (b, i)),
                pl.BlockSpec((None, length), lambda i, b, n: (b, 0)),
                pl.BlockSpec((None, None, 2), lambda i, b, n: (b, i, 0)),
                pl.BlockSpec((None, None, class_BIJ.shape[2]), lambda i, b, n: (b, i, 0))],
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)],
      compiler_params=triton_compiler_params(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
      interpret=static.interpret, name='flash_attention_forward',
  )(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, segment_ids_BT, _spans(class_BIJ), class_BIJ)


# -- backward ------------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, segments_q_ref, segments_k_ref,
               span_ref, class_ref, dq_ref, *, scale2, causal, block_k):
  block_q, head_dim = q_ref.shape
  q_tH, dout_tH = q_ref[...], dout_ref[...]
  lse2_t, delta_t = lse_ref[...], delta_ref[...]
  segments_q_t = segments_q_ref[...]
  rows_t = pl.program_id(0) * block_q + jnp.arange(block_q)

  def visit(j, dq_tH, masked):
    cols = pl.ds(j * block_k, block_k)
    k_tH, v_tH = k_ref[cols, :], v_ref[cols, :]
    scores_tt = _masked_scores(q_tH, k_tH, scale2, segments_q_t, segments_k_ref[cols], rows_t,
                               j * block_k + jnp.arange(block_k), causal, masked)
    probs_tt = jnp.exp2(scores_tt - lse2_t[:, None])
    dscores_tt = probs_tt * (pl_triton.dot(dout_tH, v_tH, trans_b=True) - delta_t[:, None])
    return dq_tH + pl_triton.dot(dscores_tt.astype(k_tH.dtype), k_tH)

  dq_tH = _loop_tiles(span_ref, class_ref, visit, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq_tH * (scale2 / LOG2_E)).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, segments_q_ref, segments_k_ref,
                span_ref, class_ref, dk_ref, dv_ref, *, scale2, causal, block_q, groups):
  block_k, head_dim = k_ref.shape
  k_tH, v_tH = k_ref[...], v_ref[...]
  segments_k_t = segments_k_ref[...]
  cols_t = pl.program_id(0) * block_k + jnp.arange(block_k)

  def visit(g, i, carry, masked):
    dk_tH, dv_tH = carry
    rows = pl.ds(i * block_q, block_q)
    q_tH, dout_tH = q_ref[rows, g, :], dout_ref[rows, g, :]
    scores_tt = _masked_scores(q_tH, k_tH, scale2, segments_q_ref[rows], segments_k_t,
                               i * block_q + jnp.arange(block_q), cols_t, causal, masked)
    probs_tt = jnp.exp2(scores_tt - lse_ref[g, rows][:, None])
    dv_tH += pl_triton.dot(probs_tt.astype(dout_tH.dtype), dout_tH, trans_a=True)
    dscores_tt = probs_tt * (pl_triton.dot(dout_tH, v_tH, trans_b=True) - delta_ref[g, rows][:, None])
    return dk_tH + pl_triton.dot(dscores_tt.astype(q_tH.dtype), q_tH, trans_a=True), dv_tH

  # dK and dV sum over the G query heads that share this kv head, in registers,
  # so that no per-query-head copy of them is written.
  def one_head(g, carry):
    return _loop_tiles(span_ref, class_ref, functools.partial(visit, g), carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk_tH, dv_tH = lax.fori_loop(0, groups, one_head, (zeros, zeros))
  dk_ref[...] = (dk_tH * (scale2 / LOG2_E)).astype(dk_ref.dtype)
  dv_ref[...] = dv_tH.astype(dv_ref.dtype)


def _backward(static: _Static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, lse2_BNT, delta_BNT,
              dout_BTNH):
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BTKH.shape[2]
  groups = num_heads // num_kv_heads
  block_q, block_k = static.blocks.backward_q, static.blocks.backward_k
  class_BIJ = block_schedule(segment_ids_BT, block_q, block_k, static.causal)
  class_BJI = class_BIJ.swapaxes(1, 2)
  kw = dict(scale2=static.softmax_scale * LOG2_E, causal=static.causal)
  params = triton_compiler_params(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  inputs = (q_BTNH, k_BTKH, v_BTKH, dout_BTNH, lse2_BNT, delta_BNT, segment_ids_BT, segment_ids_BT)

  # dQ: grid (I, B, N), like the forward.
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, length, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))
  dq_BTNH = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, **kw), grid=(length // block_q, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                pl.BlockSpec((None, block_q), lambda i, b, n: (b, i)),
                pl.BlockSpec((None, length), lambda i, b, n: (b, 0)),
                pl.BlockSpec((None, None, 2), lambda i, b, n: (b, i, 0)),
                pl.BlockSpec((None, None, class_BIJ.shape[2]), lambda i, b, n: (b, i, 0))],
      out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
      compiler_params=params, interpret=static.interpret, name='flash_attention_dq',
  )(*inputs, _spans(class_BIJ), class_BIJ)

  # dK, dV: grid (J, B, K); a program reads all G query heads of its kv head
  # ([B, T, K, G, H] is a free reshape of [B, T, N, H]).
  grouped = lambda x_BTNH: x_BTNH.reshape(batch, length, num_kv_heads, groups, head_dim)
  per_head = lambda x_BNT: x_BNT.reshape(batch, num_kv_heads, groups, length)
  q_spec = pl.BlockSpec((None, length, None, groups, head_dim), lambda j, b, k: (b, 0, k, 0, 0))
  kv_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, k: (b, j, k, 0))
  row_spec = pl.BlockSpec((None, None, groups, length), lambda j, b, k: (b, k, 0, 0))
  dk_BTKH, dv_BTKH = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, groups=groups, **kw),
      grid=(length // block_k, batch, num_kv_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                pl.BlockSpec((None, length), lambda j, b, k: (b, 0)),
                pl.BlockSpec((None, block_k), lambda j, b, k: (b, j)),
                pl.BlockSpec((None, None, 2), lambda j, b, k: (b, j, 0)),
                pl.BlockSpec((None, None, class_BJI.shape[2]), lambda j, b, k: (b, j, 0))],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BTKH.shape, k_BTKH.dtype)] * 2,
      compiler_params=params, interpret=static.interpret, name='flash_attention_dkv',
  )(grouped(q_BTNH), k_BTKH, v_BTKH, grouped(dout_BTNH), per_head(lse2_BNT), per_head(delta_BNT),
    segment_ids_BT, segment_ids_BT, _spans(class_BJI), class_BJI)
  return dq_BTNH, dk_BTKH, dv_BTKH


# -- the differentiable op -----------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
  out_BTNH, lse2_BNT = _forward(static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  return out_BTNH, lse2_BNT / LOG2_E


def _flash_forward(static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
  out_BTNH, lse2_BNT = _forward(static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  residuals = (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, out_BTNH, lse2_BNT)
  return (out_BTNH, lse2_BNT / LOG2_E), residuals


def _flash_backward(static, residuals, cotangents):
  q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, out_BTNH, lse2_BNT = residuals
  dout_BTNH, dlse_BNT = cotangents
  # dScores = P * (dP - delta) with delta = rowsum(out * dout); a cotangent on
  # the lse adds P * dlse (d lse / d scores = P), i.e. it lowers delta.
  delta_BNT = jnp.einsum('btnh,btnh->bnt', out_BTNH.astype(jnp.float32),
                         dout_BTNH.astype(jnp.float32)) - dlse_BNT
  dq_BTNH, dk_BTKH, dv_BTKH = _backward(static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, lse2_BNT,
                                        delta_BNT, dout_BTNH.astype(q_BTNH.dtype))
  return dq_BTNH, dk_BTKH, dv_BTKH, None


_flash.defvjp(_flash_forward, _flash_backward)
