"""Attention backends (xla, cudnn, pallas): milliseconds and TFLOP/s, forward and
forward+backward, causal, for one document per row and for packed rows.

    python benchmarks/attention.py [--small] [--repeats 10] [--dtype bfloat16] [--kv_heads 0]
        [--head_dims 64,128] [--lengths 1024,2048,4096,8192] [--results FILE]

Shapes: head_dim 64 and 128 with hidden = heads x head_dim = 2048, lengths 1k
to 8k with batch x length = 16k tokens; packed rows hold 8 equal documents.
FLOPs are counted as 4 * B * N * T * T * H / 2 (causal) forward and 3.5x that
forward+backward (the backward does 2.5x the forward's matmuls), for both
row kinds: on packed rows the figure is the effective throughput against a
whole-row causal attention, so skipping masked tiles shows as a higher number.
Each time is the median of the repeats after two warm-up calls, measured
with block_until_ready. `--small` runs tiny shapes in float32, in seconds on a
CPU (where pallas runs in interpret mode, so its times mean nothing there).
"""
import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maxlite.model.attention import attention, resolve_backend  # noqa: E402

BACKENDS = ('xla', 'cudnn', 'pallas')
DOCUMENTS = (1, 8)


def inputs(batch, length, heads, kv_heads, head_dim, documents, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, n, head_dim)), dtype)
             for n in (heads, kv_heads, kv_heads))
  if documents == 1:
    return q, k, v, None, None
  # Equal documents, positions restarting in each, as the packing loader makes them.
  index = np.arange(length)
  segment_ids = np.broadcast_to(1 + index * documents // length, (batch, length))
  starts = (np.arange(documents) * length + documents - 1) // documents
  positions = np.broadcast_to(index - starts[segment_ids[0] - 1], (batch, length))
  return q, k, v, jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)


def timed(fn, args, repeats: int) -> float:
  """Median seconds of fn(*args) after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def functions(backend):
  def forward(q, k, v, segment_ids, positions):
    return attention(q, k, v, segment_ids, positions, causal=True, backend=backend)

  def loss(q, k, v, segment_ids, positions):
    return jnp.sum(forward(q, k, v, segment_ids, positions).astype(jnp.float32))

  return {'fwd': jax.jit(forward), 'fwd+bwd': jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--small', action='store_true', help='tiny float32 shapes, for a CPU')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--kv_heads', type=int, default=0, help='0: as many as query heads')
  parser.add_argument('--head_dims', default='64,128')
  parser.add_argument('--lengths', default='1024,2048,4096,8192')
  parser.add_argument('--results', default='', help='append one JSON line per row to this file')
  args = parser.parse_args()
  platform = jax.default_backend()
  head_dims = [int(h) for h in args.head_dims.split(',')]
  if args.small:
    lengths, tokens, hidden, dtype = (256,), 256, 128, jnp.float32
  else:
    lengths, tokens, hidden = [int(t) for t in args.lengths.split(',')], 16384, 2048
    dtype = args.dtype

  print(f'device: {jax.devices()[0].device_kind} ({platform}), dtype {jnp.dtype(dtype).name}, '
        f'{tokens} tokens per call, hidden {hidden}, causal')
  print('| backend | head_dim | length | docs/row | pass    |       ms | TFLOP/s | note')
  print('|---------|----------|--------|----------|---------|----------|---------|-----')

  def report(backend, head_dim, length, documents, name='-', seconds=None, flops=0.0, note=''):
    """One row of the table, and of --results when given."""
    ms, tflops = ('-', '-') if seconds is None else (seconds * 1e3, flops / seconds / 1e12)
    print(f'| {backend:7} | {head_dim:8} | {length:6} | {documents:8} | {name:7} | '
          + (f'{"-":>8} | {"-":>7}' if seconds is None else f'{ms:8.2f} | {tflops:7.3f}')
          + f' | {note}', flush=True)
    if args.results:
      with open(args.results, 'a') as out:
        out.write(json.dumps({'check': 'attention', 'backend': backend, 'head_dim': head_dim,
                              'length': length, 'documents': documents, 'pass': name, 'ms': ms,
                              'tflops': tflops, 'note': note}) + '\n')

  for head_dim in head_dims:
    heads = hidden // head_dim
    kv_heads = args.kv_heads or heads
    for length in lengths:
      batch = max(1, tokens // length)
      forward_flops = 4 * batch * heads * length * length * head_dim / 2
      for documents in DOCUMENTS:
        data = inputs(batch, length, heads, kv_heads, head_dim, documents, dtype)
        for backend in BACKENDS:
          try:
            resolve_backend(backend, platform, segment_ids=documents > 1)
            fns = functions(backend)
          except ValueError as error:  # not available here: say why, in the table
            report(backend, head_dim, length, documents,
                   note=str(error).split(';')[0].replace("model.attention='cudnn' ", ''))
            continue
          for name, fn in fns.items():
            flops = forward_flops * (3.5 if name == 'fwd+bwd' else 1)
            note = 'interpret mode' if backend == 'pallas' and platform == 'cpu' else ''
            try:
              seconds = timed(fn, data, args.repeats)
            except Exception as error:  # e.g. out of memory: the row says so, the table goes on
              report(backend, head_dim, length, documents, name,
                     note=f'{type(error).__name__}: {str(error)[:60]}')
              continue
            report(backend, head_dim, length, documents, name, seconds, flops, note)


if __name__ == '__main__':
  main()
