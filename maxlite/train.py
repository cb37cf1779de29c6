"""Entry point and THE train loop, readable top to bottom.

    python -m maxlite.train --config=configs/tiny.py [--config.optim.lr=1e-3 ...]

train() builds everything in order (platform, run directory, mesh, data,
state, step, checkpoint, compile) and then runs the loop; the helpers below it
follow the same order.
"""
import collections
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from clu import parameter_overview
from ml_collections import config_flags

from maxlite import config as config_lib
from maxlite import mesh as mesh_lib
from maxlite import metrics as metrics_lib
from maxlite import distributed, hf, optim, preemption, profiling, state as state_lib, step as step_lib
from maxlite import wandb_log
from maxlite import checkpoint as checkpoint_lib
from maxlite import xla_flags
from maxlite.checkpoint import Checkpointer
from maxlite.data import embedded, pipeline, tokenizers
from maxlite.model import parametrization
from maxlite.model.attention import resolve_backend
from maxlite.model.llama import LlamaConfig

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)

_MAX_STEPS_IN_FLIGHT = 4
_ETA_INTERVALS = 5


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, an existing run_dir); printed as one line."""


def train(config) -> list[dict]:
  """Runs (or resumes) the configured training; returns the logged metrics."""
  # -- platform --------------------------------------------------------------
  flags_line = xla_flags.apply(config.platform)  # XLA reads them when the backend starts
  if config.platform:
    jax.config.update('jax_platforms', config.platform)
  distributed.initialize(config.distributed)  # before anything touches a device
  if 'float64' in (config.model.param_dtype, config.model.compute_dtype):
    jax.config.update('jax_enable_x64', True)
  if config.train.compile_cache_dir:
    compilation_cache.set_cache_dir(config.train.compile_cache_dir)
  mesh_sizes = config_lib.validate(config, jax.device_count())
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, mesh_sizes))
  try:  # the attention backend that this platform runs, resolved once
    model_cfg = dataclasses.replace(model_cfg, attention=resolve_backend(config.model.attention,
                                                                         jax.default_backend()))
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from None
  train_cfg = config.train
  seq_len = config.data.seq_len
  global_batch = train_cfg.micro_batch_size * train_cfg.grad_accum_steps
  datasets, tokenizer = open_data(config.data, model_cfg.vocab_size)  # before anything is written
  if config.checkpoint.init_from_hf:
    try:
      hf.check_config(config.checkpoint.init_from_hf, model_cfg)
    except (ValueError, OSError) as error:
      raise config_lib.ConfigError(f'checkpoint.init_from_hf: {error}') from None

  # -- run directory -----------------------------------------------------------
  run_dir = pathlib.Path(train_cfg.run_dir)
  if prepare_run_dir(run_dir, config):
    check_run_tokenizer(run_dir, tokenizer)
    check_resumable(run_dir, config)
  distributed.barrier('maxlite_run_dir_checked')  # before process 0 writes to it
  run_dir.mkdir(parents=True, exist_ok=True)
  writer = metrics_lib.MetricWriter(
      run_dir, config.logging.tensorboard,
      wandb_log.WandbLogger(run_dir, config, config.logging) if config.logging.wandb_project else None)
  if jax.process_index() == 0:
    (run_dir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    # For generate and HF export; a mixture's sources agree on BOS/EOS (pipeline.open_datasets).
    meta = datasets[0].meta
    tokenizers.save_tokenizer(tokenizer, run_dir / 'tokenizer', add_bos=meta.get('add_bos', True),
                              add_eos=meta.get('add_eos', True))

  # -- mesh ----------------------------------------------------------------------
  mesh = mesh_lib.make_mesh(mesh_sizes)
  device_kind = jax.devices()[0].device_kind
  writer.info(f'mesh: {dict(mesh.shape)} over {jax.device_count()} x {device_kind} '
              f'in {jax.process_count()} process(es)')
  writer.info(flags_line)
  writer.info(f'attention: {config.model.attention} -> {model_cfg.attention} ({jax.default_backend()})')
  if model_cfg.pipeline_stages > 1:
    writer.info(model_cfg.pipeline_schedule.describe(model_cfg.num_layers))
  if mesh_lib.tensor_crosses_processes(mesh) and jax.local_device_count() > 1:
    writer.info(f'warning: parallel.tensor={mesh_sizes["tensor"]} spans processes '
                f'({jax.local_device_count()} devices each); tensor-parallel collectives '
                'will cross hosts, which is slow')

  with jax.set_mesh(mesh):  # everything from here on runs on this mesh
    # -- data ----------------------------------------------------------------------
    batch_sharding = mesh_lib.named_sharding(mesh, step_lib.BATCH, (global_batch, seq_len))
    data_plan = plan_data(config, datasets, batch_sharding, writer.info)

    # -- state and steps -----------------------------------------------------------------
    _, _, logical = state_lib.abstract_model(model_cfg)
    tx = optim.make_optimizer(config.optim, train_cfg.steps, logical,
                              skip_nonfinite=train_cfg.nonfinite == 'skip',
                              lr_multipliers=parametrization.lr_multipliers(model_cfg, logical,
                                                                            config.optim))
    steps = step_lib.build(config, model_cfg, mesh, tx)  # jitted; compiled below
    _, _, state, shardings = state_lib.create_train_state(
        model_cfg, tx, mesh, config.seed, config.parallel.zero1)
    writer.info(parameter_overview.get_parameter_overview(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params),
        include_stats=False))
    param_bytes = state_lib.bytes_per_device(state.params, shardings.params)
    opt_bytes = state_lib.bytes_per_device(state.opt_state, shardings.opt_state)
    writer.info(f'per-device memory: params {param_bytes / 2**20:.1f} MiB, '
                f'optimizer state {opt_bytes / 2**20:.1f} MiB')

    # -- checkpoint ------------------------------------------------------------------
    checkpointer = Checkpointer(run_dir, config.checkpoint.interval, config.checkpoint.max_to_keep,
                                config.checkpoint.keep_every, config.checkpoint.async_save)
    start, state = checkpointer.restore_latest(state, shardings, writer.info)
    if start is not None:
      writer.info(f'resuming {run_dir} from its checkpoint at step {start}')
    elif config.checkpoint.init_from_hf:  # the run's own checkpoint always wins
      imported = hf.import_params(config.checkpoint.init_from_hf, model_cfg)
      state = state_lib.state_from_params(imported, tx, shardings)
      writer.info(f'initialised the parameters from {config.checkpoint.init_from_hf}')
    start = start or 0
    if start >= train_cfg.steps:
      writer.info(f'{run_dir} is already complete at step {start} of {train_cfg.steps}; pass '
                  '--config.train.fresh_start=True or another --config.train.run_dir to train again')
      checkpointer.close()
      writer.close()
      return []
    batches = open_loader(data_plan, datasets, start, checkpointer, writer.info)

    # -- ahead-of-time compile -------------------------------------------------------
    # Both steps compile here, so the loop never stops to compile and the
    # memory the train step needs is known before the first step runs.
    train_step, seconds = compile_ahead(steps.train, state, steps.batch_shapes(global_batch, seq_len))
    memory = train_step.memory_analysis()
    temp = f', temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB' if memory else ''
    writer.info(f'compiled the train step in {seconds:.1f}s{temp}')
    if train_cfg.eval_steps:
      eval_step, seconds = compile_ahead(
          steps.eval, state.params, steps.batch_shapes(train_cfg.micro_batch_size, seq_len))
      writer.info(f'compiled the eval step in {seconds:.1f}s')

    # -- downstream evals (lm-eval) on the live parameters -----------------------------
    harness = None
    if train_cfg.eval_harness_tasks:
      from maxlite import lm_eval  # imports the harness only when asked for
      harness = lm_eval.TrainingHarness(config, model_cfg, mesh, tokenizer,
                                        add_bos=datasets[0].meta.get('add_bos', True))

    # -- loop --------------------------------------------------------------------------
    config_json = config.to_json_best_effort()
    log = StepLog(
        writer, train_cfg, datasets, batches.tokens_read, tokens_per_step=global_batch * seq_len,
        flops_per_token=metrics_lib.flops_per_token(config.model, seq_len),
        causal_flops_per_token=metrics_lib.flops_per_token(config.model, seq_len, causal=True),
        peak=metrics_lib.peak_flops_per_device(device_kind, config.logging.peak_flops_per_device))
    trace = profiling.StepTrace(train_cfg.profile_steps, run_dir)
    with preemption.StopSignal() as stop_signal:
      try:
        for step in range(start + 1, train_cfg.steps + 1):
          batch = next(batches)
          is_last = step == train_cfg.steps
          trace.before(step, state)
          with jax.transfer_guard(train_cfg.transfer_guard):
            state, step_metrics = train_step(state, batch)
          trace.after(step, step_metrics, is_last)
          log.add(step_metrics)
          at_log_step = is_last or step % train_cfg.log_interval == 0
          at_eval_step = is_last or (train_cfg.eval_interval and step % train_cfg.eval_interval == 0)
          at_harness_step = harness is not None and (is_last or step % harness.interval == 0)
          stopping = not is_last and stop_signal.should_stop(at_sync_point=at_log_step)
          saving = stopping or checkpointer.should_save(step, train_cfg.steps)
          if saving or at_log_step or at_harness_step:
            log.flush(step)  # before any save: never save a non-finite state
          if train_cfg.eval_steps and at_eval_step:
            log.validation(step, evaluate(eval_step, state.params, data_plan.validation_batches()))
          if at_harness_step:
            log.harness(step, harness(state.params))
          if saving:
            checkpointer.save(step, state, config_json, *batches.checkpoint_state())
          if stopping:
            writer.info(f'{stop_signal.received or "a stop signal"} received: saved step {step} of '
                        f'{train_cfg.steps}; run the same command again to resume')
            break
          if saving or at_log_step or at_harness_step:
            log.start_interval()  # eval and save time are not step time
      except BaseException:
        trace.stop()
        checkpointer.close(report_failure=False)  # the error already raised is the one to report
        raise
      else:
        trace.stop()
        checkpointer.close()  # waits for the last save to be on disk
      finally:
        writer.close()
    return log.history


# -- run directory and datasets -------------------------------------------------------

def open_data(data, model_vocab_size: int):
  """The configured datasets and their tokenizer, checked against the model."""
  if data.source == 'embedded':
    folder = embedded.prepare(data.cache_dir, data.embedded_max_bytes, data.val_fraction)
    entries = [(str(folder), None)]
  else:
    entries = pipeline.parse_sources(data.source)
  datasets, tokenizer = pipeline.open_datasets(entries)
  if tokenizer.vocab_size > model_vocab_size:
    raise config_lib.ConfigError(
        f'model.vocab_size={model_vocab_size} is smaller than the vocabulary ({tokenizer.vocab_size}) '
        f'of the {tokenizer.kind} tokenizer of {datasets[0].folder}')
  return datasets, tokenizer


# What maxlite writes into a run directory before its first checkpoint.
_RUN_DIR_ENTRIES = ('config.json', 'metrics.jsonl', 'tokenizer', 'tensorboard', 'checkpoints',
                    'maxlite.log')


def prepare_run_dir(run_dir: pathlib.Path, config) -> bool:
  """Resume what is there, or move it aside when asked; never overwrite it.

  Returns whether there is a checkpoint to resume. A run that stopped before
  its first checkpoint restarts under the same config: what it wrote is only
  its own bookkeeping, and its old metrics are moved aside, not deleted. Every
  process looks before any of them changes the directory, so they all decide
  alike.
  """
  checkpoints = run_dir / 'checkpoints'
  # Orbax names a complete step by its number; an interrupted save has a suffix.
  has_checkpoint = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
  occupied = run_dir.exists() and any(run_dir.iterdir())
  restartable = occupied and not has_checkpoint and _started_with(run_dir, config)
  distributed.barrier('maxlite_run_dir_inspected')
  stamp = time.strftime('%Y%m%d-%H%M%S')
  if not occupied:
    return False
  if config.train.fresh_start:
    aside = run_dir.with_name(f'{run_dir.name}.old-{stamp}')
    if jax.process_index() == 0:
      shutil.move(run_dir, aside)
    print(f'train.fresh_start: moved the existing {run_dir} to {aside}', flush=True)
    return False
  if restartable:
    moved = [name for name in ('metrics.jsonl', 'tensorboard') if (run_dir / name).exists()]
    if jax.process_index() == 0:
      for name in moved:
        shutil.move(run_dir / name, run_dir / f'{name}.old-{stamp}')
    print(f'{run_dir} stopped before its first checkpoint; starting it again'
          + (f' (its {" and ".join(moved)} moved to *.old-{stamp})' if moved else ''), flush=True)
    return False
  if not has_checkpoint:
    raise TrainingError(f'train.run_dir={run_dir} exists but holds no checkpoint to resume; '
                        'pass --config.train.fresh_start=True to move it aside, or pick another run_dir')
  return True


def _started_with(run_dir: pathlib.Path, config) -> bool:
  """Whether run_dir holds only what maxlite writes before a first checkpoint, for this config."""
  # Earlier restarts' leftovers (name.old-<time>) and other processes' logs count as maxlite's.
  names = {re.sub(r'^maxlite\.\d+\.log$', 'maxlite.log', p.name.split('.old-')[0])
           for p in run_dir.iterdir()}
  if not names <= set(_RUN_DIR_ENTRIES) or not (run_dir / 'config.json').is_file():
    return False
  try:
    return json.loads((run_dir / 'config.json').read_text()) == json.loads(config.to_json_best_effort())
  except (OSError, json.JSONDecodeError):
    return False


def check_resumable(run_dir: pathlib.Path, config):
  """A resume under another model or optimizer structure is a config error, not damage:
  the run directory is left exactly as it is."""
  try:
    step, saved = checkpoint_lib.read_config(run_dir)
  except (FileNotFoundError, ValueError):  # no readable config: restore_latest judges the step
    return
  conflicts = config_lib.resume_conflicts(saved, config)
  if conflicts:
    raise config_lib.ConfigError(
        f'{run_dir} holds checkpoint {step} of another model or optimizer: {"; ".join(conflicts)}; '
        'resume with the values it was trained with, or pass --config.train.fresh_start=True '
        'to move the run aside, or pick another train.run_dir')


def check_run_tokenizer(run_dir: pathlib.Path, tokenizer):
  """A resumed run must read its data with the tokenizer it started with."""
  saved = run_dir / 'tokenizer' / tokenizers.DESCRIPTION_FILE
  if saved.is_file() and tokenizers.tokenizer_part(json.loads(saved.read_text())) != tokenizer.describe():
    raise TrainingError(f'data.source uses a different tokenizer ({tokenizer.describe()["kind"]}) '
                        f'from the one {run_dir} was trained with ({saved})')


# -- this process's data: loader shards, batch placement, resuming -----------------------

@dataclasses.dataclass(frozen=True)
class DataPlan:
  """What this process reads: its loader shards, the rows of each batch they fill, and its
  rows of the validation batches."""
  settings: pipeline.LoaderSettings  # batch_size: the rows of one loader shard
  sharding: jax.sharding.NamedSharding  # of every batch, train and validation
  global_batch: int
  micro_batch: int  # the rows of a validation batch
  shard_indices: list[int]
  num_shards: int
  counts_tokens: bool  # whether this process's tokens go into the per-source counts
  val_rows: list[dict]  # this process's rows of each validation batch

  def validation_batches(self):
    """The validation batches as global arrays, each placed as evaluation reaches it."""
    return (place_batch(rows, self.sharding, self.micro_batch) for rows in self.val_rows)


def plan_data(config, datasets, sharding, info: Callable[[str], None]) -> DataPlan:
  """This process's share of the batches that `sharding` lays out over the mesh."""
  data, train_cfg = config.data, config.train
  global_batch = train_cfg.micro_batch_size * train_cfg.grad_accum_steps
  rows_by_process = mesh_lib.batch_rows_by_process(sharding, (global_batch, data.seq_len))
  shard_indices, num_shards = loader_shards(rows_by_process, global_batch, data.loader_shards)
  # Processes holding the same rows (tensor across hosts) read the same shards;
  # the first of them counts their tokens.
  own_rows = rows_by_process[jax.process_index()]
  counts_tokens = jax.process_index() == min(p for p, rows in rows_by_process.items() if rows == own_rows)
  settings = pipeline.LoaderSettings(
      seq_len=data.seq_len, batch_size=global_batch // num_shards, packing=data.packing,
      bos_aligned=data.bos_aligned, mixing=data.mixing, shuffle=data.shuffle,
      row_shuffle_window=data.row_shuffle_window, seed=config.seed,
      worker_count=data.worker_count, worker_buffer_size=data.worker_buffer_size,
      read_threads=data.read_threads)
  val_batches = pipeline.validation_batches(
      datasets, dataclasses.replace(settings, batch_size=train_cfg.micro_batch_size),
      train_cfg.eval_steps)
  for dataset in datasets:
    info(f'data: {dataset.folder} ({dataset.meta["tokenizer"]["kind"]} tokenizer): '
         f'{dataset.split("train")["tokens"]:,} train / {dataset.split("validation")["tokens"]:,} '
         f'validation tokens' + (f', weight {dataset.weight}' if dataset.weight else ''))
  info(f'data: batch {global_batch} x {data.seq_len}, {data.packing} packing, '
       f'{len(val_batches)} validation batches, {num_shards} loader shard(s)')
  shuffle_warning = pipeline.row_shuffle_warning(datasets, settings, num_shards)
  if shuffle_warning:
    info(shuffle_warning)
  # Validation batches are whole micro-batches that every process reads; each keeps its rows.
  val_first, val_end = mesh_lib.batch_rows_by_process(
      sharding, (train_cfg.micro_batch_size, data.seq_len))[jax.process_index()]
  val_rows = [{name: x[val_first:val_end] for name, x in batch.items()} for batch in val_batches]
  return DataPlan(settings, sharding, global_batch, train_cfg.micro_batch_size, shard_indices,
                  num_shards, counts_tokens, val_rows)


