"""The train and eval steps: pure functions that train.py jits once with shardings.

A batch is a dict of [B, T] int32 arrays: inputs, targets, segment_ids (0 =
padding), positions (restarting per document) and loss_mask.

The loss and its gradients run per device (`maxlite.mesh.per_device`): each
device takes its rows of the batch and its shards of the parameters, and the
model's own collectives (maxlite.model.parallel) move what must cross devices
within a micro-step. Gradients stay per device across gradient accumulation
and are summed over `data` once per step, in optim.grad_reduce_dtype (with
ZeRO-1 reduce-scattered, so that each device receives only the slice its
optimizer state updates). `context` is summed over in the same place: its
devices hold different tokens of the same rows, as `data`'s hold different
rows, and the batch is put in its load-balanced order on the way in
(maxlite.model.context). The optimizer update then runs on the sharded
state outside the per-device region.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from maxlite import mesh as mesh_lib, optim, state as state_lib
from maxlite.model import context, moe, parallel, pipeline, pipeline_1f1b
from maxlite.model.llama import STACKS
from maxlite.state import TrainState

BATCH = P('batch', 'length')
BATCH_FIELDS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class StepSettings:
  compute_dtype: str = 'float32'
  grad_accum_steps: int = 1
  z_loss_weight: float = 0.0
  grad_reduce_dtype: str = 'float32'
  # Mixture of Experts (maxlite.model.moe): 0 experts_per_token means a dense model.
  experts_per_token: int = 0
  moe_balance_loss_weight: float = 0.0
  moe_router_z_loss_weight: float = 0.0
  moe_bias_update_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the step's arrays lie on the mesh: what `per_device` hands each device."""
  mesh: Mesh
  param_specs: Any  # PartitionSpec per parameter (the rule table's)
  grad_specs: Any  # PartitionSpec per gradient: the params', or the optimizer state's under ZeRO-1
  batch_spec: P
  schedule: pipeline.Schedule | None = None  # the pipeline's, when there is one

  @classmethod
  def create(cls, mesh: Mesh, logical_params, abstract_params, *, zero1: bool = False,
             schedule: pipeline.Schedule | None = None, batch_shape=None) -> 'Layout':
    sizes = dict(mesh.shape)

    def specs(rules):
      return jax.tree.map(lambda logical, x: mesh_lib.logical_to_spec(logical, x.shape, sizes, rules),
                          logical_params, abstract_params)

    param_specs = specs(mesh_lib.LOGICAL_AXIS_RULES)
    grad_specs = specs(mesh_lib.ZERO1_RULES) if zero1 else param_specs
    batch_spec = mesh_lib.logical_to_spec(BATCH, batch_shape, sizes) if batch_shape else P(mesh_lib.LOGICAL_AXIS_RULES['batch'])
    # The per-device step reorders each device's slice of the rows (model.context):
    # with context parallelism every row must arrive split along its length.
    assert sizes.get('context', 1) == 1 or batch_spec[1:2] == ('context',), (batch_spec, batch_shape)
    return cls(mesh, param_specs, grad_specs, batch_spec,
               schedule if schedule and schedule.stages > 1 else None)


def loss_sums(params, graphdef, batch, settings: StepSettings):
  """(objective sum, (cross-entropy sum, token count, MoE metrics)) over the batch's weighted tokens.

  Sums, not means, so that micro-batches add up to exactly the big-batch value.
  Runs per device on its rows; the sums are this device's. MoE metrics ({}
  when dense): the micro-batch's auxiliary losses (maxlite.model.moe.aux_losses)
  and its assignments per expert and layer.
  """
  model = nnx.merge(graphdef, params)
  cross_entropy_BT, log_norm_BT, router_stats = model.token_losses(
      batch['inputs'], batch['segment_ids'], batch['positions'], batch['targets'],
      compute_dtype=jnp.dtype(settings.compute_dtype), router_stats=True)
  weights_BT = batch['loss_mask'].astype(cross_entropy_BT.dtype)
  cross_entropy, count = jnp.sum(cross_entropy_BT * weights_BT), jnp.sum(weights_BT)
  objective = cross_entropy
  if settings.z_loss_weight:
    # z-loss keeps the softmax normaliser near 1, which steadies bf16 logits.
    objective += settings.z_loss_weight * jnp.sum(jnp.square(log_norm_BT) * weights_BT)
  moe_metrics = {}
  if router_stats is not None:
    totals = moe.batch_totals(router_stats)
    moe_metrics = moe.aux_losses(totals, settings.experts_per_token)
    # The auxiliary losses are means over the whole micro-batch; weighted by this
    # device's token count they add up, over devices, to mean x count like the CE.
    objective += count * (settings.moe_balance_loss_weight * moe_metrics['balance'] +
                          settings.moe_router_z_loss_weight * moe_metrics['router_z'])
    moe_metrics['counts_LE'] = totals.counts_E
  return objective, (cross_entropy, count, moe_metrics)


def _sum_over_devices(x):
  """Sums a per-device value over every mesh axis along which it differs."""
  axes = tuple(sorted(parallel.varying_axes(x)))
  return jax.lax.psum(x, axes) if axes else x


