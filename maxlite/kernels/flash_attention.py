"""Flash attention in Pallas (Triton on GPUs): causal, grouped-query, packed documents.

Shape legend: B batch, T query length, S key length (self-attention: S = T,
queries and keys alike), N query heads, K kv heads, G = N // K query heads per
kv head, H head dim, I query blocks, J key blocks; X, Y the blocks a kernel's
programs own and the blocks each one loops over (I and J, or J and I); R =
ceil(Y / 2), the most pieces of one class a row can hold, and P = 1 + 2R, a
row's piece table.

A query attends to a key when their segment ids are equal and, if causal, the
key's index is not after the query's. A token's index is its place in the
whole row: 0..T-1 by default, or given per token (`indices_BT`,
`kv_indices_BS`) when the queries are only some of the row's tokens, as with
context parallelism (maxlite.model.context), where a device's queries are two
separate chunks of the row and its keys the whole row. Within a packed row
whose positions restart at each document and increase by one inside it, this
equals the position-causal mask of `maxlite.model.attention.xla_attention`.

The attention matrix is visited in tiles of block_q x block_k. Before a kernel
runs, `block_schedule` classifies each tile from the min and max segment id
of its query and key blocks (and, if causal, from their min and max index):
SKIP (no pair can attend: disjoint id ranges, or every key after every
query), FULL (one document on both sides and every key at or before every
query: no mask needed) or PARTIAL (element mask). `loop_pieces` lists each block row's pieces: runs of
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
most 256, the table's largest. A query that sees no key at all (a padding
query when only the queries needed padding) gets output 0 and log-sum-exp
+inf, so that its backward terms are exactly 0 rather than NaN.
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
PAD_INDEX = np.iinfo(np.int32).max
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


def flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, kv_segment_ids_BS=None,
                    indices_BT=None, kv_indices_BS=None, causal: bool = True,
                    softmax_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    return_lse: bool = False, interpret: bool = False):
  """Softmax(q k^T * scale, masked) v, without materialising the scores.

  segment_ids_BT: int document id per token (None: one document); any value
  but int32's minimum, which marks padding. kv_segment_ids_BS: the keys' ids
  (None: segment_ids_BT, for self-attention; needed when S != T).
  indices_BT, kv_indices_BS: int each query's and key's index in the row,
  which the causal mask compares (None: 0..T-1 and 0..S-1); the tile
  schedule skips most work when they increase along each block, e.g. a few
  contiguous runs (context parallelism's chunks). softmax_scale defaults to
  head_dim ** -0.5. block_sizes: tile sizes in place of `LAUNCH_TABLE`'s
  (None, or a None field: the table's). With return_lse, also returns the
  natural-log log-sum-exp of the masked scaled scores, [B, N, T] float32;
  both outputs are differentiable. interpret=True runs the kernels as plain
  JAX (CPU).
  """
  batch, length, num_heads, head_dim = q_BTNH.shape
  kv_length = k_BSKH.shape[1]
  _check_inputs(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS, indices_BT,
                kv_indices_BS)
  # 16: the smallest dot the tensor cores take.
  padded_dim = max(16, pl.next_power_of_2(head_dim))
  forward, backward = launches(padded_dim, q_BTNH.dtype, block_sizes or BlockSizes(),
                               max(length, kv_length))
  static = _Static(causal, head_dim ** -0.5 if softmax_scale is None else float(softmax_scale),
                   forward, backward, interpret)
  masks = _mask_inputs(batch, length, kv_length, segment_ids_BT, kv_segment_ids_BS, indices_BT,
                       kv_indices_BS)
  multiple = max(forward.block_q, forward.block_k, backward.block_q, backward.block_k)
  padded = (-(-length // multiple) * multiple, -(-kv_length // multiple) * multiple)
  # Padding tokens get a segment id of their own and the largest index; zero
  # head-dim padding adds nothing to q.k and yields zero output columns.
  pad_rows = lambda x_BT, total, value: jnp.pad(x_BT, ((0, 0), (0, total - x_BT.shape[1])),
                                                 constant_values=value)
  def pad_heads(x_BTNH, total):
    return jnp.pad(x_BTNH, ((0, 0), (0, total - x_BTNH.shape[1]), (0, 0), (0, padded_dim - head_dim)))
  segments_BT, kv_segments_BS, indices_BT, kv_indices_BS = (
      pad_rows(x, total, value) for x, total, value in zip(
          masks, padded * 2, (PAD_SEGMENT, PAD_SEGMENT, PAD_INDEX, PAD_INDEX)))
  out_BTNH, lse_BNT = _flash(static, *_same_varying(
      pad_heads(q_BTNH, padded[0]), pad_heads(k_BSKH, padded[1]), pad_heads(v_BSKH, padded[1]),
      segments_BT, kv_segments_BS, indices_BT, kv_indices_BS))
  out_BTNH = out_BTNH[:, :length, :, :head_dim]
  if return_lse:
    return out_BTNH, lse_BNT[:, :, :length]
  return out_BTNH


def flash_attention_reference(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *,
                              kv_segment_ids_BS=None, indices_BT=None, kv_indices_BS=None,
                              causal: bool = True, softmax_scale: float | None = None,
                              block_sizes: BlockSizes | None = None, return_lse: bool = False,
                              interpret: bool = False):
  """The same function with dense scores in float32 (float64 for float64 inputs)."""
  del block_sizes, interpret
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BSKH.shape[2]
  scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH.astype(dtype), k_BSKH.astype(dtype)) * scale
  segments_BT, kv_segments_BS, indices_BT, kv_indices_BS = _mask_inputs(
      batch, length, k_BSKH.shape[1], segment_ids_BT, kv_segment_ids_BS, indices_BT, kv_indices_BS)
  mask_BTS = segments_BT[:, :, None] == kv_segments_BS[:, None, :]
  if causal:
    mask_BTS &= indices_BT[:, :, None] >= kv_indices_BS[:, None, :]
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  lse_BKGT = jax.nn.logsumexp(scores_BKGTS, axis=-1)
  probs_BKGTS = jnp.exp(scores_BKGTS - lse_BKGT[..., None])
  out_BTKGH = jnp.einsum('bkgts,bskh->btkgh', probs_BKGTS, v_BSKH.astype(dtype))
  out_BTNH = out_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype)
  if return_lse:
    return out_BTNH, lse_BKGT.reshape(batch, num_heads, length)
  return out_BTNH


def _check_inputs(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS, indices_BT,
                  kv_indices_BS):
  if q_BTNH.ndim != 4 or k_BSKH.shape != v_BSKH.shape:
    raise ValueError(f'flash_attention: q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape} '
                     'must be [batch, length, heads, head_dim] with k and v alike')
  batch, length, num_heads, head_dim = q_BTNH.shape
  kv_length = k_BSKH.shape[1]
  if k_BSKH.shape[0] != batch or k_BSKH.shape[3] != head_dim:
    raise ValueError(f'flash_attention: k {k_BSKH.shape} does not match q {q_BTNH.shape} '
                     '(same batch and head_dim)')
  if num_heads % k_BSKH.shape[2]:
    raise ValueError(f'flash_attention: {num_heads} query heads are not a multiple of '
                     f'{k_BSKH.shape[2]} kv heads')
  if q_BTNH.dtype not in KERNEL_DTYPES or k_BSKH.dtype != q_BTNH.dtype or v_BSKH.dtype != q_BTNH.dtype:
    raise ValueError(f'flash_attention: dtypes {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKH.dtype}; '
                     'q, k and v must share one of bfloat16, float16, float32')
  largest = max(dim for dim, _ in LAUNCH_TABLE)
  if head_dim > largest:
    raise ValueError(f'flash_attention: head_dim {head_dim} is above {largest}, the largest in '
                     'LAUNCH_TABLE')
  for name, x, shape in (('segment_ids', segment_ids_BT, (batch, length)),
                         ('kv_segment_ids', kv_segment_ids_BS, (batch, kv_length)),
                         ('indices', indices_BT, (batch, length)),
                         ('kv_indices', kv_indices_BS, (batch, kv_length))):
    if x is not None and x.shape != shape:
      raise ValueError(f'flash_attention: {name} {x.shape} must be {shape}')
  if segment_ids_BT is None and kv_segment_ids_BS is not None:
    raise ValueError('flash_attention: kv_segment_ids needs segment_ids')
  if segment_ids_BT is not None and kv_segment_ids_BS is None and kv_length != length:
    raise ValueError(f'flash_attention: {kv_length} keys are not the {length} queries\' tokens, '
                     'so kv_segment_ids must be given with segment_ids')
  if (indices_BT is None) != (kv_indices_BS is None):
    raise ValueError('flash_attention: give indices and kv_indices together')


def _mask_inputs(batch: int, length: int, kv_length: int, segment_ids_BT, kv_segment_ids_BS,
                 indices_BT, kv_indices_BS):
  """(segment ids, kv segment ids, indices, kv indices), int32, with their defaults filled in."""
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((batch, length), jnp.int32)
  if kv_segment_ids_BS is None:
    kv_segment_ids_BS = segment_ids_BT if kv_length == length else jnp.zeros((batch, kv_length),
                                                                              jnp.int32)
  if indices_BT is None:
    indices_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    kv_indices_BS = jnp.broadcast_to(jnp.arange(kv_length, dtype=jnp.int32), (batch, kv_length))
  return tuple(x.astype(jnp.int32) for x in (segment_ids_BT, kv_segment_ids_BS, indices_BT,
                                              kv_indices_BS))


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


def block_schedule(segment_ids_BT, block_q: int, block_k: int, causal: bool, *,
                   kv_segment_ids_BS=None, indices_BT=None, kv_indices_BS=None):
  """[B, I, J] int32 tile classes (SKIP, PARTIAL, FULL) from per-block min/max
  segment ids and, if causal, indices (defaults as in `flash_attention`)."""
  batch, length = segment_ids_BT.shape
  kv_length = length if kv_segment_ids_BS is None else kv_segment_ids_BS.shape[1]
  segment_ids_BT, kv_segment_ids_BS, indices_BT, kv_indices_BS = _mask_inputs(
      batch, length, kv_length, segment_ids_BT, kv_segment_ids_BS, indices_BT, kv_indices_BS)

  def query_blocks(x_BT):  # [B, I, 1] min and max
    x_BIt = x_BT.reshape(batch, length // block_q, block_q)
    return x_BIt.min(-1)[:, :, None], x_BIt.max(-1)[:, :, None]

  def key_blocks(x_BS):  # [B, 1, J] min and max
    x_BJt = x_BS.reshape(batch, kv_length // block_k, block_k)
    return x_BJt.min(-1)[:, None, :], x_BJt.max(-1)[:, None, :]

  q_min_BI1, q_max_BI1 = query_blocks(segment_ids_BT)
  k_min_B1J, k_max_B1J = key_blocks(kv_segment_ids_BS)
  # Disjoint id ranges: no equal ids, whatever their order within the blocks.
  visible_BIJ = (q_min_BI1 <= k_max_B1J) & (k_min_B1J <= q_max_BI1)
  one_document_BIJ = (q_min_BI1 == q_max_BI1) & (k_min_B1J == k_max_B1J) & (q_min_BI1 == k_min_B1J)
  if causal:
    first_row_BI1, last_row_BI1 = query_blocks(indices_BT)
    first_col_B1J, last_col_B1J = key_blocks(kv_indices_BS)
    visible_BIJ &= first_col_B1J <= last_row_BI1
    one_document_BIJ &= last_col_B1J <= first_row_BI1
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

def _forward_kernel(q_ref, k_ref, v_ref, segments_q_ref, segments_k_ref, indices_q_ref,
                    indices_k_ref, pieces_ref, out_ref, lse_ref, *, scale2, causal, block_k):
  block_q, head_dim = q_ref.shape
  q_tH = q_ref[...]
  segments_q_t, rows_t = segments_q_ref[...], indices_q_ref[...]

  def visit(j, carry, masked):
    acc_tH, max_t, sum_t = carry
    cols = pl.ds(j * block_k, block_k)
    mask_tt = (_tile_mask(segments_q_t, segments_k_ref[cols], rows_t, indices_k_ref[cols], causal)
               if masked else None)
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
  # A row that visited any tile has sum >= 1 (its largest score gives exp2(0));
  # sum 0 means it sees no key: output 0, and an lse of +inf that makes every
  # exp2(score - lse) of the backward 0.
  empty_t = sum_t == 0
  sum_t = jnp.where(empty_t, 1.0, sum_t)
  out_ref[...] = (acc_tH / sum_t[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty_t, jnp.inf, max_t + jnp.log2(sum_t))


def _schedule(static: _Static, block_q: int, block_k: int, masks):
  segments_BT, kv_segments_BS, indices_BT, kv_indices_BS = masks
  return block_schedule(segments_BT, block_q, block_k, static.causal,
                        kv_segment_ids_BS=kv_segments_BS, indices_BT=indices_BT,
                        kv_indices_BS=kv_indices_BS)


def _forward(static: _Static, q_BTNH, k_BSKH, v_BSKH, *masks):
  """(out [B, T, N, H], log2-sum-exp2 of the log2-unit scores [B, N, T] float32).

  masks: segment ids [B, T] and [B, S], indices [B, T] and [B, S]."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  kv_length = k_BSKH.shape[1]
  groups = num_heads // k_BSKH.shape[2]
  launch = static.forward
  block_q, block_k = launch.block_q, launch.block_k
  pieces_BI2P = loop_pieces(_schedule(static, block_q, block_k, masks))
  kernel = functools.partial(_forward_kernel, scale2=static.softmax_scale * LOG2_E,
                             causal=static.causal, block_k=block_k)
  # Grid (I, B, N): one program per query block and head; K and V of the
  # head's group are read in place, never repeated per query head.
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, kv_length, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0))
  q_row_spec = pl.BlockSpec((None, block_q), lambda i, b, n: (b, i))
  kv_row_spec = pl.BlockSpec((None, kv_length), lambda i, b, n: (b, 0))
  return pl.pallas_call(
      kernel, grid=(length // block_q, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_row_spec, kv_row_spec, q_row_spec, kv_row_spec,
                pl.BlockSpec((None, None) + pieces_BI2P.shape[2:], lambda i, b, n: (b, i, 0, 0))],
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))],
      out_shape=[_out_shape(q_BTNH.shape, q_BTNH.dtype, q_BTNH),
                 _out_shape((batch, num_heads, length), jnp.float32, q_BTNH)],
      compiler_params=triton_compiler_params(launch.num_warps, launch.num_stages),
      interpret=static.interpret, name='flash_attention_forward',
  )(q_BTNH, k_BSKH, v_BSKH, *masks, pieces_BI2P)


