"""Loss, perplexity and token count of a checkpoint on a prepared dataset's validation split.

    python -m maxlite.evaluate --run_dir=runs/tiny --data=embedded
    python -m maxlite.evaluate --run_dir=runs/tiny --data=/data/fineweb --step=100 \
        --batch_size=16 --num_batches=50 --tensor=2 --json

--data is a folder written by `python -m data_prep prepare` (or a mixture
'a:w,b:w', whose validation splits are read one after the other), or
'embedded': the corpus the run's own data settings prepare. Its tokenizer
must be the run's.

The batches are pipeline.validation_batches' (in order, unshuffled, packed
with the run's data.seq_len, data.packing and data.bos_aligned), and the loss
is the train loop's eval step (step.eval_step): with the run's
train.micro_batch_size as --batch_size and train.eval_steps as --num_batches,
the result is the val_loss that training logged at that step. By default
every batch of the split is read; a last, short batch is filled with padding
rows, which hold no targets.

Only the checkpoint's parameters are read (the newest, or --step), onto a mesh
of every device: --tensor and --fsdp of them split the model (as the training
axes of those names do) and the rest split the batch over `data`.
"""
import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
import pathlib
import sys

import jax
import numpy as np
from absl import logging

from maxlite import mesh as mesh_lib, state as state_lib, step as step_lib, xla_flags
from maxlite.data import embedded, pipeline
from maxlite.generate import read_run, restore_params
from maxlite.model.attention import resolve_backend

_STEPS_IN_FLIGHT = 4


@dataclasses.dataclass(frozen=True)
class Result:
  step: int
  loss: float  # mean cross-entropy per target token, nats
  perplexity: float
  tokens: int  # target tokens scored
  batches: int
  batch_size: int
  seq_len: int
  mesh: dict

  def line(self, run_dir, data: str) -> str:
    mesh = ' x '.join(f'{axis}={size}' for axis, size in self.mesh.items() if size > 1) or '1 device'
    return (f'{run_dir} step {self.step} on {data} validation: loss {self.loss:.4f}  '
            f'perplexity {self.perplexity:.3f}  tokens {self.tokens:,}  '
            f'({self.batches} batches of {self.batch_size} x {self.seq_len}, {mesh})')


def evaluate(run_dir, data: str, *, step: int | None = None, batch_size: int = 0,
             num_batches: int = 0, tensor: int = 1, fsdp: int = 1,
             compute_dtype: str | None = None, devices=None) -> Result:
  """Checkpoint `step` (None: the newest) of `run_dir` on the validation split of `data`.

  batch_size 0: the run's train.micro_batch_size; num_batches 0: the whole split.
  """
  for name, value, least in (('batch_size', batch_size, 0), ('num_batches', num_batches, 0),
                             ('tensor', tensor, 1), ('fsdp', fsdp, 1)):
    if value < least:
      raise ValueError(f'--{name}={value} must be >= {least}')
  step, config, tokenizer, compute_dtype = read_run(run_dir, step, compute_dtype)
  datasets = open_validation(data, config, tokenizer)
  seq_len, batch_size = config.data.seq_len, batch_size or config.train.micro_batch_size
  mesh = eval_mesh(config.model, seq_len, batch_size, tensor, fsdp, devices)

  # -- parameters and the eval step ------------------------------------------------
  try:  # 'auto' becomes what this platform runs, as in training
    attention = resolve_backend(config.model.attention, jax.default_backend())
  except ValueError as error:
    raise ValueError(f'the run: {error}') from None
  cfg, params = restore_params(run_dir, step, config.model, mesh, attention=attention)
  graphdef, abstract, logical = state_lib.abstract_model(cfg)
  layout = step_lib.Layout.create(mesh, logical, abstract, batch_shape=(batch_size, seq_len))
  eval_step = jax.jit(functools.partial(
      step_lib.eval_step, graphdef=graphdef, layout=layout,
      settings=step_lib.StepSettings(compute_dtype=compute_dtype)))
  batch_sharding = jax.sharding.NamedSharding(mesh, layout.batch_spec)

  # -- the validation batches ----------------------------------------------------
  settings = pipeline.LoaderSettings(seq_len=seq_len, batch_size=batch_size,
                                     packing=config.data.packing, bos_aligned=config.data.bos_aligned)
  batches = pipeline.iter_validation_batches(datasets, settings, drop_remainder=False)
  # (cross-entropy, tokens) summed on the host in float64, so that a long split
  # keeps its low digits. A few steps stay in flight: the host packs the next
  # batch while they run, but a deep queue would hold every batch's arrays
  # (and can time out collectives on the CPU backend).
  totals, in_flight, count = np.zeros(2, np.float64), collections.deque(), 0
  with jax.set_mesh(mesh):
    for batch in itertools.islice(batches, num_batches or None):
      in_flight.append(eval_step(params, jax.device_put(pad_rows(batch, batch_size), batch_sharding)))
      count += 1
      if len(in_flight) > _STEPS_IN_FLIGHT:
        totals += np.asarray(jax.device_get(in_flight.popleft()), np.float64)
    for sums in in_flight:
      totals += np.asarray(jax.device_get(sums), np.float64)
  ce, tokens = totals
  if not tokens:
    raise ValueError(f'--data={data}: the validation split has no token to score')
  loss = float(ce / tokens)
  return Result(step, loss, math.exp(loss) if loss < 700 else math.inf, int(tokens), count,
                batch_size, seq_len, dict(mesh.shape))


