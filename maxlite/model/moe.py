"""Mixture of Experts: a top-k router, dropless grouped matmuls, expert parallelism.

Shape legend: B batch, T length, D hidden, N tokens (B T) on this device, E
experts, X experts held here (E / expert), K experts per token, F expert MLP
width (this device's slice over tensor), A assignments (N K), R rows this
device computes, C slots per expert (capacity mode), G the `expert` axis size,
L MoE layers.

Routing (Mixtral's): softmax over the E router logits in float32, the top k,
and their probabilities renormalised to sum to 1 as the weights of the
experts' outputs. With DeepSeek-V3's aux-loss-free balancing a per-expert bias
is added to the probabilities when choosing, never to the weights; no
gradient reaches it (it only moves a choice), the optimizer leaves it alone,
and maxlite.step moves it after each update from the step's token counts
(`update_bias`).

Compute. Dropless (model.moe_capacity_factor=0, the default): a device's
assignments are sorted by expert and each expert's rows are one group of
`jax.lax.ragged_dot`. Capacity (factor f > 0): each expert takes at most
C = ceil(f N K / E) of a device's assignments, every token's first choice
before any second choice and then in token order; the rest are dropped (the
token keeps its residual and its other experts) and counted. The slots run as
one batched matmul. XLA:CPU, and XLA:GPU unless a grouped-GEMM lowering
applies, expand ragged_dot into a masked dense matmul per group, X times the
work; that is what capacity buys back (benchmarks/moe.py).

Expert parallelism. Expert weights are split over `expert` (X per device) and
the batch is split over it too (EP within data parallelism); every other
weight is replicated over it and maxlite.step sums its gradient over `expert`
once per step, as over `data`. How tokens reach their experts
(model.moe_dispatch):

  gather      all-gather the tokens and their routing over `expert`; each
              device runs its X experts on the rows routed to them and a
              psum_scatter hands each token's sum back to its device: (G - 1)
              N D per device each way, where an all-to-all moves about K N D.
              Runs on any backend; XLA:CPU has no ragged all-to-all.
  all_to_all  dropless: `jax.lax.ragged_all_to_all` sends each assignment to
              its expert's device and the result back (GPUs). With a capacity
              factor: `jax.lax.all_to_all` of the fixed [E, C, D] slots
              (any backend).

A dropless device must hold the worst case, every routed row of its expert
group landing on its experts: G N min(K, X) rows. Expert hidden dims are split
over `tensor` as the dense MLP's are: every tensor rank routes the same
(whole-length) tokens and returns partial sums, which the block reduces.

Router statistics (sums over this device's non-padding tokens) come out of
each layer as values, not side effects, so remat's recomputation cannot count
anything twice. `batch_totals` sums them over the mesh and `aux_losses` makes
the Switch load-balancing loss and the router z-loss of the whole micro-batch.
"""
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from maxlite.mesh import LOGICAL_AXIS_RULES, sharded_dim
from maxlite.model import layers, parallel
from maxlite.model.parallel import axis_index, axis_size, varying_axes

# Tokens are split over these mesh axes (rows, and their length); router
# statistics are summed over them.
BATCH_AXES = LOGICAL_AXIS_RULES['batch'] + LOGICAL_AXIS_RULES['length']


@dataclasses.dataclass(frozen=True)
class MoeSettings:
  """The MoE fields of the model config (maxlite.model.llama.LlamaConfig)."""
  hidden_size: int
  num_experts: int
  experts_per_token: int
  expert_width: int
  shared_width: int = 0
  capacity_factor: float = 0.0
  dispatch: str = 'gather'

  @classmethod
  def of(cls, cfg) -> 'MoeSettings':
    return cls(cfg.hidden_size, cfg.num_experts, cfg.experts_per_token,
               cfg.moe_intermediate_size or cfg.intermediate_size, cfg.moe_shared_expert_size,
               cfg.moe_capacity_factor, cfg.moe_dispatch)


def layer_counts(cfg) -> tuple[int, int]:
  """(dense layers, MoE layers): layers n-1, 2n-1, ... are MoE with model.moe_every=n."""
  if not getattr(cfg, 'num_experts', 0):  # a dense config may predate the MoE fields
    return cfg.num_layers, 0
  moe = cfg.num_layers // cfg.moe_every
  return cfg.num_layers - moe, moe


