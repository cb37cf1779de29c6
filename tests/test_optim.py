"""maxlite.optim against plain-Python formulas: schedules, the decay mask, AdamW's decay."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from maxlite import optim, state
from maxlite.model.llama import LlamaConfig

TOTAL = 100


def optim_config(**changes):
  config = base.get_config().optim
  config.update(lr=3e-3, min_lr=3e-4, warmup_steps=10, anneal_start_step=60)
  config.update(changes)
  return config


def reference_lr(cfg, total: int, step: int) -> float:
  """The schedule as documented, written independently of optax."""
  lr, min_lr, warmup = cfg.lr, cfg.min_lr, cfg.warmup_steps
  if step < warmup:
    return lr * min(1.0, (step + 1) / warmup)
  t, span = step - warmup, total - warmup
  if cfg.decay == 'cosine':
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
  if cfg.decay == 'linear':
    return lr + (min_lr - lr) * min(t / span, 1.0)
  if cfg.decay == 'constant':
    return lr
  if cfg.decay == 'wsd':
    anneal = cfg.anneal_start_step
    if step < anneal:
      return lr
    return lr + (min_lr - lr) * min((step - anneal) / (total - anneal), 1.0)
  raise AssertionError(cfg.decay)


@pytest.mark.parametrize('warmup', [10, 1, 0])
@pytest.mark.parametrize('decay', ['cosine', 'linear', 'constant', 'wsd'])
def test_schedule_matches_formula(decay, warmup):
  cfg = optim_config(decay=decay, warmup_steps=warmup)
  schedule = optim.learning_rate_schedule(cfg, TOTAL)
  steps = range(TOTAL + 5)  # a few past the end: the schedule must hold there
  # float64 so that 1e-6 compares formulas, not float32 rounding near min_lr.
  with jax.enable_x64(True):
    got = np.asarray(schedule(jnp.arange(len(steps), dtype=jnp.int64))).tolist()
  want = [reference_lr(cfg, TOTAL, step) for step in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] > 0  # warmup's first step already trains
  if warmup:
    assert got[0] == pytest.approx(cfg.lr / warmup, rel=1e-6)
    assert got[warmup - 1] == pytest.approx(cfg.lr, rel=1e-6)
  end = cfg.lr if decay == 'constant' else cfg.min_lr
  assert got[TOTAL] == pytest.approx(end, rel=1e-6)


def test_schedule_float32_is_close():
  """The default (no x64) path the train step actually runs."""
  cfg = optim_config(decay='cosine')
  schedule = optim.learning_rate_schedule(cfg, TOTAL)
  got = np.asarray(schedule(jnp.arange(TOTAL + 1)))
  want = [reference_lr(cfg, TOTAL, step) for step in range(TOTAL + 1)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_wsd_holds_then_anneals():
  cfg = optim_config(decay='wsd', anneal_start_step=60)
  schedule = optim.learning_rate_schedule(cfg, TOTAL)
  assert float(schedule(10)) == float(schedule(60)) == pytest.approx(cfg.lr)
  assert float(schedule(61)) < cfg.lr
  assert float(schedule(80)) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=1e-6)


def leaves_by_path(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('tie_embeddings', [True, False])
def test_decay_mask_skips_norms_only(tie_embeddings):
  model = base.get_config().model
  model.tie_embeddings = tie_embeddings
  _, shapes, logical = state.abstract_model(LlamaConfig.from_config(model))
  mask = optim.decay_mask(logical)
  assert jax.tree.structure(mask) == jax.tree.structure(shapes)
  flat = leaves_by_path(mask)
  norms = [path for path in flat if 'norm' in path]
  assert len(norms) == 3  # attention_norm, mlp_norm (stacked) and final_norm
  for path, decayed in flat.items():
    if 'norm' in path:
      assert decayed is False, path
    else:
      assert path.endswith(("['kernel']", "['table']")), path
      assert decayed is True, path
  assert ("['lm_head']['kernel']" in flat) != tie_embeddings


def test_weight_decay_shrinks_kernels_not_norm_scales():
  cfg = optim_config(weight_decay=0.1)
  params = {'final_norm': {'scale': jnp.full((4,), 1.5)},
            'mlp': {'kernel': jnp.full((4, 3), 2.0)}}
  logical = {'final_norm': {'scale': P('norm')}, 'mlp': {'kernel': P('embed', 'mlp')}}
  tx = optim.make_optimizer(cfg, TOTAL, logical)
  grads = jax.tree.map(jnp.zeros_like, params)
  # Zero gradients make Adam's own update exactly 0, leaving only decoupled decay.
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)  # one compile, not one per op
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  lr0 = cfg.lr / cfg.warmup_steps  # the first warmup step
  np.testing.assert_array_equal(new['final_norm']['scale'], params['final_norm']['scale'])
  np.testing.assert_allclose(new['mlp']['kernel'], 2.0 - lr0 * cfg.weight_decay * 2.0, rtol=1e-6)


def test_skip_nonfinite_leaves_params_and_moments_untouched_then_resumes():
  logical = {'w': P('embed', 'mlp'), 'scale': P('norm')}
  params = {'w': jnp.ones((4, 3)), 'scale': jnp.ones((3,))}
  tx = optim.make_optimizer(optim_config(grad_clip=1.0), TOTAL, logical, skip_nonfinite=True)
  opt_state = tx.init(params)
  finite = {'w': jnp.full((4, 3), 0.5), 'scale': jnp.full((3,), 0.5)}
  updates, opt_state = tx.update(finite, opt_state, params)
  params = jax.tree.map(jnp.add, params, updates)

  poisoned = {'w': finite['w'].at[1, 2].set(jnp.nan), 'scale': finite['scale']}
  skipped_updates, skipped_state = tx.update(poisoned, opt_state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(skipped_updates))
  assert int(skipped_state.notfinite_count) == 1
  for kept, before in zip(jax.tree.leaves(skipped_state.inner_state), jax.tree.leaves(opt_state.inner_state)):
    np.testing.assert_array_equal(kept, before)

  # The next finite step updates as if the poisoned one never happened.
  after_skip, state_after_skip = tx.update(finite, skipped_state, params)
  direct, _ = tx.update(finite, opt_state, params)
  assert int(state_after_skip.notfinite_count) == 0
  for a, b in zip(jax.tree.leaves(after_skip), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.asarray(a) != 0)


# -- Muon -----------------------------------------------------------------------------------

MUON_LOGICAL = {'q': P('layers', 'embed', 'heads', 'head_dim'), 'down': P('layers', 'mlp', 'embed'),
                'table': P('vocab', 'embed'), 'scale': P('layers', 'norm')}


def muon_params_and_grads():
  """Stacked (2 layers) matrices, with gradients whose singular values span 0.03..1."""
  rng = np.random.default_rng(0)
  def spread(*shape):  # a batch of matrices [L, rows, cols] with a spread spectrum
    u, _, vt = np.linalg.svd(rng.normal(size=shape), full_matrices=False)
    s = np.logspace(0, -1.5, min(shape[1:]))
    return np.einsum('lik,k,lkj->lij', u, s, vt).astype(np.float32)
  params = {'q': rng.normal(size=(2, 32, 4, 8)).astype(np.float32) * 0.02,
            'down': rng.normal(size=(2, 64, 32)).astype(np.float32) * 0.02,
            'table': rng.normal(size=(16, 32)).astype(np.float32) * 0.02,
            'scale': np.ones((2, 32), np.float32)}
  grads = {'q': spread(2, 32, 32).reshape(2, 32, 4, 8), 'down': spread(2, 64, 32),
           'table': rng.normal(size=(16, 32)).astype(np.float32),
           'scale': rng.normal(size=(2, 32)).astype(np.float32)}
  return params, grads


def test_muon_updates_are_orthogonalised_per_layer_and_the_rest_is_adamw():
  cfg = optim_config(name='muon', weight_decay=0.0, grad_clip=0.0)
  params, grads = muon_params_and_grads()
  tx = optim.make_optimizer(cfg, TOTAL, MUON_LOGICAL)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr0 = cfg.lr / cfg.warmup_steps
  # q is [L, D, N, H]: one D x NH matrix per layer; down [L, F, D]: one F x D matrix.
  for name, matrices in (('q', np.asarray(updates['q']).reshape(2, 32, 32)), ('down', np.asarray(updates['down']))):
    for layer in range(2):
      s = np.linalg.svd(matrices[layer], compute_uv=False)
      g = np.linalg.svd(np.asarray(grads[name]).reshape(matrices.shape)[layer], compute_uv=False)
      assert g.max() / g.min() > 20  # the gradient is far from orthogonal ...
      # ... its update nearly is: 5 steps of the quintic Newton-Schulz iteration land
      # every singular value in about [0.7, 1.2] (Keller Jordan's coefficients trade exactness for speed).
      assert s.max() / s.min() < 2.0, (name, layer, s)
      # RMS matched to AdamW's: 0.2 x lr (singular values ~1 x 0.2 sqrt(max(fan_in, fan_out)) x lr).
      rms = np.sqrt(np.mean(matrices[layer] ** 2))
      assert rms == pytest.approx(cfg.muon_rms_match * lr0, rel=0.3), (name, layer)
  # The embedding and the norm scales get exactly optim.name='adamw''s update.
  adamw = optim.make_optimizer(optim_config(weight_decay=0.0, grad_clip=0.0), TOTAL, MUON_LOGICAL)
  want, _ = jax.jit(adamw.update)(grads, adamw.init(params), params)
  for name in ('table', 'scale'):
    np.testing.assert_array_equal(updates[name], want[name])


def test_muon_decays_its_matrices():
  cfg = optim_config(name='muon', weight_decay=0.1)
  params, _ = muon_params_and_grads()
  tx = optim.make_optimizer(cfg, TOTAL, MUON_LOGICAL)
  zeros = jax.tree.map(np.zeros_like, params)
  # Zero gradients orthogonalise to 0, leaving only the decoupled decay.
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  lr0 = cfg.lr / cfg.warmup_steps
  for name in ('q', 'down', 'table'):
    np.testing.assert_allclose(updates[name], -lr0 * cfg.weight_decay * params[name], rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(updates['scale'], 0.0)
