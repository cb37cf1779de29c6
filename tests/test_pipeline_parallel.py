"""Pipeline parallelism (maxlite.model.pipeline): the same loss and gradients as the
unpipelined model on every mesh and schedule, layers really split between stages,
checkpoints that move between pipeline sizes, and one-line validation errors.

Shape legend: B batch, T length, L layers.
"""
import functools
import shutil

import jax
import numpy as np
import pytest

from configs import base
from maxlite import config as config_lib, hlo as hlo_lib, mesh as mesh_lib, optim, state as state_lib
from maxlite import step as step_lib
from maxlite.config import ConfigError
from maxlite.model.llama import LlamaConfig
from maxlite.train import train
from tests.test_config import base_with
from tests.test_train import tiny_config

B, T, VOCAB, LAYERS = 32, 16, 64, 4


def small_config(grad_accum_steps=1, remat='none', **parallel):
  config = base.get_config()
  model = config.model
  model.vocab_size, model.hidden_size, model.num_layers = VOCAB, 32, LAYERS
  model.num_heads, model.num_kv_heads, model.intermediate_size = 4, 2, 64
  model.max_seq_len, model.remat = T, remat
  config.train.micro_batch_size = B // grad_accum_steps
  config.train.grad_accum_steps = grad_accum_steps
  config.parallel.data = 1
  config.parallel.update(parallel)
  return config


@functools.cache
def batch():
  """Random tokens in packed documents: segments restart positions, as the loader's do."""
  rng = np.random.default_rng(0)
  segment_ids_BT = (np.cumsum(rng.random((B, T)) < 0.15, axis=1) + 1).astype(np.int32)
  positions_BT = np.zeros_like(segment_ids_BT)
  for t in range(1, T):
    same = segment_ids_BT[:, t] == segment_ids_BT[:, t - 1]
    positions_BT[:, t] = np.where(same, positions_BT[:, t - 1] + 1, 0)
  return {'inputs': rng.integers(0, VOCAB, (B, T), dtype=np.int32),
          'targets': rng.integers(0, VOCAB, (B, T), dtype=np.int32),
          'segment_ids': segment_ids_BT, 'positions': positions_BT,
          'loss_mask': (rng.random((B, T)) < 0.9).astype(np.int32)}


def model_and_mesh(config, devices=None):
  devices = jax.devices() if devices is None else devices
  sizes = config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(sizes, devices)
  return LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes)), mesh


def loss_and_gradients(config, devices=None):
  """(loss, gradients, compiled HLO text) of one batch at the initial parameters."""
  model_cfg, mesh = model_and_mesh(config, devices)
  graphdef, shapes, logical = state_lib.abstract_model(model_cfg)
  settings = step_lib.StepSettings(grad_accum_steps=config.train.grad_accum_steps)
  layout = step_lib.Layout.create(mesh, logical, shapes, schedule=model_cfg.pipeline_schedule,
                                  batch_shape=(B, T))
  with jax.set_mesh(mesh):
    shardings = mesh_lib.tree_shardings(mesh, logical, shapes)
    params = jax.jit(lambda: state_lib.init_params(model_cfg, 0), out_shardings=shardings)()
    batch_sharding = mesh_lib.named_sharding(mesh, mesh_lib.P('batch', 'length'), (B, T))
    compiled = jax.jit(lambda p, b: step_lib.gradients(p, graphdef, b, settings, layout)[:2]).lower(
        params, jax.device_put(batch(), batch_sharding)).compile()
    grads, loss = compiled(params, jax.device_put(batch(), batch_sharding))
  grads = state_lib.resize_vocab(jax.tree.map(np.asarray, grads), logical, VOCAB)
  return float(loss), grads, compiled.as_text()


@functools.cache
def reference():
  loss, grads, _ = loss_and_gradients(small_config(), jax.devices()[:1])
  return loss, grads


def relative_error(a, b):
  return np.linalg.norm(np.ravel(a - b)) / np.linalg.norm(np.ravel(b))


