"""The Llama decoder: embedding, a stack of scanned blocks, final norm, LM head.

Shape legend: B batch, T length, D hidden, N query heads, K kv heads, H head
dim, V vocab, L layers, S KV-cache slots.

The blocks' parameters are stacked along a leading 'layers' dimension and run
with one `lax.scan`, so compile time does not grow with depth. With
pipeline_stages > 1 the training forward pass runs them through
maxlite.model.pipeline instead (the decode path never does).

The model runs per device on its shards (maxlite.model.parallel): heads, MLP
width and vocabulary are split over `tensor`, and while training the residual
stream between blocks is split along its length too (sequence parallelism):
each block gathers it before its column-parallel matmuls and reduce-scatters
its row-parallel outputs. Decoding keeps the whole (short) length on every
device and all-reduces instead.

`Llama.decode` is the same forward pass with a KV cache (for generation): the
only difference is inside `Attention`, which writes each token's keys and
values into the cache and attends to the cache instead of to its own tokens.
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from maxlite.config import padded_vocab_size
from maxlite.model import context, layers, moe as moe_lib, parallel, parametrization, pipeline
from maxlite.model.attention import attention
from maxlite.model.remat import POLICIES as REMAT_POLICIES

CACHE = P('layers', 'batch', 'length', 'kv_heads', 'head_dim')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float
  norm_eps: float
  tie_embeddings: bool
  init_std: float
  param_dtype: str
  # Rows of the embedding (and LM-head columns): vocab_size padded for the
  # mesh (maxlite.config.padded_vocab_size); 0 means the one-device padding.
  padded_vocab_size: int = 0
  # dtype of the weight gradients' accumulation and cross-device sums.
  grad_reduce_dtype: str = 'float32'
  attention: str = 'xla'
  scan_layers: bool = True
  remat: str = 'none'
  # Pipeline parallelism (maxlite.model.pipeline); 1 stage is the plain scan.
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1
  pipeline_repeats: int = 1
  # 'standard' or 'mup' (maxlite.model.parametrization: init, logit and attention multipliers).
  parametrization: str = 'standard'
  mup_base_width: int = 0
  mup_base_head_dim: int = 0
  pipeline_1f1b: bool = False  # train with maxlite.model.pipeline_1f1b
  # Mixture of Experts (maxlite.model.moe); 0 experts: dense.
  num_experts: int = 0
  experts_per_token: int = 2
  moe_intermediate_size: int = 0
  moe_every: int = 1
  moe_shared_expert_size: int = 0
  moe_capacity_factor: float = 0.0
  moe_dispatch: str = 'gather'

  @classmethod
  def from_config(cls, model, **mesh_fields) -> 'LlamaConfig':
    """From the `model` sub-config; head_dim=0 there means hidden // heads.

    mesh_fields: what the mesh and the rest of the config decide (see
    maxlite.config.model_fields): the pipeline_* fields, padded_vocab_size,
    grad_reduce_dtype. Without them the model runs as on one device.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model.items() if k in fields}
    values['head_dim'] = model.head_dim or model.hidden_size // model.num_heads
    return cls(**{**values, **mesh_fields})

  @property
  def vocab_rows(self) -> int:
    return self.padded_vocab_size or padded_vocab_size(self.vocab_size, 1)

  @property
  def pipeline_schedule(self) -> pipeline.Schedule:
    return pipeline.Schedule(self.pipeline_stages, self.pipeline_microbatches, self.pipeline_repeats,
                             self.pipeline_1f1b)


