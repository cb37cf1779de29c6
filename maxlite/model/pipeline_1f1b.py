"""The 1F1B pipeline schedules: loss and gradients with one forward and one
backward per stage and iteration, so that only O(P) micro-batches are in
flight whatever their number M.

Shape legend: as maxlite.model.pipeline (B, b = B / M, t, D, P stages, M
micro-batches, R repeats); S stash slots.

Where maxlite.model.pipeline gets its backward pass from autodiff of the scan
over iterations (which keeps every iteration's input alive until the
backward scan runs), this module builds the train step's gradients itself,
per device, inside the step's shard_map:

  prologue   the embedding table gathered once, by jax.vjp (its pullback, the
             reduce-scatter, runs once after the loop);
  loop       R M + R P + P - 2 iterations; in each, every stage runs one
             forward of one micro-batch on one of its R layer groups, and one
             backward (an explicit jax.vjp of that group, from the input it
             stashed); the last stage runs the final norm, LM head and loss
             (and their jax.vjp) on each micro-batch the moment it leaves the
             last group, and starts its backward in the same iteration;
             stage 0 looks up each micro-batch's embedding as it enters, and
             runs the lookup's pullback on the input gradient as it leaves;
  epilogue   the table's pullback, and one psum over `pipeline` of the
             gradients of the parameters every stage holds.

Schedule. Micro-batches go in groups of P (Megatron's interleaved order): the
forward work item k = g R P + r P + j is micro-batch m = g P + j on its layer
group r, and it runs on stage p at iteration k + p; leaving stage P - 1 it
wraps round to stage 0 for group r + 1 at the very next iteration, so the
cyclic permute needs no queue. The backward items run the same way in
reverse (group R - 1 first, from stage P - 1 down, wrapping from stage 0 to
stage P - 1), starting R P - 1 iterations later: item (g, r, j) is on stage p
at iteration R P - 1 + g R P + (R - 1 - r) P + j + (P - 1 - p). So an input
stashed on stage p for group r waits 2 (R - 1 - r) P + 2 (P - 1 - p)
iterations for its backward: a ring of S = 2 R P - 1 slots (at most R M)
holds every stage's stash, whatever M.

R = 1 is 1F1B (PipeDream-flush); R > 1 is interleaved 1F1B, whose groups
p, p + P, ... are laid out by pipeline.to_stage_order as for the circular
schedule. Warm-up and cool-down slots are skipped (lax.cond: every device of
a tensor or fsdp group shares its stage, so they agree on the branch), which
makes the step take (R M + P - 1) (F + B) of one group's forward and
backward times:

  bubble = (P - 1) / (R M + P - 1)

as AFAB and circular, but with O(R P) stashed stage inputs instead of all
R M. The price: the backward of a group reruns its forward from the stashed
input (jax.vjp at backward time), one more forward per micro-batch than
autodiff; each layer's remat policy applies inside that rerun as usual.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from maxlite.model import parallel, pipeline


def _vma(aval) -> frozenset:
  vma = getattr(aval, 'vma', None)
  return frozenset(vma if vma is not None else aval.manual_axis_type.varying)


def _when(pred, fn: Callable, *args):
  """fn(*args) where pred holds, zeros of its types elsewhere, skipping the work there."""
  jaxpr, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)

  def idle(*_):
    return jax.tree.unflatten(jax.tree.structure(shapes), [_zeros_typed(a) for a in jaxpr.out_avals])

  return jax.lax.cond(pred, fn, idle, *args)


def _varying(tree, axis: str):
  """tree marked as differing between the devices of `axis` (no-op off the per-device region)."""
  if parallel.axis_size(axis) == 1:
    return tree
  return jax.tree.map(lambda x: x if axis in parallel.varying_axes(x)
                      else jax.lax.pcast(x, (axis,), to='varying'), tree)


def value_and_grad(params, graphdef, batch, *, schedule: pipeline.Schedule, compute_dtype,
                   z_loss_weight: float):
  """((objective sum, (cross-entropy sum, token count)), gradient sums) of this
  device's rows, as jax.value_and_grad(maxlite.step.loss_sums, has_aux=True)
  gives them; params['blocks'] is this stage's layers in stage order."""
  num_stages, num_micro, num_repeats = schedule.stages, schedule.microbatches, schedule.repeats
  num_items, num_slots = num_repeats * num_micro, schedule.stash
  stage = parallel.axis_index('pipeline')
  dtype = jnp.dtype(compute_dtype)
  blocks = params['blocks']
  # Everything outside the blocks (embedding, final norm, LM head) runs on one
  # stage at a time here: typed as differing between stages, its gradient is
  # not summed over `pipeline` inside every pullback, only once at the end.
  rest = _varying({k: v for k, v in params.items() if k != 'blocks'}, 'pipeline')
  tokens_BT = batch['inputs']
  sp = tokens_BT.shape[1] % parallel.axis_size('tensor') == 0

  def model_with(rest_params):
    return nnx.merge(graphdef, {**rest_params, 'blocks': blocks})

  run_layers = model_with(rest).layer_runner(sp)
  # The table is gathered once (its pullback, a reduce-scatter, runs once after
  # the loop); each micro-batch's lookup runs on stage 0 as its forward starts.
  table_VD, table_pullback = jax.vjp(lambda r: model_with(r).embed.gather(dtype), rest)
  micro = {k: parallel.micro_batches(v, num_micro) for k, v in batch.items()}

  def embed(rest_params, table_VD, m):
    return model_with(rest_params).embed_inputs(micro['inputs'][m], table_VD, sp)

  def embed_grads(dx_btD, m):
    _, pullback = jax.vjp(lambda r, t: embed(r, t, m), rest, table_VD)
    return pullback(dx_btD)

  groups_RG = jax.tree.map(lambda w: w.reshape(num_repeats, -1, *w.shape[1:]), blocks)

  def head(rest_params, table_VD, y_btD, m):
    """The objective and cross-entropy sums of micro-batch m from the last group's output."""
    ce_bT, log_norm_bT = model_with(rest_params).head_losses(y_btD, table_VD, micro['targets'][m], sp)
    weights_bT = micro['loss_mask'][m].astype(ce_bT.dtype)
    ce = jnp.sum(ce_bT * weights_bT)
    objective = ce
    if z_loss_weight:
      objective += z_loss_weight * jnp.sum(jnp.square(log_norm_bT) * weights_bT)
    return objective, ce

  def head_grads(y_btD, m):
    (objective, ce), pullback = jax.vjp(lambda r, t, y: head(r, t, y, m), rest, table_VD, y_btD)
    d_rest, d_table, dy_btD = pullback((parallel.zeros_like(objective) + 1, parallel.zeros_like(ce)))
    return objective, ce, d_rest, d_table, dy_btD

  def forward(layers, x_btD, m):
    return run_layers(layers, x_btD, micro['segment_ids'][m], micro['positions'][m])

  def backward(layers, x_btD, dy_btD, m):
    _, pullback = jax.vjp(lambda w, x: forward(w, x, m), layers, x_btD)
    return pullback(dy_btD)

  def split(item):
    """(micro-batch, group) of work item `item` (clipped into range)."""
    item = jnp.clip(item, 0, num_items - 1)
    g, j = item // (num_repeats * num_stages), item % num_stages
    return g * num_stages + j, (item % (num_repeats * num_stages)) // num_stages

  to_next = [(p, (p + 1) % num_stages) for p in range(num_stages)]
  to_previous = [(p, (p - 1) % num_stages) for p in range(num_stages)]
  last_stage = stage == num_stages - 1

  def iteration(carry, i):
    sent_btD, grad_in_btD, stash_SbtD, d_groups, d_rest, d_table, sums = carry
    # Forward: item i - stage, on group r, for micro-batch m.
    item = i - stage
    m, r = split(item)
    forward_now = (item >= 0) & (item < num_items)
    first = forward_now & (stage == 0) & (r == 0)
    x_btD = jnp.where(first, _when(first, embed, rest, table_VD, m), sent_btD)
    layers = jax.tree.map(lambda w: w[r], groups_RG)
    y_btD = _when(forward_now, forward, layers, x_btD, m)
    stash_SbtD = jax.lax.dynamic_update_index_in_dim(stash_SbtD, x_btD, i % num_slots, 0)
    # The loss, and the first cotangent, as the micro-batch leaves the last group.
    objective, ce, d_rest_m, d_table_m, dy_btD = _when(
        forward_now & last_stage & (r == num_repeats - 1), head_grads, y_btD, m)
    sums = (sums[0] + objective, sums[1] + ce)
    d_rest = jax.tree.map(jnp.add, d_rest, d_rest_m)
    d_table = jax.tree.map(jnp.add, d_table, d_table_m)
    # Backward: item back, reversed groups, reading the input its forward stashed.
    back = i - (num_repeats * num_stages - 1) - (num_stages - 1 - stage)
    mb, rr = split(back)
    rb = num_repeats - 1 - rr
    backward_now = (back >= 0) & (back < num_items)
    g, j = mb // num_stages, mb % num_stages
    stashed_at = g * num_repeats * num_stages + rb * num_stages + j + stage
    dy_btD = jnp.where(last_stage & (rb == num_repeats - 1), dy_btD, grad_in_btD)
    layers = jax.tree.map(lambda w: w[rb], groups_RG)
    d_layers, dx_btD = _when(backward_now, backward, layers, stash_SbtD[stashed_at % num_slots],
                             dy_btD, mb)
    d_groups = jax.tree.map(
        lambda acc, d: jax.lax.dynamic_update_index_in_dim(acc, acc[rb] + d, rb, 0), d_groups, d_layers)
    # Stage 0's input gradients of group 0 are the embedding's.
    d_rest_m, d_table_m = _when(backward_now & (stage == 0) & (rb == 0), embed_grads, dx_btD, mb)
    d_rest = jax.tree.map(jnp.add, d_rest, d_rest_m)
    d_table = jax.tree.map(jnp.add, d_table, d_table_m)
    sent_btD = jax.lax.ppermute(y_btD, 'pipeline', to_next)
    grad_in_btD = jax.lax.ppermute(dx_btD, 'pipeline', to_previous)
    return (sent_btD, grad_in_btD, stash_SbtD, d_groups, d_rest, d_table, sums), None

  zero_btD = _zeros_typed(jax.make_jaxpr(embed, static_argnums=2)(rest, table_VD, 0).out_avals[0])
  # The loss sums' types (dtype, varying axes) are the head's.
  sums = tuple(_zeros_typed(a) for a in jax.make_jaxpr(lambda y: head_grads(y, 0)[:2])(zero_btD).out_avals)
  carry = (zero_btD, zero_btD, jnp.zeros((num_slots,) + zero_btD.shape, zero_btD.dtype) + zero_btD,
           jax.tree.map(parallel.zeros_like, groups_RG), jax.tree.map(parallel.zeros_like, rest),
           parallel.zeros_like(table_VD), sums)
  (_, _, _, d_groups, d_rest, d_table, (objective, ce)), _ = jax.lax.scan(
      iteration, carry, jnp.arange(schedule.iterations))

  d_rest = jax.tree.map(jnp.add, d_rest, table_pullback(d_table)[0])
  if parallel.axis_size('pipeline') > 1:
    d_rest = jax.tree.map(lambda d: jax.lax.psum(d, 'pipeline'), d_rest)
  grads = {**d_rest, 'blocks': jax.tree.map(lambda d: d.reshape(-1, *d.shape[2:]), d_groups)}
  count = jnp.sum(batch['loss_mask'].astype(jnp.float32))
  # The loss lives on the last stage: the others contribute zeros to its sum.
  return (objective, (ce, count)), grads


def _zeros_typed(aval):
  """Zeros of aval's shape and dtype, varying over exactly its mesh axes."""
  axes = tuple(sorted(_vma(aval)))
  zeros = jnp.zeros(aval.shape, aval.dtype)
  return jax.lax.pcast(zeros, axes, to='varying') if axes else zeros
