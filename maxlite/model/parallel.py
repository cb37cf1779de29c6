"""The model's collectives: everything that crosses a device boundary, written out.

The train step, the eval step and generation run the model per device, inside
one shard_map over every mesh axis (maxlite.step, maxlite.generate). Each
device holds its own rows of the batch and its own shards of the parameters,
as the rule table in maxlite.mesh places them, and the functions here are the
only places where devices exchange data:

  fsdp      `project` and `lookup` all-gather a weight in the compute dtype
            just before its matmul (again in the backward pass, instead of
            keeping it) and reduce-scatter its gradient in grad_reduce_dtype.
  tensor    Megatron column/row parallelism with sequence parallelism. Between
            blocks the residual is split along its length; `gather_sequence`
            all-gathers it before a block's column-parallel matmuls and
            `scatter_sequence` reduce-scatters the output of its row-parallel
            ones, both in the compute dtype. The vocabulary is split as well:
            `lookup` sums partial embeddings and `cross_entropy` reduces
            [B, T] statistics, never the logits.
  data      nothing in the forward or backward pass; step.py sums gradients
            once per step.
  pipeline  stage-to-stage permutes (maxlite.model.pipeline).

Outside a shard_map (one device, no mesh) every collective here is the
identity, so the same code runs unsharded.
"""
import functools

import jax
import jax.numpy as jnp


def axis_size(axis: str) -> int:
  """The size of a mesh axis that the current code runs per device over; 1 otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.manual_axes:
    return 1
  return mesh.shape[axis]


def axis_index(axis: str):
  return jax.lax.axis_index(axis) if axis_size(axis) > 1 else 0


def varying_axes(x) -> frozenset:
  """The manual mesh axes along which x may differ between devices."""
  aval = jax.typeof(x)
  vma = getattr(aval, 'vma', None)
  if vma is None:
    vma = getattr(getattr(aval, 'manual_axis_type', None), 'varying', frozenset())
  return frozenset(vma)


def zeros_like(x):
  """Zeros typed like x, varying over the same mesh axes (e.g. a scan carry's start)."""
  zeros = jnp.zeros_like(x)
  missing = tuple(sorted(varying_axes(x) - varying_axes(zeros)))
  return jax.lax.pcast(zeros, missing, to='varying') if missing else zeros


def _sum_to_match(grad, like):
  """Sums grad over the axes it varies along but `like` (its primal) does not."""
  extra = tuple(sorted(varying_axes(grad) - varying_axes(like)))
  return jax.lax.psum(grad, extra) if extra else grad


def _gather(w, dim: int | None):
  if dim is None or axis_size('fsdp') == 1:
    return w
  return jax.lax.all_gather(w, 'fsdp', axis=dim, tiled=True)


def _reduce_scatter(g, dim: int | None):
  if dim is None or axis_size('fsdp') == 1:
    return g
  return jax.lax.psum_scatter(g, 'fsdp', scatter_dimension=dim, tiled=True)


# -- weights: gathered over fsdp for their matmul ----------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def project(x, w, num_in: int, fsdp_dim: int | None, reduce_dtype: str, out_dtype: str | None = None):
  """x[..., *in] @ w[*in, *out], w all-gathered over fsdp along fsdp_dim in x's dtype.

  out_dtype: the matmul's output dtype (default x's), e.g. float32 logits
  straight out of the accumulator. The backward pass gathers w again rather
  than keeping the gathered copy alive from the forward pass (FSDP's memory
  bound), computes the weight gradient with reduce_dtype accumulation and
  output, and reduce-scatters it over fsdp in that dtype.
  """
  return _matmul(x, _gather(w.astype(x.dtype), fsdp_dim), num_in, out_dtype)


def _matmul(x, w, num_in: int, out_dtype=None):
  contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
  return jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=out_dtype)


def _project_fwd(x, w, num_in, fsdp_dim, reduce_dtype, out_dtype):
  return project(x, w, num_in, fsdp_dim, reduce_dtype, out_dtype), (x, w)


def _project_bwd(num_in, fsdp_dim, reduce_dtype, out_dtype, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)  # both backward matmuls run in the compute dtype
  w_full = _gather(w.astype(x.dtype), fsdp_dim)
  _, x_vjp = jax.vjp(lambda x_: _matmul(x_, w_full, num_in), x)
  (dx,) = x_vjp(dy)
  # Contract every leading (token) dim of x with dy's: the result is laid out as w is.
  leading = tuple(range(x.ndim - num_in))
  dw = jax.lax.dot_general(x, dy, ((leading, leading), ((), ())),
                           preferred_element_type=jnp.dtype(reduce_dtype))
  dw = _reduce_scatter(_sum_to_match(dw, w), fsdp_dim)
  return dx, dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


# -- the vocabulary: split over tensor ----------------------------------------------

def vocab_start(local_vocab: int):
  """The first vocabulary id of this device's slice."""
  return axis_index('tensor') * local_vocab


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gathered(w, fsdp_dim: int | None, dtype: str, reduce_dtype: str):
  """w in dtype, all-gathered over fsdp along fsdp_dim, for several uses.

  `project` gathers its weight itself, twice; this gathers once and keeps the
  copy for every use (the tied embedding, used at both ends of the model), so
  that the uses' gradients are summed before their single reduce-scatter.
  """
  return _gather(w.astype(dtype), fsdp_dim)


def _gathered_fwd(w, fsdp_dim, dtype, reduce_dtype):
  return gathered(w, fsdp_dim, dtype, reduce_dtype), w