def active_params(cfg) -> int:
  """Matmul weights one token uses in an MoE layer's MLP: router, k experts, shared expert."""
  d = cfg.hidden_size
  width = cfg.moe_intermediate_size or cfg.intermediate_size
  shared = 3 * d * cfg.moe_shared_expert_size + d if cfg.moe_shared_expert_size else 0
  return d * cfg.num_experts + cfg.experts_per_token * 3 * d * width + shared


def is_moe_layer(cfg, layer: int) -> bool:
  return bool(cfg.num_experts) and (layer + 1) % cfg.moe_every == 0


def check_dispatch(dispatch: str, capacity_factor: float, expert_axis: int, platform: str):
  """ValueError when this platform cannot run the configured dispatch."""
  if dispatch == 'all_to_all' and not capacity_factor and expert_axis > 1 and platform == 'cpu':
    raise ValueError("model.moe_dispatch='all_to_all' without a capacity factor (dropless) needs "
                     'jax.lax.ragged_all_to_all, which XLA:CPU does not implement; use '
                     "model.moe_dispatch='gather' or set model.moe_capacity_factor")


class RouterStats(NamedTuple):
  """One MoE layer's routing, summed over tokens (those of segment 0, padding, left out)."""
  tokens: jax.Array  # [] tokens routed
  counts_E: jax.Array  # [E] assignments per expert (K per token); no gradient
  probs_E: jax.Array  # [E] router probabilities
  z: jax.Array  # [] squared log-normalisers of the router logits
  dropped: jax.Array  # [] assignments dropped for capacity


# -- the expert matmuls: weights gathered over fsdp ------------------------------------