class KVCache(NamedTuple):
  """Keys and values of every layer; slot s of row b holds row b's token at position s.

  Slot = position, so writing never needs a per-row pointer, and a query
  attends to exactly the slots at or before its own position: slots past it
  may hold stale values (prompt padding) that are overwritten before they are
  ever visible.
  """
  k_LBSKH: jax.Array
  v_LBSKH: jax.Array

  @classmethod
  def zeros(cls, cfg: 'LlamaConfig', batch: int, length: int, dtype) -> 'KVCache':
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def write(self, layer, k_BTKH, v_BTKH, positions_BT) -> 'KVCache':
    # A scatter into the whole cache (not a per-layer copy), so that XLA updates
    # the loop-carried buffer in place.
    rows_B1 = jnp.arange(k_BTKH.shape[0])[:, None]
    def put(cache_LBSKH, new_BTKH):
      new_BTKH = new_BTKH.astype(cache_LBSKH.dtype)
      return cache_LBSKH.at[layer, rows_B1, positions_BT].set(new_BTKH)
    return KVCache(put(self.k_LBSKH, k_BTKH), put(self.v_LBSKH, v_BTKH))


class Attention(nnx.Module):
  """q, k, v column-parallel (each device keeps whole heads), o row-parallel:
  the output is this device's partial sum, which the caller reduces."""

  def __init__(self, cfg: LlamaConfig, *, rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(std=cfg.init_std, dtype=cfg.param_dtype, rngs=rngs, reduce_dtype=cfg.grad_reduce_dtype)
    self.q = layers.Dense((d,), (n, h), ('embed',), ('heads', 'head_dim'), checkpoint_as='qkv', **kw)
    self.k = layers.Dense((d,), (k, h), ('embed',), ('kv_heads', 'head_dim'), checkpoint_as='qkv', **kw)
    self.v = layers.Dense((d,), (k, h), ('embed',), ('kv_heads', 'head_dim'), checkpoint_as='qkv', **kw)
    self.o = layers.Dense((n, h), (d,), ('heads', 'head_dim'), ('embed',), checkpoint_as='block_out',
                          **kw)
    self.rope_theta = cfg.rope_theta
    self.backend = cfg.attention
    self.query_scale = parametrization.query_multiplier(cfg)  # 1.0 but under µP

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache: KVCache | None = None, layer=None):
    """Returns (output, cache); with a cache, this layer's slots of it are updated."""
    # Positions are below the row's length (all of it, with context parallelism) or the cache's.
    if cache is None:
      length = x_BTD.shape[1] * parallel.axis_size(context.AXIS)
    else:
      length = cache.k_LBSKH.shape[2]
    q_BTNH = layers.rotary(self.q(x_BTD), positions_BT, self.rope_theta, length)
    if self.query_scale != 1.0:
      q_BTNH = q_BTNH * jnp.asarray(self.query_scale, q_BTNH.dtype)
    k_BTKH = layers.rotary(self.k(x_BTD), positions_BT, self.rope_theta, length)
    v_BTKH = self.v(x_BTD)
    if cache is None:  # with context parallelism, to the whole row's keys (maxlite.model.context)
      out_BTNH = context.attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT,
                                   backend=self.backend)
    else:
      cache = cache.write(layer, k_BTKH, v_BTKH, positions_BT)
      batch, slots = cache.k_LBSKH.shape[1:3]
      slots_BS = jnp.broadcast_to(jnp.arange(slots, dtype=positions_BT.dtype), (batch, slots))
      out_BTNH = attention(q_BTNH, cache.k_LBSKH[layer], cache.v_LBSKH[layer], segment_ids_BT,
                           positions_BT, causal=True, backend=self.backend,
                           kv_segment_ids_BS=jnp.ones_like(slots_BS), kv_positions_BS=slots_BS)
    # The name remat policies save or offload it by (maxlite.model.remat).
    return self.o(checkpoint_name(out_BTNH, 'attention')), cache


