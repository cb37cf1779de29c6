"""Input formats -> a stream of document texts, in a deterministic order.

Files (text, JSON lines, JSON, Parquet) are read here; library-backed datasets
(Hugging Face `datasets`, TFDS) live in `dataset_readers`. Everything streams:
a document is the largest thing held in memory, except a JSON-array file,
which the standard library can only parse whole.
"""
import dataclasses
import glob
import json
import os
import pathlib
from typing import Iterable, Iterator

from data_prep.records import RecordFormatter, decode_utf8

FORMATS = ('auto', 'text', 'jsonl', 'json', 'parquet', 'hf', 'hf_disk', 'tfds')
DATASET_FORMATS = ('hf', 'hf_disk', 'tfds')
SPLIT_BY = ('file', 'line', 'paragraph')
ERRORS = ('strict', 'replace')
# --format auto picks by extension; anything else is plain text.
_FORMAT_OF_EXTENSION = {'.jsonl': 'jsonl', '.ndjson': 'jsonl', '.json': 'json', '.parquet': 'parquet'}


@dataclasses.dataclass
class Corpus:
  documents: Iterator[str]
  total: int | None  # number of documents when the source knows it without reading them (for the ETA)
  source: dict       # how the documents were read, for metadata.json


def open_corpus(inputs, format: str = 'auto', *, text_column: str = 'text', template: str | None = None,
                split_by: str = 'file', split: str = 'train', errors: str = 'strict',
                tfds_data_dir: str | None = None, hf_builder: str | None = None) -> Corpus:
  """inputs: paths, globs or folders (a dataset name for tfds). Nothing is read until iterated,
  except what validation needs (file lists, schemas, dataset handles)."""
  inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
  for field, value, choices in (('format', format, FORMATS), ('split_by', split_by, SPLIT_BY),
                                ('errors', errors, ERRORS)):
    if value not in choices:
      raise ValueError(f'{field}={value!r} is not one of {choices}')
  if not inputs:
    raise ValueError('no input given')
  formatter = RecordFormatter(text_column, template, errors)
  if format == 'auto' and len(inputs) == 1 and _is_saved_hf_dataset(inputs[0]):
    format = 'hf_disk'
  if format in DATASET_FORMATS:
    from data_prep import dataset_readers  # imports `datasets` / TFDS only when asked for
    documents, total = dataset_readers.open_dataset(format, inputs, formatter, split=split,
                                                    tfds_data_dir=tfds_data_dir, hf_builder=hf_builder)
    resolved = format
  else:
    files = expand_inputs(inputs)
    formats = [_FORMAT_OF_EXTENSION.get(f.suffix.lower(), 'text') if format == 'auto' else format
               for f in files]
    counts = [_count_documents(f, fmt, split_by) for f, fmt in zip(files, formats)]
    total = None if None in counts else sum(counts)
    documents = _file_documents(files, formats, formatter, split_by, errors)
    resolved = ','.join(sorted(set(formats)))
  source = {'inputs': inputs, 'format': resolved, 'split_by': split_by if 'text' in resolved else None,
            'text_column': None if template or resolved == 'text' else text_column,
            'template': template, 'split': split if format in DATASET_FORMATS else None,
            'tfds_data_dir': tfds_data_dir, 'errors': errors}
  return Corpus(documents, total, source)


def read_documents(inputs, format: str = 'auto', **options) -> Iterator[str]:
  """The documents of `inputs` as strings; options as for `open_corpus`."""
  return open_corpus(inputs, format, **options).documents


def expand_inputs(inputs: Iterable[str]) -> list[pathlib.Path]:
  """Files named, matched by a glob, or found under a folder (recursively, sorted, hidden ones skipped)."""
  files = []
  for item in inputs:
    path = pathlib.Path(item).expanduser()
    if path.is_file():
      files.append(path)
    elif path.is_dir():
      found = _files_under(path)
      if not found:
        raise FileNotFoundError(f'input folder {path} holds no files')
      files += found
    elif any(c in item for c in '*?['):
      found = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True))
      found = [p for p in found if p.is_file()]
      if not found:
        raise FileNotFoundError(f'no file matches the input {item}')
      files += found
    elif path.exists():
      raise ValueError(f'input {item} is neither a file nor a folder')
    else:
      raise FileNotFoundError(f'input {item} does not exist')
  return files


