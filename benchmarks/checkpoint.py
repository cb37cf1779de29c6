"""Checkpoint cost for a config's full train state (params + AdamW moments + step):
bytes on disk, save and restore seconds, and how long the train loop is blocked,
with synchronous and asynchronous saves.

    python benchmarks/checkpoint.py [--config configs/llama_109m.py] [--repeats 3] [--dir /tmp/x]

"blocked" is the time `Checkpointer.save` takes to return, which is what the
train loop waits for: the whole write when synchronous, only the copy of the
arrays off the devices when asynchronous. "written" is until the step is
complete on disk. Restore is onto the same shardings, the resume path.
Each figure is the median of the repeats, each into a fresh step.
"""
import argparse
import importlib.util
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from maxlite import config as config_lib, mesh as mesh_lib, optim, state as state_lib  # noqa: E402
from maxlite.checkpoint import Checkpointer  # noqa: E402
from maxlite.model.llama import LlamaConfig  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def folder_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob('*') if p.is_file())


def measure(state, shardings, root: pathlib.Path, async_save: bool, repeats: int) -> dict:
  run_dir = root / ('async' if async_save else 'sync')
  checkpointer = Checkpointer(run_dir, interval=1, max_to_keep=repeats, async_save=async_save)
  blocked, written, restored = [], [], []
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    checkpointer.save(step, state, '{}', {}, {'source_tokens': [0]})
    blocked.append(time.perf_counter() - start)
    checkpointer.wait()
    written.append(time.perf_counter() - start)
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    jax.block_until_ready(checkpointer.restore(step, state, shardings))
    restored.append(time.perf_counter() - start)
  size = folder_bytes(run_dir / 'checkpoints' / '1')
  checkpointer.close()
  return {'bytes': size, 'blocked': statistics.median(blocked),
          'written': statistics.median(written), 'restore': statistics.median(restored)}


def noisy(state):
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.01 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
      for x, k in zip(leaves, keys)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/llama_109m.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default='', help='where to write (default: a temporary folder)')
  args = parser.parse_args()

  config = load_config(args.config)
  sizes = config_lib.mesh_shape(config.parallel, jax.device_count())
  model_cfg = LlamaConfig.from_config(config.model)
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  mesh = mesh_lib.make_mesh(sizes)
  with jax.set_mesh(mesh):
    _, _, state, shardings = state_lib.create_train_state(model_cfg, tx, mesh, 0, False)
    # Fresh AdamW moments are zeros and would compress to nothing: fill every
    # float with noise so the bytes are those of a state in mid-training.
    state = jax.jit(noisy, out_shardings=shardings)(state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix='maxlite-ckpt-bench-'))
  root.mkdir(parents=True, exist_ok=True)
  print(f'{args.config}: train state {state_bytes / 2**20:,.0f} MiB over {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, mesh {sizes}; median of {args.repeats}\n')
  print('| save  | on disk (MiB) | loop blocked (s) | written (s) | write MiB/s | restore (s) |')
  print('|-------|---------------|------------------|-------------|-------------|-------------|')
  try:
    for async_save in (False, True):
      r = measure(state, shardings, root, async_save, args.repeats)
      print(f'| {"async" if async_save else "sync":<5} | {r["bytes"] / 2**20:>13,.0f} | '
            f'{r["blocked"]:>16.3f} | {r["written"]:>11.2f} | '
            f'{r["bytes"] / 2**20 / r["written"]:>11,.0f} | {r["restore"]:>11.2f} |')
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
