"""The Grain input pipeline: prepared shards -> shuffled, per-process, mixed, packed batches.

Per source:  ArrayRecord documents -> global shuffle (reseeded every epoch) ->
             this loader shard's slice [shard::num_shards] -> decode -> repeat forever.
Then:        mix the sources by weight -> pack rows of seq_len -> shuffle rows
             within a window -> batch -> a prefetch thread or worker processes.

A global batch is made of `num_shards` such loader shards, shard 0's rows
first; each process runs only the shards whose rows its devices hold
(ShardedLoader). By default there is one shard per process.

Everything up to the mix is a random-access MapDataset, so the iterator's state
is a handful of integers plus the packer's buffer; Orbax saves it next to the
train state and a resumed run sees exactly the batches it would have seen.

Packing keeps documents apart: `segment_ids` number the documents of a row
(0 is padding) and `positions` restart at each document, so attention masks by
segment and RoPE sees each document from position 0. A target is trained on
only if it continues the same document (`loss_mask`).

Each token's target is attached to it before packing (`_Decode`), so a target
travels with its token through every cut: the last token of a row is trained
on the first token of the next row when the document runs on. Every token of
the stream is therefore a target exactly once, except the first token of each
document, which has no predecessor (with `bos_aligned`, the token at a cut is
still a target, but its input slot holds BOS).
"""
import dataclasses
import itertools
import pathlib
from collections.abc import Iterator

import grain
import numpy as np
from absl import flags
from grain import experimental as grain_exp

from maxlite.data import shards, tokenizers


class DataError(ValueError):
  """A dataset that cannot be used as configured; printed as one line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A prepared dataset folder, opened and checked."""
  name: str
  folder: pathlib.Path
  meta: dict
  weight: float | None  # share of training tokens; None: not given

  def split(self, split: str) -> dict:
    return self.meta['splits'].get(split) or {'documents': 0, 'tokens': 0, 'shards': []}

  def records(self, split: str) -> grain.MapDataset:
    paths = shards.shard_paths(self.folder, self.meta, split)
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))


def parse_sources(spec: str) -> list[tuple[str, float | None]]:
  """'path' or 'path:weight,path:weight' -> [(path, weight or None)]."""
  entries = []
  for item in (s.strip() for s in spec.split(',')):
    if not item:
      raise DataError(f'data.source={spec!r} has an empty entry')
    path, weight = item, None
    head, _, tail = item.rpartition(':')
    if head:
      try:
        path, weight = head, float(tail)
      except ValueError:
        pass  # a colon inside the path, not a weight
    if weight is not None and not weight > 0:
      raise DataError(f'data.source weight of {path} is {tail}; weights must be positive')
    entries.append((path, weight))
  if len({w is None for _, w in entries}) > 1:
    raise DataError(f'data.source={spec!r}: give a weight to every source or to none')
  return entries


def open_datasets(entries: list[tuple[str, float | None]]) -> tuple[list[Dataset], object]:
  """Reads each metadata.json and checks its shards against it; all sources must share one
  tokenizer. Returns (datasets, tokenizer)."""
  datasets = []
  for path, weight in entries:
    folder = pathlib.Path(path).expanduser()
    try:
      meta = shards.read_metadata(folder)
      # Here, before the run directory is written, rather than when the loader reaches a bad shard.
      for split in meta['splits']:
        shards.check_shards(folder, meta, split)
    except (OSError, ValueError) as error:
      raise DataError(str(error)) from None
    if not meta['splits'].get('train', {}).get('documents'):
      raise DataError(f'{folder / shards.METADATA_FILE}: the train split is empty')
    name = folder.name or str(folder)
    if any(d.name == name for d in datasets):  # names key the per-source token counts
      name = f'{name}_{len(datasets)}'
    datasets.append(Dataset(name, folder, meta, weight))
  first = datasets[0]
  for other in datasets[1:]:
    if _tokenizer_identity(other.meta) != _tokenizer_identity(first.meta):
      raise DataError(f'{other.folder} was tokenized differently from {first.folder}; '
                      'a mixture needs one tokenizer')
  try:
    tokenizer = tokenizers.from_description(first.meta['tokenizer'], first.folder)
  except (OSError, ValueError) as error:
    raise DataError(str(error)) from None
  return datasets, tokenizer


def _tokenizer_identity(meta: dict) -> tuple:
  t = meta['tokenizer']
  return t['kind'], t.get('sha256'), meta.get('add_bos'), meta.get('add_eos')


