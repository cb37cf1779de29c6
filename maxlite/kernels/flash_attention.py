"""Flash attention in Pallas (Triton on GPUs): causal, grouped-query, packed documents.

Shape legend: B batch, T length (self-attention: queries and keys alike), N
query heads, K kv heads, G = N // K query heads per kv head, H head dim, I
query blocks, J key blocks; X, Y the blocks a kernel's programs own and the
blocks each one loops over (I and J, or J and I); R = ceil(Y / 2), the most
pieces of one class a row can hold, and P = 1 + 2R, a row's piece table.

A query attends to a key when their segment ids are equal and, if causal, the
key's index is not after the query's. Within a packed row whose positions
restart at each document and increase by one inside it, this equals the
position-causal mask of `maxlite.model.attention.xla_attention`.

The attention matrix is visited in tiles of block_q x block_k. Before a kernel
runs, `block_schedule` classifies each tile from the min and max segment id
of its query and key blocks (and from the diagonal, if causal): SKIP (no pair
can attend: disjoint id ranges, or wholly above the diagonal), FULL (one
document on both sides and wholly below the diagonal: no mask needed) or
PARTIAL (element mask). `loop_pieces` lists each block row's pieces: runs of
consecutive PARTIAL tiles, and runs of consecutive FULL ones. A kernel loops
over the PARTIAL pieces, and within each over its tiles with the mask, then
over the FULL pieces without it; SKIP tiles are never visited. With packed
rows, whose ids never decrease, a row has one FULL piece (the document's
interior) and at most two PARTIAL ones (where the document starts and the
diagonal); in the dk/dv kernel, trailing padding can add a third: the last
query block, whose id range then spans the row.

No tile load sits in a branch: the mask is a select on the scores, and the
tile class picks which loop visits a tile, not whether a loop body loads.
Triton's software pipeliner can then issue the next tiles' loads while the
current one computes (num_stages); a branch per tile around the loads, as in
a switch on the class, would stop it.

Block sizes, num_warps and num_stages come from `LAUNCH_TABLE`, by head dim
and dtype, for the forward and the backward separately; `block_sizes`
overrides the blocks.

float32 inputs get exact float32 dots (precision=HIGHEST, Triton's IEEE input
precision), not TF32's 10-bit mantissas: whoever asks for float32 attention
asks for its accuracy. Those dots run on the CUDA cores, about 15x below the
bfloat16 tensor-core peak on an H100 (67 vs 989 dense TFLOP/s, NVIDIA's data
sheet); bfloat16 and float16 inputs use the tensor cores, accumulating in
float32.

Lengths are padded to a multiple of the block size with a segment id that no
token has, and head dims to a power of two (64 and 128 need no padding), at
most 256, the table's largest.
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
  """Tile sizes (powers of two, >= 16 for the tensor cores); None: `LAUNCH_TABLE`'s."""
  block_q: int | None = None
  block_k: int | None = None
  backward_q: int | None = None
  backward_k: int | None = None


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel's tile (block_q x block_k) and Triton launch parameters.

  In the dk/dv kernel block_k is the program's own block and block_q the tile it loops over."""
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


