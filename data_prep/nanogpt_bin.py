"""prepare --format nanogpt_bin: pre-tokenized .bin files -> a maxlite dataset, no detokenizing.

Three layouts, told apart by the first int32 of each file:
- nanoGPT (data/*/prepare.py): raw little-endian uint16 ids, no header; each
  document is followed by the end-of-text id. train.bin / val.bin.
- modded-nanogpt / llm.c (fineweb_{train,val}_NNNNNN.bin): 256 int32 header,
  [0] = 20240520, [1] = 1, [2] = token count, then uint16 ids; each document
  is preceded by the end-of-text id.
- NeMo Automodel's nanogpt_data_processor (dataset.bin, beside dataset.bos.idx):
  256 int32 header, [0] = 278895051, [1] = 1, [2] = token count, [3] = bytes
  per token (2 or 4); each document is preceded by BOS.

Documents are split at the separator id (--eot_id; default the tokenizer's
EOS for nanoGPT files, BOS for the other two, or 50256, GPT-2's
<|endoftext|>). Each record keeps its separator where the file has it (after
the document for nanoGPT, before it otherwise), so the records joined give
back the file's tokens; metadata.json says so with add_eos / add_bos.

Files are read in blocks of _BLOCK tokens: memory is bounded by the block
and the longest document, whatever the file size.
A file whose name contains 'val' goes to validation; without such files,
documents are held out by --val_fraction (a hash of their ids) or
--val_documents, as for text.
"""
import hashlib
import pathlib
import sys
from typing import Iterator

import numpy as np

from data_prep.output_dir import staged_folder
from data_prep.prepare import SPLITS, _split_rule
from data_prep.readers import expand_inputs
from maxlite.data import shards
from maxlite.data.tokenizers import IdsTokenizer, load_tokenizer

HEADER_INTS = 256
MODDED_MAGIC, NEMO_MAGIC = 20240520, 278895051
GPT2_EOT = 50256
_BLOCK = 1 << 22  # tokens read at a time (8 MiB of uint16, 32 MiB as int64)


class TokenFile:
  """The tokens of a file, read a slice at a time with plain reads: unlike a
  memory map, nothing read stays resident (a map's touched pages count in the
  process's memory until the kernel reclaims them)."""

  def __init__(self, path: pathlib.Path, dtype: str, offset: int, count: int):
    self.path, self.dtype, self.offset, self.count = path, np.dtype(dtype), offset, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, _ = index.indices(self.count)
    return np.fromfile(self.path, self.dtype, count=max(0, stop - start),
                       offset=self.offset + start * self.dtype.itemsize)