def document_rates(datasets: list[Dataset], mixing: str) -> list[float]:
  """How often the mix draws a document of each source.

  Weights are shares of tokens, but the mix draws documents, so a source of long
  documents is drawn less often for the same share. 'proportional' gives each
  source its share of all tokens: every source finishes its epoch together.
  """
  docs = np.array([d.split('train')['documents'] for d in datasets], np.float64)
  tokens = np.array([d.split('train')['tokens'] for d in datasets], np.float64)
  if mixing == 'proportional' or datasets[0].weight is None:
    return list(docs / docs.sum())
  weights = np.array([d.weight for d in datasets], np.float64)
  rates = weights / weights.sum() / (tokens / docs)
  return list(rates / rates.sum())


# A row shuffle window should hold at least this many average documents of
# each source. Measured: on a one-document corpus the default window gave val
# loss 1.746 and a full-epoch window 1.668 at equal steps; on the embedded
# corpus (~11 average documents a window at seq_len 128) 200 steps of
# configs/tiny.py gave 2.654 with the default and 2.699 with a full-epoch
# window, no better. Four sits between the two, nearer the harmless case, so
# that corpora of ordinary documents are not warned about.
MIN_DOCUMENTS_PER_WINDOW = 4


def row_shuffle_warning(datasets: list[Dataset], settings: 'LoaderSettings', num_shards: int = 1) -> str | None:
  """A one-line warning when data.row_shuffle_window is short for the documents; None when not.

  A document fills consecutive rows and the window shuffles only the rows it
  holds, so when a window holds a few documents every batch made from it comes
  from them, and training walks through each long document in order. This
  warns rather than growing the window by itself: the window is held in
  memory, filled before the first batch and replayed on resume, and only
  corpora of long documents need a large one. A window that holds all of a
  source's rows (of this loader shard) mixes them completely, however long.
  """
  if not settings.shuffle:
    return None
  window = max(settings.row_shuffle_window, 1)  # 0: no shuffle, a window of one row
  means = np.array([d.split('train')['tokens'] / d.split('train')['documents'] for d in datasets])
  shares = np.array(document_rates(datasets, settings.mixing)) * means  # of the packed tokens
  shares /= shares.sum()
  window_tokens = window * settings.seq_len
  wanted = 0  # rows
  for dataset, mean, share in zip(datasets, means, shares):
    epoch_tokens = dataset.split('train')['tokens'] / num_shards
    if MIN_DOCUMENTS_PER_WINDOW * mean > window_tokens and share * window_tokens < epoch_tokens:
      rows = int(np.ceil(min(MIN_DOCUMENTS_PER_WINDOW * mean, epoch_tokens / share) / settings.seq_len))
      if rows > wanted:
        wanted, name, worst_mean = rows, dataset.folder, mean
  if not wanted:
    return None
  return (f'warning: data.row_shuffle_window={settings.row_shuffle_window} rows ({window_tokens:,} tokens) '
          f'holds fewer than {MIN_DOCUMENTS_PER_WINDOW} average documents of {name} ({worst_mean:,.0f} tokens): '
          f'batches follow its documents in order; --config.data.row_shuffle_window={wanted} mixes them '
          '(the window is held in memory)')


NO_TARGET = -1  # the target of a document's last token: nothing of its own document follows


class _Decode(grain.transforms.Map):
  """Record bytes -> token ids, each token's target, and the source's index per token.

  The target (the next token of the same document) is a feature of its own, so
  the packers cut it at the same places as the tokens: a row's last token keeps
  the target that lies in the next row. Computing targets after packing, from
  the row alone, would leave the last token of every row untrained.
  """

  def __init__(self, dtype: str, source_index: int):
    self.dtype, self.source_index = dtype, source_index

  def map(self, record: bytes) -> dict:
    tokens = shards.decode_record(record, self.dtype)
    targets = np.full_like(tokens, NO_TARGET)
    targets[:-1] = tokens[1:]
    return {'tokens': tokens, 'targets': targets,
            'source': np.full(len(tokens), self.source_index, np.int32)}


