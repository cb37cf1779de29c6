"""The embedded corpus: the Python standard library's own source, byte-level.

Every Python installation carries it, so the default config trains with no
download. Files are read in sorted order (deterministic for a given Python),
each prefixed with BOS; the tail of the stream is held out for validation.
"""
import os
import pathlib
import sysconfig

import numpy as np

from maxlite.data.tokenizers import ByteTokenizer


def stdlib_files() -> list[pathlib.Path]:
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = [d for d in subfolders if d != 'site-packages']  # third-party, varies
    files += [pathlib.Path(folder, n) for n in names if n.endswith('.py')]
  if not files:
    raise FileNotFoundError(f'no Python source files under the standard library at {root}')
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_tokens(max_bytes: int, tokenizer: ByteTokenizer) -> np.ndarray:
  """BOS + bytes of each stdlib file until max_bytes, as one int32 stream."""
  pieces, total = [], 0
  for path in stdlib_files():
    data = path.read_bytes()
    piece = np.empty(len(data) + 1, np.int32)
    piece[0] = tokenizer.bos_id
    piece[1:] = np.frombuffer(data, np.uint8)
    pieces.append(piece)
    total += len(piece)
    if total >= max_bytes:
      break
  return np.concatenate(pieces)[:max_bytes]


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int):
  """(train, val): val is the last val_fraction of the stream, at least one window."""
  num_val = max(int(len(tokens) * val_fraction), seq_len + 1)
  if len(tokens) - num_val < seq_len + 1:
    raise ValueError(f'embedded corpus of {len(tokens)} tokens is too small for '
                     f'data.seq_len={seq_len} with data.val_fraction={val_fraction}')
  return tokens[:-num_val], tokens[-num_val:]


def window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, bos_id: int) -> dict:
  """Rows of seq_len + 1 tokens at `starts`, as next-token inputs and targets.

  Windows cross file boundaries, so each row is a packed sequence: segment ids
  count the BOS tokens seen, positions restart at each BOS, and a target that
  is the next document's BOS is not trained on.
  """
  rows = tokens[starts[:, None] + np.arange(seq_len + 1)]
  inputs, targets = rows[:, :-1], rows[:, 1:]
  is_bos = inputs == bos_id
  segment_ids = 1 + np.cumsum(is_bos, axis=1) - is_bos[:, :1]
  index = np.broadcast_to(np.arange(seq_len), inputs.shape)
  last_bos = np.maximum.accumulate(np.where(is_bos, index, 0), axis=1)
  positions = index - last_bos
  return {
      'inputs': inputs.astype(np.int32),
      'targets': targets.astype(np.int32),
      'segment_ids': segment_ids.astype(np.int32),
      'positions': positions.astype(np.int32),
      'loss_mask': (targets != bos_id).astype(np.int32),
  }


class WindowSampler:
  """Random windows of the stream; batch k depends only on (seed, k), so resuming
  at any step reproduces the same batches."""

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, bos_id: int):
    self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
    self.seed, self.bos_id = seed, bos_id

  def batch(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
    return window_batch(self.tokens, starts, self.seq_len, self.bos_id)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int, bos_id: int):
  """A fixed, unshuffled set of batches: evenly spaced windows over the val split."""
  if num_batches == 0:
    return []
  count = batch_size * num_batches
  starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
  return [window_batch(tokens, chunk, seq_len, bos_id) for chunk in np.split(starts, num_batches)]
