"""SPMD correctness: every mesh gives the same training, and shards are what the rules say."""
import functools

import jax
import numpy as np
import pytest

from configs import base
from maxlite import config as config_lib, mesh as mesh_lib, optim, state as state_lib, step as step_lib
from maxlite.data import embedded, pipeline
from maxlite.model import parametrization
from maxlite.model.llama import LlamaConfig

SEQ_LEN, BATCH, STEPS = 32, 32, 3


def small_config(**parallel):
  config = base.get_config()
  model = config.model
  model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads = 64, 2, 8, 4
  model.intermediate_size, model.max_seq_len = 128, SEQ_LEN
  config.train.steps, config.train.micro_batch_size = 10, BATCH
  config.optim.warmup_steps = 2
  config.parallel.data = 1
  config.parallel.update(parallel)
  return config


@functools.cache
def batches():
  """STEPS + 1 packed batches of the embedded corpus, shared by every mesh."""
  datasets, _ = pipeline.open_datasets([(str(embedded.prepare('', 200_000, 0.05)), None)])
  loader = iter(pipeline.train_loader(datasets, pipeline.LoaderSettings(seq_len=SEQ_LEN, batch_size=BATCH, seed=1)))
  out = [next(loader) for _ in range(STEPS + 1)]
  for batch in out:
    del batch['source_tokens']
  return out


def run(config, devices=None, grad_accum_steps=1):
  """STEPS train steps on the given mesh; returns (losses, gradients at the end, state)."""
  devices = jax.devices() if devices is None else devices
  sizes = config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(sizes, devices)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, abstract, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical,
                            lr_multipliers=parametrization.lr_multipliers(model_cfg, logical, config.optim))
  settings = step_lib.StepSettings(grad_accum_steps=grad_accum_steps)
  batch_sharding = mesh_lib.named_sharding(mesh, mesh_lib.P('batch', 'length'), (BATCH, SEQ_LEN))
  layout = step_lib.Layout.create(mesh, logical, abstract, zero1=config.parallel.zero1,
                                  batch_shape=(BATCH, SEQ_LEN))
  with jax.set_mesh(mesh):
    graphdef, logical, state, shardings = state_lib.create_train_state(
        model_cfg, tx, mesh, seed=0, zero1=config.parallel.zero1)
    train_step = jax.jit(functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx,
        schedule=optim.learning_rate_schedule(config.optim, config.train.steps), settings=settings,
        layout=layout),
        out_shardings=(shardings, None), donate_argnums=0)
    grad_fn = jax.jit(lambda p, b: step_lib.gradients(p, graphdef, b, settings, layout)[0])
    losses = []
    for i in range(STEPS):
      state, metrics = train_step(state, jax.device_put(batches()[i], batch_sharding))
      losses.append(float(metrics['loss']))
    grads = grad_fn(state.params, jax.device_put(batches()[STEPS], batch_sharding))
  # Compare the true vocabulary's rows: the padding depends on the mesh.
  grads = state_lib.resize_vocab(jax.tree.map(np.asarray, grads), logical, config.model.vocab_size)
  return np.array(losses), grads, state


@functools.cache
def reference():
  losses, grads, _ = run(small_config(), devices=jax.devices()[:1])
  return losses, grads


def relative_error(a, b):
  return np.linalg.norm(np.ravel(a - b)) / np.linalg.norm(np.ravel(b))


MESHES = {
    'data8': dict(data=8),
    'fsdp8': dict(fsdp=8),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'tensor4_fsdp2': dict(tensor=4, fsdp=2),
    'data8_zero1': dict(data=8, zero1=True),
}


@pytest.mark.parametrize('name', MESHES)
def test_mesh_matches_single_device(name):
  losses, grads, _ = run(small_config(**MESHES[name]))
  ref_losses, ref_grads = reference()
  assert np.all(np.isfinite(losses))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  errors = jax.tree.map(relative_error, grads, ref_grads)
  worst = max(jax.tree.leaves(errors))
  assert worst <= 1e-5, errors