# (largest head_dim, bytes per element): (forward, backward: dq and dk/dv alike);
# bfloat16 and float16 share the 2-byte rows. These are starting points, not
# measurements: no GPU was at hand to tune them, so they come from arithmetic
# on a Hopper SM (at most 227 KiB of shared memory per program, 64K 32-bit
# registers). A pipelined loop keeps num_stages copies of the two tiles it
# loads per step (K and V; Q and dO in dk/dv) in shared memory, beside the
# tiles it holds throughout (Q; Q and dO in dq; K and V in dk/dv); the comments
# add these up, and every row stays at or below 128 KiB, leaving room for
# Triton's layout conversions. Warps grow with the float32 accumulators
# (out; dK and dV), so that they take at most 64 registers per thread. float32
# has twice the bytes per element and its dots run on the CUDA cores, an order
# of magnitude slower: tiles of a quarter the area, and two stages hide a
# load behind such dots. Re-tune with benchmarks/attention.py on the GPU you
# train on.
LAUNCH_TABLE = {
    # Launch(block_q, block_k, num_warps, num_stages)            KiB: stages x loaded + held
    (64, 2): (Launch(128, 64, 4, 3), Launch(64, 64, 4, 2)),    # 3 x 16 + 16,  2 x 16 + 16
    (128, 2): (Launch(128, 64, 8, 3), Launch(64, 64, 8, 2)),   # 3 x 32 + 32,  2 x 32 + 32
    (256, 2): (Launch(64, 32, 8, 2), Launch(32, 32, 8, 2)),    # 2 x 32 + 32,  2 x 32 + 32
    (64, 4): (Launch(64, 32, 4, 2), Launch(32, 32, 4, 2)),     # 2 x 16 + 16,  2 x 16 + 16
    (128, 4): (Launch(64, 32, 4, 2), Launch(32, 32, 4, 2)),    # 2 x 32 + 32,  2 x 32 + 32
    (256, 4): (Launch(32, 16, 4, 2), Launch(16, 16, 4, 2)),    # 2 x 32 + 32,  2 x 32 + 32
}


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  softmax_scale: float
  forward: Launch
  backward: Launch
  interpret: bool


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  vma = getattr(aval, 'vma', None)
  if vma is None:
    vma = getattr(getattr(aval, 'manual_axis_type', None), 'varying', ())
  return frozenset(vma)


def _same_varying(*arrays):
  """The arrays, each marked as varying over every mesh axis that any of them
  varies over: a kernel's inputs must agree (a no-op outside a shard_map)."""
  union = frozenset().union(*map(_varying_axes, arrays))
  return tuple(x if _varying_axes(x) == union
               else jax.lax.pcast(x, tuple(sorted(union - _varying_axes(x))), to='varying')
               for x in arrays)


def _out_shape(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A pallas_call output shape that varies over the same mesh axes as `like`.

  Inside a shard_map (the model runs per device) pallas_call must be told how
  its outputs vary across devices; JAX has spelt that keyword `vma` and
  `manual_axis_type`.
  """
  aval = jax.typeof(like)
  for keyword in ('manual_axis_type', 'vma'):
    value = getattr(aval, keyword, None)
    if value is not None:
      try:
        return jax.ShapeDtypeStruct(shape, dtype, **{keyword: value})
      except TypeError:
        continue
  return jax.ShapeDtypeStruct(shape, dtype)


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
  head_dim ** -0.5. block_sizes: tile sizes in place of `LAUNCH_TABLE`'s
  (None, or a None field: the table's). With return_lse, also returns the
  natural-log log-sum-exp of the masked scaled scores, [B, N, T] float32;
  both outputs are differentiable. interpret=True runs the kernels as plain
  JAX (CPU).
  """
  batch, length, num_heads, head_dim = q_BTNH.shape
  _check_inputs(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  # 16: the smallest dot the tensor cores take.
  padded_dim = max(16, pl.next_power_of_2(head_dim))
  forward, backward = launches(padded_dim, q_BTNH.dtype, block_sizes or BlockSizes(), length)
  static = _Static(causal, head_dim ** -0.5 if softmax_scale is None else float(softmax_scale),
                   forward, backward, interpret)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((batch, length), jnp.int32)
  multiple = max(forward.block_q, forward.block_k, backward.block_q, backward.block_k)
  padded_length = -(-length // multiple) * multiple
  # Zero head-dim padding adds nothing to q.k and yields zero output columns.
  pad = ((0, 0), (0, padded_length - length), (0, 0), (0, padded_dim - head_dim))
  segment_ids_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, padded_length - length)),
                           constant_values=PAD_SEGMENT)
  out_BTNH, lse_BNT = _flash(static, *_same_varying(
      jnp.pad(q_BTNH, pad), jnp.pad(k_BTKH, pad), jnp.pad(v_BTKH, pad), segment_ids_BT))
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
  largest = max(dim for dim, _ in LAUNCH_TABLE)
  if head_dim > largest:
    raise ValueError(f'flash_attention: head_dim {head_dim} is above {largest}, the largest in '
                     'LAUNCH_TABLE')
  if segment_ids_BT is not None and segment_ids_BT.shape != (batch, length):
    raise ValueError(f'flash_attention: segment_ids {segment_ids_BT.shape} must be {(batch, length)}')


