"""Parallel tokenization: chunks of documents in, token arrays out, in input order.

Workers are spawned (not forked: the parent may hold threads from tqdm, pyarrow
or `datasets`) and each rebuilds the tokenizer from its file. At most
`2 * workers` chunks are in flight, so memory stays bounded however fast the
reader is; `Pool.imap` or `Executor.map` would read the whole input ahead.
"""
import collections
import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
from typing import Iterable, Iterator

import numpy as np

from maxlite.data.tokenizers import load_tokenizer


@dataclasses.dataclass(frozen=True)
class EncodeSpec:
  """Everything a worker needs to turn text into a record's ids."""
  tokenizer: str
  tokenizer_file: str | None
  special_tokens: dict
  add_bos: bool
  add_eos: bool
  dtype: str


@dataclasses.dataclass
class EncodedChunk:
  tokens: np.ndarray      # the chunk's documents' ids, concatenated, in the record dtype
  lengths: np.ndarray     # ids per document
  hash_points: np.ndarray  # per document, a point in [0, 1) from its text (validation split)

  def documents(self) -> list[np.ndarray]:
    return np.split(self.tokens, np.cumsum(self.lengths)[:-1])


_encoder = None  # this process's (tokenizer, spec), set by _start_worker


def _start_worker(spec: EncodeSpec):
  global _encoder
  kwargs = spec.special_tokens if spec.tokenizer == 'hf' else {}
  _encoder = load_tokenizer(spec.tokenizer, spec.tokenizer_file, **kwargs), spec


def hash_point(text: str) -> float:
  """A uniform point in [0, 1) fixed by the text: equal documents land in the same split."""
  digest = hashlib.blake2b(text.encode('utf-8', errors='surrogatepass'), digest_size=8).digest()
  return int.from_bytes(digest, 'little') / 2.0**64


def encode_chunk(texts: list[str]) -> EncodedChunk:
  tokenizer, spec = _encoder
  prefix = np.array([tokenizer.bos_id] if spec.add_bos else [], np.int64)
  suffix = np.array([tokenizer.eos_id] if spec.add_eos else [], np.int64)
  pieces = [np.concatenate([prefix, tokenizer.encode(text), suffix]) for text in texts]
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
  outside = tokens[(tokens < 0) | (tokens >= tokenizer.vocab_size)]
  if outside.size:  # the record dtype is sized for the vocabulary: such an id would wrap silently
    raise ValueError(f'tokenizer {spec.tokenizer_file or spec.tokenizer} produced id {outside[0]}, '
                     f'outside its vocab_size {tokenizer.vocab_size}')
  return EncodedChunk(tokens.astype(spec.dtype), np.array([len(p) for p in pieces], np.int64),
                      np.array([hash_point(t) for t in texts], np.float64))


def encode_chunks(chunks: Iterable[list[str]], spec: EncodeSpec, workers: int) -> Iterator[EncodedChunk]:
  """encode_chunk over `chunks`, results in input order whatever the number of workers."""
  if workers <= 1:
    _start_worker(spec)
    yield from map(encode_chunk, chunks)
    return
  # An executor, not multiprocessing.Pool: a worker that dies (OOM, a crashing tokenizer)
  # raises BrokenProcessPool here instead of leaving its task waited on forever.
  with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context('spawn'),
                                              initializer=_start_worker, initargs=(spec,)) as pool:
    in_flight = collections.deque()
    try:
      for chunk in chunks:
        in_flight.append(pool.submit(encode_chunk, chunk))
        if len(in_flight) >= 2 * workers:
          yield in_flight.popleft().result()
      while in_flight:
        yield in_flight.popleft().result()
    finally:  # closed early (--max_tokens) or failed: drop what has not started
      for future in in_flight:
        future.cancel()
