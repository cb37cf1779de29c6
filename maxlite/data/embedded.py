"""The embedded corpus: the Python standard library's own source, as a prepared dataset.

Every Python installation carries it, so the default config trains with no
download. On first use the files are tokenized byte-level into the same
ArrayRecord format `python -m data_prep prepare` writes (one document per file,
BOS ... EOS), into a cache folder keyed by the file list and the settings; later
runs reuse it. The last files (by sorted path) are held out for validation.
"""
import hashlib
import json
import os
import pathlib
import shutil
import sys
import sysconfig

import numpy as np

from maxlite.data import shards
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


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache') / 'maxlite'


def prepare(cache_dir, max_bytes: int, val_fraction: float) -> pathlib.Path:
  """The prepared folder for these settings, written on first use."""
  files = stdlib_files()
  key = hashlib.sha256(json.dumps([shards.FORMAT_VERSION, max_bytes, val_fraction, sys.version,
                                   [(str(f), f.stat().st_size) for f in files]]).encode()).hexdigest()
  folder = pathlib.Path(cache_dir or default_cache_dir()) / f'embedded-{key[:16]}'
  if (folder / shards.METADATA_FILE).is_file():
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the final name and rename: a concurrent or interrupted
  # preparation never leaves a half-written folder under the final name.
  building = folder.with_name(f'{folder.name}.tmp-{os.getpid()}')
  shutil.rmtree(building, ignore_errors=True)
  building.mkdir()
  _write(building, files, max_bytes, val_fraction)
  try:
    building.rename(folder)
  except OSError:  # another process finished first
    shutil.rmtree(building, ignore_errors=True)
  return folder


def _write(folder: pathlib.Path, files: list[pathlib.Path], max_bytes: int, val_fraction: float):
  tokenizer = ByteTokenizer()
  documents, total = [], 0
  for path in files:
    data = path.read_bytes()
    if data.strip():
      documents.append(data)
      total += len(data) + 2
    if total >= max_bytes:
      break
  # Hold out whole files from the end until val_fraction of the tokens (at least one file).
  num_val, val_tokens = 0, 0
  while num_val < len(documents) - 1 and (num_val == 0 or val_tokens < val_fraction * total):
    num_val += 1
    val_tokens += len(documents[-num_val]) + 2
  dtype = shards.token_dtype(tokenizer.vocab_size)
  splits = {}
  for split, part in (('train', documents[:len(documents) - num_val]),
                      ('validation', documents[len(documents) - num_val:])):
    writer = shards.ShardWriter(folder, split, dtype)
    for data in part:
      ids = np.empty(len(data) + 2, np.int32)
      ids[0], ids[-1] = tokenizer.bos_id, tokenizer.eos_id
      ids[1:-1] = np.frombuffer(data, np.uint8)
      writer.write(ids)
    splits[split] = writer.close()
  shards.write_metadata(
      folder, tokenizer, add_bos=True, add_eos=True, splits=splits,
      source={'format': 'embedded', 'inputs': [sysconfig.get_paths()['stdlib']], 'split_by': 'file',
              'max_bytes': max_bytes, 'val_fraction': val_fraction},
      command=['maxlite.data.embedded.prepare'])
