"""Build an output folder next to its destination and move it in only when complete.

A crash, an error or Ctrl-C leaves the destination as it was: either absent,
or the previous dataset, intact. Replacing needs `overwrite`, and only ever
replaces a folder that holds a prepared dataset (a metadata.json).
"""
import contextlib
import os
import pathlib
import shutil
from typing import Iterator

from maxlite.data.shards import METADATA_FILE


def check_destination(output: pathlib.Path, overwrite: bool):
  """Raises unless `output` is absent, an empty folder, or (with overwrite) a prepared dataset."""
  if not output.exists():
    return
  if not output.is_dir():
    raise FileExistsError(f'output {output} exists and is not a folder')
  if not any(output.iterdir()):
    return
  if not overwrite:
    raise FileExistsError(f'output folder {output} is not empty: pass --overwrite to replace it')
  if not (output / METADATA_FILE).is_file():
    raise FileExistsError(f'output folder {output} holds no {METADATA_FILE}, so it is not a prepared '
                          'dataset: refusing to replace it even with --overwrite')


@contextlib.contextmanager
def staged_folder(output, overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields an empty sibling folder `<output>.tmp-<pid>`; on success it becomes `output`."""
  output = pathlib.Path(output)
  check_destination(output, overwrite)
  staging = output.with_name(f'{output.name}.tmp-{os.getpid()}')
  if staging.exists():  # left by a killed run that had our pid
    shutil.rmtree(staging)
  staging.mkdir(parents=True)
  try:
    yield staging
    check_destination(output, overwrite)  # something may have appeared while we worked
    if output.is_dir() and not any(output.iterdir()):
      output.rmdir()
    if output.exists():
      # Two renames, then the delete: until the second rename the old dataset is whole.
      retired = output.with_name(f'{output.name}.old-{os.getpid()}')
      output.rename(retired)
      staging.rename(output)
      shutil.rmtree(retired)
    else:
      staging.rename(output)
  finally:
    if staging.exists():
      shutil.rmtree(staging, ignore_errors=True)
