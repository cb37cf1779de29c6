"""prepare: documents -> tokenized ArrayRecord shards (train, validation) + metadata.json.

The reader streams documents, workers tokenize chunks of them in order, and
this process writes each document as one record, so the output is the same
for any number of workers. A document goes to validation by a rule that needs
no look at the rest of the corpus (see `split_rule`).
"""
import collections
import contextlib
import os
import shutil
import sys
from typing import Iterable, Iterator

from data_prep.output_dir import staged_folder
from data_prep.progress import Progress
from data_prep.readers import Corpus, open_corpus
from data_prep.tokenize_workers import EncodeSpec, encode_chunks
from maxlite.data import shards
from maxlite.data.tokenizers import load_tokenizer

SPLITS = ('train', 'validation')
DEFAULT_VAL_FRACTION = 0.005
# A chunk is what one worker task tokenizes: large enough to amortise the pickling,
# small enough that 2 x workers of them in flight stay a few MB.
_CHUNK_CHARS = 1 << 18
_CHUNK_DOCUMENTS = 1024


def prepare(inputs, output, *, tokenizer: str = 'byte', tokenizer_file=None, bos_token: str = '',
            eos_token: str = '', add_bos: bool = True, add_eos: bool = True,
            val_fraction: float | None = None, val_documents: int | None = None,
            max_tokens: int | None = None, docs_per_shard: int = 100_000, workers: int | None = None,
            overwrite: bool = False, show_progress: bool = True, command: list[str] | None = None,
            **read_options) -> dict:
  """Tokenizes `inputs` into the dataset folder `output`; returns what it wrote to metadata.json.

  read_options go to `readers.open_corpus` (format, text_column, template, split_by, split, errors,
  tfds_data_dir, hf_builder).
  """
  val_fraction, val_documents = _split_rule(val_fraction, val_documents)
  if docs_per_shard < 1:
    raise ValueError(f'docs_per_shard={docs_per_shard} must be at least 1')
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f'max_tokens={max_tokens} must be at least 1')
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers < 1:
    raise ValueError(f'workers={workers} must be at least 1')
  special_tokens = {'bos_token': bos_token, 'eos_token': eos_token}
  if tokenizer != 'hf' and (bos_token or eos_token):
    raise ValueError('bos_token/eos_token name tokens of an hf tokenizer.json; '
                     f'the {tokenizer} tokenizer has fixed ones')
  tok = load_tokenizer(tokenizer, tokenizer_file, **(special_tokens if tokenizer == 'hf' else {}))
  for special, wanted, token_id in (('bos', add_bos, tok.bos_id), ('eos', add_eos, tok.eos_id)):
    if wanted and token_id < 0:
      hint = f' or name one with --{special}_token' if tokenizer == 'hf' else ''
      raise ValueError(f'tokenizer {tok.path} has no {special.upper()} token: pass --no_add_{special}{hint}')
  corpus = open_corpus(inputs, **read_options)
  dtype = shards.token_dtype(tok.vocab_size)

  with staged_folder(output, overwrite) as folder:
    shipped = None
    if tok.path is not None:  # the dataset carries its tokenizer, so it is self-contained
      shipped = folder / tok.path.name
      shutil.copyfile(tok.path, shipped)
    spec = EncodeSpec(tokenizer, shipped and str(shipped), special_tokens, add_bos, add_eos, dtype)
    splits, stats = _write_splits(corpus, spec, folder, val_fraction=val_fraction,
                                  val_documents=val_documents, max_tokens=max_tokens,
                                  docs_per_shard=docs_per_shard, workers=workers,
                                  show_progress=show_progress)
    metadata = shards.write_metadata(
        folder, tok, add_bos=add_bos, add_eos=add_eos, splits=splits, source=corpus.source,
        command=list(sys.argv if command is None else command),
        split_rule={'val_fraction': val_fraction, 'val_documents': val_documents},
        max_tokens=max_tokens, stopped_at_max_tokens=stats['stopped_at_max_tokens'],
        docs_per_shard=docs_per_shard, skipped=stats['skipped'])
  return metadata


def _split_rule(val_fraction, val_documents) -> tuple[float | None, int | None]:
  """Validation holds the first `val_documents` documents, or else each document whose text hashes
  below `val_fraction` (default 0.005); if that picks none, the last document, when there are 2+."""
  if val_fraction is not None and val_documents is not None:
    raise ValueError('give val_fraction or val_documents, not both')
  if val_documents is not None:
    if val_documents < 0:
      raise ValueError(f'val_documents={val_documents} must be at least 0')
    return None, val_documents
  val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
  if not 0 <= val_fraction < 1:
    raise ValueError(f'val_fraction={val_fraction} must be in [0, 1)')
  return val_fraction, None


def _write_splits(corpus: Corpus, spec: EncodeSpec, folder, *, val_fraction, val_documents, max_tokens,
                  docs_per_shard, workers, show_progress) -> tuple[dict, dict]:
  writers = {name: shards.ShardWriter(folder, name, spec.dtype, docs_per_shard) for name in SPLITS}
  skipped = collections.Counter(empty_documents=0, no_tokens=0)
  progress = Progress(corpus.total, max_tokens, show_progress)
  # One document of look-ahead: only at the end is it known whether validation got any.
  held, index, tokens, stopped = None, 0, 0, False
  chunks = _chunks(corpus.documents, skipped)
  try:
    with contextlib.closing(encode_chunks(chunks, spec, workers)) as encoded:
      for chunk in encoded:
        for ids, point in zip(chunk.documents(), chunk.hash_points):
          if not len(ids):  # e.g. an HF tokenizer without UNK that drops every character
            skipped['no_tokens'] += 1
            continue
          held_out = index < val_documents if val_documents is not None else point < val_fraction
          if held is not None:
            writers[held[1]].write(held[0])
          held = ids, 'validation' if held_out else 'train'
          index, tokens = index + 1, tokens + len(ids)
          if max_tokens and tokens >= max_tokens:
            stopped = True
            break
        progress.update(len(chunk.lengths), int(chunk.lengths.sum()))
        if stopped:
          break
  finally:
    progress.close()
  if held is not None:
    ids, name = held
    if (name == 'train' and val_fraction and not writers['validation'].documents
        and writers['train'].documents):
      name = 'validation'
    writers[name].write(ids)
  splits = {name: writer.close() for name, writer in writers.items()}
  if index == 0:
    raise ValueError(f'empty dataset: {", ".join(corpus.source["inputs"])} gave no non-empty document '
                     f'(skipped {skipped["empty_documents"]} empty, {skipped["no_tokens"]} without tokens)')
  if not splits['train']['documents']:
    raise ValueError(f'val_documents={val_documents} leaves no training document (the corpus has {index})')
  return splits, {'skipped': dict(skipped), 'stopped_at_max_tokens': stopped}


def _chunks(documents: Iterable[str], skipped: collections.Counter) -> Iterator[list[str]]:
  """Groups non-empty documents for the workers; counts (and drops) empty ones."""
  chunk, chars = [], 0
  for text in documents:
    if not text or text.isspace():
      skipped['empty_documents'] += 1
      continue
    chunk.append(text)
    chars += len(text)
    if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCUMENTS:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk
