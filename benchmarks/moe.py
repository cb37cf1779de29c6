"""Mixture of Experts on CPU: tokens/s against a dense model with equal active
parameters, and the bytes expert parallelism moves against the ideal.

    python benchmarks/moe.py [--steps 10] [--skip_speed] [--skip_bytes]

Speed: configs/tiny.py (dense, MLP 384) against configs/moe_tiny.py (4
experts of width 192, top-2: the same active parameters and FLOPs per token),
dropless and with capacity factor 1.25, one CPU device, float32; the mean
time of --steps train steps after one warm-up step.

Bytes: the train step on 8 fake CPU devices with parallel.expert=8 (hidden
256, 8 experts of width 512, top-2, every layer MoE, micro-batch 16 x 256,
bfloat16 compute), compiled ahead of time; each device's bytes per step over
the `expert` axis, by collective kind (maxlite.hlo, the partitioned HLO). The
ideal for tokens, per MoE layer and device, with b T tokens per device, D
hidden, k experts per token, c bytes of the compute dtype: an all-to-all
dispatch and combine forward and the same backward, 4 (G-1)/G k b T D c.
The gather dispatch moves every token to every device of the group instead:
4 (G-1) b T D c, G/k times that. Gradients of the weights replicated over
`expert` add one all-reduce per step, 2 (G-1)/G W r.
"""
import argparse
import os
import pathlib
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from collectives import compile_step  # noqa: E402
from configs import base, moe_tiny, tiny  # noqa: E402
from maxlite import config as config_lib, mesh as mesh_lib, metrics, optim  # noqa: E402
from maxlite import state as state_lib, step as step_lib  # noqa: E402
from maxlite.model import moe  # noqa: E402
from maxlite.model.llama import LlamaConfig  # noqa: E402

MIB = 2**20


def tokens_per_second(config, steps: int) -> float:
  devices = jax.devices()[:1]
  sizes = config_lib.validate(config, 1)
  mesh = mesh_lib.make_mesh(sizes, devices)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  rows, seq = config.train.micro_batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (rows, seq + 1), np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones((rows, seq), np.int32),
           'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)),
           'loss_mask': np.ones((rows, seq), np.int32)}
  with jax.set_mesh(mesh):
    steps_ = step_lib.build(config, model_cfg, mesh, tx)
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, False)
    batch = jax.device_put(batch, steps_.batch_sharding)
    state, m = steps_.train(state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      state, m = steps_.train(state, batch)
    jax.block_until_ready(m)
  return rows * seq * steps / (time.perf_counter() - start)


def speed(steps: int):
  dense = tiny.get_config()
  sparse = moe_tiny.get_config()
  capacity = moe_tiny.get_config()
  capacity.model.update(moe_capacity_factor=1.25, moe_dispatch='all_to_all')
  print(f'train step, micro-batch {dense.train.micro_batch_size} x {dense.data.seq_len}, 1 x '
        f'{jax.devices()[0].device_kind}, jax {jax.__version__}')
  print('| model | params | active params/token | FLOPs/token | tokens/s |')
  print('|---|---|---|---|---|')
  for name, config in (('tiny (dense)', dense), ('moe_tiny dropless', sparse),
                       ('moe_tiny capacity 1.25', capacity)):
    cfg = LlamaConfig.from_config(config.model)
    _, abstract, _ = state_lib.abstract_model(cfg)
    total = sum(x.size for x in jax.tree.leaves(abstract))
    flops = metrics.flops_per_token(config.model, config.data.seq_len)
    print(f'| {name} | {total:,} | {metrics.matmul_params(config.model):,} | {flops:,.0f} | '
          f'{tokens_per_second(config, steps):,.0f} |', flush=True)


def bytes_config():
  config = base.get_config()
  model = config.model
  model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads = 256, 2, 4, 4
  model.intermediate_size, model.moe_intermediate_size, model.max_seq_len = 512, 512, 256
  model.num_experts, model.experts_per_token, model.compute_dtype = 8, 2, 'bfloat16'
  config.train.micro_batch_size = 16
  config.parallel.update(data=1, expert=8)
  return config


def communication():
  config = bytes_config()
  c = compile_step(config)
  model, groups = config.model, c.sizes['expert']
  _, moe_layers = moe.layer_counts(model)
  b = config.train.micro_batch_size // groups
  tokens = b * config.data.seq_len * model.hidden_size * 2  # bf16
  ideal = 4 * (groups - 1) / groups * model.experts_per_token * tokens * moe_layers
  gather = 4 * (groups - 1) * tokens * moe_layers
  found = [x for x in c.partitioned if x.axes == ('expert',)]
  print(f'\nexpert=8: hidden {model.hidden_size}, {model.num_experts} experts top-{model.experts_per_token}, '
        f'{moe_layers} MoE layers, micro-batch {config.train.micro_batch_size} x {config.data.seq_len}, '
        'bfloat16; MiB each device sends per step over `expert`')
  print('| collective | dtype | count | MiB |')
  print('|---|---|---|---|')
  rows = {}
  for x in found:
    key = (x.kind, x.dtype)
    count, total = rows.get(key, (0, 0.0))
    rows[key] = (count + x.runs, total + x.total_bytes)
  for (kind, dtype), (count, total) in sorted(rows.items()):
    print(f'| {kind} | {dtype} | {count} | {total / MIB:.3f} |')
  moved = sum(t for (kind, dtype), (_, t) in rows.items()
              if kind in ('all-gather', 'reduce-scatter') and dtype in ('bf16', 'f32'))
  print(f'\n| tokens | MiB |\n|---|---|\n| measured all-gather + reduce-scatter over expert | {moved / MIB:.3f} |'
        f'\n| gather dispatch, analytic 4 (G-1) b T D c x layers | {gather / MIB:.3f} |'
        f'\n| ideal all-to-all, 4 (G-1)/G k b T D c x layers | {ideal / MIB:.3f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--skip_speed', action='store_true')
  parser.add_argument('--skip_bytes', action='store_true')
  args = parser.parse_args()
  if not args.skip_speed:
    speed(args.steps)
  if not args.skip_bytes:
    communication()


if __name__ == '__main__':
  main()
