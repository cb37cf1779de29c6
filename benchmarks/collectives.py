"""What each mesh axis communicates: the train step's collectives on 8 fake CPU devices
against the least each factorisation must move.

    python benchmarks/collectives.py [--layers 2] [--batch 16] [--seq 512] [--meshes data8,fsdp8]

The model has llama_109m's widths (hidden 768, 12 heads, MLP 1536, vocabulary
50257, tied), `--layers` of them, bfloat16 compute, float32 weights, AdamW and
no remat. Each row compiles the whole train step ahead of time (nothing runs)
and reads its collectives (maxlite.hlo): bytes each device sends per step,
under ring algorithms, per collective kind, from the HLO right after SPMD
partitioning ("partitioned") and from the optimised program ("optimised").
XLA:CPU's later passes promote bfloat16 collectives to float32 and combine
them, which a GPU's do not, so the partitioned program is the one compared
with the ideal. Gradient accumulation keeps the micro-batch (--batch rows)
and runs `accum` of them per step.

The ideal, per device and step, for b rows per device per micro-step, T
tokens, D hidden, L layers, c bytes of the compute dtype, r of the gradient
reduction dtype, A micro-steps; W the bytes of the weights a device holds:
  data      one all-reduce of W's gradient, 2 (n-1)/n W (r bytes). ZeRO-1:
            a reduce-scatter of it and an all-gather of the updated weights.
  fsdp      per micro-step, two all-gathers of the fsdp-split weights (c bytes;
            forward and backward) and one reduce-scatter of their gradient (r
            bytes), (n-1)/n of the gathered size each. The tied embedding is
            gathered once and kept for both of its uses. Norm scales, kept
            whole, all-reduce their gradient.
  tensor    per micro-step, Megatron-SP: per layer 2 all-gathers and 2
            reduce-scatters of S = b T D c forward, the same backward, plus one
            of each for the embedding and one of each for the LM head; (n-1)/n S
            each. The vocabulary-parallel softmax all-reduces 3 [b, T] float32
            statistics, and norm-scale gradients are all-reduced.
  pipeline  per micro-step, one collective-permute of a micro-batch's
            activations per schedule iteration, forward and backward, and an
            all-reduce of the stage output (and of its gradient) so that every
            stage holds it for the LM head.
"""
import argparse
import dataclasses
import math
import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from maxlite import config as config_lib, hlo, mesh as mesh_lib, optim  # noqa: E402
from maxlite import state as state_lib, step as step_lib  # noqa: E402
from maxlite.model.llama import LlamaConfig  # noqa: E402

MESHES = {
    'data8': dict(data=8),
    'fsdp8': dict(fsdp=8),
    'data2_tensor4': dict(data=2, tensor=4),
    'fsdp2_tensor4': dict(fsdp=2, tensor=4),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'pipeline2_data4': dict(pipeline=2, data=4),
    'data8_zero1': dict(data=8, zero1=True),
}
KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
MIB = 2**20


def make_config(parallel: dict, layers: int, batch: int, seq: int, accum: int):
  config = base.get_config()
  model = config.model
  model.vocab_size, model.hidden_size, model.num_layers = 50257, 768, layers
  model.num_heads = model.num_kv_heads = 12
  model.intermediate_size, model.max_seq_len, model.compute_dtype = 1536, seq, 'bfloat16'
  config.train.micro_batch_size, config.train.grad_accum_steps = batch, accum
  config.parallel.data = 1
  config.parallel.update(parallel)
  return config


@dataclasses.dataclass
class Compiled:
  config: object
  sizes: dict
  partitioned: list
  optimised: list
  abstract_state: object
  shardings: object
  logical: dict
  model_cfg: LlamaConfig


def compile_step(config) -> Compiled:
  """The train step for `config`, compiled ahead of time; its collectives before and after XLA's passes."""
  sizes = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(sizes)
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, sizes))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  with jax.set_mesh(mesh):
    steps = step_lib.build(config, model_cfg, mesh, tx)
    rows = config.train.micro_batch_size * config.train.grad_accum_steps
    lowered = steps.train.lower(steps.abstract_state, steps.batch_shapes(rows, config.data.seq_len))
    compiled, partitioned = hlo.compile_with_partitioned_hlo(lowered)
  shape = dict(mesh.shape)
  return Compiled(config, sizes, hlo.collectives(partitioned, shape),
                  hlo.collectives(compiled.as_text(), shape), steps.abstract_state, steps.shardings,
                  logical, model_cfg)


def _shard_bytes(x, sharding, itemsize=None) -> int:
  return math.prod(sharding.shard_shape(x.shape)) * (itemsize or np.dtype(x.dtype).itemsize)