def test_muon_and_mup_on_data2_fsdp2_tensor2_match_one_device():
  # Newton-Schulz runs on the sharded matrices (XLA partitions its matmuls):
  # the same orthogonalised updates as on one device.
  def config(**parallel):
    config = small_config(**parallel)
    config.optim.name = 'muon'
    config.model.parametrization, config.model.mup_base_width = 'mup', 32  # m = 2
    return config
  ref_losses, ref_grads, _ = run(config(), devices=jax.devices()[:1])
  losses, grads, _ = run(config(data=2, fsdp=2, tensor=2))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert not np.allclose(losses, reference()[0], rtol=1e-3)  # a different training from AdamW's
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert max(jax.tree.leaves(jax.tree.map(relative_error, grads, ref_grads))) <= 1e-5


def test_gradient_accumulation_matches_one_big_batch():
  config = small_config(data=8)
  config.train.micro_batch_size = BATCH // 4
  losses, grads, _ = run(config, grad_accum_steps=4)
  ref_losses, ref_grads = reference()
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert max(jax.tree.leaves(jax.tree.map(relative_error, grads, ref_grads))) <= 1e-5


# What the rule table means for each parameter, written out by hand: the mesh
# axes of each dimension (None: replicated).
EXPECTED_PARAM_AXES = {
    ('embed', 'table'): ('tensor', 'fsdp'),
    ('blocks', 'attention', 'q', 'kernel'): (None, 'fsdp', 'tensor', None),
    ('blocks', 'attention', 'k', 'kernel'): (None, 'fsdp', 'tensor', None),
    ('blocks', 'attention', 'v', 'kernel'): (None, 'fsdp', 'tensor', None),
    ('blocks', 'attention', 'o', 'kernel'): (None, 'tensor', None, 'fsdp'),
    ('blocks', 'mlp', 'gate', 'kernel'): (None, 'fsdp', 'tensor'),
    ('blocks', 'mlp', 'up', 'kernel'): (None, 'fsdp', 'tensor'),
    ('blocks', 'mlp', 'down', 'kernel'): (None, 'tensor', 'fsdp'),
    ('blocks', 'attention_norm', 'scale'): (None, None),
    ('blocks', 'mlp_norm', 'scale'): (None, None),
    ('final_norm', 'scale'): (None,),
}


def expected_shard_shape(path, shape, sizes, zero1_state=False):
  shard = []
  for dim, axis in zip(shape, EXPECTED_PARAM_AXES[path]):
    split = sizes[axis] if axis else 1
    if zero1_state and axis == 'fsdp':
      split *= sizes['data']
    shard.append(dim // split)
  return tuple(shard)


def _path(keypath):
  return tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))


@pytest.mark.parametrize('parallel', [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2),
                                      dict(tensor=4, fsdp=2), dict(data=4, fsdp=2, zero1=True)],
                         ids=str)
def test_every_leaf_is_sharded_as_the_rules_say(parallel):
  config = small_config(**parallel)
  sizes = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(sizes)
  model_cfg = LlamaConfig.from_config(config.model)
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, 10, logical)
  with jax.set_mesh(mesh):
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, config.parallel.zero1)

  for keypath, x in jax.tree_util.tree_leaves_with_path(state.params):
    want = expected_shard_shape(_path(keypath), x.shape, sizes)
    assert all(s.data.shape == want for s in x.addressable_shards), (keypath, want)

  # Adam's moments mirror the params (and are split over data too under ZeRO-1).
  moments = 0
  for keypath, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
    path = _path(keypath)
    if path not in EXPECTED_PARAM_AXES:
      assert x.ndim == 0 and x.sharding.is_fully_replicated, keypath  # step counters
      continue
    moments += 1
    want = expected_shard_shape(path, x.shape, sizes, zero1_state=config.parallel.zero1)
    assert all(s.data.shape == want for s in x.addressable_shards), (keypath, want)
  assert moments == 2 * len(jax.tree.leaves(state.params))