class _SplitLongDocuments(grain_exp.FlatMapTransform):
  """First-fit packing needs every piece to fit in a row: cut documents into seq_len pieces.

  Every feature is cut alike, so a piece's last token keeps its target, the
  first token of the next piece: cutting loses no training target.
  """

  def __init__(self, seq_len: int, max_document_tokens: int):
    self.seq_len = seq_len
    self.max_fan_out = max(1, -(-max_document_tokens // seq_len))

  def flat_map(self, element: dict):
    length = len(element['tokens'])
    return [{k: v[i:i + self.seq_len] for k, v in element.items()}
            for i in range(0, max(length, 1), self.seq_len)]


class _ToModelBatch(grain.transforms.Map):
  """Packed rows -> the train step's batch, plus tokens per source (host-side, for logs)."""

  def __init__(self, num_sources: int):
    self.num_sources = num_sources

  def map(self, packed: dict) -> dict:
    return model_batch(packed, self.num_sources)


def model_batch(packed: dict, num_sources: int) -> dict:
  tokens = packed['tokens']
  segment_ids = packed['tokens_segment_ids']
  # Padding has segment 0 (and target 0); a document's last token has NO_TARGET.
  loss_mask = (segment_ids > 0) & (packed['targets'] != NO_TARGET)
  targets = np.where(loss_mask, packed['targets'], 0)  # masked slots still need a valid id
  counts = np.bincount(packed['source'][segment_ids > 0], minlength=num_sources)
  return {
      'inputs': tokens.astype(np.int32),
      'targets': targets.astype(np.int32),
      'segment_ids': segment_ids.astype(np.int32),
      'positions': packed['tokens_positions'].astype(np.int32),
      'loss_mask': loss_mask.astype(np.int32),
      'source_tokens': counts.astype(np.int64),
  }


def pack_documents(documents: grain.IterDataset, datasets: list[Dataset],
                   settings: 'LoaderSettings') -> grain.IterDataset:
  """Documents -> rows of seq_len with `tokens`, `tokens_segment_ids`, `tokens_positions`."""
  lengths = {'tokens': settings.seq_len, 'targets': settings.seq_len, 'source': settings.seq_len}
  if settings.packing == 'concat':
    # Documents run on into the next row; bos_aligned restarts each continued
    # piece with BOS in `tokens` only: the token at the cut is lost as an
    # input, but `targets` keeps it, so it is still trained as the target of
    # the previous row's last token.
    bos = {}
    if settings.bos_aligned:
      bos = dict(bos_handling=grain_exp.BOSHandling.REPLACE_FIRST_TOKEN_WITH_BOS,
                 bos_features=('tokens',), bos_token_id=datasets[0].meta['bos_id'])
    return grain_exp.ConcatThenSplitIterDataset(documents, length_struct=lengths, **bos)
  longest = max(d.split('train')['max_document_tokens'] for d in datasets)
  documents = grain_exp.FlatMapIterDataset(documents, _SplitLongDocuments(settings.seq_len, longest))
  # Bins fill in parallel: as many as rows per batch keeps padding low without
  # holding more than a batch of documents back.
  return grain_exp.FirstFitPackIterDataset(
      documents, length_struct=lengths, num_packing_bins=settings.batch_size, seed=settings.seed,
      shuffle_bins=settings.shuffle)


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
  seq_len: int
  batch_size: int  # rows per step delivered by this process
  packing: str = 'concat'
  bos_aligned: bool = False
  mixing: str = 'weighted'
  shuffle: bool = True
  row_shuffle_window: int = 1024  # packed rows shuffled within windows of this many
  seed: int = 0
  worker_count: int = 0  # Grain worker processes; 0 packs in a thread of the training process
  worker_buffer_size: int = 2  # batches made ahead, per worker (or by the thread)
  read_threads: int = 4


def process_documents(dataset: Dataset, source_index: int, settings: LoaderSettings,
                      shard_index: int = 0, num_shards: int = 1) -> grain.MapDataset:
  """One epoch of a loader shard's share of a source's training documents, decoded."""
  records = dataset.records('train')
  if len(records) < num_shards:
    raise DataError(f'{dataset.folder} has {len(records)} training documents, fewer than the '
                    f'{num_shards} loader shards that share it')
  if settings.shuffle:
    records = records.seed(settings.seed + 7919 * source_index).shuffle()
  # Slicing after the shuffle: the shards split one global permutation,
  # disjoint and covering; a later repeat() reseeds the shuffle every epoch.
  records = records[shard_index::num_shards]
  return records.map(_Decode(dataset.meta['token_dtype'], source_index))


def train_loader(datasets: list[Dataset], settings: LoaderSettings, shard_index: int = 0,
                 num_shards: int = 1) -> grain.IterDataset:
  """The training stream of one loader shard: an endless IterDataset of batches."""
  sources = [process_documents(d, i, settings, shard_index, num_shards).repeat()
             for i, d in enumerate(datasets)]
  documents = sources[0]
  if len(sources) > 1:
    documents = grain.MapDataset.mix(sources, document_rates(datasets, settings.mixing))
  documents = documents.to_iter_dataset(grain.ReadOptions(num_threads=settings.read_threads,
                                                          prefetch_buffer_size=256))
  packed = pack_documents(documents, datasets, settings)
  if settings.shuffle and settings.row_shuffle_window > 1:
    # A long document fills many consecutive rows; without this a whole batch
    # can come from one document. Restoring replays at most one window.
    packed = grain_exp.WindowShuffleIterDataset(packed, window_size=settings.row_shuffle_window,
                                                seed=settings.seed + 1)
  batches = packed.batch(settings.batch_size, drop_remainder=True).map(_ToModelBatch(len(datasets)))
  if settings.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; scripts may not parse any
      flags.FLAGS.mark_as_parsed()
    return batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=settings.worker_count, per_worker_buffer_size=settings.worker_buffer_size))
  # A background thread packs the next batches while the training thread
  # dispatches steps; its state is that of the batches handed out, not made.
  return grain_exp.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=settings.worker_buffer_size)