def _files_under(folder: pathlib.Path) -> list[pathlib.Path]:
  files = []
  for parent, subfolders, names in os.walk(folder):
    subfolders[:] = [d for d in subfolders if not d.startswith('.')]
    files += [pathlib.Path(parent, n) for n in names if not n.startswith('.')]
  # Sorting by the relative path makes the order independent of the file system.
  return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _is_saved_hf_dataset(item: str) -> bool:
  path = pathlib.Path(item)
  return (path / 'dataset_dict.json').is_file() or (path / 'state.json').is_file()


def _count_documents(path: pathlib.Path, format: str, split_by: str) -> int | None:
  if format == 'text' and split_by == 'file':
    return 1
  if format == 'parquet':
    return _parquet_file(path).metadata.num_rows
  return None  # lines and JSON records are only known by reading the file


def _file_documents(files, formats, formatter: RecordFormatter, split_by: str, errors: str) -> Iterator[str]:
  for path, format in zip(files, formats):
    if format == 'text':
      yield from _text_documents(path, split_by, errors)
    elif format == 'parquet':
      yield from _parquet_documents(path, formatter)
    else:
      for record, where in _json_records(path, format, errors):
        yield formatter(record, where)


def _text_documents(path: pathlib.Path, split_by: str, errors: str) -> Iterator[str]:
  """The file whole, each non-blank line, or each blank-line separated paragraph, verbatim
  (line endings inside a paragraph kept as written, the one after it dropped)."""
  if split_by == 'file':
    yield decode_utf8(path.read_bytes(), path, 0, errors)
    return
  paragraph = []
  for line in _lines(path, errors):
    if line.strip():
      if split_by == 'line':
        yield _without_line_ending(line)
      else:
        paragraph.append(line)
    elif paragraph:
      yield _without_line_ending(''.join(paragraph))
      paragraph = []
  if paragraph:
    yield _without_line_ending(''.join(paragraph))


def _lines(path: pathlib.Path, errors: str) -> Iterator[str]:
  """Lines with their line endings; read as bytes so a decoding error knows its file offset."""
  offset = 0
  with open(path, 'rb') as f:
    for raw in f:
      yield decode_utf8(raw, path, offset, errors)
      offset += len(raw)


def _without_line_ending(line: str) -> str:
  if line.endswith('\n'):
    return line[:-2] if line.endswith('\r\n') else line[:-1]
  return line


def _json_records(path: pathlib.Path, format: str, errors: str) -> Iterator[tuple[dict, str]]:
  """(record, where) from JSON lines, or from a JSON array of objects (`.json` may be either)."""
  if format == 'json' and _first_byte(path) == b'[':
    try:
      records = json.loads(decode_utf8(path.read_bytes(), path, 0, errors))
    except json.JSONDecodeError as error:
      raise ValueError(f'{path} is not valid JSON: {error.msg} at line {error.lineno}') from None
    numbered = ((record, f'{path} item {i}') for i, record in enumerate(records))
  else:
    numbered = ((_parse_json_line(line, path, number), f'{path} line {number}')
                for number, line in enumerate(_lines(path, errors), 1) if line.strip())
  for record, where in numbered:
    if not isinstance(record, dict):
      raise ValueError(f'{where} is a JSON {type(record).__name__}, expected an object with a text field')
    yield record, where


def _parse_json_line(line: str, path, number: int):
  try:
    return json.loads(line)
  except json.JSONDecodeError as error:
    raise ValueError(f'{path} line {number} is not valid JSON: {error.msg} at column {error.colno}') from None


def _first_byte(path: pathlib.Path) -> bytes:
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 16), b''):
      block = block.lstrip()
      if block:
        return block[:1]
  return b''


def _parquet_file(path: pathlib.Path):
  import pyarrow
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(path)
  except pyarrow.ArrowException as error:
    raise ValueError(f'{path} is not a Parquet file: {error}') from None


def _parquet_documents(path: pathlib.Path, formatter: RecordFormatter) -> Iterator[str]:
  parquet = _parquet_file(path)
  formatter.check_columns(parquet.schema_arrow.names, path)
  # Record batches keep memory bounded by the batch, not the file.
  for batch in parquet.iter_batches(batch_size=1024, columns=list(formatter.columns)):
    for record in batch.to_pylist():
      yield formatter(record, path)