# Axes whose devices hold different tokens but the same (most) weights: the step
# sums gradients over them once. `data` and `expert` split the batch's rows,
# `context` its rows' length; `expert` also splits the experts: their weights'
# gradients are already whole per device and are not summed over it.
REPLICA_AXES = ('data', 'context', 'expert')


def _replica_axes(x) -> tuple[str, ...]:
  """The replica axes (of size > 1) along which the parameter x is the same on every device."""
  return tuple(a for a in REPLICA_AXES if parallel.axis_size(a) > 1 and a not in parallel.varying_axes(x))


def _sum_over_data(grad, spec: P, reduce_dtype: str, axes: tuple[str, ...]):
  """The step's one reduction over the replica `axes` (`data`, `context`, and
  `expert` for non-expert weights): psum, or psum_scatter into the dimension
  that ZeRO-1 splits over them as well (data and expert; the rest is psummed)."""
  if not axes:
    return grad
  summed = grad.astype(reduce_dtype)
  for dim, dim_axes in enumerate(spec):
    dim_axes = dim_axes if isinstance(dim_axes, tuple) else (dim_axes,)
    scattered = tuple(a for a in dim_axes if a in axes)
    if scattered:
      summed = jax.lax.psum_scatter(summed, scattered, scatter_dimension=dim, tiled=True)
      axes = tuple(a for a in axes if a not in scattered)
      break
  if axes:
    summed = jax.lax.psum(summed, axes)
  return summed.astype(grad.dtype)


def _per_device_gradients(params, batch, *, graphdef, settings: StepSettings, layout: Layout):
  """(gradient sums, cross-entropy sum, token count, MoE metrics) on this device's shards."""
  batch = context.balance(batch)
  # Each device's gradients stay its own until the end of the step: their one
  # sum over the replica axes is below, not inside every micro-step.
  replicas = jax.tree.map(_replica_axes, params)
  params = jax.tree.map(lambda p, a: jax.lax.pcast(p, a, to='varying') if a else p, params, replicas)
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  if layout.schedule and layout.schedule.one_f_one_b:  # the schedule runs its own backward
    grad_fn = functools.partial(_one_f_one_b, schedule=layout.schedule)
  if settings.grad_accum_steps == 1:
    (_, (ce_sum, count, moe_metrics)), grad_sums = grad_fn(params, graphdef, batch, settings)
  else:
    def accumulate(grad_acc, micro):
      (_, aux), grads = grad_fn(params, graphdef, micro, settings)
      return jax.tree.map(jnp.add, grad_acc, grads), aux

    micro_batches = jax.tree.map(
        lambda x: parallel.micro_batches(x, settings.grad_accum_steps), batch)
    grad_sums, (ce_M, count_M, moe_M) = jax.lax.scan(
        accumulate, jax.tree.map(parallel.zeros_like, params), micro_batches)
    ce_sum, count = jnp.sum(ce_M), jnp.sum(count_M)
    # Losses: the mean over micro-batches; assignments: the step's sum.
    moe_metrics = {k: jnp.sum(v, 0) if k == 'counts_LE' else jnp.mean(v, 0) for k, v in moe_M.items()}
  grad_sums = jax.tree.map(
      lambda g, spec, axes: _sum_over_data(g, spec, settings.grad_reduce_dtype, axes),
      grad_sums, layout.grad_specs, replicas, is_leaf=lambda x: isinstance(x, P))
  return grad_sums, _sum_over_devices(ce_sum), _sum_over_devices(count), moe_metrics


def _one_f_one_b(params, graphdef, batch, settings: StepSettings, *, schedule):
  (objective, aux), grads = pipeline_1f1b.value_and_grad(
      params, graphdef, batch, schedule=schedule, compute_dtype=settings.compute_dtype,
      z_loss_weight=settings.z_loss_weight)
  # Back into params' container types (a plain dict of the same sorted keys and
  # leaves); no MoE metrics (config validation keeps MoE off the 1F1B schedules).
  return (objective, (*aux, {})), jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(grads))


def _stage_order(tree, schedule, inverse: bool = False):
  """The stacked layers (dense and MoE) of a params-like tree to the pipeline's stage order, or back."""
  if not schedule:
    return tree
  reorder = pipeline.from_stage_order if inverse else pipeline.to_stage_order
  return {k: reorder(v, schedule) if k in STACKS else v for k, v in tree.items()}


