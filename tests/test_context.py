"""Context parallelism (maxlite.model.context): the load-balanced layout round-trips,
every mesh with a `context` axis gives the single device's loss and gradients on
packed documents, the Pallas kernel takes the queries' row indices, the compiled
step moves only K and V (and the batch once), and per-device memory falls as 1/CP.

Shape legend: B batch, T length, CP the size of `context`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from maxlite import config as config_lib, mesh as mesh_lib, state as state_lib, step as step_lib
from maxlite.kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from maxlite.model import context
from maxlite.model.llama import LlamaConfig
from tests.test_config import flat_keys
from tests.test_collectives import compile_steps, small_config as collectives_config, total
from tests.test_flash_attention import FAST_COMPILE, packed_segments

B, T, VOCAB = 8, 32, 64


def small_config(attention='xla', remat='none', accum=1, seq_len=T, **parallel):
  config = base.get_config()
  model = config.model
  model.vocab_size, model.hidden_size, model.num_layers = VOCAB, 32, 2
  model.num_heads, model.num_kv_heads, model.intermediate_size = 4, 2, 64  # grouped-query
  model.max_seq_len, model.attention, model.remat = seq_len, attention, remat
  config.train.micro_batch_size, config.train.grad_accum_steps = B // accum, accum
  config.parallel.data = 1
  config.parallel.update(parallel)
  return config


@functools.cache
def packed_batch():
  """Packed documents of random lengths, positions restarting per document, a
  padded tail (segment 0, no loss) on some rows and a few masked targets."""
  rng = np.random.default_rng(0)
  segment_ids_BT = packed_segments(rng, B, T, mean_document=7)
  segment_ids_BT[::3, -5:] = 0
  starts_BT = np.diff(segment_ids_BT, axis=1, prepend=-1) != 0
  index_BT = np.broadcast_to(np.arange(T), (B, T))
  positions_BT = index_BT - np.maximum.accumulate(np.where(starts_BT, index_BT, 0), axis=1)
  return {'inputs': rng.integers(0, VOCAB, (B, T), dtype=np.int32),
          'targets': rng.integers(0, VOCAB, (B, T), dtype=np.int32),
          'segment_ids': segment_ids_BT, 'positions': positions_BT.astype(np.int32),
          'loss_mask': ((segment_ids_BT > 0) & (rng.random((B, T)) < 0.9)).astype(np.int32)}


def gradient_fn(config, devices, batch_shape=(B, T), abstract=False):
  """(jitted (params, batch) -> (gradients, loss), params (ShapeDtypeStructs if
  abstract), batch sharding, logical names, mesh)."""
  sizes = config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(sizes, devices)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  graphdef, shapes, logical = state_lib.abstract_model(model_cfg)
  settings = step_lib.StepSettings(grad_accum_steps=config.train.grad_accum_steps)
  layout = step_lib.Layout.create(mesh, logical, shapes, schedule=model_cfg.pipeline_schedule,
                                  batch_shape=batch_shape)
  shardings = mesh_lib.tree_shardings(mesh, logical, shapes)
  if abstract:
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  else:
    with jax.set_mesh(mesh):
      params = jax.jit(lambda: state_lib.init_params(model_cfg, 0), out_shardings=shardings)()
  fn = jax.jit(lambda p, b: step_lib.gradients(p, graphdef, b, settings, layout)[:2])
  batch_sharding = mesh_lib.named_sharding(mesh, step_lib.BATCH, batch_shape)
  return fn, params, batch_sharding, logical, mesh


def loss_and_gradients(config, devices):
  fn, params, batch_sharding, logical, mesh = gradient_fn(config, devices)
  with jax.set_mesh(mesh):
    grads, loss = fn(params, jax.device_put(packed_batch(), batch_sharding))
  return float(loss), state_lib.resize_vocab(jax.tree.map(np.asarray, grads), logical, VOCAB)


@functools.cache
def reference():
  return loss_and_gradients(small_config(), jax.devices()[:1])


def test_layout_round_trips_and_balances_the_causal_work():
  for num_shards in (1, 2, 4, 8):
    x_BT = np.arange(3 * 64).reshape(3, 64)
    balanced_BT = context.to_balanced(x_BT, num_shards)
    np.testing.assert_array_equal(context.from_balanced(balanced_BT, num_shards), x_BT)
    # Device c's slice holds chunks c and 2CP - 1 - c: equal causal work for all.
    work = [np.sum(slice_ + 1) for slice_ in np.split(balanced_BT[0], num_shards)]
    assert len(set(work)) == 1, work
  with pytest.raises(ValueError, match='cannot be cut into 2 x 4 chunks'):
    context.balanced_indices(36, 4)


def test_device_reorder_matches_the_host_layout():
  """`balance` (two collective-permutes) gives each device the host layout's slice;
  `gather_row` and `token_indices` undo it; data=2 x context=4."""
  mesh = mesh_lib.make_mesh({'data': 2, 'context': 4})
  x_BT = np.arange(4 * T, dtype=np.int32).reshape(4, T)

  def per_device(x_Bt):
    balanced_Bt = context.balance({'x': x_Bt})['x']
    indices_t = jnp.broadcast_to(context.token_indices(balanced_Bt.shape[1]), balanced_Bt.shape)
    return balanced_Bt, context.gather_row(balanced_Bt)[:, None], indices_t

  spec = P('data', 'context')
  balanced, rows, indices = mesh_lib.per_device(
      per_device, mesh, in_specs=(spec,), out_specs=(spec, spec, spec))(x_BT)
  np.testing.assert_array_equal(balanced, context.to_balanced(x_BT, 4))
  for device in range(4):  # every device of a row's group holds the whole row
    np.testing.assert_array_equal(rows[:, device], x_BT)
  np.testing.assert_array_equal(indices[0], context.balanced_indices(T, 4))


MESHES = {
    'context2_data2_tensor2_pallas_remat': (dict(context=2, data=2, tensor=2),
                                            dict(attention='pallas', remat='full')),
    'context4_pipeline2_accum2': (dict(context=4, pipeline=2), dict(accum=2)),
    'context8': (dict(context=8), {}),
    'context2_fsdp4': (dict(context=2, fsdp=4), {}),
}


@pytest.mark.parametrize('name', MESHES)
def test_context_matches_single_device(name):
  parallel, settings = MESHES[name]
  config = small_config(**settings, **parallel)
  devices = jax.devices()[:int(np.prod(list(parallel.values())))]
  loss, grads = loss_and_gradients(config, devices)
  ref_loss, ref_grads = reference()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  errors = jax.tree.map(lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b), grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= 1e-5, errors


def test_kernel_takes_row_indices():
  """A device's balanced queries (chunks 1 and 2 of 4) against the whole row's
  keys: the kernel equals the dense reference, values and gradients, with
  packed documents and grouped-query heads."""
  rng = np.random.default_rng(1)
  length, num_shards = 64, 2
  segments_BT = packed_segments(rng, 2, length, mean_document=20)
  index = context.balanced_indices(length, num_shards)[length // 2:]  # device 1
  q = jnp.asarray(rng.normal(size=(2, length // 2, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32) for _ in range(2))
  masks = dict(kv_segment_ids_BS=segments_BT, indices_BT=np.broadcast_to(index, (2, length // 2)),
               kv_indices_BS=np.broadcast_to(np.arange(length), (2, length)))

  def run(fn, **kw):
    def loss(q, k, v):
      out, lse = fn(q, k, v, segments_BT[:, index], return_lse=True, **masks, **kw)
      return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse)), (out, lse)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                   compiler_options=FAST_COMPILE)(q, k, v)

  # 16-token tiles: a chunk is two query blocks, and most key blocks are SKIP or FULL.
  (_, got), got_grads = run(flash_attention, interpret=True, block_sizes=BlockSizes(16, 16, 16, 16))
  (_, want), want_grads = run(flash_attention_reference)
  for a, b in zip((*got, *got_grads), (*want, *want_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_context_moves_keys_and_values_and_the_batch_once():
  """data=2 x context=4 in bfloat16: per layer K and V all-gathered over `context`
  forward and again in the rematerialised backward, dK and dV reduce-scattered;
  the batch permuted once; gradients all-reduced once per step outside loops."""
  found, sizes, steps, _ = compile_steps(collectives_config(data=2, context=4))
  partitioned = found['train'][0]
  cp, rows, layers = sizes['context'], 16 // sizes['data'], 2
  over_context = [c for c in partitioned if 'context' in c.axes]
  kv_shape = (rows, 32, 4, 16)  # [b, T, K, H]: the whole row's keys
  kv = [c for c in over_context if c.kind == 'all-gather' and c.dtype == 'bf16']
  assert kv and all(c.shapes == (kv_shape,) for c in kv), kv
  kv_bytes = np.prod(kv_shape) * 2 * (cp - 1) / cp
  assert total(kv, 'all-gather') == pytest.approx(2 * 2 * layers * kv_bytes)
  assert total(over_context, 'reduce-scatter', dtype='bf16') == pytest.approx(2 * layers * kv_bytes)
  permutes = [c for c in over_context if c.kind == 'collective-permute']
  assert permutes and all(c.dtype == 's32' and c.runs == 1 for c in permutes)
  reduced = [c for c in over_context if c.kind == 'all-reduce']
  assert reduced and all(c.runs == 1 and not c.loops and c.dtype == 'f32' for c in reduced)
  kinds = {c.kind for c in over_context}
  assert kinds == {'all-gather', 'reduce-scatter', 'collective-permute', 'all-reduce'}, kinds


def test_activation_memory_scales_as_length_over_context():
  """The compiled gradients' temporaries at T = 256 fall as 1/CP (xla attention,
  no remat): each device holds T / CP tokens' activations and [t, T] scores."""
  temp, rows, length = {}, 2, 256
  for cp in (1, 4):
    config = small_config(seq_len=length, context=cp)
    config.train.micro_batch_size = rows
    fn, params, batch_sharding, _, mesh = gradient_fn(config, jax.devices()[:cp], (rows, length),
                                                      abstract=True)
    batch = {name: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding)
             for name in step_lib.BATCH_FIELDS}
    with jax.set_mesh(mesh):
      temp[cp] = fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] <= 1.25 * temp[1] / 4, temp


@pytest.mark.parametrize('name', ['long_context_tiny', 'llama_109m_32k'])
def test_long_context_configs_validate_on_8_devices(name):
  config = __import__(f'configs.{name}', fromlist=['get_config']).get_config()
  sizes = config_lib.validate(config, 8)
  assert sizes['context'] == 8 and config.data.seq_len // sizes['context'] in (1024, 4096)
  assert flat_keys(config) == flat_keys(base.get_config())  # a variant changes values, not keys