def _gathered_bwd(fsdp_dim, dtype, reduce_dtype, w, d_full):
  grad = _reduce_scatter(_sum_to_match(d_full.astype(reduce_dtype), w), fsdp_dim)
  return (grad.astype(w.dtype),)


gathered.defvjp(_gathered_fwd, _gathered_bwd)


@jax.custom_vjp
def lookup(table_VD, tokens_BT):
  """This device's part of the embedding of tokens_BT: the rows in its
  vocabulary slice of the (gathered) table, zeros elsewhere; sum over tensor
  for the whole.

  The gradient is a scatter-add of every token's cotangent into a float32
  table, rounded to the table's dtype once: summing many bf16 contributions
  to the same row one by one would drop their low bits.
  """
  local_BT, inside_BT = _local_ids(tokens_BT, table_VD.shape[0])
  rows_BTD = jnp.take(table_VD, local_BT, axis=0)
  return jnp.where(inside_BT[..., None], rows_BTD, jnp.zeros((), rows_BTD.dtype))


def _local_ids(tokens_BT, local_vocab: int):
  local_BT = tokens_BT - vocab_start(local_vocab)
  inside_BT = (local_BT >= 0) & (local_BT < local_vocab)
  return jnp.where(inside_BT, local_BT, 0), inside_BT


def _lookup_fwd(table_VD, tokens_BT):
  return lookup(table_VD, tokens_BT), (table_VD, tokens_BT)


def _lookup_bwd(residuals, d_BTD):
  table_VD, tokens_BT = residuals
  local_BT, inside_BT = _local_ids(tokens_BT, table_VD.shape[0])
  d_BTD = jnp.where(inside_BT[..., None], d_BTD.astype(jnp.float32), 0.0)
  grad_VD = jnp.zeros(table_VD.shape, jnp.float32).at[local_BT].add(d_BTD)
  return _sum_to_match(grad_VD, table_VD).astype(table_VD.dtype), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)


def mask_padding(logits_BTv, vocab_size: int):
  """Sets the logits of padding ids (>= vocab_size) to the dtype's minimum: never predicted."""
  ids_v = vocab_start(logits_BTv.shape[-1]) + jnp.arange(logits_BTv.shape[-1])
  return jnp.where(ids_v < vocab_size, logits_BTv, jnp.finfo(logits_BTv.dtype).min)


def cross_entropy(logits_BTv, targets_BT):
  """(cross-entropy, log-normaliser), each [B, T], from this device's vocabulary
  slice of the logits; the softmax statistics are reduced over tensor, so the
  logits themselves never cross devices. Padding must already be masked."""
  ids_v = vocab_start(logits_BTv.shape[-1]) + jnp.arange(logits_BTv.shape[-1])
  # The max only steadies the exponentials; no gradient flows through it.
  max_BT = _over_tensor(jax.lax.pmax, jax.lax.stop_gradient(jnp.max(logits_BTv, axis=-1)))
  sum_exp_BT = _over_tensor(jax.lax.psum, jnp.sum(jnp.exp(logits_BTv - max_BT[..., None]), axis=-1))
  log_norm_BT = max_BT + jnp.log(sum_exp_BT)
  target_BT = _over_tensor(jax.lax.psum, jnp.sum(
      jnp.where(ids_v == targets_BT[..., None], logits_BTv, 0.0), axis=-1))
  return log_norm_BT - target_BT, log_norm_BT


def gather_vocab(logits_BTv):
  """The whole vocabulary's logits, the same on every device (inference only).

  A sum of zero-padded slices rather than an all-gather: a psum's result is
  known to be equal on every device, so it may leave the per-device region
  unsplit.
  """
  size = axis_size('tensor')
  if size == 1:
    return logits_BTv
  local = logits_BTv.shape[-1]
  whole = jnp.zeros((*logits_BTv.shape[:-1], size * local), logits_BTv.dtype)
  whole = jax.lax.dynamic_update_slice_in_dim(whole, logits_BTv, vocab_start(local), axis=-1)
  return jax.lax.psum(whole, 'tensor')


def _over_tensor(collective, x):
  return collective(x, 'tensor') if axis_size('tensor') > 1 else x


# -- the residual stream: split along its length over tensor -------------------------

def gather_sequence(x_BtD, sequence_parallel: bool):
  """[B, T / tensor, D] -> [B, T, D] before column-parallel matmuls."""
  if not sequence_parallel or axis_size('tensor') == 1:
    return x_BtD
  return jax.lax.all_gather(x_BtD, 'tensor', axis=1, tiled=True)


def scatter_sequence(partial_BTD, sequence_parallel: bool):
  """Sums the row-parallel partial outputs over tensor, leaving each device its
  slice of the length ([B, T / tensor, D]); without sequence parallelism
  (decoding a token at a time) every device keeps the whole sum."""
  if axis_size('tensor') == 1:
    return partial_BTD
  if not sequence_parallel:
    return jax.lax.psum(partial_BTD, 'tensor')
  return jax.lax.psum_scatter(partial_BTD, 'tensor', scatter_dimension=1, tiled=True)


def local_sequence(x_BT, sequence_parallel: bool):
  """This device's slice of the length of a [B, T, ...] array that every tensor rank holds."""
  size = axis_size('tensor')
  if not sequence_parallel or size == 1:
    return x_BT
  length = x_BT.shape[1] // size
  return jax.lax.dynamic_slice_in_dim(x_BT, axis_index('tensor') * length, length, axis=1)


def micro_batches(x_B, num_micro: int):
  """This device's rows [B, ...] -> [num_micro, B / num_micro, ...] (gradient
  accumulation and pipeline micro-batches alike)."""
  return x_B.reshape(num_micro, x_B.shape[0] // num_micro, *x_B.shape[1:])
