"""µP (maxlite.model.parametrization): exact at the base width, the multipliers of
Tensor Programs V's table 3 written out by hand, a coordinate check, HF parity."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import base
from maxlite import hf, optim, state as state_lib, step as step_lib
from maxlite.model import parametrization
from maxlite.model.llama import LlamaConfig

SEQ_LEN, BATCH = 32, 4


def model_config(width: int, name: str = 'mup', base_width: int = 32, tie: bool = False,
                 **changes) -> LlamaConfig:
  """2 layers, 4 heads (head dim width/4), MLP 2x: everything scales with width."""
  model = base.get_config().model
  model.update(hidden_size=width, intermediate_size=2 * width, num_layers=2, num_heads=4,
               num_kv_heads=2, max_seq_len=SEQ_LEN, tie_embeddings=tie, parametrization=name,
               mup_base_width=base_width if name == 'mup' else 0, **changes)
  return LlamaConfig.from_config(model)


def optim_config(**changes):
  config = base.get_config().optim
  config.update(warmup_steps=0, decay='constant', **changes)
  return config


def tokens(seed=0):
  tokens_BT = np.random.default_rng(seed).integers(0, 264, (BATCH, SEQ_LEN))
  positions_BT = np.broadcast_to(np.arange(SEQ_LEN), tokens_BT.shape)
  return jnp.asarray(tokens_BT), jnp.ones_like(tokens_BT), jnp.asarray(positions_BT)


def init_params(cfg):
  return jax.jit(state_lib.init_params, static_argnums=(0, 1))(cfg, 0)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens_BT, segments_BT, positions_BT):
  return nnx.merge(state_lib.abstract_model(cfg)[0], params)(tokens_BT, segments_BT, positions_BT)


def _flat(tree):
  return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_mup_at_its_base_width_is_the_standard_model_bit_for_bit():
  standard, mup = model_config(64, 'standard'), model_config(64, 'mup', base_width=64)
  ref_params, params = init_params(standard), init_params(mup)
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  logits = [forward(cfg, p, *tokens()) for cfg, p in ((standard, ref_params), (mup, params))]
  np.testing.assert_array_equal(logits[0], logits[1])
  assert parametrization.query_multiplier(mup) == parametrization.logit_multiplier(mup) == 1.0
  # Every learning rate keeps its value, so make_optimizer builds the standard optimizer.
  logical = state_lib.abstract_model(mup)[2]
  for name in ('adamw', 'muon'):
    assert set(jax.tree.leaves(parametrization.lr_multipliers(mup, logical, optim_config(name=name)))) == {1.0}


# Tensor Programs V, table 3 (Adam), for width 128 over base width 32 (m = 4): the
# learning-rate multiplier and init-std multiplier of each parameter. The readout
# keeps both and its logits are multiplied by 1/m; Muon (update RMS matched to
# AdamW's) scales its hidden matrices' lr by m^-1/2, Keller Jordan's shape scale by 1.
HAND_TABLE = {  # path: (AdamW lr, Muon rms-matched lr, Muon shape-scaled lr, init std)
    ('embed', 'table'): (1, 1, 1, 1),
    ('blocks', 'attention', 'q', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'attention', 'k', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'attention', 'v', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'attention', 'o', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'mlp', 'gate', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'mlp', 'up', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'mlp', 'down', 'kernel'): (1 / 4, 1 / 2, 1, 1 / 2),
    ('blocks', 'attention_norm', 'scale'): (1, 1, 1, 1),
    ('blocks', 'mlp_norm', 'scale'): (1, 1, 1, 1),
    ('final_norm', 'scale'): (1, 1, 1, 1),
    ('lm_head', 'kernel'): (1, 1, 1, 1),
}


def test_multipliers_match_the_hand_written_table():
  cfg = model_config(128, base_width=32)  # m = 4
  logical = _flat(state_lib.abstract_model(cfg)[2])
  assert set(logical) == set(HAND_TABLE)
  tables = [_flat(parametrization.lr_multipliers(cfg, state_lib.abstract_model(cfg)[2], optim_config(**o)))
            for o in ({'name': 'adamw'}, {'name': 'muon'}, {'name': 'muon', 'muon_rms_match': 0.0})]
  for path, (adamw, muon, muon_shape, init) in HAND_TABLE.items():
    got = (tables[0][path], tables[1][path], tables[2][path],
           parametrization.init_std_multiplier(cfg, logical[path]))
    assert got == pytest.approx((adamw, muon, muon_shape, init), rel=1e-12), path
  assert parametrization.logit_multiplier(cfg) == pytest.approx(1 / 4)
  # Head dim 32 over the base's 8: q.k x sqrt(8)/32 = (q.k/sqrt(32)) x 1/2.
  assert parametrization.query_multiplier(cfg) == pytest.approx(1 / 2)

  # The init: the standard model's draw (same seed), with the hidden matrices x 1/2.
  params = _flat(init_params(cfg))
  standard = _flat(init_params(model_config(128, 'standard')))
  for path, (*_, init) in HAND_TABLE.items():
    np.testing.assert_allclose(params[path], standard[path] * init, rtol=1e-6, err_msg=str(path))


def _coordinates(width: int, name: str, steps: int = 3, lr: float = 1e-2) -> dict[str, float]:
  """Mean |x| of the embedding, each block and the logits after `steps` AdamW steps."""
  cfg = model_config(width, name, base_width=32)
  graphdef, _, logical = state_lib.abstract_model(cfg)
  optim_cfg = optim_config(lr=lr, weight_decay=0.0)
  tx = optim.make_optimizer(optim_cfg, steps, logical,
                            lr_multipliers=parametrization.lr_multipliers(cfg, logical, optim_cfg))
  tokens_BT, segments_BT, positions_BT = tokens(1)
  batch = {'inputs': tokens_BT, 'segment_ids': segments_BT, 'positions': positions_BT,
           'targets': jnp.roll(tokens_BT, -1, axis=1), 'loss_mask': jnp.ones_like(tokens_BT)}

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: step_lib.loss_sums(p, graphdef, batch, step_lib.StepSettings())[0])(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (jax.tree.map(jnp.add, params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return parametrization.activation_scales(nnx.merge(graphdef, params), tokens_BT, segments_BT,
                                             positions_BT)

  return {k: float(v) for k, v in train(init_params(cfg)).items()}


@functools.cache
def coordinate_slopes(name: str) -> dict[str, float]:
  widths = (32, 128)
  rows = [_coordinates(w, name) for w in widths]
  return {k: float(np.polyfit(np.log(widths), np.log([r[k] for r in rows]), 1)[0]) for k in rows[0]}


def test_coordinate_check_flat_under_mup_growing_under_standard():
  mup, standard = coordinate_slopes('mup'), coordinate_slopes('standard')
  # After a few large Adam steps the standard model's logits grow about linearly in
  # width (an update of size lr in every one of `width` coordinates adds up); µP's stay put.
  assert standard['logits'] > 0.5, standard
  assert abs(mup['logits']) < 0.2, mup
  for name in ('embedding', 'block 0', 'block 1'):
    assert abs(mup[name]) < 0.2, (name, mup)


def test_hf_export_of_a_mup_model_matches_transformers_and_imports_back(tmp_path):
  # Tied: the logit multiplier must fold into the final norm, not into the shared table.
  cfg = model_config(128, base_width=32, tie=True)
  params = jax.tree.map(np.asarray, init_params(cfg))
  # Trained-looking norms, so that folding into the wrong one would show.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
      if 'scale' in str(path) else x, params)
  tokens_BT, segments_BT, positions_BT = tokens(2)
  ours_BTV = np.asarray(forward(cfg, params, tokens_BT, segments_BT, positions_BT))
  folder = hf.write_folder(tmp_path / 'hf', params, cfg, max_seq_len=SEQ_LEN, log=lambda _: None)
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
  with torch.no_grad():
    theirs_BTV = model(torch.tensor(np.asarray(tokens_BT))).logits.numpy()
  assert np.abs(theirs_BTV - ours_BTV).max() <= 1e-5 * max(1.0, np.abs(ours_BTV).max())
  back = hf.import_params(folder, cfg)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(back)[0], jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=str(path))
