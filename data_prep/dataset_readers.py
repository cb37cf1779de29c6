"""Library-backed inputs: Hugging Face `datasets` (local files or a saved dataset) and TFDS.

Both libraries are imported only here and only when asked for. Neither is ever
allowed to download: inputs must already be on disk.
"""
import os
import pathlib
from typing import Iterator

from data_prep.records import RecordFormatter

# `datasets` builder for data files of each extension (--format hf without --hf_builder).
_HF_BUILDER_OF_EXTENSION = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.csv': 'csv',
                            '.txt': 'text', '.arrow': 'arrow'}


def open_dataset(format: str, inputs: list[str], formatter: RecordFormatter, *, split: str,
                 tfds_data_dir: str | None, hf_builder: str | None) -> tuple[Iterator[str], int | None]:
  """(documents, number of documents or None) of an `hf`, `hf_disk` or `tfds` input."""
  if format == 'tfds':
    return _tfds(_single(inputs, format), formatter, split, tfds_data_dir)
  if format == 'hf_disk':
    return _hf_disk(_single(inputs, format), formatter, split)
  return _hf_files(inputs, formatter, split, hf_builder)


def _single(inputs: list[str], format: str) -> str:
  if len(inputs) != 1:
    raise ValueError(f'--format {format} takes exactly one input, got {len(inputs)}')
  return inputs[0]


def _import_datasets():
  # Offline before the first import: `datasets` reads these once, and must never reach the Hub.
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  try:
    import datasets
  except ImportError:
    raise ValueError('--format hf/hf_disk needs the `datasets` package: pip install datasets') from None
  return datasets


def _records(records, formatter: RecordFormatter, source) -> Iterator[str]:
  for record in records:
    yield formatter(record, source)


def _hf_files(inputs: list[str], formatter: RecordFormatter, split: str, hf_builder: str | None):
  """`datasets.load_dataset` on local data: a dataset folder, or data files with a builder."""
  from data_prep.readers import expand_inputs
  datasets = _import_datasets()
  folder = pathlib.Path(inputs[0])
  source = inputs[0] if len(inputs) == 1 else f'{inputs[0]} (and {len(inputs) - 1} more)'
  if len(inputs) == 1 and folder.is_dir() and hf_builder is None:
    args, kwargs = (str(folder),), {}  # `datasets` infers the builder from the files inside
  else:
    files = [str(f) for f in expand_inputs(inputs)]
    if hf_builder is None:
      builders = {_HF_BUILDER_OF_EXTENSION.get(pathlib.Path(f).suffix.lower()) for f in files}
      if len(builders) != 1 or None in builders:
        raise ValueError(f'cannot tell the `datasets` builder of {source} from its extensions: pass --hf_builder')
      hf_builder = builders.pop()
    args, kwargs = (hf_builder,), {'data_files': files}
  try:
    # Streaming reads the files lazily and writes no Arrow cache.
    dataset = datasets.load_dataset(*args, split=split, streaming=True, **kwargs)
  except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError,
          datasets.exceptions.DatasetNotFoundError) as error:
    raise ValueError(f'{source}: {_one_line(error)}') from None
  if dataset.column_names is not None:  # unknown for some builders until the first record
    formatter.check_columns(dataset.column_names, source)
    dataset = dataset.select_columns(list(formatter.columns))
  return _records(dataset, formatter, source), None


def _hf_disk(path: str, formatter: RecordFormatter, split: str):
  """A dataset written by `Dataset.save_to_disk` (or a DatasetDict's, then `split` picks one)."""
  datasets = _import_datasets()
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f'input {path} does not exist')
  try:
    dataset = datasets.load_from_disk(path)
  except FileNotFoundError as error:
    raise ValueError(f'{path} is not a saved Hugging Face dataset: {_one_line(error)}') from None
  if isinstance(dataset, datasets.DatasetDict):
    if split not in dataset:
      raise ValueError(f'{path} has no split {split!r} (it has: {", ".join(dataset)})')
    dataset = dataset[split]
  formatter.check_columns(dataset.column_names, path)
  # Arrow files are memory-mapped; batches of rows keep Python objects few.
  batches = dataset.select_columns(list(formatter.columns)).iter(batch_size=1000)
  rows = (dict(zip(batch, values)) for batch in batches for values in zip(*batch.values()))
  return _records(rows, formatter, path), len(dataset)


def _tfds(name: str, formatter: RecordFormatter, split: str, data_dir: str | None):
  """A prepared TFDS dataset in ArrayRecord format, read through `tfds.data_source` (no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ValueError('--format tfds needs the `tensorflow-datasets` package') from None
  where = data_dir or 'the default TFDS data dir'
  if data_dir and not pathlib.Path(data_dir).is_dir():
    raise FileNotFoundError(f'TFDS data dir {data_dir} does not exist')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(f'TFDS dataset {name!r} is not in {where}') from None
  if not builder.is_prepared():
    raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared in {where} (data_prep never downloads)')
  if split not in builder.info.splits:
    raise ValueError(f'TFDS dataset {name!r} has no split {split!r} (it has: {", ".join(builder.info.splits)})')
  file_format = builder.info.file_format
  if file_format is None or file_format.value != 'array_record':
    raise ValueError(f'TFDS dataset {name!r} is stored as {file_format}: reading it without TensorFlow '
                     'needs array_record (tfds build --file_format=array_record)')
  formatter.check_columns(builder.info.features.keys(), f'TFDS dataset {name!r}')
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  records = (source[i] for i in range(len(source)))
  return _records(records, formatter, f'TFDS dataset {name!r}'), len(source)


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())
