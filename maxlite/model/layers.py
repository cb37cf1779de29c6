"""Llama building blocks: dense projections, RMSNorm, rotary embeddings, SwiGLU.

Shape legend: B batch, T length, D hidden (embed), N query heads, K kv heads,
H head dim, F mlp width, V vocab.

Every parameter is created with `logical_axes` metadata naming its dimensions;
maxlite.mesh turns those names into shardings.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P


def param(rngs: nnx.Rngs, shape, logical_axes: tuple, dtype, std: float | None) -> nnx.Param:
  """A Param with its logical axis names; std=None gives ones (norm scales)."""
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=P(*logical_axes))


class Dense(nnx.Module):
  """x[..., *in_dims] @ kernel[*in_dims, *out_dims]; names one tuple per side."""

  def __init__(self, in_dims, out_dims, in_axes, out_axes, *, std, dtype, rngs):
    self.num_in = len(in_dims)
    self.kernel = param(rngs, (*in_dims, *out_dims), (*in_axes, *out_axes), dtype, std)

  def __call__(self, x):
    kernel = self.kernel[...]
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
    return jax.lax.dot_general(x, kernel.astype(x.dtype), (contract, ((), ())))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, dtype, rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ('norm',), dtype, None)

  def __call__(self, x):
    # Statistics in at least float32: bf16 squares lose too many bits.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(normed.dtype)).astype(x.dtype)


def rotary(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the half-split layout (pairs are (i, i + H/2)).

  Positions restart per packed document, so each document sees positions 0..n.
  """
  half = x_BTNH.shape[-1] // 2
  dtype = jnp.promote_types(x_BTNH.dtype, jnp.float32)
  inv_freq = theta ** (-jnp.arange(half, dtype=dtype) / half)
  angle_BTH = positions_BT.astype(dtype)[..., None] * inv_freq
  sin, cos = jnp.sin(angle_BTH)[:, :, None, :], jnp.cos(angle_BTH)[:, :, None, :]
  x = x_BTNH.astype(dtype)
  first, second = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


class SwiGLU(nnx.Module):

  def __init__(self, hidden: int, intermediate: int, *, std, dtype, rngs):
    self.gate = Dense((hidden,), (intermediate,), ('embed',), ('mlp',), std=std, dtype=dtype, rngs=rngs)
    self.up = Dense((hidden,), (intermediate,), ('embed',), ('mlp',), std=std, dtype=dtype, rngs=rngs)
    self.down = Dense((intermediate,), (hidden,), ('mlp',), ('embed',), std=std, dtype=dtype, rngs=rngs)

  def __call__(self, x_BTD):
    h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
    return self.down(h_BTF)


class Embed(nnx.Module):
  """Token embedding; `attend` reuses the table as the LM head when tied."""

  def __init__(self, vocab: int, hidden: int, *, std, dtype, rngs):
    self.table = param(rngs, (vocab, hidden), ('vocab', 'embed'), dtype, std)

  def __call__(self, tokens_BT, dtype):
    return jnp.take(self.table[...], tokens_BT, axis=0).astype(dtype)

  def attend(self, x_BTD):
    # Logits in float32 straight out of the matmul's accumulator.
    return jnp.einsum('btd,vd->btv', x_BTD, self.table[...].astype(x_BTD.dtype),
                      preferred_element_type=jnp.promote_types(x_BTD.dtype, jnp.float32))

