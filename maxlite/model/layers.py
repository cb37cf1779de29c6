"""Llama building blocks: dense projections, RMSNorm, rotary embeddings, SwiGLU.

Shape legend: B batch, T length, D hidden (embed), N query heads, K kv heads,
H head dim, F mlp width, V vocab.

Every parameter is created with `logical_axes` metadata naming its dimensions;
maxlite.mesh turns those names into shardings. The layers run on whatever
shard of a weight the device holds; the weight matmuls and the embedding go
through maxlite.model.parallel, which gathers the fsdp-split dimension.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from maxlite.mesh import sharded_dim
from maxlite.model import parallel


def param(rngs: nnx.Rngs, shape, logical_axes: tuple, dtype, std: float | None,
          padded_shape=None) -> nnx.Param:
  """A Param with its logical axis names; std=None gives ones (norm scales).

  padded_shape: the stored shape, when larger than `shape`; the extra entries
  are zeros, so the random values do not depend on the padding.
  """
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  if padded_shape is not None:
    value = jnp.pad(value, [(0, padded - size) for size, padded in zip(shape, padded_shape)])
  return nnx.Param(value, logical_axes=P(*logical_axes))


class Dense(nnx.Module):
  """x[..., *in_dims] @ kernel[*in_dims, *out_dims]; names one tuple per side.

  reduce_dtype: the dtype in which the kernel's gradient is accumulated and
  summed over devices (optim.grad_reduce_dtype). checkpoint_as: the name that
  remat policies (maxlite.model.llama.REMAT_POLICIES) know the output by.
  """

  def __init__(self, in_dims, out_dims, in_axes, out_axes, *, std, dtype, rngs,
               reduce_dtype='float32', padded_out_dims=None, checkpoint_as: str = ''):
    self.num_in = len(in_dims)
    self.kernel = param(rngs, (*in_dims, *out_dims), (*in_axes, *out_axes), dtype, std,
                        None if padded_out_dims is None else (*in_dims, *padded_out_dims))
    self.fsdp_dim = sharded_dim((*in_axes, *out_axes), 'fsdp')
    self.reduce_dtype = reduce_dtype
    self.checkpoint_as = checkpoint_as

  def __call__(self, x, out_dtype=None):
    y = parallel.project(x, self.kernel[...], self.num_in, self.fsdp_dim, self.reduce_dtype,
                         out_dtype)
    return checkpoint_name(y, self.checkpoint_as) if self.checkpoint_as else y


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, dtype, rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ('norm',), dtype, None)

  def __call__(self, x):
    # Statistics in at least float32: bf16 squares lose too many bits.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(normed.dtype)).astype(x.dtype)


@functools.lru_cache(maxsize=8)
def rotary_table(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos), each [length, head_dim / 2] float64: the rotary angles of positions 0..length-1."""
  half = head_dim // 2
  angle_PH = np.arange(length, dtype=np.float64)[:, None] * theta ** (-np.arange(half) / half)
  return np.sin(angle_PH), np.cos(angle_PH)


def rotary(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float, length: int) -> jax.Array:
  """Rotary embedding in the half-split layout (pairs are (i, i + H/2)).

  Positions restart per packed document, so each document sees positions 0..n,
  all below `length` (the row's, or the KV cache's). The sines and cosines come
  from a table: computed in place, XLA fuses them into each elementwise consumer
  and evaluates them again per head and per use, ~4% of a small model's step
  on a CPU (benchmarks/NOTES.md).
  """
  half = x_BTNH.shape[-1] // 2
  dtype = jnp.promote_types(x_BTNH.dtype, jnp.float32)
  sin_PH, cos_PH = rotary_table(length, x_BTNH.shape[-1], theta)
  sin = jnp.asarray(sin_PH, dtype)[positions_BT][:, :, None, :]
  cos = jnp.asarray(cos_PH, dtype)[positions_BT][:, :, None, :]
  x = x_BTNH.astype(dtype)
  first, second = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


class SwiGLU(nnx.Module):
  """Column-parallel gate and up, row-parallel down: the caller sums `down`'s
  output over tensor (maxlite.model.parallel.scatter_sequence)."""

  def __init__(self, hidden: int, intermediate: int, *, std, dtype, rngs, reduce_dtype='float32'):
    kw = dict(std=std, dtype=dtype, rngs=rngs, reduce_dtype=reduce_dtype)
    self.gate = Dense((hidden,), (intermediate,), ('embed',), ('mlp',), checkpoint_as='mlp_in', **kw)
    self.up = Dense((hidden,), (intermediate,), ('embed',), ('mlp',), checkpoint_as='mlp_in', **kw)
    self.down = Dense((intermediate,), (hidden,), ('mlp',), ('embed',), checkpoint_as='block_out',
                      **kw)

  def __call__(self, x_BTD):
    h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
    return self.down(h_BTF)


class Embed(nnx.Module):
  """Token embedding over a vocabulary padded to `padded_vocab` rows (zeros past
  `vocab`); `attend` reuses the table as the LM head when tied.

  Both are vocabulary-parallel: a device holds a slice of the rows, looks up
  only the tokens in it (the caller sums over tensor) and computes only its
  slice of the logits.
  """

  def __init__(self, vocab: int, padded_vocab: int, hidden: int, *, std, dtype, rngs,
               reduce_dtype='float32'):
    self.table = param(rngs, (vocab, hidden), ('vocab', 'embed'), dtype, std, (padded_vocab, hidden))
    self.fsdp_dim = sharded_dim(('vocab', 'embed'), 'fsdp')
    self.reduce_dtype = reduce_dtype

  def gather(self, dtype):
    """The table in dtype, gathered over fsdp: pass it to both uses of a tied table."""
    return parallel.gathered(self.table[...], self.fsdp_dim, jnp.dtype(dtype).name,
                             self.reduce_dtype)

  def __call__(self, tokens_BT, dtype, table_VD=None):
    """This device's partial embedding of tokens_BT (see parallel.lookup)."""
    return parallel.lookup(self.gather(dtype) if table_VD is None else table_VD, tokens_BT)

  def attend(self, x_BTD, table_VD=None):
    """This device's vocabulary slice of the logits, float32 straight out of the accumulator."""
    table_VD = self.gather(x_BTD.dtype) if table_VD is None else table_VD
    return parallel.project(x_BTD, table_VD.T, 1, None, self.reduce_dtype,
                            jnp.promote_types(x_BTD.dtype, jnp.float32).name)