class Block(nnx.Module):
  """Attention and an MLP: SwiGLU, or a Mixture of Experts (maxlite.model.moe) when `moe`."""

  def __init__(self, cfg: LlamaConfig, *, rngs, moe: bool = False):
    norm = dict(eps=cfg.norm_eps, dtype=cfg.param_dtype, rngs=rngs)
    self.attention_norm = layers.RMSNorm(cfg.hidden_size, **norm)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.hidden_size, **norm)
    mlp = dict(std=cfg.init_std, dtype=cfg.param_dtype, rngs=rngs, reduce_dtype=cfg.grad_reduce_dtype)
    if moe:
      self.mlp = moe_lib.MoE(moe_lib.MoeSettings.of(cfg), **mlp)
    else:
      self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, **mlp)

  def __call__(self, x_BtD, segment_ids_BT, positions_BT, cache: KVCache | None = None, layer=None,
               *, sequence_parallel: bool = False):
    """(x, cache, router statistics or None); x_BtD: the residual, split along
    its length over tensor when sequence_parallel.

    Norms run on the split residual; the gather moves their compute-dtype output.
    """
    sp = sequence_parallel
    attended_BTD, cache = self.attention(
        parallel.gather_sequence(self.attention_norm(x_BtD), sp), segment_ids_BT, positions_BT,
        cache, layer)
    x_BtD = x_BtD + parallel.scatter_sequence(attended_BTD, sp)
    h_BTD, stats = parallel.gather_sequence(self.mlp_norm(x_BtD), sp), None
    if isinstance(self.mlp, moe_lib.MoE):
      out_BTD, stats = self.mlp(h_BTD, segment_ids_BT != 0)
    else:
      out_BTD = self.mlp(h_BTD)
    return x_BtD + parallel.scatter_sequence(out_BTD, sp), cache, stats


def stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs, num_layers: int | None = None,
                   moe: bool = False) -> Block:
  """num_layers Blocks as one Block whose parameters have a leading 'layers' dim."""

  @nnx.split_rngs(splits=cfg.num_layers if num_layers is None else num_layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return Block(cfg, rngs=rngs, moe=moe)

  blocks = create(rngs)
  for _, variable in nnx.iter_graph(blocks):
    if isinstance(variable, nnx.Param):
      variable.set_metadata(logical_axes=P('layers', *variable.get_metadata()['logical_axes']))
  return blocks


class Llama(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.Embed(cfg.vocab_size, cfg.vocab_rows, cfg.hidden_size, std=cfg.init_std,
                              dtype=cfg.param_dtype, rngs=rngs, reduce_dtype=cfg.grad_reduce_dtype)
    # Dense layers in `blocks`, MoE layers in `moe_blocks` (maxlite.model.moe.layer_counts).
    num_dense, num_moe = moe_lib.layer_counts(cfg)
    if num_dense:
      self.blocks = stacked_blocks(cfg, rngs, num_dense)
    if num_moe:
      self.moe_blocks = stacked_blocks(cfg, rngs, num_moe, moe=True)
    self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=cfg.param_dtype,
                                     rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Dense((cfg.hidden_size,), (cfg.vocab_size,), ('embed',), ('vocab',),
                                  std=cfg.init_std, dtype=cfg.param_dtype, rngs=rngs,
                                  reduce_dtype=cfg.grad_reduce_dtype,
                                  padded_out_dims=(cfg.vocab_rows,))
    parametrization.scale_init(self, cfg)

  def __call__(self, tokens_BT, segment_ids_BT, positions_BT, *, compute_dtype=jnp.float32):
    """Returns logits [B, T, V] in float32 (float64 when computing in float64)."""
    x_BTD, _, table_VD, _ = self._hidden(tokens_BT, segment_ids_BT, positions_BT, None, compute_dtype)
    return self._whole_vocab(self._logits(x_BTD, table_VD))

  def token_losses(self, tokens_BT, segment_ids_BT, positions_BT, targets_BT, *,
                   compute_dtype=jnp.float32, router_stats: bool = False):
    """(cross-entropy, log-normaliser), each [B, T] float32, of predicting targets_BT;
    with router_stats, also the MoE layers' maxlite.model.moe.RouterStats ([L, ...], or None).

    Each device computes only its vocabulary slice of the logits; they are
    never gathered (maxlite.model.parallel.cross_entropy).
    """
    sp = tokens_BT.shape[1] % parallel.axis_size('tensor') == 0
    table_VD = self.embed.gather(compute_dtype)
    x_BtD = self.embed_inputs(tokens_BT, table_VD, sp)
    x_BtD, _, stats = self._run_blocks(x_BtD, segment_ids_BT, positions_BT, None, sp)
    losses = self.head_losses(x_BtD, table_VD, targets_BT, sp)
    return (*losses, stats) if router_stats else losses

  # The pieces of token_losses, which the 1F1B pipeline schedules
  # (maxlite.model.pipeline_1f1b) differentiate one by one. table_VD: the
  # embedding gathered once (embed.gather), for both ends when tied.
  def embed_inputs(self, tokens_BT, table_VD, sequence_parallel: bool):
    """The residual entering the blocks [B, t, D]."""
    return parallel.scatter_sequence(self.embed(tokens_BT, table_VD.dtype, table_VD), sequence_parallel)

  def layer_runner(self, sequence_parallel: bool):
    """run_layers(layers, x_btD, segment_ids_bT, positions_bT) -> x_btD for a
    group of the dense stack `blocks` (the 1F1B schedules, which refuse MoE)."""
    graphdefs = {'blocks': nnx.graphdef(self.blocks)}
    def run_layers(layers, x_btD, segment_ids_bT, positions_bT):
      return _run_layers(graphdefs, self.cfg, {'blocks': layers}, x_btD, segment_ids_bT,
                         positions_bT, None, sequence_parallel)[0]
    return run_layers

  def head_losses(self, x_BtD, table_VD, targets_BT, sequence_parallel: bool):
    """(cross-entropy, log-normaliser) [B, T] from the blocks' output."""
    x_BTD = parallel.gather_sequence(self.final_norm(x_BtD), sequence_parallel)
    return parallel.cross_entropy(self._logits(x_BTD, table_VD if self.cfg.tie_embeddings else None),
                                  targets_BT)

  def decode(self, tokens_BT, positions_BT, cache: KVCache, *, compute_dtype=jnp.float32):
    """(logits [B, T, V], cache) for tokens at positions_BT that continue what
    the cache holds: each row's tokens go into the slots named by their
    positions and see the slots up to their own. One call fills the cache with
    a (right-padded) prompt; later calls add one token per row."""
    x_BTD, cache, table_VD, _ = self._hidden(tokens_BT, jnp.ones_like(tokens_BT), positions_BT,
                                             cache, compute_dtype)
    return self._whole_vocab(self._logits(x_BTD, table_VD)), cache

  def _hidden(self, tokens_BT, segment_ids_BT, positions_BT, cache, compute_dtype):
    """(the final norm's output [B, T, D] on every tensor rank, the cache, the
    gathered table when tied: both ends use one copy, and one gradient sum,
    the MoE layers' router statistics or None)."""
    sp = cache is None and tokens_BT.shape[1] % parallel.axis_size('tensor') == 0
    table_VD = self.embed.gather(compute_dtype) if self.cfg.tie_embeddings else None
    x_BtD = parallel.scatter_sequence(self.embed(tokens_BT, compute_dtype, table_VD), sp)
    x_BtD, cache, stats = self._run_blocks(x_BtD, segment_ids_BT, positions_BT, cache, sp)
    return parallel.gather_sequence(self.final_norm(x_BtD), sp), cache, table_VD, stats

  def _logits(self, x_BTD, table_VD):
    """This device's vocabulary slice of the logits, float32 (or float64), padding masked."""
    if self.cfg.tie_embeddings:
      logits_BTv = self.embed.attend(x_BTD, table_VD)
    else:
      logits_BTv = self.lm_head(x_BTD, out_dtype=jnp.promote_types(x_BTD.dtype, jnp.float32).name)
    if (multiplier := parametrization.logit_multiplier(self.cfg)) != 1.0:
      logits_BTv = logits_BTv * multiplier
    return parallel.mask_padding(logits_BTv, self.cfg.vocab_size)

  def _whole_vocab(self, logits_BTv):
    return parallel.gather_vocab(logits_BTv)[..., :self.cfg.vocab_size]

  def _run_blocks(self, x_BtD, segment_ids_BT, positions_BT, cache, sp):
    graphdefs, stacks = {}, {}
    for name in STACKS:
      if hasattr(self, name):
        graphdefs[name], stacks[name] = nnx.split(getattr(self, name))
    if cache is None and self.cfg.pipeline_stages > 1:
      def run_layers(layers, x_btD, segment_ids_bT, positions_bT):
        x_btD, _, stats = _run_layers(graphdefs, self.cfg, layers, x_btD, segment_ids_bT,
                                      positions_bT, None, sp)
        return x_btD, stats
      x_BtD, stats = pipeline.run(run_layers, stacks, x_BtD, segment_ids_BT, positions_BT,
                                  self.cfg.pipeline_schedule)
      return x_BtD, None, stats
    return _run_layers(graphdefs, self.cfg, stacks, x_BtD, segment_ids_BT, positions_BT, cache, sp)


# The stacked layers: dense blocks, and MoE blocks (maxlite.model.moe.layer_counts).
STACKS = ('blocks', 'moe_blocks')


def _run_layers(graphdefs, cfg: LlamaConfig, stacks, x_BTD, segment_ids_BT, positions_BT, cache,
                sequence_parallel: bool):
  """Runs the layers whose stacked states are `stacks` (all of them, or a
  pipeline stage's group); returns (x, cache, router statistics [L_moe, ...] or None).

  With MoE every n-th layer they run in groups of n, the n - 1 dense layers
  and then the MoE one (moe_every=1: groups of one MoE layer), so one scan
  covers both stacks.
  """
  per_group = cfg.moe_every if cfg.num_experts else 1
  dense_per_group = per_group - 1 if cfg.num_experts else 1
  groups = dict(stacks)
  if 'moe_blocks' in stacks:
    num_groups = jax.tree.leaves(stacks['moe_blocks'])[0].shape[0]
    if 'blocks' in stacks:
      groups['blocks'] = jax.tree.map(lambda w: w.reshape(num_groups, -1, *w.shape[1:]),
                                      stacks['blocks'])
  else:
    num_groups = jax.tree.leaves(stacks['blocks'])[0].shape[0]

  # The cache rides in the carry, not in xs/ys, so that it is updated in place.
  def one_block(carry, layer_state, layer, stack):
    x_BTD, cache = carry
    block = nnx.merge(graphdefs[stack], layer_state)
    x_BTD, cache, stats = block(x_BTD, segment_ids_BT, positions_BT, cache, layer,
                                sequence_parallel=sequence_parallel)
    return (x_BTD, cache), stats

  if cfg.remat != 'none':
    one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[cfg.remat],
                               prevent_cse=not cfg.scan_layers, static_argnums=(3,))

  def one_group(carry, group_and_index):
    group, g = group_and_index
    stats = None
    if 'moe_blocks' not in group:  # dense: a group is one layer
      carry, _ = one_block(carry, group['blocks'], g, 'blocks')
      return carry, None
    for j in range(dense_per_group):
      carry, _ = one_block(carry, jax.tree.map(lambda w: w[j], group['blocks']), g * per_group + j,
                           'blocks')
    carry, stats = one_block(carry, group['moe_blocks'], g * per_group + per_group - 1,
                             'moe_blocks')
    return carry, stats

  if cfg.scan_layers:
    (x_BTD, cache), stats = jax.lax.scan(one_group, (x_BTD, cache), (groups, jnp.arange(num_groups)))
  else:  # unrolled: longer compiles, sometimes faster steps
    per_group_stats = []
    for i in range(num_groups):
      (x_BTD, cache), stats = one_group((x_BTD, cache), (jax.tree.map(lambda a: a[i], groups), i))
      per_group_stats.append(stats)
    stats = None if per_group_stats[0] is None else jax.tree.map(
        lambda *s: jnp.stack(s), *per_group_stats)
  return x_BTD, cache, stats