def open_validation(data: str, config, run_tokenizer) -> list[pipeline.Dataset]:
  """The datasets that --data names, checked to share the run's tokenizer."""
  if data == 'embedded':
    folder = embedded.prepare(config.data.cache_dir, config.data.embedded_max_bytes,
                              config.data.val_fraction)
    entries = [(str(folder), None)]
  else:
    entries = pipeline.parse_sources(data)
    for path, _ in entries:
      if not pathlib.Path(path).expanduser().is_dir():
        raise FileNotFoundError(f'--data={path} does not exist')
  datasets, tokenizer = pipeline.open_datasets(entries)
  ours, theirs = run_tokenizer.describe(), tokenizer.describe()
  if (ours['kind'], ours['sha256']) != (theirs['kind'], theirs['sha256']):
    raise ValueError(f'--data={data} was tokenized with another tokenizer ({_name(theirs)}) '
                     f'than the run\'s ({_name(ours)})')
  if not any(d.split('validation')['documents'] for d in datasets):
    raise ValueError(f'--data={data} has an empty validation split')
  return datasets


def _name(description: dict) -> str:
  return ' '.join(str(part) for part in (description['kind'], description['file']) if part)


def eval_mesh(model, seq_len: int, batch_size: int, tensor: int, fsdp: int, devices=None):
  """Every device: `tensor` x `fsdp` of them split the model, the rest (`data`) the batch."""
  devices = jax.devices() if devices is None else list(devices)
  if len(devices) % (tensor * fsdp):
    raise ValueError(f'--tensor={tensor} x --fsdp={fsdp} does not divide the {len(devices)} devices')
  for field, size in (('num_heads', model.num_heads), ('num_kv_heads', model.num_kv_heads),
                      ('intermediate_size', model.intermediate_size)):
    if size % tensor:
      raise ValueError(f'--tensor={tensor} does not divide the run\'s model.{field}={size}')
  if seq_len % tensor:
    raise ValueError(f'--tensor={tensor} does not divide the run\'s data.seq_len={seq_len}')
  if model.hidden_size % fsdp:
    raise ValueError(f'--fsdp={fsdp} does not divide the run\'s model.hidden_size={model.hidden_size}')
  data = len(devices) // (tensor * fsdp)
  if batch_size % (data * fsdp):
    raise ValueError(f'--batch_size={batch_size} is not divisible by the {data * fsdp} devices '
                     f'that split the batch (data={data} x fsdp={fsdp})')
  return mesh_lib.make_mesh({'data': data, 'fsdp': fsdp, 'tensor': tensor, 'pipeline': 1}, devices)


def pad_rows(batch: dict, rows: int) -> dict:
  """The batch with all-zero rows added up to `rows`: segment 0 is padding and
  loss_mask 0 scores nothing, so the sums are those of the real rows."""
  missing = rows - len(batch['inputs'])
  if not missing:
    return batch
  return {name: np.pad(x, ((0, missing), (0, 0))) for name, x in batch.items()}


# -- command line ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv=None):
  parser = _Parser(prog='python -m maxlite.evaluate',
                   description='Loss and perplexity of a checkpoint on a validation split.')
  parser.add_argument('--run_dir', required=True, help='the training run directory')
  parser.add_argument('--data', required=True,
                      help="a folder written by `python -m data_prep prepare`, or 'embedded'")
  parser.add_argument('--step', type=int, default=None, help='default: the newest checkpoint')
  parser.add_argument('--batch_size', type=int, default=0,
                      help="rows per batch; default: the run's train.micro_batch_size")
  parser.add_argument('--num_batches', type=int, default=0, help='default: the whole split')
  parser.add_argument('--tensor', type=int, default=1, help='devices that split heads, MLP, vocab')
  parser.add_argument('--fsdp', type=int, default=1, help='devices that split the weights (ZeRO-3)')
  parser.add_argument('--compute_dtype', default=None, choices=['bfloat16', 'float32', 'float64'],
                      help="default: the run's model.compute_dtype")
  parser.add_argument('--json', action='store_true', help='print the result as one JSON object')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  xla_flags.apply()  # before anything starts the backend, as train.py does
  try:
    result = evaluate(args.run_dir, args.data, step=args.step, batch_size=args.batch_size,
                      num_batches=args.num_batches, tensor=args.tensor, fsdp=args.fsdp,
                      compute_dtype=args.compute_dtype)
  except (ValueError, OSError) as error:  # pipeline.DataError is a ValueError
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr)
    sys.exit(1)
  if args.json:
    print(json.dumps({'run_dir': args.run_dir, 'data': args.data, **dataclasses.asdict(result)}))
  else:
    print(result.line(args.run_dir, args.data))


if __name__ == '__main__':
  main()
