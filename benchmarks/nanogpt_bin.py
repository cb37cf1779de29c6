"""data_prep --format nanogpt_bin: throughput and peak memory against the file's size.

    python benchmarks/nanogpt_bin.py [--tokens 20M 80M] [--layout modded-nanogpt]

Writes a synthetic file of each size (documents of 200-2000 random ids,
GPT-2's EOT between them), prepares it in a fresh process and prints the
wall time, tokens/s and that process's peak resident memory. Bounded memory
means the peak stays flat as the file grows (it holds one 4M-token read
block, int64, plus the longest document), not proportional to it.
"""
import argparse
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.__main__ import count  # noqa: E402
from data_prep.nanogpt_bin import GPT2_EOT, MODDED_MAGIC  # noqa: E402


def write_file(path: pathlib.Path, tokens: int, layout: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  with open(path, 'wb') as f:
    if layout == 'modded-nanogpt':
      header = np.zeros(256, '<i4')
      header[:3] = MODDED_MAGIC, 1, tokens
      f.write(header.tobytes())
    written = 0
    while written < tokens:  # 4M tokens at a time: the writer's memory stays bounded too
      chunk = rng.integers(0, GPT2_EOT, min(1 << 22, tokens - written), dtype=np.uint16)
      chunk[rng.random(len(chunk)) < 1 / 1000] = GPT2_EOT  # documents of ~1000 tokens
      f.write(chunk.astype('<u2').tobytes())
      written += len(chunk)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--tokens', nargs='+', type=count, default=[count('20M'), count('80M')])
  parser.add_argument('--layout', default='modded-nanogpt', choices=('nanogpt', 'modded-nanogpt'))
  args = parser.parse_args()
  print(f'{"tokens":>12} {"file MiB":>9} {"documents":>10} {"seconds":>8} {"Mtok/s":>7} {"peak RSS MiB":>13}')
  with tempfile.TemporaryDirectory() as tmp:
    for tokens in args.tokens:
      source = pathlib.Path(tmp) / f'train_{tokens}.bin'
      write_file(source, tokens, args.layout)
      out = pathlib.Path(tmp) / f'ds_{tokens}'
      start = time.perf_counter()
      before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
      subprocess.run([sys.executable, '-m', 'data_prep', 'prepare', '--format', 'nanogpt_bin',
                      '--input', str(source), '--vocab_size', '50304', '--output', str(out),
                      '--val_fraction', '0.01'], check=True, cwd=REPO, stdout=subprocess.PIPE)
      seconds = time.perf_counter() - start
      peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
      import json
      meta = json.loads((out / 'metadata.json').read_text())
      docs = sum(s['documents'] for s in meta['splits'].values())
      note = '' if peak > before else ' (<= an earlier row)'
      print(f'{tokens:>12,} {source.stat().st_size / 2**20:>9.0f} {docs:>10,} {seconds:>8.1f} '
            f'{tokens / seconds / 1e6:>7.2f} {peak / 1024:>13.0f}{note}')
      source.unlink()


if __name__ == '__main__':
  main()
