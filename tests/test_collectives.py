"""What the compiled steps communicate, read from their HLO (maxlite.hlo): each mesh
axis moves only what it must. Equal losses across meshes (test_sharding.py)
prove the maths; these tests prove the mechanism.

Shape legend: b rows per device, T length, D hidden, L layers.
"""
import math

import jax
import numpy as np
import pytest

from configs import base
from maxlite import config as config_lib, hlo, mesh as mesh_lib, optim, state as state_lib
from maxlite import step as step_lib
from maxlite.model.llama import LlamaConfig

BATCH, T, D, LAYERS = 16, 32, 64, 2


def small_config(accum=1, **parallel):
  config = base.get_config()
  model = config.model
  model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads = D, LAYERS, 8, 4
  model.head_dim = 16  # no weight has an activation's shape, so shapes tell them apart
  model.intermediate_size, model.max_seq_len, model.compute_dtype = 128, T, 'bfloat16'
  config.train.micro_batch_size, config.train.grad_accum_steps = BATCH, accum
  config.parallel.data = 1
  config.parallel.update(parallel)
  return config


def compile_steps(config, with_eval=False):
  """{'train': (partitioned, optimised) collectives[, 'eval': ...]}, sizes, steps, compiled texts."""
  sizes = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(sizes)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  found, texts = {}, {}
  with jax.set_mesh(mesh):
    steps = step_lib.build(config, model_cfg, mesh, tx)
    rows = config.train.micro_batch_size * config.train.grad_accum_steps
    lowered = {'train': steps.train.lower(steps.abstract_state, steps.batch_shapes(rows, T))}
    if with_eval:
      lowered['eval'] = steps.eval.lower(steps.abstract_state.params,
                                         steps.batch_shapes(config.train.micro_batch_size, T))
    for name, step in lowered.items():
      compiled, partitioned = hlo.compile_with_partitioned_hlo(step)
      texts[name] = compiled.as_text()
      found[name] = (hlo.collectives(partitioned, dict(mesh.shape)),
                     hlo.collectives(texts[name], dict(mesh.shape)))
  return found, sizes, steps, texts


def total(collectives, kind, axis=None, dtype=None):
  return sum(c.total_bytes for c in collectives if c.kind == kind
             and (axis is None or axis in c.axes) and (dtype is None or c.dtype == dtype))


def weight_shapes(steps) -> set:
  """Sorted dims of every matmul weight and embedding, whole, per layer and per device."""
  shapes = set()
  leaves = jax.tree_util.tree_leaves_with_path(steps.abstract_state.params)
  for (path, x), sharding in zip(leaves, jax.tree.leaves(steps.shardings.params)):
    if 'scale' in jax.tree_util.keystr(path):  # norm scales: see the tensor test
      continue
    for shape in (x.shape, x.shape[1:], sharding.shard_shape(x.shape), sharding.shard_shape(x.shape)[1:]):
      shapes.add(tuple(sorted(shape)))
  return shapes


def test_tensor_parallelism_moves_activations_not_weights():
  """Megatron-SP on data=2 x tensor=4: per layer two all-gathers and two
  reduce-scatters of the [b, T, D] residual forward and the same backward, one
  of each for the embedding and the LM head, all in bfloat16; no weight, no
  weight gradient and no all-to-all. Only [b, T] softmax statistics and the
  norm scales' gradients (the norms see a slice of the length each) are
  all-reduced over tensor."""
  found, sizes, steps, _ = compile_steps(small_config(data=2, tensor=4))
  partitioned, optimised = found['train']
  t, rows = sizes['tensor'], BATCH // sizes['data']
  activation = rows * T * D * 2  # bfloat16
  want = (4 * LAYERS + 2) * (t - 1) / t * activation
  assert total(partitioned, 'all-gather', 'tensor', 'bf16') == pytest.approx(want)
  assert total(partitioned, 'reduce-scatter', 'tensor', 'bf16') == pytest.approx(want)
  assert total(partitioned, 'all-gather', 'tensor') == total(partitioned, 'all-gather', 'tensor', 'bf16')
  reduced = [c for c in partitioned if c.kind == 'all-reduce' and 'tensor' in c.axes]
  assert all(math.prod(shape) in (rows * T, D, 1) for c in reduced for shape in c.shapes), reduced
  weights = weight_shapes(steps)
  for collectives in (partitioned, optimised):
    assert not [c for c in collectives if c.kind == 'all-to-all']
    moved = [c for c in collectives if 'tensor' in c.axes
             and any(tuple(sorted(shape)) in weights for shape in c.shapes)]
    assert not moved, moved


