"""Pipeline schedules on 8 fake CPU devices: the compiled train step's per-device
memory and FLOPs, its collectives, and the measured step time against pipeline=1;
then the temporaries of AFAB and 1F1B as the number of micro-batches grows.

    python benchmarks/pipeline.py [--layers 8] [--hidden 256] [--seq 128] [--batch 32] [--steps 3]
        [--tables steps,memory] [--schedules afab,circular,1f1b,interleaved_1f1b]

Each row of the first table compiles the whole train step (forward, backward,
AdamW) of the same model and global batch; the rest of the 8 devices go to
`data`. Memory is XLA's memory analysis of one device's program (arguments +
temporaries). XLA's cost analysis counts a loop body once, whatever its trip
count, so next to its figure the table gives the FLOPs the busiest device
executes, counted from the schedule: under AFAB and circular the blocks run
R M + P - 1 iterations of which P - 1 are bubble (SPMD stages compute on
their idle slots too), and the LM head runs on every pipeline device; under
1F1B idle slots are skipped, each backward reruns its group's forward (4/3 of
the blocks' training FLOPs), and the LM head runs on the last stage only. On
fake CPU devices all 8 share the host's cores, so the step time tracks the
FLOPs summed over devices, not what P GPUs would see.

The second table only compiles the gradients (no optimizer) with one row per
micro-batch and data shard, so the batch grows with M: AFAB's temporaries
grow with it, 1F1B's should not.
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from maxlite import config as config_lib, mesh as mesh_lib, optim, state as state_lib  # noqa: E402
from maxlite import metrics as metrics_lib, step as step_lib  # noqa: E402
from maxlite.model.llama import LlamaConfig  # noqa: E402

# (schedule, pipeline, repeats, micro-batches); pipeline=1 is the baseline.
ROWS = [('afab', 1, 1, 0), ('afab', 2, 1, 2), ('afab', 2, 1, 8), ('circular', 2, 2, 4),
        ('afab', 4, 1, 4), ('afab', 4, 1, 8), ('circular', 4, 2, 4), ('circular', 4, 2, 8),
        ('1f1b', 2, 1, 8), ('interleaved_1f1b', 2, 2, 4), ('1f1b', 4, 1, 8),
        ('interleaved_1f1b', 4, 2, 8)]
# (schedule, pipeline, micro-batches) of the temporaries-vs-M table.
MEMORY_ROWS = [(s, p, m) for p in (2, 4) for s in ('afab', '1f1b') for m in (4, 8, 16)]
COLLECTIVES = ('collective-permute', 'all-to-all', 'all-gather', 'all-reduce')


def make_config(args, schedule, stages, repeats, micro):
  config = base.get_config()
  model = config.model
  model.num_layers, model.hidden_size, model.intermediate_size = args.layers, args.hidden, 3 * args.hidden
  model.num_heads = model.num_kv_heads = args.hidden // 64
  model.max_seq_len = args.seq
  config.train.micro_batch_size = args.batch
  config.parallel.update(data=-1, pipeline=stages, pipeline_repeats=repeats,
                         pipeline_microbatches=micro if stages > 1 else 0, pipeline_schedule=schedule)
  return config


def executed_flops(config, schedule, stages, repeats, micro) -> float:
  """Training FLOPs the busiest device executes per step, bubble iterations included."""
  model, tokens = config.model, config.train.micro_batch_size * config.model.max_seq_len
  head = 6 * model.vocab_size * model.hidden_size
  blocks = metrics_lib.flops_per_token(model, model.max_seq_len) - head
  per_device = tokens / 8  # the batch's share of a device with pipeline=1
  if stages == 1:
    return per_device * (blocks + head)
  if schedule in ('1f1b', 'interleaved_1f1b'):  # no idle compute; backward reruns the forward
    return per_device * (blocks * 4 / 3 + head * stages)
  iterations = repeats * micro + stages - 1
  return per_device * (blocks * iterations / (repeats * micro) + head * stages)


def measure(args, schedule, stages, repeats, micro) -> dict:
  config = make_config(args, schedule, stages, repeats, micro)
  sizes = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(sizes)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  rng = np.random.default_rng(0)
  batch = {name: rng.integers(0, model_cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
           for name in ('inputs', 'targets')}
  batch.update(segment_ids=np.ones((args.batch, args.seq), np.int32),
               positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)),
               loss_mask=np.ones((args.batch, args.seq), np.int32))
  with jax.set_mesh(mesh):
    steps = step_lib.build(config, model_cfg, mesh, tx)
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, False)
    batch = jax.device_put(batch, steps.batch_sharding)
    compiled = steps.train.lower(state, batch).compile()
    memory, cost, hlo = compiled.memory_analysis(), compiled.cost_analysis(), compiled.as_text()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  cost = cost[0] if isinstance(cost, list) else cost
  schedule = model_cfg.pipeline_schedule
  return {
      'schedule': '-' if stages == 1 else schedule.name, 'P': stages, 'R': repeats,
      'stash': schedule.stash if stages > 1 else '-',
      'M': schedule.microbatches if stages > 1 else '-',
      'bubble': schedule.bubble if stages > 1 else 0.0,
      'args_mib': memory.argument_size_in_bytes / 2**20, 'temp_mib': memory.temp_size_in_bytes / 2**20,
      'xla_gflops': cost['flops'] / 1e9,
      'gflops': executed_flops(config, schedule.name, stages, repeats, schedule.microbatches) / 1e9, 'step_s': statistics.median(times),
      'collectives': ' '.join(str(sum(f' {op}(' in line or f' {op}-start(' in line for line in hlo.splitlines()))
                              for op in COLLECTIVES),
      'loss': float(metrics['loss']),
  }


def gradient_temporaries(args, schedule, stages, micro) -> dict:
  """Compiled per-device temporaries of the gradients with one row per micro-batch and batch shard."""
  data = jax.device_count() // stages
  config = make_config(args, schedule, stages, 1, micro)
  config.train.micro_batch_size = rows = micro * data
  sizes = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(sizes)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  graphdef, shapes, logical = state_lib.abstract_model(model_cfg)
  layout = step_lib.Layout.create(mesh, logical, shapes, schedule=model_cfg.pipeline_schedule,
                                  batch_shape=(rows, args.seq))
  shardings = mesh_lib.tree_shardings(mesh, logical, shapes)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  batch_sharding = mesh_lib.named_sharding(mesh, step_lib.BATCH, (rows, args.seq))
  batch = {k: jax.ShapeDtypeStruct((rows, args.seq), np.int32, sharding=batch_sharding)
           for k in step_lib.BATCH_FIELDS}
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda p, b: step_lib.gradients(p, graphdef, b, step_lib.StepSettings(), layout)[:2]
                       ).lower(params, batch).compile()
  return {'temp_mib': compiled.memory_analysis().temp_size_in_bytes / 2**20,
          'stash': model_cfg.pipeline_schedule.stash}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--tables', default='steps,memory', help='steps, memory or both')
  parser.add_argument('--schedules', default='afab,circular,1f1b,interleaved_1f1b',
                      help='the rows to run (the pipeline=1 baseline always runs)')
  args = parser.parse_args()
  print(f'{args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; collectives: '
        f'{" / ".join(COLLECTIVES)}')
  if 'steps' in args.tables:
    print('| schedule | P | R | M | bubble | stash | args MiB | temp MiB | XLA GFLOP | executed GFLOP '
          '| step (s) | vs P=1 | collectives | loss |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    baseline = None
    for schedule, stages, repeats, micro in ROWS:
      if stages > 1 and schedule not in args.schedules.split(','):
        continue
      row = measure(args, schedule, stages, repeats, micro)
      baseline = baseline or row['step_s']
      print(f'| {row["schedule"]} | {row["P"]} | {row["R"]} | {row["M"]} | {100 * row["bubble"]:.0f}% '
            f'| {row["stash"]} | {row["args_mib"]:.1f} | {row["temp_mib"]:.1f} | {row["xla_gflops"]:.2f} '
            f'| {row["gflops"]:.2f} | {row["step_s"]:.3f} '
            f'| {row["step_s"] / baseline:.2f} | {row["collectives"]} | {row["loss"]:.5f} |', flush=True)
  if 'memory' in args.tables:
    print(f'\ngradients only, one row per micro-batch and data shard ({args.seq} tokens):')
    print('| schedule | P | M | global batch | stash | temp MiB |')
    print('|---|---|---|---|---|---|')
    for schedule, stages, micro in MEMORY_ROWS:
      if schedule not in args.schedules.split(','):
        continue
      row = gradient_temporaries(args, schedule, stages, micro)
      print(f'| {schedule} | {stages} | {micro} | {micro * jax.device_count() // stages} | {row["stash"]} '
            f'| {row["temp_mib"]:.1f} |', flush=True)


if __name__ == '__main__':
  main()