# -- backward ------------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, segments_q_ref, segments_k_ref,
               indices_q_ref, indices_k_ref, pieces_ref, dq_ref, *, scale2, causal, block_k):
  block_q, head_dim = q_ref.shape
  q_tH, dout_tH = q_ref[...], dout_ref[...]
  lse2_t, delta_t = lse_ref[...], delta_ref[...]
  segments_q_t, rows_t = segments_q_ref[...], indices_q_ref[...]

  def visit(j, dq_tH, masked):
    cols = pl.ds(j * block_k, block_k)
    k_tH, v_tH = k_ref[cols, :], v_ref[cols, :]
    mask_tt = (_tile_mask(segments_q_t, segments_k_ref[cols], rows_t, indices_k_ref[cols], causal)
               if masked else None)
    probs_tt = jnp.exp2(_scores(q_tH, k_tH, scale2, mask_tt) - lse2_t[:, None])
    dscores_tt = probs_tt * (_dot(dout_tH, v_tH, trans_b=True) - delta_t[:, None])
    return dq_tH + _dot(dscores_tt.astype(k_tH.dtype), k_tH)

  dq_tH = _loop_tiles(pieces_ref, visit, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq_tH * (scale2 / LOG2_E)).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, segments_q_ref, segments_k_ref,
                indices_q_ref, indices_k_ref, pieces_ref, dk_ref, dv_ref, *, scale2, causal,
                block_q, groups):
  block_k, head_dim = k_ref.shape
  k_tH, v_tH = k_ref[...], v_ref[...]
  segments_k_t, cols_t = segments_k_ref[...], indices_k_ref[...]

  def visit(g, i, carry, masked):
    dk_tH, dv_tH = carry
    rows = pl.ds(i * block_q, block_q)
    q_tH, dout_tH = q_ref[rows, g, :], dout_ref[rows, g, :]
    mask_tt = (_tile_mask(segments_q_ref[rows], segments_k_t, indices_q_ref[rows], cols_t, causal)
               if masked else None)
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