def ideal(c: Compiled) -> dict[str, float]:
  """The least each axis must move per device per step, by collective kind (see the docstring)."""
  sizes, config, model = c.sizes, c.config, c.model_cfg
  d, f, t, p = sizes['data'], sizes['fsdp'], sizes['tensor'], sizes['pipeline']
  accum = config.train.grad_accum_steps
  compute = np.dtype(config.model.compute_dtype).itemsize
  reduce = np.dtype(model.grad_reduce_dtype).itemsize
  params = c.abstract_state.params
  param_shardings = c.shardings.params
  ring = lambda n: (n - 1) / n
  out = dict.fromkeys(KINDS, 0.0)
  leaves = list(zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)))
  held = sum(_shard_bytes(x, s, reduce) for x, s in leaves)  # gradient bytes a device holds
  if d > 1 and config.parallel.zero1:
    out['reduce-scatter'] += ring(d) * held
    out['all-gather'] += ring(d) * sum(_shard_bytes(x, s) for x, s in leaves)
  elif d > 1:
    out['all-reduce'] += 2 * ring(d) * held
  if f > 1:
    tied_table = params['embed']['table'] if model.tie_embeddings else None
    for x, s in leaves:
      if 'fsdp' in str(s.spec):
        gathered = _shard_bytes(x, s, 1) * f
        gathers = 1 if x is tied_table else 2
        out['all-gather'] += accum * gathers * ring(f) * gathered * compute
        out['reduce-scatter'] += accum * ring(f) * gathered * reduce
      else:  # norm scales
        out['all-reduce'] += accum * 2 * ring(f) * _shard_bytes(x, s, 4)
  rows = config.train.micro_batch_size // (d * f)  # per device per micro-step
  seq, hidden = config.data.seq_len, model.hidden_size
  if t > 1:
    activation = rows * seq * hidden * compute
    per_kind = (4 * model.num_layers + 2) * ring(t) * activation
    out['all-gather'] += accum * per_kind
    out['reduce-scatter'] += accum * per_kind
    statistics = 3 * rows * seq * 4
    norms = (2 * model.num_layers + 1) * hidden * 4
    out['all-reduce'] += accum * 2 * ring(t) * (statistics + norms)
  if p > 1:
    schedule = model.pipeline_schedule
    micro_activation = rows // schedule.microbatches * seq // t * hidden * compute
    out['collective-permute'] += accum * 2 * schedule.iterations * micro_activation
    out['all-reduce'] += accum * 2 * 2 * ring(p) * rows * seq // t * hidden * compute
  return out


def tensor_weight_bytes(c: Compiled, found) -> float:
  """Bytes of collectives over `tensor` that move a weight or its gradient (by shape)."""
  shapes = set()
  for x, s in zip(jax.tree.leaves(c.abstract_state.params), jax.tree.leaves(c.shardings.params)):
    for shape in (x.shape, x.shape[1:], s.shard_shape(x.shape), s.shard_shape(x.shape)[1:]):
      shapes.add(tuple(sorted(shape)))
  return sum(col.total_bytes for col in found if 'tensor' in col.axes
             and any(tuple(sorted(shape)) in shapes for shape in col.shapes))


def by_kind(found) -> dict[str, float]:
  totals = dict.fromkeys(KINDS, 0.0)
  for col in found:
    totals[col.kind] += col.total_bytes
  return totals


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--batch', type=int, default=16, help='micro-batch rows over the whole mesh')
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--accum', default='1,4', help='gradient accumulation steps to compare')
  parser.add_argument('--meshes', default=','.join(MESHES))
  args = parser.parse_args()
  print(f'llama_109m widths, {args.layers} layers, micro-batch {args.batch} x {args.seq}, bfloat16 '
        f'compute; MiB each device sends per step ({jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, jax {jax.__version__})')
  print('| mesh | accum | collective | partitioned MiB | optimised MiB | ideal MiB | ratio |')
  print('|---|---|---|---|---|---|---|')
  for name in args.meshes.split(','):
    for accum in (int(a) for a in args.accum.split(',')):
      c = compile_step(make_config(MESHES[name], args.layers, args.batch, args.seq, accum))
      partitioned, optimised, want = by_kind(c.partitioned), by_kind(c.optimised), ideal(c)
      for kind in KINDS:
        if not (partitioned[kind] or optimised[kind] or want[kind]):
          continue
        ratio = f'{partitioned[kind] / want[kind]:.2f}' if want[kind] else '-'
        print(f'| {name} | {accum} | {kind} | {partitioned[kind] / MIB:.2f} | '
              f'{optimised[kind] / MIB:.2f} | {want[kind] / MIB:.2f} | {ratio} |')
      total, total_ideal = sum(partitioned.values()), sum(want.values())
      weights = tensor_weight_bytes(c, c.partitioned)
      print(f'| {name} | {accum} | **total** | {total / MIB:.2f} | {sum(optimised.values()) / MIB:.2f} '
            f'| {total_ideal / MIB:.2f} | {total / total_ideal:.2f} |'
            + (f' tensor: {weights / MIB:.2f} MiB of weights' if c.sizes['tensor'] > 1 else ''),
            flush=True)


if __name__ == '__main__':
  main()