# dw[g] = x[rows of g]^T dy[rows of g]: the weight gradient of a ragged_dot.
_WEIGHT_GRADIENT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _grouped(x, w_XIO, group_sizes_X, out_dtype=None):
  if group_sizes_X is None:  # slots: [X, R, in]
    return jnp.einsum('xri,xio->xro', x, w_XIO, preferred_element_type=out_dtype)
  return jax.lax.ragged_dot(x, w_XIO, group_sizes_X, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def expert_matmul(x, w_XIO, group_sizes_X, fsdp_dim: int | None, reduce_dtype: str):
  """Each expert's rows times its weight, w all-gathered over fsdp in x's dtype.

  x: [R, in] sorted by expert, group_sizes_X rows each (rows past their sum
  give zeros), or [X, R, in] slots with group_sizes_X None. As with
  parallel.project, the backward pass gathers w again rather than keeping it,
  computes its gradient with reduce_dtype accumulation and output, and
  reduce-scatters it over fsdp in that dtype.
  """
  return _grouped(x, parallel._gather(w_XIO.astype(x.dtype), fsdp_dim), group_sizes_X)


def _expert_matmul_fwd(x, w_XIO, group_sizes_X, fsdp_dim, reduce_dtype):
  return expert_matmul(x, w_XIO, group_sizes_X, fsdp_dim, reduce_dtype), (x, w_XIO, group_sizes_X)


def _expert_matmul_bwd(fsdp_dim, reduce_dtype, residuals, dy):
  x, w_XIO, group_sizes_X = residuals
  dy = dy.astype(x.dtype)
  w_full = parallel._gather(w_XIO.astype(x.dtype), fsdp_dim)
  _, x_vjp = jax.vjp(lambda x_: _grouped(x_, w_full, group_sizes_X), x)
  (dx,) = x_vjp(dy)
  if group_sizes_X is None:
    dw = jnp.einsum('xri,xro->xio', x, dy, preferred_element_type=jnp.dtype(reduce_dtype))
  else:
    dw = jax.lax.ragged_dot_general(x, dy, group_sizes_X, _WEIGHT_GRADIENT,
                                    preferred_element_type=jnp.dtype(reduce_dtype))
  dw = parallel._reduce_scatter(parallel._sum_to_match(dw, w_XIO), fsdp_dim)
  return dx, dw.astype(w_XIO.dtype), None


expert_matmul.defvjp(_expert_matmul_fwd, _expert_matmul_bwd)


# -- the layer ---------------------------------------------------------------------------

class MoE(nnx.Module):
  """Router, E SwiGLU experts (column-parallel gate and up, row-parallel down
  over tensor, like layers.SwiGLU) and optionally a shared expert that every
  token runs, scaled by a sigmoid gate of the token (Qwen2-MoE's). The output is
  this device's partial sum over tensor; the caller reduces it."""

  def __init__(self, settings: MoeSettings, *, std, dtype, rngs, reduce_dtype='float32'):
    d, e, f = settings.hidden_size, settings.num_experts, settings.expert_width
    self.settings, self.reduce_dtype = settings, reduce_dtype
    kw = dict(std=std, dtype=dtype, rngs=rngs, reduce_dtype=reduce_dtype)
    self.router = layers.Dense((d,), (e,), ('embed',), (None,), **kw)
    # Aux-loss-free balancing's bias: moved by maxlite.step, never by the optimizer:
    # it gets no gradient, and its 'norm' name keeps weight decay off it
    # (maxlite.optim.decay_mask), so AdamW's update of it is exactly 0.
    self.bias = nnx.Param(jnp.zeros((e,), dtype), logical_axes=P('norm'))
    self.gate = layers.param(rngs, (e, d, f), ('experts', 'embed', 'mlp'), dtype, std)
    self.up = layers.param(rngs, (e, d, f), ('experts', 'embed', 'mlp'), dtype, std)
    self.down = layers.param(rngs, (e, f, d), ('experts', 'mlp', 'embed'), dtype, std)
    self.in_fsdp_dim = sharded_dim(('experts', 'embed', 'mlp'), 'fsdp')
    self.out_fsdp_dim = sharded_dim(('experts', 'mlp', 'embed'), 'fsdp')
    if settings.shared_width:
      self.shared = layers.SwiGLU(d, settings.shared_width, **kw)
      self.shared_gate = layers.Dense((d,), (1,), ('embed',), (None,), **kw)

  def __call__(self, x_BTD, mask_BT) -> tuple[jax.Array, RouterStats]:
    """(this device's partial output [B, T, D], router statistics); mask_BT: tokens to count."""
    s = self.settings
    batch, length, d = x_BTD.shape
    x_ND = x_BTD.reshape(batch * length, d)
    logits_NE = self.router(x_ND, out_dtype=jnp.promote_types(x_ND.dtype, jnp.float32).name)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    choice_NE = jax.lax.stop_gradient(probs_NE + self.bias[...].astype(probs_NE.dtype))
    _, ids_NK = jax.lax.top_k(choice_NE, s.experts_per_token)
    top_NK = jnp.take_along_axis(probs_NE, ids_NK, axis=-1)
    weights_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
    if s.capacity_factor:
      y_ND, kept_NK = self._slots(x_ND, ids_NK, weights_NK)
    elif s.dispatch == 'all_to_all' and axis_size('expert') > 1:
      y_ND, kept_NK = self._ragged_all_to_all(x_ND, ids_NK, weights_NK), None
    else:
      y_ND, kept_NK = self._gathered(x_ND, ids_NK, weights_NK), None
    if s.shared_width:
      gate_N1 = jax.nn.sigmoid(self.shared_gate(x_ND))
      y_ND = y_ND + gate_N1 * self.shared(x_ND)
    mask_N = mask_BT.reshape(-1).astype(probs_NE.dtype)
    return y_ND.reshape(x_BTD.shape), _statistics(logits_NE, probs_NE, ids_NK, kept_NK, mask_N)

  def _ffn(self, x, group_sizes_X):
    """The experts' SwiGLU on rows grouped by expert ([R, D] with group sizes, or [X, R, D])."""
    def mm(x, w, fsdp_dim):
      return expert_matmul(x, w, group_sizes_X, fsdp_dim, self.reduce_dtype)
    gate = checkpoint_name(mm(x, self.gate[...], self.in_fsdp_dim), 'mlp_in')
    up = checkpoint_name(mm(x, self.up[...], self.in_fsdp_dim), 'mlp_in')
    return checkpoint_name(mm(jax.nn.silu(gate) * up, self.down[...], self.out_fsdp_dim), 'block_out')

  def _gathered(self, x_ND, ids_NK, weights_NK):
    """Dropless, the expert group's tokens all-gathered: see the module docstring."""
    k, num_experts, groups = self.settings.experts_per_token, self.settings.num_experts, axis_size('expert')
    local = num_experts // groups
    if groups > 1:
      x_ND, ids_NK, weights_NK = (jax.lax.all_gather(a, 'expert', axis=0, tiled=True)
                                  for a in (x_ND, ids_NK, weights_NK))
    local_A = ids_NK.reshape(-1) - axis_index('expert') * local
    key_A = jnp.where((local_A >= 0) & (local_A < local), local_A, local)  # others sort last
    rows = x_ND.shape[0] * min(k, local)  # every row the group could route here
    order_R = jnp.argsort(key_A, stable=True)[:rows]
    group_sizes_X = jnp.bincount(key_A, length=local + 1)[:local].astype(jnp.int32)
    token_R = order_R // k
    out_RD = self._ffn(x_ND[token_R], group_sizes_X)
    weight_R = jnp.where(key_A[order_R] < local, weights_NK.reshape(-1)[order_R], 0.0)
    y_ND = _combine(out_RD, weight_R, token_R, x_ND.shape[0])
    if groups > 1:
      y_ND = jax.lax.psum_scatter(y_ND, 'expert', scatter_dimension=0, tiled=True)
    return y_ND

  def _ragged_all_to_all(self, x_ND, ids_NK, weights_NK):
    """Dropless, each assignment sent to its expert's device and back (ragged_all_to_all)."""
    k, num_experts, groups = self.settings.experts_per_token, self.settings.num_experts, axis_size('expert')
    local, me = num_experts // groups, axis_index('expert')
    order_A = jnp.argsort(ids_NK.reshape(-1), stable=True)
    token_A = order_A // k
    counts_E = jnp.bincount(ids_NK.reshape(-1), length=num_experts).astype(jnp.int32)
    # sent_SG[s, g]: rows device s sends to device g; every device knows them all.
    counts_SGX = jax.lax.all_gather(counts_E, 'expert').reshape(groups, groups, local)
    sent_SG = counts_SGX.sum(-1)
    send_G, recv_S = sent_SG[me], sent_SG[:, me]
    send_offsets_G = jnp.cumsum(send_G) - send_G
    # Where my rows start in each receiver's buffer: after the rows of the devices before me.
    landing_G = (jnp.cumsum(sent_SG, axis=0) - sent_SG)[me]
    recv_offsets_S = jnp.cumsum(recv_S) - recv_S
    rows = groups * x_ND.shape[0] * min(k, local)
    recv_RD = _RAGGED_ALL_TO_ALL(x_ND[token_A], jnp.zeros((rows, x_ND.shape[1]), x_ND.dtype),
                                 send_offsets_G, send_G, landing_G, recv_S, axis_name='expert')
    # Received rows run by source, then by local expert; regroup them by expert.
    bounds = jnp.cumsum(counts_SGX[:, me, :].reshape(-1))
    segment_R = jnp.searchsorted(bounds, jnp.arange(rows), side='right')
    key_R = jnp.where(segment_R < groups * local, segment_R % local, local)
    order_R = jnp.argsort(key_R, stable=True)
    out_RD = self._ffn(recv_RD[order_R], counts_SGX[:, me, :].sum(0))
    out_RD = jnp.zeros_like(out_RD).at[order_R].set(out_RD)
    # Back to the devices they came from, into the places they were sent from.
    returned_SG = (jnp.cumsum(sent_SG, axis=1) - sent_SG)[:, me]
    back_AD = _RAGGED_ALL_TO_ALL(out_RD, jnp.zeros((order_A.shape[0], x_ND.shape[1]), out_RD.dtype),
                                 recv_offsets_S, recv_S, returned_SG, send_G, axis_name='expert')
    return _combine(back_AD, weights_NK.reshape(-1)[order_A], token_A, x_ND.shape[0])

  def _slots(self, x_ND, ids_NK, weights_NK):
    """Capacity mode: fixed [E, C] slots per device, exchanged whole by all_to_all."""
    s, groups = self.settings, axis_size('expert')
    num_tokens, d = x_ND.shape
    local = s.num_experts // groups
    capacity = math.ceil(s.capacity_factor * num_tokens * s.experts_per_token / s.num_experts)
    slot_NK, kept_NK = assign_slots(ids_NK, s.num_experts, capacity)
    token_NK = jnp.broadcast_to(jnp.arange(num_tokens)[:, None], ids_NK.shape)
    slots_SD = jnp.zeros((s.num_experts * capacity, d), x_ND.dtype)
    slots_SD = slots_SD.at[slot_NK.reshape(-1)].set(x_ND[token_NK.reshape(-1)], mode='drop')
    # [E C, D] = [G, X C, D]: chunk g goes to device g, which receives [source, X C, D].
    slots = slots_SD.reshape(groups, local * capacity, d)
    if groups > 1:
      slots = jax.lax.all_to_all(slots, 'expert', 0, 0, tiled=True)
    rows_XRD = slots.reshape(groups, local, capacity, d).swapaxes(0, 1).reshape(local, -1, d)
    out = self._ffn(rows_XRD, None).reshape(local, groups, capacity, d).swapaxes(0, 1)
    out = out.reshape(groups, local * capacity, d)
    if groups > 1:
      out = jax.lax.all_to_all(out, 'expert', 0, 0, tiled=True)
    out_NKD = out.reshape(-1, d).at[slot_NK].get(mode='fill', fill_value=0)
    weights_NK = jnp.where(kept_NK, weights_NK, 0.0)
    y_ND = jnp.einsum('nkd,nk->nd', out_NKD.astype(weights_NK.dtype), weights_NK)
    return y_ND.astype(x_ND.dtype), kept_NK


def _combine(out_RD, weight_R, token_R, num_tokens: int):
  """Sum over each token's rows of weight x expert output, accumulated in float32."""
  dtype = jnp.promote_types(out_RD.dtype, jnp.float32)
  y_ND = jnp.zeros((num_tokens, out_RD.shape[1]), dtype)
  y_ND = y_ND.at[token_R].add(out_RD.astype(dtype) * weight_R[:, None].astype(dtype))
  return y_ND.astype(out_RD.dtype)


def assign_slots(ids_NK, num_experts: int, capacity: int):
  """(slot in [0, E C), or E C when dropped; kept) of each assignment.

  An expert's slots go to every token's first choice before any second
  choice, then in token order, so which assignments are dropped depends only
  on the routing, deterministically.
  """
  ids_A = ids_NK.T.reshape(-1)  # choice-major
  onehot_AE = jax.nn.one_hot(ids_A, num_experts, dtype=jnp.int32)
  position_A = jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=-1)
  kept_A = position_A < capacity
  slot_A = jnp.where(kept_A, ids_A * capacity + position_A, num_experts * capacity)
  return slot_A.reshape(ids_NK.T.shape).T, kept_A.reshape(ids_NK.T.shape).T


