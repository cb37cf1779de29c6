"""inspect: a prepared dataset's metadata in words, and a few of its documents decoded."""
import json
from typing import Iterator

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from maxlite.data import shards
from maxlite.data.tokenizers import from_description


def read_split(folder, split: str = 'train') -> Iterator[np.ndarray]:
  """Each document of `split` as int32 ids (BOS/EOS included as the metadata says)."""
  meta = shards.read_metadata(folder)
  paths = shards.shard_paths(folder, meta, split)
  if not paths:
    return
  source = ArrayRecordDataSource(paths)
  for index in range(len(source)):
    yield shards.decode_record(source[index], meta['token_dtype'])


def describe_dataset(folder, split: str = 'train', num_documents: int = 3, max_chars: int = 500) -> str:
  """The report `python -m data_prep inspect` prints."""
  meta = shards.read_metadata(folder)
  tokenizer = from_description(meta['tokenizer'], folder)
  desc = meta['tokenizer']
  shipped = f' ({desc["file"]}, sha256 {desc["sha256"][:12]})' if desc['file'] else ''
  lines = [f'dataset      {folder}',
           f'tokenizer    {desc["kind"]}{shipped}',
           f'vocab        {meta["vocab_size"]} ids as {meta["token_dtype"]}',
           f'specials     bos {meta["bos_id"]} (added: {meta["add_bos"]}), eos {meta["eos_id"]} '
           f'(added: {meta["add_eos"]}), pad {meta.get("pad_id")}']
  for name, entry in meta['splits'].items():
    mean = entry['tokens'] / entry['documents'] if entry['documents'] else 0
    lines.append(f'{name:<12} {entry["documents"]:,} documents, {entry["tokens"]:,} tokens '
                 f'(mean {mean:,.1f}, max {entry["max_document_tokens"]:,}) in {len(entry["shards"])} shards')
  if meta.get('skipped'):
    lines.append(f'skipped      {", ".join(f"{v:,} {k}" for k, v in meta["skipped"].items())}')
  if meta.get('stopped_at_max_tokens'):
    lines.append(f'stopped      at max_tokens={meta["max_tokens"]:,}')
  source = {k: v for k, v in meta.get('source', {}).items() if v is not None}
  lines.append(f'source       {json.dumps(source)}')
  lines.append(f'command      {" ".join(meta.get("command", []))}')
  lines.append(f'created      {meta.get("created")}')
  for index, ids in enumerate(read_split(folder, split)):
    if index == num_documents:
      break
    text = tokenizer.decode(ids)
    cut = f' ... [{len(text) - max_chars:,} more chars]' if len(text) > max_chars else ''
    lines += ['', f'--- {split} document {index}: {len(ids):,} tokens, first ids {ids[:8].tolist()} ---',
              text[:max_chars] + cut]
  return '\n'.join(lines)