def loader_shards(rows_by_process: dict, global_batch: int, configured: int) -> tuple[list[int], int]:
  """(this process's loader shards, how many there are) for the rows its devices hold.

  By default there is one shard per distinct block of rows, i.e. one per
  process. A fixed data.loader_shards makes the batches independent of the
  process count, so a run resumes exactly on another number of hosts.
  """
  blocks = sorted(set(rows_by_process.values()))
  num_shards = configured or len(blocks)
  first, end = rows_by_process[jax.process_index()]
  rows_per_shard = global_batch // num_shards
  if global_batch % num_shards or first % rows_per_shard or end % rows_per_shard:
    raise config_lib.ConfigError(
        f'data.loader_shards={num_shards} does not fit the batch: each of the {len(blocks)} '
        f'blocks of the global batch {global_batch} that the processes hold (rows {blocks}) '
        'must be a whole number of shards')
  return list(range(first // rows_per_shard, end // rows_per_shard)), num_shards


@dataclasses.dataclass
class TrainBatches:
  """This process's training batches as global arrays, and the tokens it has read per source."""
  loader: pipeline.ShardedLoader
  plan: DataPlan
  source_tokens: np.ndarray  # this process's counts; their sum over processes is global

  def __next__(self) -> dict:
    local_rows = next(self.loader)
    self.source_tokens += local_rows.pop('source_tokens') * self.plan.counts_tokens
    return place_batch(local_rows, self.plan.sharding, self.plan.global_batch)

  def tokens_read(self) -> np.ndarray:
    """Tokens read per source by all processes (a collective: every process calls it)."""
    return global_counts(self.source_tokens)

  def checkpoint_state(self) -> tuple[dict, dict]:
    """(loader state, data progress), the arguments Checkpointer.save takes; a collective."""
    return self.loader.get_state(), {'source_tokens': self.tokens_read().tolist()}


def open_loader(plan: DataPlan, datasets, start: int, checkpointer: Checkpointer,
                info: Callable[[str], None]) -> TrainBatches:
  """The training batches after step `start`: from the loader state saved there when it fits
  this run's loader shards, else from a fresh shuffle."""
  loader_state, progress = checkpointer.restore_data(start) if start else (None, None)
  settings = plan.settings
  resumes = pipeline.ShardedLoader.state_fits(loader_state, plan.shard_indices, plan.num_shards)
  if start and not resumes:
    # A shard's state covers its own slice of the documents, so it does not
    # carry over to another number of shards: start a fresh shuffle instead.
    settings = dataclasses.replace(settings, seed=settings.seed + start)
    saved = loader_state['num_shards'] if loader_state else 'no'
    info(f'data: the checkpoint at step {start} has {saved} loader shards, this run '
         f'{plan.num_shards}; starting a fresh shuffle (documents of the interrupted epoch may '
         'repeat or be skipped; a fixed data.loader_shards avoids this)')
  loader = pipeline.ShardedLoader(datasets, settings, plan.shard_indices, plan.num_shards)
  if resumes:
    loader.set_state(loader_state)
    info(f'data: the loader continues from its state at step {start}')
  source_tokens = np.zeros(len(datasets), np.int64)
  if progress and jax.process_index() == 0:  # counters are per process; their sum is global
    source_tokens[:] = progress['source_tokens']
  return TrainBatches(loader, plan, source_tokens)


def place_batch(local_rows: dict, sharding, global_rows: int) -> dict:
  """This process's rows of a batch -> global arrays laid out as the step wants them."""
  return {name: jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))
          for name, x in local_rows.items()}


