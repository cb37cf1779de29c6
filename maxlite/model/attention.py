"""Attention: one entry point, `attention`, dispatching on a backend name.

Shape legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

Backends (`model.attention`):
  xla     dense scores in float32; the reference, and every platform's fallback.
  cudnn   `jax.nn.dot_product_attention(implementation='cudnn')`: NVIDIA GPUs,
          causal or not, but no segment ids, so not for packed training rows.
  pallas  maxlite.kernels.flash_attention: fused, skips the tiles that packed
          documents or causality mask. On CPU it runs in Pallas interpret mode
          (correct but slow; for tests).
  auto    pallas on GPUs with segment ids, cudnn on NVIDIA GPUs without, xla on CPU.
The KV-cache path (decoding) always runs on xla: its queries are a few tokens
against a cache with its own slot mask, which the fused kernels do not take.
With context parallelism (maxlite.model.context) a device's queries are some
of the row's tokens and its keys all of them; the call then names every
token's index in the row, which the masks compare, and xla and pallas both run.
"""
import math

import jax
import jax.numpy as jnp

from maxlite.config import ATTENTION_BACKENDS
from maxlite.kernels.flash_attention import flash_attention
from maxlite.model import parallel

GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')


def resolve_backend(name: str, platform: str, *, segment_ids: bool = True,
                    kv_cache: bool = False) -> str:
  """The backend that runs for `model.attention=name` on `platform` (jax.default_backend()).

  segment_ids: whether the call masks documents (training batches always do).
  Raises ValueError for a combination the backend cannot run, unless 'auto'.
  """
  if name not in ATTENTION_BACKENDS:
    raise ValueError(f'model.attention={name!r} is not one of {ATTENTION_BACKENDS}')
  on_gpu = platform in GPU_PLATFORMS
  if name == 'cudnn' and not on_gpu:
    raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU; the platform is {platform}")
  if name == 'cudnn' and segment_ids and not kv_cache:
    raise ValueError("model.attention='cudnn' cannot mask packed documents (segment ids); "
                     "use 'pallas', 'xla' or 'auto'")
  if kv_cache:
    return 'xla'
  if name == 'auto':
    return ('pallas' if segment_ids else 'cudnn') if on_gpu else 'xla'
  return name


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, positions_BT, *, causal: bool = True,
              backend: str = 'xla', kv_segment_ids_BS=None, kv_positions_BS=None,
              indices_BT=None, kv_indices_BS=None):
  """Grouped-query attention where no token attends across packed documents.

  segment_ids_BT: document index per token (0 marks padding); tokens attend
  only within their own segment; None: one document per row. positions_BT:
  position within the document, the coordinate the causal mask compares in
  (None: the index). It restarts per document and increases by one within
  it, so together with the segment mask it equals the index-causal mask,
  which is what the fused backends (pallas, cudnn) apply.
  kv_segment_ids_BS, kv_positions_BS: the same for the keys when they are not
  the queries' own tokens (a KV cache); by default the queries' are used.
  indices_BT, kv_indices_BS: each query's and key's index in the whole row,
  when the queries are only some of the row's tokens and the keys all of them
  (context parallelism; kv_segment_ids_BS then given too). The causal mask
  then compares indices, not positions: the same mask on packed rows, and
  the one the fused kernels apply.
  """
  kv_cache = kv_segment_ids_BS is not None and kv_indices_BS is None
  backend = resolve_backend(backend, jax.default_backend(), segment_ids=segment_ids_BT is not None,
                            kv_cache=kv_cache)
  if kv_indices_BS is not None:
    positions_BT, kv_positions_BS = indices_BT, kv_indices_BS
  # The model runs per device (maxlite.model.parallel): the arrays here are this
  # device's rows and heads, so the fused kernels need no sharding of their own.
  if backend == 'pallas':
    masks = dict(segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS,
                 indices_BT=indices_BT, kv_indices_BS=kv_indices_BS)
    if jax.default_backend() == 'cpu':
      return _interpreted_flash_attention(q_BTNH, k_BSKH, v_BSKH, masks, causal)
    return flash_attention(q_BTNH, k_BSKH, v_BSKH, **masks, causal=causal)
  if backend == 'cudnn':
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal,
                                        implementation='cudnn')
  batch, length = q_BTNH.shape[:2]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((batch, length), jnp.int32)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(length), (batch, length))
  if kv_segment_ids_BS is None:
    kv_segment_ids_BS, kv_positions_BS = segment_ids_BT, positions_BT
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, positions_BT, kv_segment_ids_BS,
                       kv_positions_BS, causal=causal)


def _interpreted_flash_attention(q_BTNH, k_BSKH, v_BSKH, masks: dict, causal: bool):
  """The Pallas kernel in interpret mode (CPU), on every device's inputs at once.

  JAX's Pallas interpreter cannot yet evaluate a kernel whose inputs differ
  between the devices of a shard_map (it mixes per-device blocks with shared
  loop indices), so here each device sums everyone's inputs into one batch
  that all devices share, runs the kernel on it, and keeps its own rows. The
  numbers and gradients are the kernel's; the extra work only costs CPU tests.
  masks: flash_attention's segment-id and index keywords, each [B, ...] or None.
  """
  if masks['segment_ids_BT'] is None:
    masks = {**masks, 'segment_ids_BT': jnp.ones(q_BTNH.shape[:2], jnp.int32)}
  masks = {name: x for name, x in masks.items() if x is not None}
  inputs = (q_BTNH, k_BSKH, v_BSKH, *masks.values())
  axes = tuple(sorted(frozenset().union(*map(parallel.varying_axes, inputs))))
  if not axes:
    return flash_attention(q_BTNH, k_BSKH, v_BSKH, **masks, causal=causal, interpret=True)
  me = jax.lax.axis_index(axes)
  count = math.prod(parallel.axis_size(axis) for axis in axes)

  def everyone(x):  # [B, ...] -> [count * B, ...], the same on every device
    slots = jnp.zeros((count, *x.shape), x.dtype).at[me].set(x)
    return jax.lax.psum(slots, axes).reshape(count * x.shape[0], *x.shape[1:])

  out = flash_attention(*map(everyone, (q_BTNH, k_BSKH, v_BSKH)),
                        **{name: everyone(x) for name, x in masks.items()},
                        causal=causal, interpret=True)
  return out.reshape(count, *q_BTNH.shape)[me]


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
