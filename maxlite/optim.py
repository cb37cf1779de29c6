"""The optimizer: learning-rate schedules, global-norm clipping, AdamW with a decay
mask or Muon for the hidden matrices, and µP's per-parameter learning rates."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from maxlite.model import parametrization


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


def muon_dimension_numbers(logical_tree):
  """How Muon sees each parameter: for a hidden matrix, its fan-in dims as the
  reduction axes and its fan-out dims as the output axes, so that the stacked
  'layers' dim is a batch of independent matrices (and q's [D, N, H] is one
  D x NH matrix per layer); None for the rest, which AdamW updates."""
  def dims(logical):
    role = parametrization.role(logical)
    if role.kind != parametrization.HIDDEN:
      return None
    return MuonDimensionNumbers(reduction_axis=role.fan_in_dims, output_axis=role.fan_out_dims)
  return jax.tree.map(dims, logical_tree)


def _is_dims(x) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def _muon(optim, schedule, dims_tree) -> optax.GradientTransformation:
  """optax.contrib's Muon step (momentum, Newton-Schulz orthogonalisation) for
  the matrices of dims_tree, scaled per matrix, decayed, at the Muon lr.

  optax.contrib.muon wraps the same steps, but with a Nesterov Adam for the
  other parameters that decays the norm scales too; maxlite gives those
  exactly optim.name='adamw''s AdamW instead, so only the matrices differ
  between the two optimizers. Its per-matrix scale (`scale_by_shape`) is not
  exported, hence `scale` here.
  """
  def resolved(updates):  # the dims at the leaves this branch updates; partition masks the rest
    return jax.tree.map(lambda dims, u: u if dims is None else dims, dims_tree, updates,
                        is_leaf=_is_dims)

  def scale(updates, params=None):
    del params
    def one(u, dims):
      fan_in = math.prod(u.shape[d] for d in dims.reduction_axis)
      fan_out = math.prod(u.shape[d] for d in dims.output_axis)
      # The orthogonalised update has singular values near 1, so RMS 1/sqrt(max(fan_in, fan_out)).
      if optim.muon_rms_match:
        return u * (optim.muon_rms_match * math.sqrt(max(fan_in, fan_out)))
      return u * math.sqrt(max(1.0, fan_out / fan_in))
    return jax.tree.map(one, updates, resolved(updates))

  muon_over_lr = (optim.muon_lr or optim.lr) / optim.lr
  return optax.chain(
      optax.contrib.scale_by_muon(beta=optim.muon_momentum, weight_dimension_numbers=resolved),
      optax.stateless(scale),
      optax.add_decayed_weights(optim.weight_decay),
      optax.scale_by_learning_rate(lambda step: muon_over_lr * schedule(step)))


def make_optimizer(optim, total_steps: int, logical_tree, skip_nonfinite: bool = False,
                   lr_multipliers=None) -> optax.GradientTransformation:
  """optim.name's optimizer for parameters whose logical axes are `logical_tree`.

  skip_nonfinite: a step whose gradients hold a NaN or inf leaves params and
  optimizer state untouched (the train loop decides when to give up).
  lr_multipliers: a float per parameter that multiplies its update, weight
  decay included (maxlite.model.parametrization.lr_multipliers); the update
  runs outside the per-device region, on the sharded state, so Muon's
  Newton-Schulz matmuls on sharded matrices are partitioned by XLA.
  """
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                   weight_decay=optim.weight_decay, mask=decay_mask(logical_tree))
  if optim.name == 'muon':
    dims_tree = muon_dimension_numbers(logical_tree)
    labels = jax.tree.map(lambda dims: 'adamw' if dims is None else 'muon', dims_tree, is_leaf=_is_dims)
    tx = optax.partition({'muon': _muon(optim, schedule, dims_tree), 'adamw': tx}, labels)
  if lr_multipliers is not None and any(m != 1.0 for m in jax.tree.leaves(lr_multipliers)):
    tx = optax.chain(tx, optax.stateless(
        lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, lr_multipliers)))
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  if skip_nonfinite:
    # Never apply a non-finite update, however many come in a row.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)
  return tx