def _backward(static: _Static, q_BTNH, k_BSKH, v_BSKH, masks, lse2_BNT, delta_BNT, dout_BTNH):
  (q_BTNH, k_BSKH, v_BSKH, lse2_BNT, delta_BNT, dout_BTNH, *masks) = _same_varying(
      q_BTNH, k_BSKH, v_BSKH, lse2_BNT, delta_BNT, dout_BTNH, *masks)
  batch, length, num_heads, head_dim = q_BTNH.shape
  kv_length, num_kv_heads = k_BSKH.shape[1:3]
  groups = num_heads // num_kv_heads
  launch = static.backward
  block_q, block_k = launch.block_q, launch.block_k
  class_BIJ = _schedule(static, block_q, block_k, masks)
  pieces_BI2P, pieces_BJ2P = loop_pieces(class_BIJ), loop_pieces(class_BIJ.swapaxes(1, 2))
  kw = dict(scale2=static.softmax_scale * LOG2_E, causal=static.causal)
  params = triton_compiler_params(launch.num_warps, launch.num_stages)

  # dQ: grid (I, B, N), like the forward.
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0))
  kv_spec = pl.BlockSpec((None, kv_length, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))
  q_row_spec = pl.BlockSpec((None, block_q), lambda i, b, n: (b, i))
  kv_row_spec = pl.BlockSpec((None, kv_length), lambda i, b, n: (b, 0))
  dq_BTNH = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, **kw), grid=(length // block_q, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                q_row_spec, kv_row_spec, q_row_spec, kv_row_spec,
                pl.BlockSpec((None, None) + pieces_BI2P.shape[2:], lambda i, b, n: (b, i, 0, 0))],
      out_specs=q_spec, out_shape=_out_shape(q_BTNH.shape, q_BTNH.dtype, q_BTNH),
      compiler_params=params, interpret=static.interpret, name='flash_attention_dq',
  )(q_BTNH, k_BSKH, v_BSKH, dout_BTNH, lse2_BNT, delta_BNT, *masks, pieces_BI2P)

  # dK, dV: grid (J, B, K); a program reads all G query heads of its kv head
  # ([B, T, K, G, H] is a free reshape of [B, T, N, H]).
  grouped = lambda x_BTNH: x_BTNH.reshape(batch, length, num_kv_heads, groups, head_dim)
  per_head = lambda x_BNT: x_BNT.reshape(batch, num_kv_heads, groups, length)
  q_spec = pl.BlockSpec((None, length, None, groups, head_dim), lambda j, b, k: (b, 0, k, 0, 0))
  kv_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, k: (b, j, k, 0))
  row_spec = pl.BlockSpec((None, None, groups, length), lambda j, b, k: (b, k, 0, 0))
  q_row_spec = pl.BlockSpec((None, length), lambda j, b, k: (b, 0))
  kv_row_spec = pl.BlockSpec((None, block_k), lambda j, b, k: (b, j))
  dk_BSKH, dv_BSKH = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, groups=groups, **kw),
      grid=(kv_length // block_k, batch, num_kv_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                q_row_spec, kv_row_spec, q_row_spec, kv_row_spec,
                pl.BlockSpec((None, None) + pieces_BJ2P.shape[2:], lambda j, b, k: (b, j, 0, 0))],
      out_specs=[kv_spec, kv_spec],
      out_shape=[_out_shape(k_BSKH.shape, k_BSKH.dtype, k_BSKH)] * 2,
      compiler_params=params, interpret=static.interpret, name='flash_attention_dkv',
  )(grouped(q_BTNH), k_BSKH, v_BSKH, grouped(dout_BTNH), per_head(lse2_BNT), per_head(delta_BNT),
    *masks, pieces_BJ2P)
  return dq_BTNH, dk_BSKH, dv_BSKH


