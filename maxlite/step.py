"""The train and eval steps: pure functions that train.py jits once with shardings.

A batch is a dict of [B, T] int32 arrays: inputs, targets, segment_ids (0 =
padding), positions (restarting per document) and loss_mask.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxlite.mesh import constrain
from maxlite.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSettings:
  compute_dtype: str = 'float32'
  grad_accum_steps: int = 1
  z_loss_weight: float = 0.0


def _cast(params, dtype):
  return jax.tree.map(lambda p: p.astype(dtype), params)


def loss_sums(params, graphdef, batch, settings: StepSettings):
  """(objective sum, (cross-entropy sum, token count)) over the batch's weighted tokens.

  Sums, not means, so that micro-batches add up to exactly the big-batch value.
  """
  model = nnx.merge(graphdef, _cast(params, settings.compute_dtype))
  logits_BTV = model(batch['inputs'], batch['segment_ids'], batch['positions'],
                     compute_dtype=jnp.dtype(settings.compute_dtype))
  log_norm_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, batch['targets'][..., None], axis=-1)[..., 0]
  weights_BT = batch['loss_mask'].astype(logits_BTV.dtype)
  cross_entropy = jnp.sum((log_norm_BT - target_logit_BT) * weights_BT)
  objective = cross_entropy
  if settings.z_loss_weight:
    # z-loss keeps the softmax normaliser near 1, which steadies bf16 logits.
    objective += settings.z_loss_weight * jnp.sum(jnp.square(log_norm_BT) * weights_BT)
  return objective, (cross_entropy, jnp.sum(weights_BT))


def _micro_batches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B / num_micro, ...], taking rows num_micro apart so that
  every micro-batch is spread over all batch shards instead of a few devices."""
  def split(x):
    x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, P(None, 'batch', *([None] * (x.ndim - 2))))
  return jax.tree.map(split, batch)


def gradients(params, graphdef, batch, settings: StepSettings):
  """Gradient of the mean cross-entropy, accumulated over micro-batches in param precision."""
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  if settings.grad_accum_steps == 1:
    (_, (ce_sum, count)), grad_sums = grad_fn(params, graphdef, batch, settings)
  else:
    def accumulate(carry, micro):
      grad_acc, ce_acc, count_acc = carry
      (_, (ce, count)), grads = grad_fn(params, graphdef, micro, settings)
      return (jax.tree.map(jnp.add, grad_acc, grads), ce_acc + ce, count_acc + count), None

    zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero)
    (grad_sums, ce_sum, count), _ = jax.lax.scan(
        accumulate, init, _micro_batches(batch, settings.grad_accum_steps))
  count = jnp.maximum(count, 1)
  return jax.tree.map(lambda g: g / count, grad_sums), ce_sum / count, count


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, settings: StepSettings):
  grads, loss, count = gradients(state.params, graphdef, batch, settings)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'lr': schedule(state.step), 'tokens': count}
  if isinstance(opt_state, optax.ApplyIfFiniteState):  # train.nonfinite='skip'
    metrics['skipped_in_a_row'] = opt_state.notfinite_count
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef, settings: StepSettings):
  """(cross-entropy sum, token count) of one validation batch."""
  _, (ce_sum, count) = loss_sums(params, graphdef, batch, settings)
  return ce_sum, count