CASES = {
    'pipeline2_data4': dict(pipeline=2, data=4),
    'pipeline4_tensor2': dict(pipeline=4, tensor=2),
    'pipeline2_fsdp2_tensor2_remat': dict(pipeline=2, fsdp=2, tensor=2, remat='full'),
    # 4 micro-batches on 2 stages: each waits a round in stage 0's queue between repeats.
    'pipeline2_repeats2_data4': dict(pipeline=2, pipeline_repeats=2, pipeline_microbatches=4, data=4,
                                     pipeline_schedule='circular'),
    'pipeline4_micro8_accum2_data2': dict(pipeline=4, pipeline_microbatches=8, data=2, grad_accum_steps=2),
    # 1F1B: explicit per-stage jax.vjp, stash ring, loss on the last stage (maxlite.model.pipeline_1f1b).
    '1f1b_pipeline2_micro4_data4': dict(pipeline=2, pipeline_microbatches=4, data=4, pipeline_schedule='1f1b'),
    '1f1b_pipeline4_micro16_tensor2': dict(pipeline=4, pipeline_microbatches=16, tensor=2,
                                           pipeline_schedule='1f1b'),
    '1f1b_pipeline2_micro8_fsdp2_tensor2_accum2_remat': dict(
        pipeline=2, pipeline_microbatches=8, fsdp=2, tensor=2, grad_accum_steps=2, remat='full',
        pipeline_schedule='1f1b'),
    'interleaved_1f1b_pipeline2_repeats2_micro4_data2_tensor2': dict(
        pipeline=2, pipeline_repeats=2, pipeline_microbatches=4, data=2, tensor=2,
        pipeline_schedule='interleaved_1f1b'),
}


@pytest.mark.parametrize('name', CASES)
def test_loss_and_gradients_match_the_unpipelined_model(name):
  loss, grads, hlo = loss_and_gradients(small_config(**CASES[name]))
  ref_loss, ref_grads = reference()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  errors = jax.tree.map(relative_error, grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= 1e-5, errors
  if name in ('pipeline2_data4', '1f1b_pipeline2_micro4_data4'):
    # Stages hand activations on point to point; no parameter is ever gathered.
    assert 'collective-permute' in hlo
    assert 'all-gather' not in hlo and 'all-to-all' not in hlo
  if name == '1f1b_pipeline2_micro4_data4':
    # Every iteration (R (M + P) + P - 2 = 6) one micro-batch's [b, t, D] goes
    # forward and one's gradient backward over `pipeline`, and nothing else.
    mesh_shape = {'data': 4, 'fsdp': 1, 'tensor': 1, 'pipeline': 2}
    permutes = [c for c in hlo_lib.collectives(hlo, mesh_shape) if c.kind == 'collective-permute']
    # (hlo.py names the axes its pairs span together: every data row's stages.)
    assert [(c.runs, c.axes, c.dtype, c.shapes) for c in permutes] == \
        [(6, ('data', 'pipeline'), 'f32', ((2, T, 32),))] * 2, permutes


def test_eval_step_under_interleaved_1f1b_runs_the_forward_pipeline():
  """Eval has no backward: it runs the circular forward order on the same layer placement."""
  config = small_config(pipeline=2, pipeline_repeats=2, pipeline_microbatches=4, data=4,
                        pipeline_schedule='interleaved_1f1b')
  model_cfg, mesh = model_and_mesh(config)
  graphdef, shapes, logical = state_lib.abstract_model(model_cfg)
  layout = step_lib.Layout.create(mesh, logical, shapes, schedule=model_cfg.pipeline_schedule,
                                  batch_shape=(B, T))
  with jax.set_mesh(mesh):
    params = jax.jit(lambda: state_lib.init_params(model_cfg, 0),
                     out_shardings=mesh_lib.tree_shardings(mesh, logical, shapes))()
    batch_sharding = mesh_lib.named_sharding(mesh, mesh_lib.P('batch', 'length'), (B, T))
    ce_sum, count = jax.jit(lambda p, b: step_lib.eval_step(
        p, b, graphdef=graphdef, settings=step_lib.StepSettings(), layout=layout))(
            params, jax.device_put(batch(), batch_sharding))
  np.testing.assert_allclose(float(ce_sum) / float(count), reference()[0], rtol=1e-5)


@pytest.mark.parametrize('parallel', [dict(pipeline=4, tensor=2), dict(pipeline=2, pipeline_repeats=2, data=4,
                                                                     pipeline_schedule='circular')],
                         ids=str)
def test_each_device_holds_only_its_share_of_the_layers(parallel):
  """AFAB: the block of L / P layers a device holds is exactly its stage's. The
  circular schedule keeps the same 1/P blocks at rest (see maxlite.model.pipeline)."""
  config = small_config(**parallel)
  model_cfg, mesh = model_and_mesh(config)
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, 10, logical)
  with jax.set_mesh(mesh):
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, zero1=False)
  stages = mesh.shape['pipeline']
  per_stage = LAYERS // stages
  stage_of = {d: coords[mesh.axis_names.index('pipeline')]
              for coords, d in np.ndenumerate(mesh.devices)}
  has_blocks = lambda x: isinstance(x, dict) and 'blocks' in x  # noqa: E731
  blocks = [state.params['blocks']] + [m['blocks'] for m in jax.tree.leaves(
      state.opt_state, is_leaf=has_blocks) if has_blocks(m)]
  assert len(blocks) == 3  # params and both AdamW moments
  for x in jax.tree.leaves(blocks):
    full_L = np.asarray(x)
    for shard in x.addressable_shards:
      stage = stage_of[shard.device]
      assert shard.data.shape[0] == per_stage
      assert shard.index[0] == slice(stage * per_stage, (stage + 1) * per_stage)
      np.testing.assert_array_equal(np.asarray(shard.data), full_L[shard.index])
  # Outside the blocks nothing is split over pipeline: every stage holds the same shards.
  embed = state.params['embed']['table']
  distinct = {tuple((i.start, i.stop) for i in s.index) for s in embed.addressable_shards}
  assert len(distinct) == mesh.shape['tensor']


