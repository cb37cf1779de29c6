"""Data throughput: `data_prep prepare` tokens/s per tokenizer and worker count, then the
training loader's tokens/s for batch x seq with packing.

    python benchmarks/data.py [--megabytes 8] [--workers 1 2] [--batch 32 --seq_len 2048]

The corpus is the standard library's Python source (present everywhere), one
document per file. Preparation times are end to end: reading, tokenizing,
writing shards, including worker start-up. The SentencePiece model is trained
on the same text. The loader reads the SentencePiece-tokenized shards through
the real training pipeline of one process (shuffle, packing, row shuffle,
batching) and is timed after a warm-up.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from data_prep.prepare import prepare  # noqa: E402
from data_prep.tokenizer_training import train_tokenizer  # noqa: E402
from maxlite.data import pipeline  # noqa: E402
from maxlite.data.embedded import stdlib_files  # noqa: E402


def corpus_files(megabytes: float) -> list[str]:
  files, total = [], 0
  for path in stdlib_files():
    if total >= megabytes * 2**20:
      break
    files.append(str(path))
    total += path.stat().st_size
  return files


def loader_table(folder, workers_list, batch: int, seq_len: int, batches: int):
  """Loader tokens/s: the training pipeline of one process, end to end, after a warm-up."""
  datasets, _ = pipeline.open_datasets([(str(folder), None)])
  print(f'\nloader: batch {batch} x seq {seq_len}, {batches} batches timed after 5 of warm-up\n')
  print('| packing   | workers | batches/s | tokens/s   | padding |')
  print('|-----------|---------|-----------|------------|---------|')
  for packing in ('concat', 'first_fit'):
    for workers in workers_list:
      settings = pipeline.LoaderSettings(seq_len=seq_len, batch_size=batch, packing=packing,
                                         worker_count=workers)
      iterator = iter(pipeline.train_loader(datasets, settings))
      for _ in range(5):
        next(iterator)
      real = 0
      start = time.perf_counter()
      for _ in range(batches):
        real += int((next(iterator)['segment_ids'] > 0).sum())
      seconds = time.perf_counter() - start
      print(f'| {packing:<9} | {workers:>7} | {batches / seconds:>9.1f} | '
            f'{batches * batch * seq_len / seconds:>10,.0f} | {1 - real / (batches * batch * seq_len):>6.1%} |')
      iterator.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--megabytes', type=float, default=8)
  parser.add_argument('--workers', type=int, nargs='+', default=sorted({1, os.cpu_count() or 1}))
  parser.add_argument('--sp_vocab_size', type=int, default=8192)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--loader_workers', type=int, nargs='+', default=[0, 1, 2])
  args = parser.parse_args()
  files = corpus_files(args.megabytes)
  megabytes = sum(os.path.getsize(f) for f in files) / 2**20
  with tempfile.TemporaryDirectory() as scratch:
    start = time.perf_counter()
    model = train_tokenizer(files, f'{scratch}/sp', vocab_size=args.sp_vocab_size, errors='replace')['model']
    print(f'{len(files)} files, {megabytes:.1f} MB; SentencePiece BPE {args.sp_vocab_size} trained in '
          f'{time.perf_counter() - start:.1f} s\n')
    print('| tokenizer     | workers | tokens     | seconds | tokens/s   | MB/s  |')
    print('|---------------|---------|------------|---------|------------|-------|')
    for kind, path in (('byte', None), ('sentencepiece', model)):
      for workers in args.workers:
        start = time.perf_counter()
        meta = prepare(files, f'{scratch}/{kind}-{workers}', tokenizer=kind, tokenizer_file=path,
                       workers=workers, errors='replace', show_progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(split['tokens'] for split in meta['splits'].values())
        print(f'| {kind:<13} | {workers:>7} | {tokens:>10,} | {seconds:>7.2f} | {tokens / seconds:>10,.0f} '
              f'| {megabytes / seconds:>5.1f} |')
    loader_table(f'{scratch}/sentencepiece-{args.workers[0]}', args.loader_workers, args.batch,
                 args.seq_len, args.batches)


if __name__ == '__main__':
  main()