@pytest.mark.parametrize('accum', [1, 4])
def test_gradients_are_summed_over_data_once_per_step(accum):
  """data=4 x fsdp=2: one all-reduce of the gradients over `data` per step, outside
  every loop, whatever the accumulation; fsdp's reduce-scatters run per micro-step."""
  found, sizes, steps, _ = compile_steps(small_config(accum, data=4, fsdp=2))
  grad_bytes = sum(math.prod(s.shard_shape(x.shape)) * 4 for x, s in zip(
      jax.tree.leaves(steps.abstract_state.params), jax.tree.leaves(steps.shardings.params)))
  for collectives in found['train']:
    over_data = [c for c in collectives if 'data' in c.axes]
    assert over_data and all(c.runs == 1 and not c.loops for c in over_data), over_data
    assert sum(c.total_bytes for c in over_data) == pytest.approx(2 * 3 / 4 * grad_bytes, rel=1e-3)
  partitioned = found['train'][0]
  scatters = [c for c in partitioned if c.kind == 'reduce-scatter' and 'fsdp' in c.axes]
  assert scatters and all(c.runs % accum == 0 and len(c.loops) >= (accum > 1) for c in scatters)


@pytest.mark.parametrize('reduce_dtype', ['float32', 'bfloat16'])
def test_fsdp_gathers_the_compute_dtype_and_reduce_scatters_the_gradients(reduce_dtype):
  """fsdp=8: weights are all-gathered in bfloat16 (twice: forward and backward;
  the tied table once, for both of its uses) and their gradients
  reduce-scattered in optim.grad_reduce_dtype; nothing is all-reduced but the
  norm scales' gradients."""
  config = small_config(fsdp=8)
  config.optim.grad_reduce_dtype = reduce_dtype
  found, _, steps, _ = compile_steps(config)
  partitioned = found['train'][0]
  gathers = [c for c in partitioned if c.kind == 'all-gather']
  scatters = [c for c in partitioned if c.kind == 'reduce-scatter']
  assert gathers and all(c.dtype == 'bf16' and c.axes == ('fsdp',) for c in gathers)
  want_dtype = {'float32': 'f32', 'bfloat16': 'bf16'}[reduce_dtype]
  assert scatters and all(c.dtype == want_dtype and c.axes == ('fsdp',) for c in scatters)
  split = [x for x, s in zip(jax.tree.leaves(steps.abstract_state.params),
                             jax.tree.leaves(steps.shardings.params)) if 'fsdp' in str(s.spec)]
  table = steps.abstract_state.params['embed']['table']
  gathered = sum(x.size * (1 if x is table else 2) for x in split) * 2 * 7 / 8
  assert total(partitioned, 'all-gather') == pytest.approx(gathered)
  itemsize = np.dtype(reduce_dtype).itemsize
  assert total(partitioned, 'reduce-scatter') == pytest.approx(sum(x.size for x in split) * itemsize * 7 / 8)
  norms = sum(x.size for x in jax.tree.leaves(steps.abstract_state.params) if x.ndim <= 2
              and x.shape[-1] == D and x.size < 10 * D)
  assert total(partitioned, 'all-reduce') <= 2 * norms * 4


def test_the_eval_step_runs_sharded():
  """The eval step is compiled per device like the train step: its batch is a
  device's rows, and tensor parallelism moves the forward's activations."""
  found, sizes, _, texts = compile_steps(small_config(data=2, tensor=4), with_eval=True)
  partitioned = found['eval'][0]
  rows = BATCH // sizes['data']
  activation = rows * T * D * 2
  forward = (2 * LAYERS + 1) * 3 / 4 * activation
  assert total(partitioned, 'all-gather', 'tensor', 'bf16') == pytest.approx(forward)
  assert total(partitioned, 'reduce-scatter', 'tensor', 'bf16') == pytest.approx(forward)
  entry = texts['eval'][texts['eval'].index('ENTRY'):].split('\n', 1)[0]
  assert f's32[{rows},{T}]' in entry and f's32[{BATCH},{T}]' not in entry


def test_the_parser_reads_replica_groups_and_loop_trip_counts():
  text = '''HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add
  %rs = f32[2]{0} reduce-scatter(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = bf16[4,8]{1,0} all-gather(%b), replica_groups={{0,2},{1,3},{4,6},{5,7}}, dimensions={0}
  ROOT %cp = f32[8]{0} collective-permute(%a), source_target_pairs={{0,1},{1,0},{2,2}}
}
'''
  found = {c.kind: c for c in hlo.collectives(text, {'data': 2, 'fsdp': 2, 'tensor': 2, 'pipeline': 1})}
  assert found['all-reduce'].runs == 3 and found['all-reduce'].loops == ('w',)
  assert found['all-reduce'].axes == ('fsdp', 'tensor')  # groups {0..3}, {4..7}
  assert found['all-reduce'].bytes_sent == 2 * 3 / 4 * 32
  # Device ids [2,4]T(1,0) = 0 4 1 5 2 6 3 7 laid out as the mesh [2, 4]; groups along axis_0.
  assert hlo.replica_groups(text.splitlines()[6]) == [[0, 2], [4, 6], [1, 3], [5, 7]]
  assert found['reduce-scatter'].axes == ('fsdp',)
  assert found['reduce-scatter'].bytes_sent == 1 * 8  # (n - 1) x the 2-float result
  assert found['all-gather'].axes == ('fsdp',) and found['all-gather'].runs == 1
  assert found['all-gather'].bytes_sent == 64 / 2  # bf16[4, 8] gathered from halves
  assert found['collective-permute'].bytes_sent == 32 and found['collective-permute'].axes == ('tensor',)