# (schedule of the pipeline=2 run, the mesh and schedule it resumes on, its log line)
MOVES = {
    'afab_to_pipeline1': ('afab', dict(data=8), 'pipeline: afab schedule, 2 stages of 2 layer(s), '
                          '2 micro-batches, 3 iterations, bubble 1/3 = 33.3%, stash 3 stage inputs'),
    '1f1b_to_afab': ('1f1b', dict(data=4, pipeline=2, pipeline_schedule='afab'),
                     'pipeline: 1f1b schedule, 2 stages of 2 layer(s), 2 micro-batches, 4 iterations, '
                     'bubble 1/3 = 33.3%, stash 2 stage inputs'),
}


@pytest.mark.parametrize('move', MOVES)
def test_a_pipeline2_run_trains_saves_and_resumes_on_another_schedule(tmp_path, capsys, move):
  schedule, resume_on, log_line = MOVES[move]

  def config(run_dir, **parallel):
    c = tiny_config(run_dir, steps=4, log_interval=1, eval_steps=0, micro_batch_size=8)
    c.model.hidden_size, c.model.intermediate_size, c.model.max_seq_len = 64, 128, 32
    c.checkpoint.interval = 2
    c.parallel.update(parallel)
    return c

  run_dir = tmp_path / 'pipeline2'
  piped = {h['step']: h['loss']
           for h in train(config(run_dir, data=4, pipeline=2, pipeline_schedule=schedule)) if 'loss' in h}
  assert piped[4] < piped[1]
  assert log_line in capsys.readouterr().out
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(run_dir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '4')
  resumed = {h['step']: h['loss'] for h in train(config(resumed_dir, **resume_on)) if 'loss' in h}
  assert sorted(resumed) == [3, 4]
  np.testing.assert_allclose([resumed[3], resumed[4]], [piped[3], piped[4]], rtol=2e-5)


# (overrides of configs/base.py on 8 devices, regex the one-line error must match)
BROKEN = [
    ({'parallel.pipeline': 8}, r'model\.num_layers=4 is not divisible by parallel\.pipeline=8 x '
                               r'parallel\.pipeline_repeats=1'),
    ({'parallel.pipeline': 2, 'parallel.pipeline_repeats': 4, 'parallel.pipeline_schedule': 'circular'},
     r'model\.num_layers=4 is not divisible by parallel\.pipeline=2 x parallel\.pipeline_repeats=4'),
    ({'parallel.pipeline': 2, 'parallel.pipeline_repeats': 2, 'parallel.pipeline_microbatches': 1,
      'parallel.pipeline_schedule': 'circular'},
     r'parallel\.pipeline_microbatches=1 must be >= parallel\.pipeline=2 for the circular schedule '
     r'\(parallel\.pipeline_repeats=2 > 1\)'),
    ({'parallel.pipeline': 2, 'parallel.pipeline_microbatches': 8},
     r'train\.micro_batch_size=16 is not divisible by parallel\.pipeline_microbatches=8 x '
     r'parallel\.data\*parallel\.fsdp\*parallel\.expert=4'),
    ({'parallel.pipeline': 4, 'parallel.data': 1, 'parallel.fsdp': 2, 'train.micro_batch_size': 6},
     r'train\.micro_batch_size=6 is not divisible by parallel\.pipeline_microbatches=4 x '
     r'parallel\.data\*parallel\.fsdp\*parallel\.expert=2'),
    ({'parallel.pipeline_repeats': 2}, r'parallel\.pipeline_repeats=2, parallel\.pipeline_microbatches=0 '
                                       r"and parallel\.pipeline_schedule='afab' need parallel\.pipeline > 1"),
    ({'parallel.pipeline_microbatches': 4}, r'parallel\.pipeline_repeats=1, '
                                            r'parallel\.pipeline_microbatches=4 .* need parallel\.pipeline > 1'),
    ({'parallel.pipeline_schedule': '1f1b'}, r"parallel\.pipeline_schedule='1f1b' need parallel\.pipeline > 1"),
    ({'parallel.pipeline': 2, 'parallel.pipeline_schedule': 'zb'},
     r"parallel\.pipeline_schedule='zb' must be one of afab, circular, 1f1b, interleaved_1f1b"),
    # Before pipeline_schedule, pipeline_repeats > 1 alone chose the circular schedule.
    ({'parallel.pipeline': 2, 'parallel.pipeline_repeats': 2},
     r"parallel\.pipeline_schedule='afab' runs one layer group per stage but parallel\.pipeline_repeats=2: "
     r"use pipeline_schedule='circular'"),
    ({'parallel.pipeline': 2, 'parallel.pipeline_schedule': 'interleaved_1f1b'},
     r"parallel\.pipeline_schedule='interleaved_1f1b' needs parallel\.pipeline_repeats > 1 \(it is 1\)"),
    ({'parallel.pipeline': 4, 'parallel.pipeline_repeats': 1, 'parallel.pipeline_microbatches': 6,
      'parallel.data': 2, 'model.num_layers': 8, 'parallel.pipeline_schedule': '1f1b'},
     r'train\.micro_batch_size=16 is not divisible by parallel\.pipeline_microbatches=6'),
    ({'parallel.pipeline': 2, 'parallel.pipeline_repeats': 2, 'parallel.pipeline_microbatches': 3,
      'parallel.pipeline_schedule': 'interleaved_1f1b'},
     r"parallel\.pipeline_microbatches=3 must be a multiple of parallel\.pipeline=2 for "
     r"pipeline_schedule='interleaved_1f1b'"),
    ({'parallel.pipeline': 2, 'parallel.pipeline_repeats': 0}, r'parallel\.pipeline_repeats=0 must be >= 1'),
    ({'parallel.pipeline': 2, 'parallel.pipeline_microbatches': -1},
     r'parallel\.pipeline_microbatches=-1 must be >= 0'),
]