def launches(head_dim: int, dtype, block_sizes: BlockSizes, length: int) -> tuple[Launch, Launch]:
  """The forward and backward `Launch` for a (padded) head_dim and dtype.

  block_sizes' fields that are not None replace the table's blocks; every
  block is then cut to the (power-of-two rounded) length, so short inputs pad little.
  """
  for name, size in dataclasses.asdict(block_sizes).items():
    if size is not None and (size < 1 or size & (size - 1)):
      raise ValueError(f'flash_attention: {name}={size} must be a power of two')
  row = min(dim for dim, _ in LAUNCH_TABLE if dim >= head_dim)
  forward, backward = LAUNCH_TABLE[row, jnp.dtype(dtype).itemsize]
  longest = max(16, pl.next_power_of_2(length))

  def fit(launch, block_q, block_k):
    return dataclasses.replace(launch, block_q=min(block_q or launch.block_q, longest),
                               block_k=min(block_k or launch.block_k, longest))
  return (fit(forward, block_sizes.block_q, block_sizes.block_k),
          fit(backward, block_sizes.backward_q, block_sizes.backward_k))


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


def loop_pieces(class_BXY):
  """[B, X, 2, P] int32: per block row, its PARTIAL pieces then its FULL ones.

  A piece is a maximal run of consecutive tiles of one class. Each of the two
  tables is [count, start, end, start, end, ...], pieces in order, unused
  entries Y; the kernels read the count and the pieces it covers, nothing else.
  """
  num_tiles = class_BXY.shape[-1]
  most = (num_tiles + 1) // 2
  index_Y = jnp.arange(num_tiles)
  no_tile = jnp.zeros(class_BXY.shape[:-1] + (1,), bool)
  tables = []
  for kind in (PARTIAL, FULL):
    is_BXY = class_BXY == kind
    starts_BXY = is_BXY & ~jnp.concatenate([no_tile, is_BXY[..., :-1]], axis=-1)
    ends_BXY = is_BXY & ~jnp.concatenate([is_BXY[..., 1:], no_tile], axis=-1)
    # Sorting moves the pieces' starts (and ends) to the front, in order.
    start_BXR = jnp.sort(jnp.where(starts_BXY, index_Y, num_tiles), axis=-1)[..., :most]
    end_BXR = jnp.sort(jnp.where(ends_BXY, index_Y + 1, num_tiles), axis=-1)[..., :most]
    bounds_BXR2 = jnp.stack([start_BXR, end_BXR], axis=-1)
    tables.append(jnp.concatenate([starts_BXY.sum(-1, keepdims=True),
                                   bounds_BXR2.reshape(*start_BXR.shape[:-1], 2 * most)], axis=-1))
  return jnp.stack(tables, axis=2).astype(jnp.int32)


def _tile_mask(segments_q_t, segments_k_t, rows_t, cols_t, causal):
  mask_tt = segments_q_t[:, None] == segments_k_t[None, :]
  if causal:
    mask_tt &= rows_t[:, None] >= cols_t[None, :]
  return mask_tt


def _dot(a, b, **transpose):
  """pl.dot at HIGHEST precision: exact for float32 inputs (Triton's IEEE rather
  than TF32); bfloat16 and float16 inputs take the tensor cores either way."""
  return pl_triton.dot(a, b, precision=lax.Precision.HIGHEST, **transpose)


def _scores(q_tH, k_tH, scale2, mask_tt=None):
  """Scores in log2 units (exp2 is the cheap exponential on GPUs), masked where mask_tt is False.

  A mask is a select on the scores: no load depends on it."""
  scores_tt = _dot(q_tH, k_tH, trans_b=True) * scale2
  return scores_tt if mask_tt is None else jnp.where(mask_tt, scores_tt, MASK_VALUE)