def gradients(params, graphdef, batch, settings: StepSettings, layout: Layout, *,
              with_moe: bool = False):
  """Gradient of the mean cross-entropy (plus the MoE auxiliary losses),
  accumulated over micro-batches in param precision; with_moe: also the MoE metrics."""
  params = _stage_order(params, layout.schedule)
  batch_specs = {name: layout.batch_spec for name in batch}
  moe_specs = {}
  if 'moe_blocks' in params:
    moe_specs = {'balance': P(), 'router_z': P(), 'dropped': P(),
                 'counts_LE': P('pipeline' if layout.schedule else None, None)}
  grad_sums, ce_sum, count, moe_metrics = mesh_lib.per_device(
      lambda p, b: _per_device_gradients(p, b, graphdef=graphdef, settings=settings, layout=layout),
      layout.mesh, in_specs=(layout.param_specs, batch_specs),
      out_specs=(layout.grad_specs, P(), P(), moe_specs))(params, batch)
  grad_sums = _stage_order(grad_sums, layout.schedule, inverse=True)
  if 'counts_LE' in moe_metrics:
    moe_metrics['counts_LE'] = _stage_order(
        {'moe_blocks': moe_metrics['counts_LE']}, layout.schedule, inverse=True)['moe_blocks']
  count = jnp.maximum(count, 1)
  grads = jax.tree.map(lambda g: g / count, grad_sums)
  if with_moe:
    return grads, ce_sum / count, count, moe_metrics
  return grads, ce_sum / count, count


def all_finite(tree) -> jax.Array:
  """Whether every floating-point entry of a pytree is finite."""
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)] or [True]))


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, settings: StepSettings,
               layout: Layout):
  grads, loss, count, moe_metrics = gradients(state.params, graphdef, batch, settings, layout,
                                              with_moe=True)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if moe_metrics and settings.moe_bias_update_rate:
    # Outside the optimizer, from the step's assignments (maxlite.model.moe.update_bias).
    params = moe.update_bias(params, moe_metrics['counts_LE'], settings.moe_bias_update_rate)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'lr': schedule(state.step), 'tokens': count,
             **{f'moe_{k}': v for k, v in moe_metrics.items() if k != 'counts_LE'},
             **({'moe_load': moe.load(moe_metrics['counts_LE'])} if moe_metrics else {}),
             # The loss is computed before the update; this looks at what the
             # update left behind, which is what a checkpoint would hold.
             'state_finite': all_finite((params, opt_state))}
  if isinstance(opt_state, optax.ApplyIfFiniteState):  # train.nonfinite='skip'
    metrics['skipped_in_a_row'] = opt_state.notfinite_count
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef, settings: StepSettings, layout: Layout):
  """(cross-entropy sum, token count) of one validation batch."""
  params = _stage_order(params, layout.schedule)

  def per_device(params, batch):
    _, (ce_sum, count, _) = loss_sums(params, graphdef, context.balance(batch), settings)
    return _sum_over_devices(ce_sum), _sum_over_devices(count)

  return mesh_lib.per_device(per_device, layout.mesh,
                             in_specs=(layout.param_specs, {k: layout.batch_spec for k in batch}),
                             out_specs=(P(), P()))(params, batch)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted train and eval steps of a run, and how their arrays are laid out."""
  train: Any  # (state, batch) -> (state, metrics); donates the state
  eval: Any  # (params, batch) -> (cross-entropy sum, token count)
  abstract_state: TrainState  # ShapeDtypeStructs with shardings: compile without allocating
  shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  layout: Layout

  def batch_shapes(self, rows: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a batch, to compile the steps ahead of time."""
    return {name: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=self.batch_sharding)
            for name in BATCH_FIELDS}


def moe_settings(model) -> dict:
  """The StepSettings fields of the model config's MoE loss weights and bias rate."""
  if not model.num_experts:
    return {}
  return dict(experts_per_token=model.experts_per_token,
              moe_balance_loss_weight=model.moe_balance_loss_weight,
              moe_router_z_loss_weight=model.moe_router_z_loss_weight,
              moe_bias_update_rate=model.moe_bias_update_rate)


def build(config, model_cfg, mesh: Mesh, tx) -> Steps:
  """The train and eval steps for `config`, jitted with the state's and the batch's shardings."""
  graphdef, abstract_params, logical = state_lib.abstract_model(model_cfg)
  if model_cfg.num_experts:
    moe.check_dispatch(model_cfg.moe_dispatch, model_cfg.moe_capacity_factor, mesh.shape['expert'],
                       mesh.devices.flat[0].platform)
  train_cfg = config.train
  batch_shape = (train_cfg.micro_batch_size * train_cfg.grad_accum_steps, config.data.seq_len)
  layout = Layout.create(mesh, logical, abstract_params, zero1=config.parallel.zero1,
                         schedule=model_cfg.pipeline_schedule, batch_shape=batch_shape)
  settings = StepSettings(compute_dtype=config.model.compute_dtype,
                          grad_accum_steps=train_cfg.grad_accum_steps,
                          z_loss_weight=config.model.z_loss_weight,
                          grad_reduce_dtype=model_cfg.grad_reduce_dtype,
                          **moe_settings(config.model))
  abstract_state, shardings = state_lib.abstract_train_state(model_cfg, tx, mesh, config.parallel.zero1)
  batch_sharding = mesh_lib.named_sharding(mesh, BATCH, batch_shape)
  batch_shardings = {name: batch_sharding for name in BATCH_FIELDS}
  lr_schedule = optim.learning_rate_schedule(config.optim, train_cfg.steps)
  train = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=lr_schedule,
                                    settings=settings, layout=layout),
                  in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, settings=settings, layout=layout),
                     in_shardings=(shardings.params, batch_shardings))
  return Steps(train, evaluate, abstract_state, shardings, batch_sharding, layout)
