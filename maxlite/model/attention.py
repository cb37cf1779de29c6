"""Attention: one entry point, `attention`, dispatching on a backend name.

Shape legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.
"""
import jax
import jax.numpy as jnp


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, positions_BT, *, causal: bool = True,
              backend: str = 'xla', kv_segment_ids_BS=None, kv_positions_BS=None):
  """Grouped-query attention where no token attends across packed documents.

  segment_ids_BT: document index per token (0 marks padding); tokens attend
  only within their own segment. positions_BT: position within the document,
  the coordinate the causal mask compares in (it restarts per document, and
  together with the segment mask this equals the usual index-causal mask).
  kv_segment_ids_BS, kv_positions_BS: the same for the keys when they are not
  the queries' own tokens (a KV cache); by default the queries' are used.
  """
  if kv_segment_ids_BS is None:
    kv_segment_ids_BS, kv_positions_BS = segment_ids_BT, positions_BT
  if backend == 'xla':
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, positions_BT, kv_segment_ids_BS,
                         kv_positions_BS, causal=causal)
  raise ValueError(f'unknown attention backend {backend!r}')


def attention_mask(segment_ids_BT, positions_BT, kv_segment_ids_BS, kv_positions_BS, causal: bool):
  """[B, T, S] boolean: True where a query may attend to a key."""
  mask_BTS = segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  if causal:
    mask_BTS &= positions_BT[:, :, None] >= kv_positions_BS[:, None, :]
  return mask_BTS


def xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, positions_BT, kv_segment_ids_BS,
                  kv_positions_BS, *, causal: bool):
  """The reference backend: dense scores in float32, K/V never repeated per group."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  score_dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  scores_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH, k_BSKH,
                            preferred_element_type=score_dtype) * head_dim ** -0.5
  mask_BTS = attention_mask(segment_ids_BT, positions_BT, kv_segment_ids_BS, kv_positions_BS,
                            causal)
  # Every query sees at least itself, so no row is fully masked and no NaN appears.
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(scores_BKGTS.dtype).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum('bkgts,bskh->btkgh', probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(batch, length, num_heads, head_dim)
