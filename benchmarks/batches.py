"""The synthetic batch the train-step benchmarks feed maxlite and its PyTorch peer."""
import numpy as np


def make_batch(batch: int, length: int, vocab: int, documents: int, seed: int = 0) -> dict:
  """maxlite's batch layout: `documents` equal documents per row, positions restarting in each."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length + 1))
  index = np.arange(length)
  segment_ids = 1 + index * documents // length
  starts = np.searchsorted(segment_ids, segment_ids)  # first index of each token's document
  same_next = np.append(segment_ids[1:] == segment_ids[:-1], False)
  rows = lambda x: np.broadcast_to(x, (batch, length))
  return {name: np.ascontiguousarray(x, np.int32) for name, x in (
      ('inputs', tokens[:, :-1]), ('targets', tokens[:, 1:]), ('segment_ids', rows(segment_ids)),
      ('positions', rows(index - starts)), ('loss_mask', rows(same_next)))}
