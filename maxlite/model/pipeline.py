"""Pipeline parallelism: the decoder blocks split into stages over the `pipeline` mesh axis.

Shape legend: B batch, b = B / M rows per micro-batch, T length, D hidden,
L layers, P stages, M micro-batches, R repeats, G = L / (P R) layers per group.

The formulation is plain SPMD (no shard_map). A buffer of P slots, one per
stage, has its stage dim sharded over `pipeline`. Every iteration each stage
runs one group of G layers on its slot (a vmap over stages with
spmd_axis_name='pipeline', so the blocks' own sharding constraints gain the
stage dim), then the buffer rolls by one stage, which XLA lowers to a single
collective-permute. The backward pass is autodiff of the scan over
iterations; each layer inside a stage is rematerialised per the model's remat
policy, i.e. per micro-batch and layer.

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
works for AFAB. The queue has a stage dim too, of which only stage 0's copy is
used: that keeps every read and write local (no broadcast per iteration).

Layer placement. Parameters keep their [L, ...] execution-order layout (the
checkpoint format, whatever the pipeline size) and the 'layers' dim is split
into P contiguous blocks over `pipeline`. For AFAB that block is exactly stage
p's layers. The circular schedule needs the strided groups p, p + P, ..., so
the step reshuffles the blocks into [P, R, G, ...] (one all-to-all of the
block parameters over `pipeline` in the forward pass, and its transpose for
the gradients). At rest every device still holds only 1/P of the layers and
of their optimizer state; the price is that all-to-all per micro-step, which
benchmarks/pipeline.py measures. Keeping the strided groups resident instead
would save it, but would make the stored layout depend on R and need a
reshuffle on every save and restore.

The embedding, final norm and LM head stay outside the pipeline: they run on
every pipeline device (replicated over `pipeline`), as do the loss and its
gradient.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from maxlite.mesh import constrain

STATE = P('stages', 'batch', 'residual_length', 'embed')
QUEUE = P('stages', None, 'batch', 'residual_length', 'embed')


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def name(self) -> str:
    return 'afab' if self.repeats == 1 else 'circular'

  @property
  def iterations(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """Share of stage-iterations that are idle."""
    return (self.stages - 1) / self.iterations

  def describe(self, num_layers: int) -> str:
    group = num_layers // (self.stages * self.repeats)
    repeats = f' x {self.repeats} repeats' if self.repeats > 1 else ''
    return (f'pipeline: {self.name} schedule, {self.stages} stages{repeats} of {group} layer(s), '
            f'{self.microbatches} micro-batches, {self.iterations} iterations, '
            f'bubble {self.stages - 1}/{self.iterations} = {100 * self.bubble:.1f}%')


def _split(x_B, num_micro: int, logical: P):
  """[B, ...] -> [M, B / M, ...], rows M apart, so that every micro-batch is
  spread over all batch shards (the same split as gradient accumulation)."""
  x = x_B.reshape(x_B.shape[0] // num_micro, num_micro, *x_B.shape[1:]).swapaxes(0, 1)
  return constrain(x, P(None, *logical))


def _merge(x_MbTD):
  return x_MbTD.swapaxes(0, 1).reshape(-1, *x_MbTD.shape[2:])


def _pipeline_axis():
  """'pipeline' when tracing under a mesh that has it; None runs the same schedule unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or 'pipeline' not in mesh.axis_names else 'pipeline'


def _stage_major(w_L, schedule: Schedule):
  """[L, ...] -> [P, R, G, ...]: stage p's groups p, p + P, ... (local when R = 1)."""
  stages, repeats = schedule.stages, schedule.repeats
  w = w_L.reshape(repeats, stages, w_L.shape[0] // (stages * repeats), *w_L.shape[1:])
  w = w.swapaxes(0, 1)
  if _pipeline_axis():
    # Only the stage dim is pinned; the rest keeps the parameter's own sharding.
    spec = P('pipeline', None, None, *([P.UNCONSTRAINED] * (w.ndim - 3)))
    w = jax.lax.with_sharding_constraint(w, spec)
  return w


def run(run_layers: Callable, stacked, x_BTD, segment_ids_BT, positions_BT, schedule: Schedule):
  """The blocks' forward pass through the pipeline; returns x [B, T, D].

  run_layers(layers, x_bTD, segment_ids_bT, positions_bT) -> x_bTD runs a
  contiguous group of layers whose stacked state is `layers` (leading dim G).
  stacked: the blocks' state, leading dim L in execution order.
  """
  num_stages, num_micro, num_repeats = schedule.stages, schedule.microbatches, schedule.repeats
  axis = _pipeline_axis()
  x_MbTD = _split(x_BTD, num_micro, P('batch', 'residual_length', 'embed'))
  segment_ids_MbT = _split(segment_ids_BT, num_micro, P('batch', 'length'))
  positions_MbT = _split(positions_BT, num_micro, P('batch', 'length'))
  groups_PRG = jax.tree.map(lambda w: _stage_major(w, schedule), stacked)
  stage_P = jnp.arange(num_stages)

  def stage_step(stage, groups_RG, x_bTD, queue_MbTD, i):
    """What `stage` does at iteration i: one group of layers on one micro-batch."""
    item = i - stage  # r M + m of the micro-batch on this stage (< 0 or past the end: idle)
    micro = item % num_micro
    # Stage 0 takes its input from the queue (new micro-batches, or returning ones).
    x_bTD = jnp.where(stage == 0, queue_MbTD[i % num_micro], x_bTD)
    if num_repeats == 1:
      layers = jax.tree.map(lambda w: w[0], groups_RG)
    else:
      repeat = jnp.clip(item // num_micro, 0, num_repeats - 1)
      layers = jax.tree.map(lambda w: w[repeat], groups_RG)
    return run_layers(layers, x_bTD, segment_ids_MbT[micro], positions_MbT[micro])

  def store(queue_MbTD, x_bTD, done):
    """Puts what the last stage finished (micro-batch done % M) into the queue."""
    slot = done % num_micro
    kept_bTD = jnp.where(done >= 0, x_bTD, queue_MbTD[slot])  # the first P - 1 are idle output
    return jax.lax.dynamic_update_index_in_dim(queue_MbTD, kept_bTD, slot, 0)

  def iteration(carry, i):
    state_PbTD, queue_PMbTD = carry
    out_PbTD = jax.vmap(stage_step, in_axes=(0, 0, 0, 0, None), spmd_axis_name=axis)(
        stage_P, groups_PRG, state_PbTD, queue_PMbTD, i)
    # Stage p's output moves on to stage p + 1; the last stage's wraps round to stage 0.
    state_PbTD = constrain(jnp.roll(out_PbTD, 1, axis=0), STATE)
    # Every stage writes its own queue copy (only stage 0's is ever read): no broadcast.
    queue_PMbTD = jax.vmap(store, in_axes=(0, 0, None), spmd_axis_name=axis)(
        queue_PMbTD, state_PbTD, i - (num_stages - 1))
    return (state_PbTD, constrain(queue_PMbTD, QUEUE)), None

  state_PbTD = constrain(jnp.zeros((num_stages, *x_MbTD.shape[1:]), x_MbTD.dtype), STATE)
  queue_PMbTD = constrain(jnp.broadcast_to(x_MbTD, (num_stages, *x_MbTD.shape)), QUEUE)
  (_, queue_PMbTD), _ = jax.lax.scan(iteration, (state_PbTD, queue_PMbTD),
                                     jnp.arange(schedule.iterations))
  return _merge(queue_PMbTD[0])