def _loop_tiles(pieces_ref, visit, carry):
  """Runs visit(index, carry, masked) over a block row's PARTIAL tiles, masked,
  then over its FULL ones, unmasked, a loop per piece (see `loop_pieces`).

  The inner loops are straight-line code whose loads are unconditional and
  affine in the index, which is what Triton's software pipeliner needs to
  prefetch the next tiles; the order of the tiles does not matter to the sums.
  """
  for kind, masked in ((0, True), (1, False)):
    def piece(p, carry, kind=kind, masked=masked):
      start, end = pieces_ref[kind, 1 + 2 * p], pieces_ref[kind, 2 + 2 * p]
      return lax.fori_loop(start, end, functools.partial(visit, masked=masked), carry)
    carry = lax.fori_loop(0, pieces_ref[kind, 0], piece, carry)
  return carry


# -- forward -------------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, segments_q_ref, segments_k_ref, pieces_ref, out_ref,
                    lse_ref, *, scale2, causal, block_k):
  block_q, head_dim = q_ref.shape
  q_tH = q_ref[...]
  segments_q_t = segments_q_ref[...]
  rows_t = pl.program_id(0) * block_q + jnp.arange(block_q)

  def visit(j, carry, masked):
    acc_tH, max_t, sum_t = carry
    cols = pl.ds(j * block_k, block_k)
    mask_tt = (_tile_mask(segments_q_t, segments_k_ref[cols], rows_t,
                          j * block_k + jnp.arange(block_k), causal) if masked else None)
    scores_tt = _scores(q_tH, k_ref[cols, :], scale2, mask_tt)
    new_max_t = jnp.maximum(max_t, scores_tt.max(axis=1))
    rescale_t = jnp.exp2(max_t - new_max_t)
    probs_tt = jnp.exp2(scores_tt - new_max_t[:, None])
    v_tH = v_ref[cols, :]
    acc_tH = acc_tH * rescale_t[:, None] + _dot(probs_tt.astype(v_tH.dtype), v_tH)
    return acc_tH, new_max_t, sum_t * rescale_t + probs_tt.sum(axis=1)

  init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc_tH, max_t, sum_t = _loop_tiles(pieces_ref, visit, init)
  out_ref[...] = (acc_tH / sum_t[:, None]).astype(out_ref.dtype)
  lse_ref[...] = max_t + jnp.log2(sum_t)


