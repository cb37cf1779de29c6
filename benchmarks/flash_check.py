"""The Pallas flash-attention kernel against its dense reference: bfloat16, causal, grouped-query,
one and 8 documents per row, forward and backward; the largest errors.

    python benchmarks/flash_check.py [--lengths 512,2048,8192] [--small] [--results FILE]

Per length T the batch holds 8192 / T rows of 16 query heads, 4 kv
heads and head dim 128, drawn fresh on every run (the seed is printed). The
kernel runs on the bfloat16 inputs; the reference
(maxlite.kernels.flash_attention_reference, dense scores) on the same values
in float32. For the output and the gradients of q, k and v (cotangent: float32
normal) the table gives the largest absolute error, and that over the
reference's largest magnitude, which must stay under 3e-2: the kernel rounds
probabilities and dS to bfloat16 before its matmuls, as the tests allow. A
NaN or inf fails. Exit code 1 if any row fails. `--small` runs 2 rows of T=128
with 4 heads of 64 in Pallas interpret mode, for a CPU.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.attention import inputs  # noqa: E402
from maxlite.kernels.flash_attention import flash_attention, flash_attention_reference  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 16, 4, 128
TOLERANCE = 3e-2  # relative to the reference's largest magnitude; bfloat16 operands


def outputs_and_grads(fn, q, k, v, segment_ids, cotangent):
  def loss(q, k, v):
    out = fn(q, k, v, segment_ids, causal=True)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return (out, *grads)


def check(length: int, documents: int, seed: int, interpret: bool, tokens: int, heads: int,
          kv_heads: int, head_dim: int) -> list[dict]:
  batch = max(1, tokens // length)
  q, k, v, segment_ids, _ = inputs(batch, length, heads, kv_heads, head_dim, documents,
                                   jnp.bfloat16, seed)
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  cotangent = jax.random.normal(jax.random.key(seed), q.shape, jnp.float32)
  # Interpret mode compiles the kernel's loops as plain XLA; optimising that
  # code costs more than running it at --small's sizes.
  options = {'xla_backend_optimization_level': 0} if interpret else None
  kernel = jax.jit(lambda *a: outputs_and_grads(
      lambda *b, **kw: flash_attention(*b, interpret=interpret, **kw), *a), compiler_options=options)
  reference = jax.jit(lambda q, k, v, *a: outputs_and_grads(
      flash_attention_reference, q.astype(jnp.float32), k.astype(jnp.float32),
      v.astype(jnp.float32), *a))
  start = time.perf_counter()
  got = jax.device_get(kernel(q, k, v, segment_ids, cotangent))
  seconds = time.perf_counter() - start  # compile and one run
  expected = jax.device_get(reference(q, k, v, segment_ids, cotangent))
  rows = []
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, expected):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    error = float(np.abs(a - b).max()) if np.isfinite(a).all() else float('nan')
    relative = error / max(float(np.abs(b).max()), 1e-30)
    rows.append(dict(length=length, documents=documents, batch=batch, tensor=name,
                     max_error=error, relative=relative, ok=bool(relative < TOLERANCE),
                     seconds=seconds))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='512,2048,8192')
  parser.add_argument('--small', action='store_true', help='T=128, small heads, interpret mode')
  parser.add_argument('--results', default='', help='append one JSON line per row to this file')
  args = parser.parse_args()
  seed = int(time.time()) % 2**31
  interpret = jax.default_backend() == 'cpu'
  shape = (8192, HEADS, KV_HEADS, HEAD_DIM)  # tokens per call, heads, kv heads, head dim
  lengths = [int(t) for t in args.lengths.split(',')]
  if args.small:
    lengths, shape = [128], (256, 4, 2, 64)
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}'
        f'{", interpret mode" if interpret else ""}), bfloat16, causal, {shape[0]} tokens per call, '
        f'heads {shape[1]}, kv heads {shape[2]}, head dim {shape[3]}, seed {seed}')
  print('| T | docs/row | rows | tensor | max abs error | / max abs ref | ok | compile+run s |')
  print('|---|---|---|---|---|---|---|---|')
  failed = False
  for length in lengths:
    for documents in (1, 8):
      try:
        rows = check(length, documents, seed, interpret, *shape)
      except Exception as error:  # a compile or launch failure is a row, not the end of the table
        rows = [dict(length=length, documents=documents, batch='-', tensor='-', max_error=float('nan'),
                     relative=float('nan'), ok=False, seconds=0.0,
                     error=f'{type(error).__name__}: {" ".join(str(error).split())[:120]}')]
      for row in rows:
        failed |= not row['ok']
        print(f'| {row["length"]} | {row["documents"]} | {row["batch"]} | {row["tensor"]} | '
              f'{row["max_error"]:.3e} | {row["relative"]:.3e} | {"ok" if row["ok"] else "FAIL"} | '
              f'{row["seconds"]:.1f} |' + (f' {row["error"]}' if 'error' in row else ''), flush=True)
        if args.results:
          with open(args.results, 'a') as out:
            out.write(json.dumps({'check': 'flash', **row}) + '\n')
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
