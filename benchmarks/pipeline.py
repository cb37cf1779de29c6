"""Pipeline schedules on 8 fake CPU devices: the compiled train step's per-device
memory and FLOPs, its collectives, and the measured step time against pipeline=1.

    python benchmarks/pipeline.py [--layers 8] [--hidden 256] [--seq 128] [--batch 32] [--steps 5]

Each row compiles the whole train step (forward, backward, AdamW) of the same
model and global batch; the rest of the 8 devices go to `data`. Memory is XLA's
memory analysis of one device's program (arguments + temporaries). XLA's cost
analysis counts a loop body once, whatever its trip count, so next to its
figure the table gives the FLOPs a device executes, counted from the schedule:
the blocks run R M + P - 1 iterations of which P - 1 are bubble (SPMD stages
compute on their idle slots too), and the LM head runs on every pipeline
device. On fake CPU devices all 8 share the host's cores, so the step time
tracks the FLOPs summed over devices, not what P GPUs would see.
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

# (pipeline, repeats, micro-batches); pipeline=1 is the baseline.
ROWS = [(1, 1, 0), (2, 1, 2), (2, 1, 8), (2, 2, 4), (4, 1, 4), (4, 1, 8), (4, 2, 4), (4, 2, 8)]
COLLECTIVES = ('collective-permute', 'all-to-all', 'all-gather', 'all-reduce')


def make_config(args, stages, repeats, micro):
  config = base.get_config()
  model = config.model
  model.num_layers, model.hidden_size, model.intermediate_size = args.layers, args.hidden, 3 * args.hidden
  model.num_heads = model.num_kv_heads = args.hidden // 64
  model.max_seq_len = args.seq
  config.train.micro_batch_size = args.batch
  config.parallel.update(data=-1, pipeline=stages, pipeline_repeats=repeats,
                         pipeline_microbatches=micro if stages > 1 else 0)
  return config


def executed_flops(config, stages, repeats, micro) -> float:
  """Training FLOPs one device executes per step, bubble iterations included."""
  model, tokens = config.model, config.train.micro_batch_size * config.model.max_seq_len
  head = 6 * model.vocab_size * model.hidden_size
  blocks = metrics_lib.flops_per_token(model, model.max_seq_len) - head
  per_device = tokens / 8  # the batch's share of a device with pipeline=1
  if stages == 1:
    return per_device * (blocks + head)
  iterations = repeats * micro + stages - 1
  return per_device * (blocks * iterations / (repeats * micro) + head * stages)


def measure(args, stages, repeats, micro) -> dict:
  config = make_config(args, stages, repeats, micro)
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
      'M': schedule.microbatches if stages > 1 else '-',
      'bubble': schedule.bubble if stages > 1 else 0.0,
      'args_mib': memory.argument_size_in_bytes / 2**20, 'temp_mib': memory.temp_size_in_bytes / 2**20,
      'xla_gflops': cost['flops'] / 1e9,
      'gflops': executed_flops(config, stages, repeats, schedule.microbatches) / 1e9, 'step_s': statistics.median(times),
      'collectives': ' '.join(str(sum(f' {op}(' in line or f' {op}-start(' in line for line in hlo.splitlines()))
                              for op in COLLECTIVES),
      'loss': float(metrics['loss']),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  print(f'{args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; collectives: '
        f'{" / ".join(COLLECTIVES)}')
  print('| schedule | P | R | M | bubble | args MiB | temp MiB | XLA GFLOP | executed GFLOP '
        '| step (s) | vs P=1 | collectives | loss |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  baseline = None
  for stages, repeats, micro in ROWS:
    row = measure(args, stages, repeats, micro)
    baseline = baseline or row['step_s']
    print(f'| {row["schedule"]} | {row["P"]} | {row["R"]} | {row["M"]} | {100 * row["bubble"]:.0f}% '
          f'| {row["args_mib"]:.1f} | {row["temp_mib"]:.1f} | {row["xla_gflops"]:.2f} | {row["gflops"]:.2f} '
          f'| {row["step_s"]:.3f} '
          f'| {row["step_s"] / baseline:.2f} | {row["collectives"]} | {row["loss"]:.5f} |', flush=True)


if __name__ == '__main__':
  main()