def _forward(static: _Static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
  """(out [B, T, N, H], log2-sum-exp2 of the log2-unit scores [B, N, T] float32)."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  groups = num_heads // k_BTKH.shape[2]
  launch = static.forward
  block_q, block_k = launch.block_q, launch.block_k
  pieces_BI2P = loop_pieces(block_schedule(segment_ids_BT, block_q, block_k, static.causal))
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
                pl.BlockSpec((None, None) + pieces_BI2P.shape[2:], lambda i, b, n: (b, i, 0, 0))],
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))],
      out_shape=[_out_shape(q_BTNH.shape, q_BTNH.dtype, q_BTNH),
                 _out_shape((batch, num_heads, length), jnp.float32, q_BTNH)],
      compiler_params=triton_compiler_params(launch.num_warps, launch.num_stages),
      interpret=static.interpret, name='flash_attention_forward',
  )(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, segment_ids_BT, pieces_BI2P)


# -- backward ------------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, segments_q_ref, segments_k_ref,
               pieces_ref, dq_ref, *, scale2, causal, block_k):
  block_q, head_dim = q_ref.shape
  q_tH, dout_tH = q_ref[...], dout_ref[...]
  lse2_t, delta_t = lse_ref[...], delta_ref[...]
  segments_q_t = segments_q_ref[...]
  rows_t = pl.program_id(0) * block_q + jnp.arange(block_q)

  def visit(j, dq_tH, masked):
    cols = pl.ds(j * block_k, block_k)
    k_tH, v_tH = k_ref[cols, :], v_ref[cols, :]
    mask_tt = (_tile_mask(segments_q_t, segments_k_ref[cols], rows_t,
                          j * block_k + jnp.arange(block_k), causal) if masked else None)
    probs_tt = jnp.exp2(_scores(q_tH, k_tH, scale2, mask_tt) - lse2_t[:, None])
    dscores_tt = probs_tt * (_dot(dout_tH, v_tH, trans_b=True) - delta_t[:, None])
    return dq_tH + _dot(dscores_tt.astype(k_tH.dtype), k_tH)

  dq_tH = _loop_tiles(pieces_ref, visit, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq_tH * (scale2 / LOG2_E)).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, segments_q_ref, segments_k_ref,
                pieces_ref, dk_ref, dv_ref, *, scale2, causal, block_q, groups):
  block_k, head_dim = k_ref.shape
  k_tH, v_tH = k_ref[...], v_ref[...]
  segments_k_t = segments_k_ref[...]
  cols_t = pl.program_id(0) * block_k + jnp.arange(block_k)

  def visit(g, i, carry, masked):
    dk_tH, dv_tH = carry
    rows = pl.ds(i * block_q, block_q)
    q_tH, dout_tH = q_ref[rows, g, :], dout_ref[rows, g, :]
    mask_tt = (_tile_mask(segments_q_ref[rows], segments_k_t, i * block_q + jnp.arange(block_q),
                          cols_t, causal) if masked else None)
    probs_tt = jnp.exp2(_scores(q_tH, k_tH, scale2, mask_tt) - lse_ref[g, rows][:, None])
    dv_tH += _dot(probs_tt.astype(dout_tH.dtype), dout_tH, trans_a=True)
    dscores_tt = probs_tt * (_dot(dout_tH, v_tH, trans_b=True) - delta_ref[g, rows][:, None])
    return dk_tH + _dot(dscores_tt.astype(q_tH.dtype), q_tH, trans_a=True), dv_tH

  # dK and dV sum over the G query heads that share this kv head, in registers,
  # so that no per-query-head copy of them is written.
  def one_head(g, carry):
    return _loop_tiles(pieces_ref, functools.partial(visit, g), carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk_tH, dv_tH = lax.fori_loop(0, groups, one_head, (zeros, zeros))
  dk_ref[...] = (dk_tH * (scale2 / LOG2_E)).astype(dk_ref.dtype)
  dv_ref[...] = dv_tH.astype(dv_ref.dtype)


def _backward(static: _Static, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, lse2_BNT, delta_BNT,
              dout_BTNH):
  (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, lse2_BNT, delta_BNT, dout_BTNH) = _same_varying(
      q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, lse2_BNT, delta_BNT, dout_BTNH)
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BTKH.shape[2]
  groups = num_heads // num_kv_heads
  launch = static.backward
  block_q, block_k = launch.block_q, launch.block_k
  class_BIJ = block_schedule(segment_ids_BT, block_q, block_k, static.causal)
  pieces_BI2P, pieces_BJ2P = loop_pieces(class_BIJ), loop_pieces(class_BIJ.swapaxes(1, 2))
  kw = dict(scale2=static.softmax_scale * LOG2_E, causal=static.causal)
  params = triton_compiler_params(launch.num_warps, launch.num_stages)
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
                pl.BlockSpec((None, None) + pieces_BI2P.shape[2:], lambda i, b, n: (b, i, 0, 0))],
      out_specs=q_spec, out_shape=_out_shape(q_BTNH.shape, q_BTNH.dtype, q_BTNH),
      compiler_params=params, interpret=static.interpret, name='flash_attention_dq',
  )(*inputs, pieces_BI2P)

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
                pl.BlockSpec((None, None) + pieces_BJ2P.shape[2:], lambda j, b, k: (b, j, 0, 0))],
      out_specs=[kv_spec, kv_spec],
      out_shape=[_out_shape(k_BTKH.shape, k_BTKH.dtype, k_BTKH)] * 2,
      compiler_params=params, interpret=static.interpret, name='flash_attention_dkv',
  )(grouped(q_BTNH), k_BTKH, v_BTKH, grouped(dout_BTNH), per_head(lse2_BNT), per_head(delta_BNT),
    segment_ids_BT, segment_ids_BT, pieces_BJ2P)
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