class ShardedLoader:
  """Batches made of this process's loader shards, their rows concatenated in shard order.

  Shard l reads documents [l::num_shards] of the global shuffle and packs its
  own rows into rows [l * rows_per_shard, (l + 1) * rows_per_shard) of every
  global batch. The batches therefore depend on num_shards alone, not on how
  many processes run the shards, and the saved state (one entry per shard)
  restores on any process count that divides the shards.
  """

  def __init__(self, datasets: list[Dataset], settings: LoaderSettings, shard_indices: list[int],
               num_shards: int):
    # settings.batch_size is the rows of one shard.
    self.num_shards = num_shards
    self.iterators = {shard: iter(train_loader(datasets, settings, shard, num_shards))
                      for shard in shard_indices}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(iterator) for iterator in self.iterators.values()]
    if len(parts) == 1:
      return parts[0]
    batch = {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if name != 'source_tokens'}
    batch['source_tokens'] = np.sum([p['source_tokens'] for p in parts], axis=0)
    return batch

  def get_state(self) -> dict:
    return {'num_shards': self.num_shards,
            'shards': {str(shard): it.get_state() for shard, it in self.iterators.items()}}

  @staticmethod
  def state_fits(state: dict | None, shard_indices: list[int], num_shards: int) -> bool:
    """Whether `state` (the merged states of all processes) covers these shards of num_shards."""
    return (state is not None and state.get('num_shards') == num_shards
            and all(str(shard) in state['shards'] for shard in shard_indices))

  def set_state(self, state: dict):
    for shard, iterator in self.iterators.items():
      iterator.set_state(state_from_json(state['shards'][str(shard)]))


def validation_batches(datasets: list[Dataset], settings: LoaderSettings, num_batches: int) -> list[dict]:
  """A fixed set of global batches: the validation splits in order, unshuffled, packed alike."""
  return list(itertools.islice(iter_validation_batches(datasets, settings), num_batches))


def iter_validation_batches(datasets: list[Dataset], settings: LoaderSettings, *,
                            drop_remainder: bool = True) -> Iterator[dict]:
  """Every batch of the validation splits, in order; the last may have fewer
  rows unless drop_remainder. Nothing is read before the first batch is asked for."""
  parts = [d.records('validation').map(_Decode(d.meta['token_dtype'], i))
           for i, d in enumerate(datasets) if d.split('validation')['documents']]
  if not parts:
    return
  documents = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
  packed = pack_documents(documents.to_iter_dataset(), datasets,
                          dataclasses.replace(settings, shuffle=False, seed=0))
  batches = packed.batch(settings.batch_size, drop_remainder=drop_remainder)
  for batch in batches.map(_ToModelBatch(len(datasets))):
    del batch['source_tokens']
    yield batch


def state_from_json(value, in_slices: bool = False):
  """A loader state read back from JSON, with the tuples JSON turned into lists restored.

  Grain's concat packer tests its `remainder_slices` against the tuple (-1, -1);
  a list never equals it, and the restored packer would read one element too many.
  """
  if isinstance(value, dict):
    return {k: state_from_json(v, in_slices or k == 'remainder_slices') for k, v in value.items()}
  if isinstance(value, list):
    items = [state_from_json(v, in_slices) for v in value]
    return tuple(items) if in_slices else items
  return value
