"""The optimizer: learning-rate schedules, global-norm clipping, AdamW with a decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine, linear, constant or WSD decay to `min_lr`.

  Warmup reaches lr/warmup_steps on the first step, not 0, so no step is wasted.
  WSD holds `lr` until `anneal_start_step`, then decays linearly to `min_lr`.
  """
  lr, min_lr, warmup = optim.lr, optim.min_lr, optim.warmup_steps

  def warmup_fn(step):
    return lr * jnp.minimum(1.0, (step + 1) / max(warmup, 1))

  decay_steps = max(total_steps - warmup, 1)
  if optim.decay == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr)
  elif optim.decay == 'linear':
    decay = optax.linear_schedule(lr, min_lr, decay_steps)
  elif optim.decay == 'constant':
    decay = optax.constant_schedule(lr)
  elif optim.decay == 'wsd':
    anneal = optim.anneal_start_step
    decay = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, min_lr, max(total_steps - anneal, 1))],
        [anneal - warmup])
  else:
    raise ValueError(f'optim.decay={optim.decay!r} is unknown')
  return optax.join_schedules([warmup_fn, decay], [warmup])


def decay_mask(logical_tree):
  """Weight decay on matrices only: never on norm scales (maxlite has no biases)."""
  return jax.tree.map(lambda logical: 'norm' not in tuple(logical), logical_tree)


def make_optimizer(optim, total_steps: int, logical_tree,
                   skip_nonfinite: bool = False) -> optax.GradientTransformation:
  """skip_nonfinite: a step whose gradients hold a NaN or inf leaves params and
  optimizer state untouched (the train loop decides when to give up)."""
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                   weight_decay=optim.weight_decay, mask=decay_mask(logical_tree))
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  if skip_nonfinite:
    # Never apply a non-finite update, however many come in a row.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)
  return tx