def open_bin(path: pathlib.Path) -> tuple[str, TokenFile]:
  """(layout, the file's tokens), header checked."""
  size = path.stat().st_size
  head = np.fromfile(path, '<i4', count=min(HEADER_INTS, size // 4))
  magic = int(head[0]) if len(head) else None
  if magic in (MODDED_MAGIC, NEMO_MAGIC):
    layout = 'modded-nanogpt' if magic == MODDED_MAGIC else 'nemo'
    if len(head) < HEADER_INTS:
      raise ValueError(f'{path}: a {layout} header is {HEADER_INTS * 4} bytes, the file has {size}')
    if head[1] != 1:
      raise ValueError(f'{path}: {layout} header version {head[1]}, expected 1')
    itemsize = 2 if layout == 'modded-nanogpt' else int(head[3])
    if itemsize not in (2, 4):
      raise ValueError(f'{path}: header says {itemsize} bytes per token, expected 2 or 4')
    body = size - HEADER_INTS * 4
    count = int(head[2])
    if body != count * itemsize:
      raise ValueError(f'{path}: the header says {count:,} tokens but the file holds '
                       f'{body / itemsize:,.1f} ({body:,} bytes after the header); it is truncated '
                       'or not a finished shard')
    dtype, offset = ('<u2' if itemsize == 2 else '<u4'), HEADER_INTS * 4
  else:
    if size % 2:
      raise ValueError(f'{path}: {size:,} bytes is not a whole number of uint16 tokens, and there '
                       f'is no modded-nanogpt ({MODDED_MAGIC}) or NeMo ({NEMO_MAGIC}) header')
    layout, dtype, offset, count = 'nanogpt', '<u2', 0, size // 2
  return layout, TokenFile(path, dtype, offset, count)


def documents(tokens: TokenFile, separator: int, separator_first: bool) -> Iterator[np.ndarray]:
  """The documents of a token stream, each with its separator (before it when
  separator_first, else after it): joined, they are the stream."""
  carry = np.zeros(0, np.int64)
  for start in range(0, len(tokens), _BLOCK):
    block = np.asarray(tokens[start:start + _BLOCK], np.int64)
    cuts = np.flatnonzero(block == separator)
    # Boundaries: a document begins at a separator (first) or just after one (last).
    bounds = cuts if separator_first else cuts + 1
    previous = 0
    for bound in bounds:
      piece = np.concatenate([carry, block[previous:bound]])
      carry = np.zeros(0, np.int64)
      if len(piece):
        yield piece
      previous = bound
    carry = np.concatenate([carry, block[previous:]])
  if len(carry):
    yield carry


def prepare_bin(inputs, output, *, tokenizer_file=None, vocab_size: int | None = None,
                eot_id: int | None = None, bos_token: str = '', eos_token: str = '',
                val_fraction: float | None = None, val_documents: int | None = None,
                max_tokens: int | None = None, docs_per_shard: int = 100_000,
                overwrite: bool = False, command: list[str] | None = None) -> dict:
  """Writes the dataset folder `output` from nanoGPT-style .bin files; returns its metadata."""
  val_fraction, val_documents = _split_rule(val_fraction, val_documents)
  files = [f for f in expand_inputs([str(i) for i in inputs]) if f.suffix == '.bin']
  if not files:
    raise ValueError(f'--input {" ".join(map(str, inputs))}: no .bin file found')
  opened = [(f, *open_bin(f)) for f in files]
  layouts = {layout for _, layout, _ in opened}
  if len(layouts) > 1:
    raise ValueError(f'the inputs mix layouts ({", ".join(sorted(layouts))}); prepare each alone')
  layout = layouts.pop()
  separator_first = layout != 'nanogpt'

  if tokenizer_file:
    kind = 'sentencepiece' if str(tokenizer_file).endswith('.model') else 'hf'
    special = {'bos_token': bos_token, 'eos_token': eos_token} if kind == 'hf' else {}
    tok = load_tokenizer(kind, tokenizer_file, **special)
    if vocab_size is not None and vocab_size != tok.vocab_size:
      raise ValueError(f'--vocab_size={vocab_size} differs from the {tok.vocab_size} of {tokenizer_file}')
    named = tok.bos_id if separator_first else tok.eos_id
    eot_id = named if eot_id is None else eot_id
    if eot_id < 0 or eot_id != named:
      which = 'BOS' if separator_first else 'EOS'
      raise ValueError(f'--eot_id={eot_id}: {layout} files separate documents with the {which} '
                       f'token, which is {named} in {tokenizer_file}; name it with '
                       f'--{which.lower()}_token')
  else:
    if not vocab_size:
      raise ValueError('--format nanogpt_bin needs --tokenizer_file (a tokenizer.json; required '
                       'to generate, evaluate or export) or --vocab_size')
    eot_id = GPT2_EOT if eot_id is None else eot_id
    if not 0 <= eot_id < vocab_size:
      raise ValueError(f'--eot_id={eot_id} is not in [0, --vocab_size={vocab_size})')
    tok = IdsTokenizer(vocab_size, bos_id=eot_id if separator_first else -1,
                       eos_id=-1 if separator_first else eot_id)
  dtype = shards.token_dtype(tok.vocab_size)
  by_name = any('val' in f.name for f, _, _ in opened)

  with staged_folder(output, overwrite) as folder:
    if tok.path is not None:
      (folder / tok.path.name).write_bytes(tok.path.read_bytes())
    writers = {name: shards.ShardWriter(folder, name, dtype, docs_per_shard) for name in SPLITS}
    index = total = 0
    stopped = False
    for path, _, tokens in opened:
      for start in range(0, len(tokens), _BLOCK):  # ids beyond the vocabulary: one line, naming the file
        top = int(np.max(tokens[start:start + _BLOCK]))
        if top >= tok.vocab_size:
          raise ValueError(f'{path} holds token id {top}, not below the vocabulary size '
                           f'{tok.vocab_size}')
      for ids in documents(tokens, eot_id, separator_first):
        if by_name:
          split = 'validation' if 'val' in path.name else 'train'
        elif val_documents is not None:
          split = 'validation' if index < val_documents else 'train'
        else:
          point = int.from_bytes(hashlib.blake2b(ids.astype('<u4').tobytes(), digest_size=8).digest(),
                                 'little') / 2**64
          split = 'validation' if point < val_fraction else 'train'
        writers[split].write(ids)
        index, total = index + 1, total + len(ids)
        if max_tokens and total >= max_tokens:
          stopped = True
          break
      if stopped:
        break
    splits = {name: writer.close() for name, writer in writers.items()}
    if not splits['train']['documents']:
      raise ValueError(f'{", ".join(map(str, files))}: no training document')
    return shards.write_metadata(
        folder, tok, add_bos=separator_first, add_eos=not separator_first, splits=splits,
        source={'inputs': [str(f) for f in files], 'format': 'nanogpt_bin', 'layout': layout,
                'eot_id': eot_id, 'split_by_file_name': by_name},
        command=list(sys.argv if command is None else command),
        split_rule={'val_fraction': val_fraction, 'val_documents': val_documents},
        max_tokens=max_tokens, stopped_at_max_tokens=stopped, docs_per_shard=docs_per_shard,
        skipped={'empty_documents': 0})