def global_counts(local: np.ndarray) -> np.ndarray:
  """Sums per-process counters over all processes (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return local
  return multihost_utils.process_allgather(local).sum(axis=0)


# -- steps ----------------------------------------------------------------------------------

def compile_ahead(jitted, *args) -> tuple[jax.stages.Compiled, float]:
  """(the compiled step, the seconds its compile took)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def evaluate(eval_step, params, val_batches) -> float:
  """Mean cross-entropy over the validation batches: summed on the devices, fetched once."""
  sums = [eval_step(params, batch) for batch in val_batches]
  ce, count = np.sum(jax.device_get(sums), axis=0)
  return float(ce / max(count, 1))


# -- the log ------------------------------------------------------------------------------

@dataclasses.dataclass
class StepLog:
  """The metrics of dispatched steps, fetched and logged at each log step: the loop's only host sync.

  Holds the steps' metrics (device arrays) until the next flush, times the
  interval since the last one, applies train.nonfinite before anything is
  saved, and keeps the history that train() returns.
  """
  writer: metrics_lib.MetricWriter
  train_cfg: ml_collections.ConfigDict  # config.train
  datasets: list[pipeline.Dataset]
  tokens_read: Callable[[], np.ndarray]  # per source, all processes: a collective, as is flush
  tokens_per_step: int
  flops_per_token: float  # the PaLM convention (metrics.py)
  causal_flops_per_token: float  # attention's causal half not counted
  peak: float | None  # FLOP/s per device; None: no MFU
  pending: list[dict] = dataclasses.field(default_factory=list)
  history: list[dict] = dataclasses.field(default_factory=list)
  interval_start: float = dataclasses.field(default_factory=time.perf_counter)
  loop_start: float = dataclasses.field(default_factory=time.perf_counter)
  # (seconds, steps) of the last few log intervals, eval and save excluded: the ETA's pace.
  recent: collections.deque = dataclasses.field(
      default_factory=lambda: collections.deque(maxlen=_ETA_INTERVALS))

  def start_interval(self):
    self.interval_start = time.perf_counter()

  def add(self, step_metrics: dict):
    self.pending.append(step_metrics)
    if len(self.pending) > _MAX_STEPS_IN_FLIGHT:
      # Bound the queue of dispatched steps: a deep queue of collectives can
      # time out on the CPU backend. The step waited on is long done on a GPU.
      self.pending[-_MAX_STEPS_IN_FLIGHT - 1]['loss'].block_until_ready()

  def flush(self, step: int):
    """Fetches the metrics of the steps since the last flush, checks them, logs the last one."""
    fetched = jax.device_get(self.pending)
    seconds = time.perf_counter() - self.interval_start
    self._check_finite(step - len(fetched) + 1, fetched)
    self.pending.clear()
    last = {k: float(v) for k, v in fetched[-1].items() if k != 'state_finite'}
    tokens_per_second = self.tokens_per_step * len(fetched) / seconds
    self.recent.append((seconds, len(fetched)))
    pace = sum(s for s, _ in self.recent) / sum(n for _, n in self.recent)
    record = {'loss': last['loss'], 'grad_norm': last['grad_norm'], 'lr': last['lr'],
              'tokens_per_second': tokens_per_second, 'step_time': seconds / len(fetched),
              'elapsed_s': time.perf_counter() - self.loop_start,
              'eta_s': pace * (self.train_cfg.steps - step)}
    line = (f'step {step:>6}/{self.train_cfg.steps}  loss {last["loss"]:.4f}  grad_norm '
            f'{last["grad_norm"]:.3f}  lr {last["lr"]:.2e}  {tokens_per_second:,.0f} tok/s  '
            f'{1e3 * record["step_time"]:.1f} ms/step  elapsed {hours_minutes(record["elapsed_s"])}'
            f'  ETA {hours_minutes(record["eta_s"])}')
    if 'moe_load' in last:  # Mixture of Experts: balance loss, max/mean assignments per expert
      record.update({k: v for k, v in last.items() if k.startswith('moe_')})
      line += f'  balance {last["moe_balance"]:.3f}  load {last["moe_load"]:.2f}'
      if last['moe_dropped']:
        line += f'  dropped {100 * last["moe_dropped"]:.2f}%'
    if self.peak:
      for name, flops in (('mfu', self.flops_per_token), ('mfu_causal', self.causal_flops_per_token)):
        record[name] = metrics_lib.mfu(flops, tokens_per_second, jax.device_count(), self.peak)
      line += f'  MFU {100 * record["mfu"]:.1f}% (causal {100 * record["mfu_causal"]:.1f}%)'
    consumed = self.tokens_read()
    for dataset, count in zip(self.datasets, consumed):
      record[f'tokens/{dataset.name}'] = int(count)
    if len(self.datasets) == 1:
      line += f'  epoch {consumed[0] / self.datasets[0].split("train")["tokens"]:.3f}'
    else:  # a mixture: tokens and epochs of each source so far
      line += ''.join(f'  {d.name} {_short(count)} tok ({count / d.split("train")["tokens"]:.3f} ep)'
                      for d, count in zip(self.datasets, consumed))
    self.writer.write(step, record, line)
    self.history.append({'step': step, **record})

  def _check_finite(self, first_step: int, fetched: list[dict]):
    """train.nonfinite: 'stop' at a non-finite loss or update; 'skip' warns of each
    skipped update and stops after train.max_skipped_in_a_row in a row. Either
    way a step whose update left the parameters or optimizer state non-finite
    stops the run before anything is saved."""
    for step, m in enumerate(fetched, start=first_step):
      skipped_in_a_row = int(m.get('skipped_in_a_row', 0))
      if not m['state_finite'] and (np.isfinite(m['loss']) or self.train_cfg.nonfinite == 'skip'):
        raise TrainingError(f'the update of step {step} (loss {m["loss"]:.4g}, grad_norm '
                            f'{m["grad_norm"]:.4g}) left the parameters or optimizer state '
                            'non-finite; stopping before anything is saved (lower optim.lr or '
                            'raise optim.warmup_steps; the last checkpoint is unaffected)')
      if np.isfinite(m['loss']) and not skipped_in_a_row:
        continue
      if self.train_cfg.nonfinite == 'stop':
        raise TrainingError(f'loss is {m["loss"]} at step {step}; stopping '
                            '(lower optim.lr or raise optim.warmup_steps, or set '
                            "train.nonfinite='skip')")
      self.writer.info(f'warning: step {step}: loss {m["loss"]}, non-finite gradients; '
                       'the update was skipped')
      if skipped_in_a_row >= self.train_cfg.max_skipped_in_a_row:
        raise TrainingError(f'{skipped_in_a_row} updates in a row were skipped at step '
                            f'{step} (train.max_skipped_in_a_row='
                            f'{self.train_cfg.max_skipped_in_a_row}); stopping')

  def validation(self, step: int, val_loss: float):
    self.writer.write(step, {'val_loss': val_loss},
                      f'step {step:>6}/{self.train_cfg.steps}  val_loss {val_loss:.4f}')
    self.history.append({'step': step, 'val_loss': val_loss})

  def harness(self, step: int, scores: dict):
    scalars = {f'harness/{name}': value for name, value in scores.items()}
    self.writer.write(step, scalars, f'step {step:>6}/{self.train_cfg.steps}  ' + '  '.join(
        f'{name} {value:.4f}' for name, value in scores.items()))
    self.history.append({'step': step, **scalars})


def hours_minutes(seconds: float) -> str:
  """h:mm, rounded to the minute: '0:07', '12:30'."""
  minutes = int(round(seconds / 60))
  return f'{minutes // 60}:{minutes % 60:02d}'


def _short(count: int) -> str:
  for unit, size in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if count >= size:
      return f'{count / size:.1f}{unit}'
  return str(int(count))


# -- entry point ----------------------------------------------------------------------------

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config=configs/<experiment>.py is required')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  try:
    train(_CONFIG.value)
  except (config_lib.ConfigError, TrainingError, pipeline.DataError,
          distributed.DistributedError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
  except checkpoint_lib.CheckpointError as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    # A failed write can leave TensorStore's I/O threads with callbacks for an
    # event loop that is gone; at interpreter exit each would print a
    # traceback. The failure is reported and every file is closed: leave now.
    sys.stdout.flush()
    os._exit(1)


def parse_flags(argv):
  """absl flag parsing, but a bad --config or override is one line, not a traceback."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # config files load lazily: fail here, not mid-run
    return argv
  except Exception as error:  # config_flags raises whatever loading or overriding raised
    message = ' '.join(str(error).split())
    print(f'error: bad --config or override: {type(error).__name__}: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
