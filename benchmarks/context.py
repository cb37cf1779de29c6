"""Context parallelism on fake CPU devices: tokens/s and memory against row length, and
the bytes each device sends per step against the least it must.

    python benchmarks/context.py [--seqs 1024,2048,4096] [--cps 1,2,4] [--layers 2]
    python benchmarks/context.py --bytes-only --seqs 8192 --cps 2,4,8

Throughput table: a small model (hidden 256, 4 query and 2 key/value heads,
--layers layers, float32, xla attention, no remat), one packed row per step
on CP devices (context=CP, nothing else split), the train step run --steps
times after one warm-up. The fake devices share the host's cores, and each
runs its program on its own thread, so CP devices can use up to CP cores
where one device uses about one: tokens/s here says whether the layout's
extra work (the reorder, the gathers, the recomputed attention forward)
costs more than that, not what a GPU would gain. The temporaries per device
(compiled.memory_analysis) are the number that carries over: they should
fall as T / CP.

Bytes table: llama_109m's widths (benchmarks/collectives.py's model, with 4
key/value heads, so grouped-query), bfloat16 compute, the train step compiled
ahead of time on 8 fake devices as data=8/CP x context=CP, and its
collectives read from the partitioned HLO (maxlite.hlo). The ideal per device
per micro-step, for b rows per device, T tokens, K kv heads, H head dim, L
layers, c compute bytes, r reduction bytes, W the gradient bytes a device
holds, n = CP and m = data x CP:
  all-gather      K and V of the row, forward and in the backward's
                  recompute: 4 L (n-1)/n b T K H c; the segment ids once:
                  (n-1)/n b T 4
  reduce-scatter  dK and dV: 2 L (n-1)/n b T K H c
  all-reduce      the gradients over data x context, once per step: 2 (m-1)/m W
  permute         the batch's five int32 fields to their balanced places,
                  once per step: at most 5 b T / n 4
"""
import argparse
import math
import os
import pathlib
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import collectives  # noqa: E402
from configs import base  # noqa: E402
from maxlite import config as config_lib, mesh as mesh_lib, optim  # noqa: E402
from maxlite import state as state_lib, step as step_lib  # noqa: E402
from maxlite.model.llama import LlamaConfig  # noqa: E402

MIB = 2**20


def packed_batch(rows: int, seq: int, vocab: int, mean_document: int = 700):
  rng = np.random.default_rng(0)
  starts = rng.random((rows, seq)) < 1 / mean_document
  starts[:, 0] = True
  segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
  index = np.broadcast_to(np.arange(seq), (rows, seq))
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {'inputs': rng.integers(0, vocab, (rows, seq), dtype=np.int32),
          'targets': rng.integers(0, vocab, (rows, seq), dtype=np.int32),
          'segment_ids': segment_ids, 'positions': positions.astype(np.int32),
          'loss_mask': np.ones((rows, seq), np.int32)}


def throughput(seq: int, cp: int, layers: int, num_steps: int):
  """(tokens/s, per-device temporaries in bytes) of the train step."""
  config = base.get_config()
  model = config.model
  model.vocab_size, model.hidden_size, model.num_layers = 264, 256, layers
  model.num_heads, model.num_kv_heads, model.intermediate_size = 4, 2, 768
  model.max_seq_len = seq
  config.train.micro_batch_size = 1
  config.parallel.data, config.parallel.context = 1, cp
  devices = jax.devices()[:cp]
  sizes = config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(sizes, devices)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  with jax.set_mesh(mesh):
    steps = step_lib.build(config, model_cfg, mesh, tx)
    compiled = steps.train.lower(steps.abstract_state, steps.batch_shapes(1, seq)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, 0, False)
    batch = jax.device_put(packed_batch(1, seq, model.vocab_size), steps.batch_sharding)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  return seq * num_steps / (time.perf_counter() - start), temp


def context_ideal(c) -> dict[str, float]:
  sizes, config, model = c.sizes, c.config, c.model_cfg
  n, m = sizes['context'], sizes['data'] * sizes['context']
  ring = lambda k: (k - 1) / k
  compute = np.dtype(config.model.compute_dtype).itemsize
  reduce = np.dtype(model.grad_reduce_dtype).itemsize
  rows = config.train.micro_batch_size // (sizes['data'] * sizes['fsdp'])
  seq, layers, accum = config.data.seq_len, model.num_layers, config.train.grad_accum_steps
  kv = rows * seq * model.num_kv_heads * model.head_dim * compute
  held = sum(math.prod(s.shard_shape(x.shape)) * reduce for x, s in zip(
      jax.tree.leaves(c.abstract_state.params), jax.tree.leaves(c.shardings.params)))
  out = dict.fromkeys(collectives.KINDS, 0.0)
  out['all-gather'] = accum * ring(n) * (4 * layers * kv + rows * seq * 4)
  out['reduce-scatter'] = accum * ring(n) * 2 * layers * kv
  out['all-reduce'] = 2 * ring(m) * held
  out['collective-permute'] = 5 * rows * seq // n * 4
  return out


def bytes_table(seqs, cps, layers: int, batch: int):
  print(f'\nllama_109m widths with 4 kv heads, {layers} layers, {batch} rows per micro-step, '
        f'bfloat16; MiB each device sends per step, partitioned HLO '
        f'({jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__})')
  print('| seq | mesh | collective | measured MiB | ideal MiB | ratio |')
  print('|---|---|---|---|---|---|')
  for seq in seqs:
    for cp in cps:
      parallel = dict(data=8 // cp, context=cp)
      config = collectives.make_config(parallel, layers, batch, seq, 1)
      config.model.num_kv_heads = 4
      c = collectives.compile_step(config)
      measured, want = collectives.by_kind(c.partitioned), context_ideal(c)
      name = f'data{8 // cp}_context{cp}'
      for kind in collectives.KINDS:
        if measured[kind] or want[kind]:
          ratio = f'{measured[kind] / want[kind]:.2f}' if want[kind] else '-'
          print(f'| {seq} | {name} | {kind} | {measured[kind] / MIB:.2f} | {want[kind] / MIB:.2f} '
                f'| {ratio} |')
      total, ideal = sum(measured.values()), sum(want.values())
      print(f'| {seq} | {name} | **total** | {total / MIB:.2f} | {ideal / MIB:.2f} | '
            f'{total / ideal:.2f} |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seqs', default='1024,2048,4096')
  parser.add_argument('--cps', default='1,2,4')
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--batch', type=int, default=8, help='bytes table: rows per micro-step')
  parser.add_argument('--bytes-only', action='store_true')
  args = parser.parse_args()
  seqs = [int(s) for s in args.seqs.split(',')]
  cps = [int(c) for c in args.cps.split(',')]
  if not args.bytes_only:
    print(f'hidden 256, {args.layers} layers, 1 packed row per step, float32, xla attention; '
          f'{jax.device_count()} x {jax.devices()[0].device_kind} sharing {os.cpu_count()} cores, '
          f'jax {jax.__version__}')
    print('| seq | CP | tokens/s | temporaries per device MiB | x CP=1 |')
    print('|---|---|---|---|---|')
    for seq in seqs:
      base_temp = None
      for cp in cps:
        tokens, temp = throughput(seq, cp, args.layers, args.steps)
        base_temp = base_temp or temp
        print(f'| {seq} | {cp} | {tokens:.0f} | {temp / MIB:.1f} | {temp / base_temp:.2f} |',
              flush=True)
  bytes_table(seqs, [c for c in cps if c > 1], args.layers, args.batch)


if __name__ == '__main__':
  main()
