"""Pipeline parallelism: the decoder blocks split into stages over the `pipeline` mesh axis.

Shape legend: B batch (this device's rows), b = B / M rows per micro-batch, t
this device's slice of the length (T / tensor while training), D hidden, L
layers, P stages, M micro-batches, R repeats, G = L / (P R) layers per group.

It runs per device like the rest of the model (maxlite.model.parallel): the
device at pipeline index p is stage p. Every iteration each stage runs one
group of G layers on the micro-batch in its slot, then passes its output to
the next stage with one collective-permute (the last stage's output wraps
round to stage 0). The backward pass is autodiff of the scan over
iterations, so the same permutes run in reverse; each layer inside a stage is
rematerialised per the model's remat policy, i.e. per micro-batch and layer.

Schedule. Layer group g = r P + p (repeat r, stage p) holds layers
[g G, (g + 1) G), so a micro-batch visits stages 0..P-1 R times. Micro-batch m
on its repeat r is on stage p at iteration r M + m + p, so every stage is busy
from iteration p to R M + p - 1, and the run takes R M + P - 1 iterations:

  bubble = (P - 1) / (R M + P - 1)

R = 1 is GPipe's all-forward-all-backward (AFAB); R > 1 is the circular
(interleaved) schedule, whose bubble shrinks with R at the price of R times
more stage-to-stage hops. What leaves the last stage wraps round to stage 0's
queue of M slots (slot m: micro-batch m), and waits there until its next
repeat starts M - P + 1 iterations later; so circular needs M >= P, and any M
works for AFAB. Every stage keeps a queue, but only stage 0's is read: that
keeps every read and write local. When the last repeat is done, stage 0's
queue is summed over `pipeline` (the other stages contribute zeros), so that
every stage holds the output for the LM head, which runs on all of them.

Layer placement. Parameters keep their [L, ...] execution-order layout (the
checkpoint format, whatever the pipeline size) and the 'layers' dim is split
into P contiguous blocks over `pipeline`. For AFAB that block is exactly stage
p's layers. The circular schedule needs the strided groups p, p + P, ...:
`to_stage_order` permutes the layers before the step goes per device (XLA
moves the blocks between stages, once per step) and `from_stage_order` puts
the gradients back. At rest every device still holds only 1/P of the layers
and of their optimizer state.

The embedding, final norm and LM head stay outside the pipeline: they run on
every pipeline device (replicated over `pipeline`), as do the loss and its
gradient.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from maxlite.model import parallel


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: int
  microbatches: int
  repeats: int = 1
  # The 1F1B schedules (maxlite.model.pipeline_1f1b) for training; the
  # forward-only passes (eval) run `run` below, whose layer placement they share.
  one_f_one_b: bool = False

  @property
  def name(self) -> str:
    kind = 'afab' if self.repeats == 1 else 'circular'
    if self.one_f_one_b:
      kind = '1f1b' if self.repeats == 1 else 'interleaved_1f1b'
    return kind

  @property
  def iterations(self) -> int:
    if self.one_f_one_b:  # forwards start R P - 1 iterations ahead of the backwards
      return self.repeats * (self.microbatches + self.stages) + self.stages - 2
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """Share of a stage's time that is idle. Under 1F1B an iteration is one
    forward and one backward, and the first and last R P - 1 run only one of them."""
    return (self.stages - 1) / (self.repeats * self.microbatches + self.stages - 1)

  @property
  def stash(self) -> int:
    """Stage inputs a stage keeps for its backward pass: a ring of O(R P) under
    1F1B; every iteration's under autodiff of the scan."""
    if self.one_f_one_b:
      return min(2 * self.repeats * self.stages - 1, self.repeats * self.microbatches)
    return self.iterations

  def describe(self, num_layers: int) -> str:
    group = num_layers // (self.stages * self.repeats)
    repeats = f' x {self.repeats} repeats' if self.repeats > 1 else ''
    idle = self.stages - 1
    return (f'pipeline: {self.name} schedule, {self.stages} stages{repeats} of {group} layer(s), '
            f'{self.microbatches} micro-batches, {self.iterations} iterations, '
            f'bubble {idle}/{idle + self.repeats * self.microbatches} = {100 * self.bubble:.1f}%, '
            f'stash {self.stash} stage inputs of one micro-batch')


def to_stage_order(stacked, schedule: Schedule):
  """[L, ...] in execution order -> [L, ...] whose p-th contiguous block holds
  stage p's groups p, p + P, ... in repeat order (the identity for AFAB)."""
  if schedule.repeats == 1:
    return stacked
  def reorder(w_L):
    return _swap_group_dims(w_L, schedule.repeats, schedule.stages)
  return jax.tree.map(reorder, stacked)


def from_stage_order(stacked, schedule: Schedule):
  """The inverse of to_stage_order."""
  if schedule.repeats == 1:
    return stacked
  def reorder(w_L):
    return _swap_group_dims(w_L, schedule.stages, schedule.repeats)
  return jax.tree.map(reorder, stacked)