# -- the differentiable op -----------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q_BTNH, k_BSKH, v_BSKH, *masks):
  out_BTNH, lse2_BNT = _forward(static, q_BTNH, k_BSKH, v_BSKH, *masks)
  return out_BTNH, lse2_BNT / LOG2_E


def _flash_forward(static, q_BTNH, k_BSKH, v_BSKH, *masks):
  out_BTNH, lse2_BNT = _forward(static, q_BTNH, k_BSKH, v_BSKH, *masks)
  residuals = (q_BTNH, k_BSKH, v_BSKH, masks, out_BTNH, lse2_BNT)
  return (out_BTNH, lse2_BNT / LOG2_E), residuals


def _flash_backward(static, residuals, cotangents):
  q_BTNH, k_BSKH, v_BSKH, masks, out_BTNH, lse2_BNT = residuals
  dout_BTNH, dlse_BNT = cotangents
  # dScores = P * (dP - delta) with delta = rowsum(out * dout); a cotangent on
  # the lse adds P * dlse (d lse / d scores = P), i.e. it lowers delta.
  delta_BNT = jnp.einsum('btnh,btnh->bnt', out_BTNH.astype(jnp.float32),
                         dout_BTNH.astype(jnp.float32)) - dlse_BNT
  dq_BTNH, dk_BSKH, dv_BSKH = _backward(static, q_BTNH, k_BSKH, v_BSKH, masks, lse2_BNT,
                                        delta_BNT, dout_BTNH.astype(q_BTNH.dtype))
  return (dq_BTNH, dk_BSKH, dv_BSKH) + (None,) * len(masks)


_flash.defvjp(_flash_forward, _flash_backward)