def _statistics(logits_NE, probs_NE, ids_NK, kept_NK, mask_N) -> RouterStats:
  counts_E = jnp.zeros(probs_NE.shape[-1], probs_NE.dtype).at[ids_NK].add(
      jnp.broadcast_to(mask_N[:, None], ids_NK.shape))
  log_norm_N = jax.nn.logsumexp(logits_NE, axis=-1)
  dropped = 0.0 if kept_NK is None else jnp.sum(jnp.where(kept_NK, 0.0, mask_N[:, None]))
  return RouterStats(tokens=jnp.sum(mask_N), counts_E=jax.lax.stop_gradient(counts_E),
                     probs_E=jnp.sum(probs_NE * mask_N[:, None], axis=0),
                     z=jnp.sum(jnp.square(log_norm_N) * mask_N),
                     dropped=jnp.asarray(dropped, probs_NE.dtype))


# -- the ragged all-to-all and its reference -------------------------------------------

def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name: str):
  """jax.lax.ragged_all_to_all's result built from all-gathers (any backend, G x the traffic).

  Device i's rows operand[input_offsets[j]:][:send_sizes[j]] land in device
  j's output at output_offsets[j] (offsets as the sender sees them); rows
  nothing lands on keep `output`'s values. recv_sizes is implied.
  """
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  operand_G, in_G, size_G, out_G = (jax.lax.all_gather(a, axis_name) for a in
                                    (operand, input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  start_G, size_G, in_G = out_G[:, me], size_G[:, me], in_G[:, me]
  inside_GR = (rows >= start_G[:, None]) & (rows < (start_G + size_G)[:, None])
  source_GR = jnp.clip(in_G[:, None] + rows - start_G[:, None], 0, operand.shape[0] - 1)
  picked_GR = jax.vmap(lambda x, i: x[i])(operand_G, source_GR)
  landed = jnp.sum(jnp.where(inside_GR[..., None], picked_GR, 0), axis=0)
  return jnp.where(jnp.any(inside_GR, axis=0)[:, None], landed.astype(output.dtype), output)


_RAGGED_ALL_TO_ALL = jax.lax.ragged_all_to_all  # the tests substitute the reference on CPU


# -- statistics over the mesh, the auxiliary losses, the bias ------------------------------

def batch_totals(stats: RouterStats) -> RouterStats:
  """Each statistic summed over every device's tokens: over the batch axes, and
  averaged over tensor, whose ranks route the same tokens. Each device keeps
  its own layers' ([L, ...], split over pipeline)."""
  def total(x):
    axes = tuple(a for a in BATCH_AXES if a in varying_axes(x))
    x = jax.lax.psum(x, axes) if axes else x
    return jax.lax.pmean(x, 'tensor') if 'tensor' in varying_axes(x) else x
  return jax.tree.map(total, stats)


def _over_layers(x_L):
  """Sum over the MoE layers of every pipeline stage."""
  x = jnp.sum(x_L)
  return jax.lax.psum(x, 'pipeline') if 'pipeline' in varying_axes(x) else x


def aux_losses(totals: RouterStats, experts_per_token: int) -> dict[str, jax.Array]:
  """The auxiliary losses of the micro-batch, each the mean over MoE layers.

  balance: Switch's E sum_e f_e P_e with f_e the share of assignments expert
  e received (count / (K tokens)) and P_e its mean router probability; 1 when
  both are uniform. router_z: ST-MoE's mean squared log-normaliser of the
  router logits. dropped: the share of assignments dropped for capacity.
  """
  layers_here = totals.tokens.shape[0]
  num_layers = layers_here * axis_size('pipeline')
  tokens_L = jnp.maximum(totals.tokens, 1.0)
  num_experts = totals.counts_E.shape[-1]
  share_LE = totals.counts_E / (experts_per_token * tokens_L[:, None])
  balance_L = num_experts * jnp.sum(share_LE * totals.probs_E / tokens_L[:, None], axis=-1)
  return {'balance': _over_layers(balance_L) / num_layers,
          'router_z': _over_layers(totals.z / tokens_L) / num_layers,
          'dropped': _over_layers(totals.dropped) / jnp.maximum(
              _over_layers(experts_per_token * totals.tokens), 1.0)}


def load(counts_LE) -> jax.Array:
  """The most loaded expert's assignments over the mean, in the worst layer."""
  mean_L = jnp.maximum(jnp.mean(counts_LE, axis=-1), 1.0)
  return jnp.max(jnp.max(counts_LE, axis=-1) / mean_L)


def update_bias(params, counts_LE, rate: float):
  """DeepSeek-V3's aux-loss-free step: each expert's bias rises by `rate` when it
  received fewer assignments than the mean in the step, falls when more."""
  mlp = params['moe_blocks']['mlp']
  bias_LE = mlp['bias']
  step_LE = rate * jnp.sign(jnp.mean(counts_LE, axis=-1, keepdims=True) - counts_LE)
  bias_LE = bias_LE + step_LE.astype(bias_LE.dtype)
  return {**params, 'moe_blocks': {**params['moe_blocks'], 'mlp': {**mlp, 'bias': bias_LE}}}
