"""The on-disk format of a prepared dataset, shared by data_prep (writer) and the trainer (reader).

    <dataset>/metadata.json                  what is below, and how it was made
    <dataset>/<tokenizer file>               SentencePiece .model or tokenizer.json (absent for bytes)
    <dataset>/<split>-NNNNN.array_record     one record per document

A record is a document's token ids, BOS/EOS included as metadata says, as raw
little-endian uint16 (vocab <= 65536) or uint32. ArrayRecord files are written
with group_size 1, so any document is one seek away: the Grain source shuffles
globally by index without reading neighbours.

Each split of metadata.json lists its shards and, in datasets prepared since
they were recorded, each shard's documents and bytes, so that `check_shards`
finds a missing, truncated or replaced shard at start-up instead of mid-run.
"""
import datetime
import json
import os
import pathlib

import numpy as np
from array_record.python import array_record_module

FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
# One record per chunk: random access reads exactly the document asked for.
WRITER_OPTIONS = 'group_size:1'


def token_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 1 << 16 else 'uint32'


def encode_record(ids: np.ndarray, dtype: str) -> bytes:
  return np.asarray(ids).astype(np.dtype(dtype).newbyteorder('<'), copy=False).tobytes()


def decode_record(record: bytes, dtype: str) -> np.ndarray:
  return np.frombuffer(record, np.dtype(dtype).newbyteorder('<')).astype(np.int32)


class ShardWriter:
  """Writes one split's documents, starting a new shard every `docs_per_shard` documents."""

  def __init__(self, folder, split: str, dtype: str, docs_per_shard: int = 100_000):
    self.folder, self.split, self.dtype = pathlib.Path(folder), split, dtype
    self.docs_per_shard = docs_per_shard
    self.shards: list[str] = []
    self.shard_documents: list[int] = []
    self.shard_bytes: list[int] = []
    self.documents = self.tokens = self.max_document_tokens = 0
    self._writer = None
    self._in_shard = 0

  def write(self, ids: np.ndarray):
    if self._writer is None or self._in_shard == self.docs_per_shard:
      self._close_shard()
      name = f'{self.split}-{len(self.shards):05d}.array_record'
      self._writer = array_record_module.ArrayRecordWriter(str(self.folder / name), WRITER_OPTIONS)
      self.shards.append(name)
    self._writer.write(encode_record(ids, self.dtype))
    self._in_shard += 1
    self.documents += 1
    self.tokens += len(ids)
    self.max_document_tokens = max(self.max_document_tokens, len(ids))

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
      self.shard_documents.append(self._in_shard)
      self.shard_bytes.append(os.path.getsize(self.folder / self.shards[-1]))
    self._writer, self._in_shard = None, 0

  def close(self) -> dict:
    """Finishes the last shard; returns this split's entry for metadata.json."""
    self._close_shard()
    return {'documents': self.documents, 'tokens': self.tokens,
            'max_document_tokens': self.max_document_tokens, 'shards': self.shards,
            'shard_documents': self.shard_documents, 'shard_bytes': self.shard_bytes}


def write_metadata(folder, tokenizer, *, add_bos: bool, add_eos: bool, splits: dict, source: dict,
                   command: list[str], **extra) -> dict:
  """Writes <folder>/metadata.json, the one description of a prepared dataset; returns it."""
  meta = {
      'format_version': FORMAT_VERSION,
      'tokenizer': tokenizer.describe(),
      'vocab_size': tokenizer.vocab_size,
      'bos_id': tokenizer.bos_id,
      'eos_id': tokenizer.eos_id,
      'pad_id': tokenizer.pad_id,
      'add_bos': add_bos,
      'add_eos': add_eos,
      'token_dtype': token_dtype(tokenizer.vocab_size),
      'splits': splits,
      **extra,
      'source': source,
      'command': command,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  (pathlib.Path(folder) / METADATA_FILE).write_text(json.dumps(meta, indent=2) + '\n')
  return meta


def read_metadata(folder) -> dict:
  """metadata.json of a prepared dataset, checked enough that later errors cannot be cryptic."""
  path = pathlib.Path(folder) / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: prepare the dataset with '
                            '`python -m data_prep prepare ...` first')
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{path} is not valid JSON: {error}') from None
  if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path} has format_version {meta.get("format_version") if isinstance(meta, dict) else None}, '
                     f'expected {FORMAT_VERSION}')
  for key in ('tokenizer', 'token_dtype', 'splits'):
    if key not in meta:
      raise ValueError(f'{path} lacks the field {key!r}')
  return meta


def shard_paths(folder, meta: dict, split: str) -> list[str]:
  folder = pathlib.Path(folder)
  if split not in meta['splits']:
    raise ValueError(f'{folder / METADATA_FILE} has no split {split!r} (it has {sorted(meta["splits"])})')
  paths = [folder / name for name in meta['splits'][split]['shards']]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f'shard {missing[0]} listed in {folder / METADATA_FILE} is missing')
  return [str(p) for p in paths]


def check_shards(folder, meta: dict, split: str):
  """Raises naming the first shard of `split` that is missing, truncated or replaced.

  Cheap enough for every start-up: a stat of each shard, and an ArrayRecord
  reader opened on it, which reads the footer (the record count and index),
  not the records. Sizes and counts are compared with those metadata.json
  recorded when each shard was written; a dataset prepared before they were
  recorded is checked for readable shards whose counts add up to the split's.
  """
  meta_path = pathlib.Path(folder) / METADATA_FILE
  entry = meta['splits'][split]
  paths = shard_paths(folder, meta, split)
  sizes, counts = entry.get('shard_bytes'), entry.get('shard_documents')
  if any(listed is not None and len(listed) != len(paths) for listed in (sizes, counts)):
    raise ValueError(f'{meta_path}: split {split!r} lists {len(paths)} shards but not as many sizes and counts')
  total = 0
  for index, path in enumerate(paths):
    size = os.path.getsize(path)
    if sizes is not None and size != sizes[index]:
      raise ValueError(f'shard {path} has {size:,} bytes, but {meta_path} records {sizes[index]:,}: '
                       'it was truncated or replaced; prepare the dataset again')
    count = record_count(path)
    if counts is not None and count != counts[index]:
      raise ValueError(f'shard {path} holds {count:,} documents, but {meta_path} records '
                       f'{counts[index]:,}; prepare the dataset again')
    total += count
  if total != entry['documents']:
    raise ValueError(f'the {split} shards of {meta_path} hold {total:,} documents, but it records '
                     f'{entry["documents"]:,}; prepare the dataset again')


def record_count(path) -> int:
  """The records of an ArrayRecord file, from its footer; raises ValueError naming an unreadable file."""
  reader = array_record_module.ArrayRecordReader(str(path), 'readahead_buffer_size:0')
  count = reader.num_records() if reader.ok() else None
  try:
    reader.close()  # the reader of a damaged file raises its reason here
  except RuntimeError as error:
    reason = ' '.join(str(error).split())
    raise ValueError(f'shard {path} is truncated or damaged ({reason}); prepare the dataset again') from None
  if count is None:
    raise ValueError(f'shard {path} is truncated or damaged; prepare the dataset again')
  return count