def _swap_group_dims(w_L, outer: int, inner: int):
  """[outer, inner, G, ...] -> [inner, outer, G, ...], flattened back to [L, ...]."""
  rest = w_L.shape[1:]
  group = w_L.shape[0] // (outer * inner)
  return w_L.reshape(outer, inner, group, *rest).swapaxes(0, 1).reshape(w_L.shape)


def _varying(x, axis: str):
  """x marked as differing between the devices of `axis` (a scan carry must be typed so from the start)."""
  if axis in parallel.varying_axes(x):
    return x
  return jax.lax.pcast(x, (axis,), to='varying')


def run(run_layers: Callable, stage_layers, x_BtD, segment_ids_BT, positions_BT,
        schedule: Schedule):
  """The blocks' forward pass through the pipeline, on this device's stage;
  returns (x [B, t, D], this stage's per-layer statistics summed over micro-batches, or None).

  run_layers(layers, x_btD, segment_ids_bT, positions_bT) -> (x_btD, stats)
  runs a contiguous group of layers whose stacked state is `layers` (leading
  dim G); stats: a pytree of per-layer sums with leading dim G (the MoE
  router's), or None. stage_layers: this stage's layers in stage order
  (to_stage_order), leading dim R G. The returned statistics are in the same
  stage order, leading dim R G.
  """
  num_stages, num_micro, num_repeats = schedule.stages, schedule.microbatches, schedule.repeats
  stage = parallel.axis_index('pipeline')
  x_MbtD = parallel.micro_batches(x_BtD, num_micro)
  segment_ids_MbT = parallel.micro_batches(segment_ids_BT, num_micro)
  positions_MbT = parallel.micro_batches(positions_BT, num_micro)
  groups_RG = jax.tree.map(lambda w: w.reshape(num_repeats, -1, *w.shape[1:]), stage_layers)
  to_next_stage = [(p, (p + 1) % num_stages) for p in range(num_stages)]

  def iteration(carry, i):
    (state_btD, queue_MbtD), stats_R = carry
    item = i - stage  # r M + m of the micro-batch on this stage (< 0 or past the end: idle)
    micro = item % num_micro
    # Stage 0 takes its input from the queue (new micro-batches, or returning ones).
    x_btD = jnp.where(stage == 0, queue_MbtD[i % num_micro], state_btD)
    repeat = jnp.clip(item // num_micro, 0, num_repeats - 1)
    layers = jax.tree.map(lambda w: w[repeat], groups_RG)
    out_btD, stats = run_layers(layers, x_btD, segment_ids_MbT[micro], positions_MbT[micro])
    if stats is not None:  # idle iterations run on stale inputs: count only the busy ones
      busy = (item >= 0) & (item < num_repeats * num_micro)
      stats_R = jax.tree.map(lambda acc, s: acc.at[repeat].add(jnp.where(busy, s, 0)), stats_R, stats)
    state_btD = jax.lax.ppermute(out_btD, 'pipeline', to_next_stage)
    # On stage 0, what just arrived from the last stage is micro-batch `done`.
    done = i - (num_stages - 1)
    slot = done % num_micro
    kept_btD = jnp.where(done >= 0, state_btD, queue_MbtD[slot])  # the first P - 1 are idle output
    queue_MbtD = jax.lax.dynamic_update_index_in_dim(queue_MbtD, kept_btD, slot, 0)
    return ((state_btD, queue_MbtD), stats_R), None

  queue_MbtD = _varying(x_MbtD, 'pipeline')
  state_btD = jnp.zeros_like(queue_MbtD[0])
  # The statistics' shapes, from one group's layers (traced only for its shapes).
  stats_shapes = jax.eval_shape(lambda: run_layers(jax.tree.map(lambda w: w[0], groups_RG),
                                                   queue_MbtD[0], segment_ids_MbT[0],
                                                   positions_MbT[0])[1])
  # Typed as varying over every mesh axis, as whatever the layers return may be.
  manual = tuple(sorted(jax.sharding.get_abstract_mesh().manual_axes))
  stats_R = jax.tree.map(
      lambda s: jax.lax.pcast(jnp.zeros((num_repeats, *s.shape), s.dtype), manual, to='varying'),
      stats_shapes)
  # R M + P - 1 forward iterations, whichever schedule trains (1F1B's eval runs this too).
  ((_, queue_MbtD), stats_R), _ = jax.lax.scan(iteration, ((state_btD, queue_MbtD), stats_R),
                                               jnp.arange(num_repeats * num_micro + num_stages - 1))
  out_MbtD = jax.lax.psum(jnp.where(stage == 0, queue_MbtD, 0), 'pipeline')
  stats = jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stats_R)
  return out_MbtD.reshape(x_BtD.shape), stats