@pytest.mark.parametrize('overrides, message', BROKEN, ids=[','.join(o) for o, _ in BROKEN])
def test_broken_pipeline_field_fails_with_one_line(overrides, message):
  with pytest.raises(ConfigError, match=message) as error:
    config_lib.validate(base_with(overrides), 8)
  assert '\n' not in str(error.value)


def test_defaults_resolve_to_one_micro_batch_per_stage():
  config = base_with({'parallel.pipeline': -1, 'parallel.data': 2})
  sizes = config_lib.validate(config, 8)
  assert config_lib.pipeline_fields(config.parallel, sizes) == {
      'pipeline_stages': 4, 'pipeline_microbatches': 4, 'pipeline_repeats': 1, 'pipeline_1f1b': False}


def compiled_temporaries(schedule: str, micro: int) -> int:
  """Per-device temporaries (bytes) of the compiled gradients on 2 stages, 2 rows per micro-batch."""
  config = small_config(pipeline=2, pipeline_microbatches=micro, pipeline_schedule=schedule)
  config.model.max_seq_len = seq_len = 64
  config.train.micro_batch_size = rows = 2 * micro
  model_cfg, mesh = model_and_mesh(config, jax.devices()[:2])
  graphdef, shapes, logical = state_lib.abstract_model(model_cfg)
  settings = step_lib.StepSettings()
  layout = step_lib.Layout.create(mesh, logical, shapes, schedule=model_cfg.pipeline_schedule,
                                  batch_shape=(rows, seq_len))
  shardings = mesh_lib.tree_shardings(mesh, logical, shapes)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  batch_sharding = mesh_lib.named_sharding(mesh, mesh_lib.P('batch', 'length'), (rows, seq_len))
  batch = {k: jax.ShapeDtypeStruct((rows, seq_len), np.int32, sharding=batch_sharding)
           for k in step_lib.BATCH_FIELDS}
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda p, b: step_lib.gradients(p, graphdef, b, settings, layout)[:2]).lower(
        params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_1f1b_temporaries_stay_flat_as_micro_batches_grow():
  """AFAB keeps every micro-batch's activations for its backward; 1F1B a ring of
  2 P - 1 stage inputs, plus one micro-batch's activations in its pullback."""
  afab = {m: compiled_temporaries('afab', m) for m in (4, 16)}
  one_f_one_b = {m: compiled_temporaries('1f1b', m) for m in (4, 16)}
  per_micro_batch = (afab[16] - afab[4]) / 12  # one micro-batch's activations, AFAB's slope
  assert afab[16] > 2.5 * afab[4], afab  # about linear in M
  assert one_f_one_b[16] - one_f_one_b[4] <= per_micro_batch, (afab, one_f_one_b)
  assert one_f_one_b[16] < afab[16] / 2.5, (afab, one_f_one_b)
