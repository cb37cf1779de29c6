"""Config validation and derived values. Defaults live in configs/base.py, not here.

Every check runs before anything is compiled and fails with one line that names
the fields and numbers involved.
"""
import math

import ml_collections

from maxlite.model import remat  # the policy table only, not the model

MESH_AXES = ('data', 'fsdp', 'context', 'expert', 'tensor', 'pipeline')
PIPELINE_SCHEDULES = ('afab', 'circular', '1f1b', 'interleaved_1f1b')
DTYPES = ('bfloat16', 'float32', 'float64')
DECAY_STYLES = ('cosine', 'linear', 'constant', 'wsd')
ATTENTION_BACKENDS = ('auto', 'xla', 'cudnn', 'pallas')
MOE_DISPATCHES = ('gather', 'all_to_all')
PACKINGS = ('concat', 'first_fit')
MIXINGS = ('weighted', 'proportional')
NONFINITE_POLICIES = ('stop', 'skip')
DISTRIBUTED_MODES = ('auto', 'slurm', 'env', 'none')
PARAMETRIZATIONS = ('standard', 'mup')  # maxlite.model.parametrization
OPTIMIZERS = ('adamw', 'muon')  # maxlite.optim


class ConfigError(ValueError):
  """A user mistake in the config; the entry point prints it as one line."""


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def mesh_shape(parallel, num_devices: int) -> dict[str, int]:
  """Resolves the one allowed -1 and checks the product against the device count."""
  sizes = {axis: int(parallel[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  _require(len(free) <= 1, f'parallel: only one axis may be -1, got {free}')
  for axis, size in sizes.items():
    _require(size == -1 or size >= 1, f'parallel.{axis}={size} must be >= 1 or -1')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    _require(num_devices % fixed == 0,
             f'parallel: {num_devices} devices are not divisible by the fixed axes '
             f'product {fixed} ({_fmt(sizes)})')
    sizes[free[0]] = num_devices // fixed
  product = math.prod(sizes.values())
  _require(product == num_devices,
           f'parallel: {"*".join(MESH_AXES)} = {product} ({_fmt(sizes)}) '
           f'but there are {num_devices} devices')
  return sizes


def _fmt(sizes):
  return ', '.join(f'{axis}={size}' for axis, size in sizes.items())


def head_dim(model) -> int:
  return model.head_dim or model.hidden_size // model.num_heads


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Checks the whole config; returns the resolved mesh shape."""
  model, train, optim = config.model, config.train, config.optim
  for field in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
                'intermediate_size', 'max_seq_len'):
    _require(model[field] >= 1, f'model.{field}={model[field]} must be >= 1')
  _require(model.num_heads % model.num_kv_heads == 0,
           f'model.num_heads={model.num_heads} is not divisible by '
           f'model.num_kv_heads={model.num_kv_heads}')
  _require(model.head_dim >= 0, f'model.head_dim={model.head_dim} must be >= 0 (0: hidden_size // num_heads)')
  _require(model.head_dim > 0 or model.hidden_size % model.num_heads == 0,
           f'model.hidden_size={model.hidden_size} is not divisible by '
           f'model.num_heads={model.num_heads} (or set model.head_dim)')
  _require(head_dim(model) % 2 == 0, f'head dim {head_dim(model)} must be even for rotary embeddings')
  for field in ('param_dtype', 'compute_dtype'):
    _require(model[field] in DTYPES, f'model.{field}={model[field]!r} is not one of {DTYPES}')
  _require(model.remat in remat.POLICIES,
           f'model.remat={model.remat!r} is not one of {tuple(remat.POLICIES)}')
  _require(model.attention in ATTENTION_BACKENDS,
           f'model.attention={model.attention!r} is not one of {ATTENTION_BACKENDS}')
  _require(model.norm_eps > 0 and model.init_std > 0 and model.rope_theta > 0,
           'model.norm_eps, model.init_std and model.rope_theta must be > 0')
  _require(0 < config.data.seq_len <= model.max_seq_len,
           f'data.seq_len={config.data.seq_len} must be in [1, model.max_seq_len={model.max_seq_len}]')

  data = config.data
  _require(bool(data.source), "data.source must be 'embedded' or a prepared dataset folder")
  _require(data.packing in PACKINGS, f'data.packing={data.packing!r} is not one of {PACKINGS}')
  _require(data.mixing in MIXINGS, f'data.mixing={data.mixing!r} is not one of {MIXINGS}')
  _require(not data.bos_aligned or data.packing == 'concat',
           "data.bos_aligned=True needs data.packing='concat' (first_fit never cuts a row start)")
  for field, least in (('worker_count', 0), ('worker_buffer_size', 1), ('read_threads', 1),
                       ('row_shuffle_window', 0)):
    _require(data[field] >= least, f'data.{field}={data[field]} must be >= {least}')
  _require(0 < data.val_fraction < 1, f'data.val_fraction={data.val_fraction} must be in (0, 1)')
  _require(data.loader_shards >= 0, f'data.loader_shards={data.loader_shards} must be >= 0 (0: one per process)')

  _require(train.steps >= 1, f'train.steps={train.steps} must be >= 1')
  _require(train.micro_batch_size >= 1, f'train.micro_batch_size={train.micro_batch_size} must be >= 1')
  _require(train.grad_accum_steps >= 1, f'train.grad_accum_steps={train.grad_accum_steps} must be >= 1')
  for field in ('eval_interval', 'eval_steps', 'eval_harness_interval', 'eval_harness_limit'):
    _require(train[field] >= 0, f'train.{field}={train[field]} must be >= 0')
  # -- lm-eval during training (maxlite/lm_eval.py) --
  _require(not train.eval_harness_tasks or config.parallel.pipeline == 1,
           f'train.eval_harness_tasks needs parallel.pipeline=1 (it is {config.parallel.pipeline}); '
           'run python -m maxlite.lm_eval on the checkpoints instead')
  _require(not train.eval_harness_tasks or train.eval_harness_interval or train.eval_interval,
           'train.eval_harness_tasks needs train.eval_harness_interval or train.eval_interval > 0')
  _require(train.log_interval >= 1, f'train.log_interval={train.log_interval} must be >= 1')
  _require(bool(train.run_dir), 'train.run_dir must be set')
  _require(train.nonfinite in NONFINITE_POLICIES,
           f'train.nonfinite={train.nonfinite!r} is not one of {NONFINITE_POLICIES}')
  _require(train.max_skipped_in_a_row >= 1,
           f'train.max_skipped_in_a_row={train.max_skipped_in_a_row} must be >= 1')
  profile_range(train.profile_steps)
  checkpoint = config.checkpoint
  for field, least in (('interval', 0), ('max_to_keep', 1), ('keep_every', 0)):
    _require(checkpoint[field] >= least, f'checkpoint.{field}={checkpoint[field]} must be >= {least}')

  _require(optim.lr > 0, f'optim.lr={optim.lr} must be > 0')
  _require(0 <= optim.min_lr <= optim.lr, f'optim.min_lr={optim.min_lr} must be in [0, optim.lr={optim.lr}]')
  _require(0 <= optim.warmup_steps < train.steps,
           f'optim.warmup_steps={optim.warmup_steps} must be in [0, train.steps={train.steps})')
  _require(optim.decay in DECAY_STYLES, f'optim.decay={optim.decay!r} is not one of {DECAY_STYLES}')
  if optim.decay == 'wsd':
    _require(optim.warmup_steps <= optim.anneal_start_step < train.steps,
             f'optim.anneal_start_step={optim.anneal_start_step} must be in '
             f'[optim.warmup_steps={optim.warmup_steps}, train.steps={train.steps}) for wsd')
  _require(optim.weight_decay >= 0, f'optim.weight_decay={optim.weight_decay} must be >= 0')
  _require(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1, f'optim.b1={optim.b1} and optim.b2={optim.b2} must be in [0, 1)')
  _require(optim.eps > 0, f'optim.eps={optim.eps} must be > 0')
  _require(optim.grad_clip >= 0, f'optim.grad_clip={optim.grad_clip} must be >= 0 (0 disables)')
  _validate_parametrization_and_optimizer(model, optim)

  dist = config.distributed
  _require(dist.mode in DISTRIBUTED_MODES, f'distributed.mode={dist.mode!r} is not one of {DISTRIBUTED_MODES}')
  for field in ('init_timeout_s', 'heartbeat_timeout_s'):
    _require(dist[field] >= 1, f'distributed.{field}={dist[field]} must be >= 1')

  _require(optim.grad_reduce_dtype in ('float32', 'bfloat16'),
           f"optim.grad_reduce_dtype={optim.grad_reduce_dtype!r} is not one of ('float32', 'bfloat16')")

  sizes = mesh_shape(config.parallel, num_devices)
  # Every sharded dimension must divide evenly: each device runs the model on
  # its own shards (maxlite.model.parallel), so a replicated fallback would
  # silently change what crosses the mesh.
  tensor = sizes['tensor']
  for field in ('num_heads', 'num_kv_heads', 'intermediate_size'):
    _require(model[field] % tensor == 0,
             f'parallel.tensor={tensor} does not divide model.{field}={model[field]}'
             + (' (key/value heads are not replicated across tensor ranks)'
                if field == 'num_kv_heads' else ''))
  _require(config.data.seq_len % tensor == 0,
           f'parallel.tensor={tensor} does not divide data.seq_len={config.data.seq_len} '
           '(the residual stream is split along its length between blocks)')
  _validate_context(config, sizes)
  _require(model.hidden_size % sizes['fsdp'] == 0,
           f'parallel.fsdp={sizes["fsdp"]} does not divide model.hidden_size={model.hidden_size}')
  _require(train.micro_batch_size % batch_shards(sizes) == 0,
           f'train.micro_batch_size={train.micro_batch_size} (global batch '
           f'{train.micro_batch_size * train.grad_accum_steps}) is not divisible by '
           f'{BATCH_SHARDS}={batch_shards(sizes)}')
  _validate_moe(config, sizes)
  _validate_pipeline(config, sizes)
  return sizes


# The mesh axes that split the batch's rows (the rule table's 'batch').
BATCH_SHARDS = 'parallel.data*parallel.fsdp*parallel.expert'


def batch_shards(sizes: dict[str, int]) -> int:
  return sizes['data'] * sizes['fsdp'] * sizes['expert']


def expert_width(model) -> int:
  return model.moe_intermediate_size or model.intermediate_size


def _validate_moe(config, sizes):
  """The Mixture-of-Experts fields (maxlite.model.moe) and the `expert` axis."""
  model = config.model
  experts, expert = model.num_experts, sizes['expert']
  _require(experts >= 0, f'model.num_experts={experts} must be >= 0 (0: dense)')
  if not experts:
    _require(expert == 1, f'parallel.expert={expert} splits experts, but model.num_experts=0 (dense)')
    return
  _require(1 <= model.experts_per_token <= experts,
           f'model.experts_per_token={model.experts_per_token} must be in [1, model.num_experts={experts}]')
  _require(model.moe_every >= 1 and model.num_layers % model.moe_every == 0,
           f'model.moe_every={model.moe_every} must be >= 1 and divide model.num_layers={model.num_layers}')
  for field in ('moe_intermediate_size', 'moe_shared_expert_size', 'moe_capacity_factor',
                'moe_balance_loss_weight', 'moe_router_z_loss_weight', 'moe_bias_update_rate'):
    _require(model[field] >= 0, f'model.{field}={model[field]} must be >= 0')
  _require(model.moe_dispatch in MOE_DISPATCHES,
           f'model.moe_dispatch={model.moe_dispatch!r} is not one of {MOE_DISPATCHES}')
  _require(not (model.moe_capacity_factor and model.moe_dispatch == 'gather'),
           f'model.moe_capacity_factor={model.moe_capacity_factor} needs '
           "model.moe_dispatch='all_to_all' (the capacity slots are what it exchanges)")
  _require(experts % expert == 0, f'parallel.expert={expert} does not divide model.num_experts={experts}')
  for width in ('moe_shared_expert_size',) + (('moe_intermediate_size',) if model.moe_intermediate_size else ()):
    _require(model[width] % sizes['tensor'] == 0,
             f'parallel.tensor={sizes["tensor"]} does not divide model.{width}={model[width]}')
  # Combinations not supported yet, each for the reason given.
  schedule = config.parallel.pipeline_schedule
  _require(schedule not in ('1f1b', 'interleaved_1f1b'),
           f'model.num_experts={experts} cannot take parallel.pipeline_schedule={schedule!r} (its '
           "explicit backward does not carry the router's losses); use 'afab' or 'circular'")
  _require(sizes['context'] == 1,
           f'model.num_experts={experts} cannot take parallel.context={sizes["context"]} yet '
           '(the router statistics are not summed over context); use parallel.context=1')
  _require(model.parametrization == 'standard',
           f'model.num_experts={experts} cannot take model.parametrization={model.parametrization!r} '
           "yet (no µP rule for the experts' stacked weights); use 'standard'")
  _require(config.optim.name == 'adamw',
           f'model.num_experts={experts} cannot take optim.name={config.optim.name!r} yet '
           "(no Muon rule for the experts' stacked weights); use 'adamw'")


def _validate_context(config, sizes):
  context, tensor, seq_len = sizes['context'], sizes['tensor'], config.data.seq_len
  if context == 1:
    return
  # Each row is cut into 2 x context chunks (maxlite.model.context), and each
  # device's share of it is split again over tensor between blocks.
  _require(seq_len % (2 * context) == 0,
           f'data.seq_len={seq_len} is not divisible by 2 x parallel.context={context} '
           '(each row is cut into 2 x context chunks)')
  _require(config.model.attention != 'cudnn',
           f"model.attention='cudnn' cannot take parallel.context={context} (its causal mask "
           "assumes the queries are the keys' first tokens); use 'pallas', 'xla' or 'auto'")
  _require(seq_len // context % tensor == 0,
           f'parallel.tensor={tensor} does not divide data.seq_len / parallel.context = '
           f'{seq_len // context} (the residual stream is split along its length between blocks)')


def _validate_parametrization_and_optimizer(model, optim):
  _require(model.parametrization in PARAMETRIZATIONS,
           f'model.parametrization={model.parametrization!r} is not one of {PARAMETRIZATIONS}')
  _require(model.parametrization != 'mup' or model.mup_base_width >= 1,
           f"model.mup_base_width={model.mup_base_width} must be >= 1 with model.parametrization='mup' "
           '(the hidden_size the hyperparameters were tuned at)')
  _require(model.mup_base_head_dim >= 0,
           f'model.mup_base_head_dim={model.mup_base_head_dim} must be >= 0 (0: scaled like the width)')
  _require(optim.name in OPTIMIZERS, f'optim.name={optim.name!r} is not one of {OPTIMIZERS}')
  _require(optim.muon_lr >= 0, f'optim.muon_lr={optim.muon_lr} must be >= 0 (0: optim.lr)')
  _require(0 <= optim.muon_momentum < 1, f'optim.muon_momentum={optim.muon_momentum} must be in [0, 1)')
  _require(optim.muon_rms_match >= 0,
           f'optim.muon_rms_match={optim.muon_rms_match} must be >= 0 (0: no RMS matching)')


def _validate_pipeline(config, sizes):
  parallel, stages = config.parallel, sizes['pipeline']
  repeats, micro = parallel.pipeline_repeats, parallel.pipeline_microbatches
  _require(repeats >= 1, f'parallel.pipeline_repeats={repeats} must be >= 1')
  _require(micro >= 0, f'parallel.pipeline_microbatches={micro} must be >= 0 (0: one per stage)')
  schedule = parallel.pipeline_schedule
  _require(schedule in PIPELINE_SCHEDULES,
           f'parallel.pipeline_schedule={schedule!r} must be one of {", ".join(PIPELINE_SCHEDULES)}')
  if stages == 1:
    _require(repeats == 1 and micro == 0 and schedule == 'afab',
             f'parallel.pipeline_repeats={repeats}, parallel.pipeline_microbatches={micro} and '
             f"parallel.pipeline_schedule={schedule!r} need parallel.pipeline > 1 (set them to 1, 0 and 'afab')")
    return
  grouped = schedule in ('circular', 'interleaved_1f1b')
  _require(grouped == (repeats > 1),
           f'parallel.pipeline_schedule={schedule!r} ' +
           (f'needs parallel.pipeline_repeats > 1 (it is {repeats})' if grouped else
            f'runs one layer group per stage but parallel.pipeline_repeats={repeats}: use '
            f"pipeline_schedule='{'interleaved_1f1b' if schedule == '1f1b' else 'circular'}'"))
  micro = micro or stages
  num_layers = config.model.num_layers
  _require(num_layers % (stages * repeats) == 0,
           f'model.num_layers={num_layers} is not divisible by parallel.pipeline={stages} x '
           f'parallel.pipeline_repeats={repeats}')
  # Circular: a micro-batch leaving the last stage re-enters stage 0 only after
  # the other micro-batches of its round, which needs at least one per stage.
  _require(repeats == 1 or micro >= stages,
           f'parallel.pipeline_microbatches={micro} must be >= parallel.pipeline={stages} for the '
           f'{schedule} schedule (parallel.pipeline_repeats={repeats} > 1)')
  # Interleaved 1F1B sends micro-batches through the layer groups P at a time.
  _require(schedule != 'interleaved_1f1b' or micro % stages == 0,
           f'parallel.pipeline_microbatches={micro} must be a multiple of parallel.pipeline={stages} '
           "for pipeline_schedule='interleaved_1f1b'")
  # Each pipeline micro-batch is itself split over the batch shards.
  _require(config.train.micro_batch_size % (micro * batch_shards(sizes)) == 0,
           f'train.micro_batch_size={config.train.micro_batch_size} is not divisible by '
           f'parallel.pipeline_microbatches={micro} x {BATCH_SHARDS}={batch_shards(sizes)}')
  # With MoE every n-th layer the stacks run in groups of n layers.
  groups = num_layers // (config.model.moe_every if config.model.num_experts else 1)
  _require(groups % (stages * repeats) == 0,
           f'model.num_layers={num_layers} / model.moe_every={config.model.moe_every} = {groups} '
           f'layer groups is not divisible by parallel.pipeline={stages} x '
           f'parallel.pipeline_repeats={repeats}')


def profile_range(spec: str) -> tuple[int, int] | None:
  """train.profile_steps 'START:STOP' -> (START, STOP), the steps START to STOP - 1; '' -> None."""
  if not spec:
    return None
  try:
    start, stop = (int(part) for part in spec.split(':'))
  except ValueError:
    raise ConfigError(f"train.profile_steps={spec!r} must be 'START:STOP' (traces steps START to "
                      "STOP-1, e.g. '10:15') or '' (off)") from None
  _require(1 <= start < stop, f'train.profile_steps={spec!r} needs 1 <= START < STOP')
  return start, stop


def model_fields(config, sizes: dict[str, int]) -> dict:
  """The model's fields that the mesh and the other config groups decide."""
  float64 = config.model.param_dtype == 'float64'
  return {**pipeline_fields(config.parallel, sizes),
          'padded_vocab_size': padded_vocab_size(config.model.vocab_size, sizes['tensor']),
          # float64 runs (the numerics tests) sum in float64 too.
          'grad_reduce_dtype': 'float64' if float64 else config.optim.grad_reduce_dtype}


def pipeline_fields(parallel, sizes: dict[str, int]) -> dict:
  """The model's pipeline_* fields for a validated config and its resolved mesh."""
  return {'pipeline_stages': sizes['pipeline'],
          'pipeline_microbatches': parallel.pipeline_microbatches or sizes['pipeline'],
          'pipeline_repeats': parallel.pipeline_repeats,
          'pipeline_1f1b': parallel.pipeline_schedule in ('1f1b', 'interleaved_1f1b')}


# What a checkpoint's arrays depend on beyond the mesh: a run resumes only with
# these unchanged (the mesh, steps, schedule, data and dtypes may change).
RESUME_FIELDS = ('model.vocab_size', 'model.hidden_size', 'model.num_layers', 'model.num_heads',
                 'model.num_kv_heads', 'model.intermediate_size', 'model.tie_embeddings',
                 'model.rope_theta', 'model.norm_eps', 'train.nonfinite',
                 # the µP multipliers change what the parameters mean; the optimizer, its state
                 'model.parametrization', 'optim.name',
                 # Mixture of Experts (maxlite.model.moe)
                 'model.num_experts', 'model.experts_per_token', 'model.moe_intermediate_size',
                 'model.moe_every', 'model.moe_shared_expert_size')
# The value of a RESUME_FIELDS entry in a checkpoint written before the field existed.
_RESUME_DEFAULTS = {'model.parametrization': 'standard', 'optim.name': 'adamw', 'model.num_experts': 0,
                    'model.experts_per_token': 2, 'model.moe_intermediate_size': 0, 'model.moe_every': 1,
                    'model.moe_shared_expert_size': 0}


def resume_conflicts(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """'field=new (the checkpoint has old)' for each field that a checkpoint
  written with `saved` cannot resume under `config`."""
  def get(cfg, dotted):
    group, name = dotted.split('.')
    value = cfg[group].get(name) if group in cfg else None
    return _RESUME_DEFAULTS.get(dotted) if value is None else value

  fields = RESUME_FIELDS
  if get(saved, 'model.parametrization') == get(config, 'model.parametrization') == 'mup':
    fields += ('model.mup_base_width', 'model.mup_base_head_dim')
  conflicts = [f'{field}={get(config, field)!r} (the checkpoint has {get(saved, field)!r})'
               for field in fields
               if get(saved, field) is not None and get(saved, field) != get(config, field)]
  if 'model' in saved and head_dim(saved.model) != head_dim(config.model):
    conflicts.append(f'model.head_dim={config.model.head_dim} (the checkpoint has {saved.model.head_dim}, '
                     f'i.e. {head_dim(saved.model)})')
  if 'optim' in saved and (saved.optim.get('grad_clip', 0) > 0) != (config.optim.grad_clip > 0):
    # Clipping adds a stage to the optimizer, and so to its state.
    conflicts.append(f'optim.grad_clip={config.optim.grad_clip} (the checkpoint has '
                     f'{saved.optim.grad_clip}: clipping on or off changes the optimizer state)')
  return conflicts


def padded_vocab_size(vocab_size: int, tensor: int) -> int:
  """The embedding's row count: vocab_size rounded up to a multiple of 128 x tensor.

  128 keeps the LM-head matmul on whole tensor-core tiles, and the tensor
  factor gives every tensor rank an equal, aligned slice. The padding rows
  are zero and their logits are masked, so no padding id is ever predicted;
  checkpoints written with another padding restore by padding or cutting rows.
  """
  multiple = 128 * tensor
  return -(-vocab_size // multiple) * multiple

