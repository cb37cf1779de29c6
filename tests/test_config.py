"""maxlite.config: every validation check fails with one line naming its fields and
numbers, the shipped configs validate, and the config surface changes only on purpose."""
import functools
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import base, llama_109m, moe_1b, moe_tiny, tiny
from maxlite.config import ConfigError, mesh_shape, validate

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {'base': base, 'tiny': tiny, 'llama_109m': llama_109m, 'moe_tiny': moe_tiny, 'moe_1b': moe_1b}

# The snapshot of every knob; adding or removing one must be a deliberate edit here.
BASE_KEYS = [
    'checkpoint.async_save', 'checkpoint.init_from_hf', 'checkpoint.interval', 'checkpoint.keep_every',
    'checkpoint.max_to_keep',
    'data.bos_aligned', 'data.cache_dir', 'data.embedded_max_bytes', 'data.loader_shards', 'data.mixing',
    'data.packing', 'data.read_threads', 'data.row_shuffle_window', 'data.seq_len',
    'data.shuffle', 'data.source', 'data.val_fraction', 'data.worker_buffer_size',
    'data.worker_count',
    'distributed.heartbeat_timeout_s', 'distributed.init_timeout_s', 'distributed.mode',
    'logging.peak_flops_per_device', 'logging.tensorboard', 'logging.wandb_entity',
    'logging.wandb_project', 'logging.wandb_run_name', 'logging.wandb_tags',
    'model.attention', 'model.compute_dtype', 'model.experts_per_token', 'model.head_dim',
    'model.hidden_size', 'model.init_std', 'model.intermediate_size', 'model.max_seq_len',
    'model.moe_balance_loss_weight', 'model.moe_bias_update_rate', 'model.moe_capacity_factor',
    'model.moe_dispatch', 'model.moe_every', 'model.moe_intermediate_size',
    'model.moe_router_z_loss_weight', 'model.moe_shared_expert_size',
    'model.mup_base_head_dim', 'model.mup_base_width', 'model.norm_eps',
    'model.num_experts', 'model.num_heads', 'model.num_kv_heads', 'model.num_layers', 'model.param_dtype',
    'model.parametrization', 'model.remat', 'model.rope_theta', 'model.scan_layers', 'model.tie_embeddings',
    'model.vocab_size', 'model.z_loss_weight',
    'optim.anneal_start_step', 'optim.b1', 'optim.b2', 'optim.decay', 'optim.eps',
    'optim.grad_clip', 'optim.grad_reduce_dtype', 'optim.lr', 'optim.min_lr',
    'optim.muon_lr', 'optim.muon_momentum', 'optim.muon_rms_match', 'optim.name',
    'optim.warmup_steps', 'optim.weight_decay',
    'parallel.context', 'parallel.data', 'parallel.expert', 'parallel.fsdp', 'parallel.pipeline',
    'parallel.pipeline_microbatches', 'parallel.pipeline_repeats', 'parallel.pipeline_schedule',
    'parallel.tensor', 'parallel.zero1',
    'platform', 'seed',
    'train.compile_cache_dir', 'train.eval_harness_include_path', 'train.eval_harness_interval',
    'train.eval_harness_limit', 'train.eval_harness_tasks', 'train.eval_interval', 'train.eval_steps',
    'train.fresh_start', 'train.grad_accum_steps', 'train.log_interval', 'train.max_skipped_in_a_row',
    'train.micro_batch_size', 'train.nonfinite', 'train.profile_steps', 'train.run_dir',
    'train.steps', 'train.transfer_guard',
]


def flat_keys(config, prefix=''):
  keys = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += flat_keys(value, f'{prefix}{name}.')
    else:
      keys.append(prefix + name)
  return sorted(keys)


def base_with(overrides: dict) -> ml_collections.ConfigDict:
  # Through a plain dict: that unties data.seq_len from model.max_seq_len (one
  # FieldReference), so a test can break one without moving the other.
  config = ml_collections.ConfigDict(base.get_config().to_dict())
  for dotted, value in overrides.items():
    *parents, name = dotted.split('.')
    setattr(functools.reduce(getattr, parents, config), name, value)
  return config


# (overrides of configs/base.py, device count, regex the one-line error must match)
BROKEN = [
    *[({f'model.{f}': 0}, 8, rf'model\.{f}=0 must be >= 1') for f in (
        'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
        'intermediate_size', 'max_seq_len')],
    ({'model.num_kv_heads': 3}, 8, r'model\.num_heads=4 is not divisible by model\.num_kv_heads=3'),
    ({'model.hidden_size': 130}, 8, r'model\.hidden_size=130 is not divisible by model\.num_heads=4'),
    ({'model.head_dim': 15}, 8, r'head dim 15 must be even'),
    ({'model.param_dtype': 'float16'}, 8, r"model\.param_dtype='float16' is not one of"),
    ({'model.compute_dtype': 'fp8'}, 8, r"model\.compute_dtype='fp8' is not one of"),
    ({'model.remat': 'some'}, 8, r"model\.remat='some' is not one of \('none', 'full', 'save_matmuls', "
                                 r"'save_qkv', 'save_attention', 'offload_attention'\)"),
    ({'model.attention': 'flash'}, 8, r"model\.attention='flash' is not one of \('auto', 'xla', 'cudnn', 'pallas'\)"),
    *[({f'model.{f}': 0.0}, 8, r'model\.norm_eps, model\.init_std and model\.rope_theta must be > 0')
      for f in ('norm_eps', 'init_std', 'rope_theta')],
    ({'data.seq_len': 256}, 8, r'data\.seq_len=256 must be in \[1, model\.max_seq_len=128\]'),
    ({'data.seq_len': 0}, 8, r'data\.seq_len=0 must be in \[1, model\.max_seq_len=128\]'),
    ({'data.source': ''}, 8, r"data\.source must be 'embedded' or a prepared dataset folder"),
    ({'data.packing': 'best_fit'}, 8, r"data\.packing='best_fit' is not one of \('concat', 'first_fit'\)"),
    ({'data.mixing': 'equal'}, 8, r"data\.mixing='equal' is not one of \('weighted', 'proportional'\)"),
    ({'data.packing': 'first_fit', 'data.bos_aligned': True}, 8, r"data\.bos_aligned=True needs data\.packing='concat'"),
    ({'data.worker_count': -1}, 8, r'data\.worker_count=-1 must be >= 0'),
    ({'data.read_threads': 0}, 8, r'data\.read_threads=0 must be >= 1'),
    ({'data.worker_buffer_size': 0}, 8, r'data\.worker_buffer_size=0 must be >= 1'),
    ({'data.row_shuffle_window': -1}, 8, r'data\.row_shuffle_window=-1 must be >= 0'),
    ({'data.val_fraction': 1.0}, 8, r'data\.val_fraction=1\.0 must be in \(0, 1\)'),
    ({'train.steps': 0}, 8, r'train\.steps=0 must be >= 1'),
    ({'train.micro_batch_size': 0}, 8, r'train\.micro_batch_size=0 must be >= 1'),
    ({'train.grad_accum_steps': 0}, 8, r'train\.grad_accum_steps=0 must be >= 1'),
    ({'train.eval_interval': -1}, 8, r'train\.eval_interval=-1 must be >= 0'),
    ({'train.eval_harness_limit': -1}, 8, r'train\.eval_harness_limit=-1 must be >= 0'),
    ({'train.eval_harness_tasks': 'arc_easy', 'parallel.pipeline': 2, 'parallel.data': 4}, 8,
     r'train\.eval_harness_tasks needs parallel\.pipeline=1 \(it is 2\)'),
    ({'train.eval_harness_tasks': 'arc_easy', 'train.eval_interval': 0}, 8,
     r'train\.eval_harness_tasks needs train\.eval_harness_interval or train\.eval_interval > 0'),
    ({'train.eval_steps': -1}, 8, r'train\.eval_steps=-1 must be >= 0'),
    ({'train.log_interval': 0}, 8, r'train\.log_interval=0 must be >= 1'),
    ({'train.run_dir': ''}, 8, r'train\.run_dir must be set'),
    ({'train.nonfinite': 'ignore'}, 8, r"train\.nonfinite='ignore' is not one of \('stop', 'skip'\)"),
    ({'train.max_skipped_in_a_row': 0}, 8, r'train\.max_skipped_in_a_row=0 must be >= 1'),
    ({'train.profile_steps': '10'}, 8, r"train\.profile_steps='10' must be 'START:STOP'"),
    ({'train.profile_steps': '10:x'}, 8, r"train\.profile_steps='10:x' must be 'START:STOP'"),
    ({'train.profile_steps': '5:5'}, 8, r"train\.profile_steps='5:5' needs 1 <= START < STOP"),
    ({'train.profile_steps': '0:3'}, 8, r"train\.profile_steps='0:3' needs 1 <= START < STOP"),
    ({'checkpoint.max_to_keep': 0}, 8, r'checkpoint\.max_to_keep=0 must be >= 1'),
    ({'checkpoint.keep_every': -1}, 8, r'checkpoint\.keep_every=-1 must be >= 0'),
    ({'checkpoint.interval': -1}, 8, r'checkpoint\.interval=-1 must be >= 0'),
    ({'optim.lr': 0.0}, 8, r'optim\.lr=0\.0 must be > 0'),
    ({'optim.lr': -0.1}, 8, r'optim\.lr=-0\.1 must be > 0'),
    ({'optim.min_lr': 0.01}, 8, r'optim\.min_lr=0\.01 must be in \[0, optim\.lr=0\.003\]'),
    ({'optim.min_lr': -0.1}, 8, r'optim\.min_lr=-0\.1 must be in \[0, optim\.lr=0\.003\]'),
    ({'optim.warmup_steps': 200}, 8, r'optim\.warmup_steps=200 must be in \[0, train\.steps=200\)'),
    ({'optim.warmup_steps': -1}, 8, r'optim\.warmup_steps=-1 must be in \[0, train\.steps=200\)'),
    ({'optim.decay': 'exp'}, 8, r"optim\.decay='exp' is not one of \('cosine', 'linear', 'constant', 'wsd'\)"),
    ({'optim.decay': 'wsd', 'optim.anneal_start_step': 10}, 8,
     r'optim\.anneal_start_step=10 must be in \[optim\.warmup_steps=20, train\.steps=200\) for wsd'),
    ({'optim.decay': 'wsd', 'optim.anneal_start_step': 200}, 8,
     r'optim\.anneal_start_step=200 must be in \[optim\.warmup_steps=20, train\.steps=200\) for wsd'),
    ({'optim.weight_decay': -0.1}, 8, r'optim\.weight_decay=-0\.1 must be >= 0'),
    ({'optim.b1': 1.0}, 8, r'optim\.b1=1\.0 and optim\.b2=0\.95 must be in \[0, 1\)'),
    ({'optim.b2': -0.5}, 8, r'optim\.b1=0\.9 and optim\.b2=-0\.5 must be in \[0, 1\)'),
    ({'optim.eps': 0.0}, 8, r'optim\.eps=0\.0 must be > 0'),
    ({'optim.grad_clip': -1.0}, 8, r'optim\.grad_clip=-1\.0 must be >= 0'),
    ({'optim.grad_reduce_dtype': 'float16'}, 8,
     r"optim\.grad_reduce_dtype='float16' is not one of \('float32', 'bfloat16'\)"),
    # µP and Muon
    ({'model.parametrization': 'mu'}, 8, r"model\.parametrization='mu' is not one of \('standard', 'mup'\)"),
    ({'model.parametrization': 'mup'}, 8, r"model\.mup_base_width=0 must be >= 1 with model\.parametrization='mup'"),
    ({'optim.name': 'sgd'}, 8, r"optim\.name='sgd' is not one of \('adamw', 'muon'\)"),
    ({'optim.muon_momentum': 1.0}, 8, r'optim\.muon_momentum=1\.0 must be in \[0, 1\)'),
    # mesh_shape
    ({'parallel.data': -1, 'parallel.tensor': -1}, 8, r"only one axis may be -1, got \['data', 'tensor'\]"),
    ({'parallel.fsdp': 0}, 8, r'parallel\.fsdp=0 must be >= 1 or -1'),
    ({'parallel.tensor': -2}, 8, r'parallel\.tensor=-2 must be >= 1 or -1'),
    ({'parallel.fsdp': 3}, 8, r'8 devices are not divisible by the fixed axes product 3 '
                              r'\(data=-1, fsdp=3, context=1, expert=1, tensor=1, pipeline=1\)'),
    ({'parallel.data': 2, 'parallel.fsdp': 3}, 8,
     r'data\*fsdp\*context\*expert\*tensor\*pipeline = 6 '
     r'\(data=2, fsdp=3, context=1, expert=1, tensor=1, pipeline=1\) but there are 8 devices'),
    ({'parallel.data': 2}, 1, r'data\*fsdp\*context\*expert\*tensor\*pipeline = 2 \(data=2, .*\) but there are 1 devices'),
    # checks on the resolved mesh
    ({'parallel.tensor': 8}, 8, r'parallel\.tensor=8 does not divide model\.num_heads=4'),
    ({'parallel.tensor': 4, 'model.num_heads': 8, 'model.num_kv_heads': 2}, 8,
     r'parallel\.tensor=4 does not divide model\.num_kv_heads=2'),
    ({'parallel.tensor': 2, 'model.intermediate_size': 385}, 8,
     r'parallel\.tensor=2 does not divide model\.intermediate_size=385'),
    ({'parallel.tensor': 2, 'data.seq_len': 127}, 8,
     r'parallel\.tensor=2 does not divide data\.seq_len=127'),
    ({'parallel.fsdp': 8, 'model.hidden_size': 132, 'model.num_heads': 2, 'model.num_kv_heads': 2}, 8,
     r'parallel\.fsdp=8 does not divide model\.hidden_size=132'),
    ({'train.micro_batch_size': 12, 'train.grad_accum_steps': 2}, 8,
     r'train\.micro_batch_size=12 \(global batch 24\) is not divisible by parallel\.data\*parallel\.fsdp\*parallel\.expert=8'),
    ({'train.micro_batch_size': 6, 'parallel.fsdp': 4}, 8,
     r'train\.micro_batch_size=6 \(global batch 6\) is not divisible by parallel\.data\*parallel\.fsdp\*parallel\.expert=8'),
    # Mixture of Experts
    ({'parallel.expert': 2}, 8, r'parallel\.expert=2 splits experts, but model\.num_experts=0'),
    ({'model.num_experts': 4, 'model.experts_per_token': 5}, 8,
     r'model\.experts_per_token=5 must be in \[1, model\.num_experts=4\]'),
    ({'model.num_experts': 6, 'parallel.expert': 4}, 8, r'parallel\.expert=4 does not divide model\.num_experts=6'),
    ({'model.num_experts': 4, 'model.moe_every': 3}, 8,
     r'model\.moe_every=3 must be >= 1 and divide model\.num_layers=4'),
    ({'model.num_experts': 4, 'model.moe_dispatch': 'ring'}, 8,
     r"model\.moe_dispatch='ring' is not one of \('gather', 'all_to_all'\)"),
    ({'model.num_experts': 4, 'model.moe_capacity_factor': 1.25}, 8,
     r"model\.moe_capacity_factor=1\.25 needs model\.moe_dispatch='all_to_all'"),
    ({'model.num_experts': 4, 'parallel.pipeline': 2, 'parallel.pipeline_schedule': '1f1b'}, 8,
     r"model\.num_experts=4 cannot take parallel\.pipeline_schedule='1f1b'"),
    ({'model.num_experts': 4, 'parallel.pipeline': 2, 'parallel.pipeline_repeats': 2,
      'parallel.pipeline_schedule': 'interleaved_1f1b'}, 8,
     r"model\.num_experts=4 cannot take parallel\.pipeline_schedule='interleaved_1f1b'"),
    ({'model.num_experts': 4, 'parallel.context': 2}, 8, r'model\.num_experts=4 cannot take parallel\.context=2'),
    ({'model.num_experts': 4, 'model.parametrization': 'mup', 'model.mup_base_width': 32}, 8,
     r"model\.num_experts=4 cannot take model\.parametrization='mup'"),
    ({'model.num_experts': 4, 'optim.name': 'muon'}, 8, r"model\.num_experts=4 cannot take optim\.name='muon'"),
    # context parallelism
    ({'parallel.context': 8, 'data.seq_len': 40}, 8,
     r'data\.seq_len=40 is not divisible by 2 x parallel\.context=8'),
    ({'parallel.context': 2, 'parallel.tensor': 4, 'model.num_heads': 8, 'data.seq_len': 36}, 8,
     r'parallel\.tensor=4 does not divide data\.seq_len / parallel\.context = 18'),
    ({'parallel.context': 2, 'model.attention': 'cudnn'}, 8,
     r"model\.attention='cudnn' cannot take parallel\.context=2"),
]


@pytest.mark.parametrize('overrides, num_devices, message', BROKEN,
                         ids=[','.join(o) + f'@{n}' for o, n, _ in BROKEN])
def test_broken_field_fails_with_one_line(overrides, num_devices, message):
  config = base_with(overrides)
  with pytest.raises(ConfigError, match=message) as error:
    validate(config, num_devices)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('overrides', [
    {'model.head_dim': 64, 'model.hidden_size': 130},  # explicit head_dim frees hidden_size
    {'optim.decay': 'wsd', 'optim.anneal_start_step': 20},  # anneal right after warmup
    {'optim.min_lr': 3e-3, 'optim.warmup_steps': 0},
    {'train.eval_interval': 0, 'train.eval_steps': 0, 'checkpoint.interval': 0, 'optim.grad_clip': 0.0},
    {'model.num_heads': 8, 'model.num_kv_heads': 1, 'parallel.tensor': 1},  # multi-query
], ids=str)
def test_edges_that_are_allowed(overrides):
  validate(base_with(overrides), 8)


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('num_devices', [1, 8])
def test_shipped_configs_validate(name, num_devices):
  sizes = validate(CONFIGS[name].get_config(), num_devices)
  assert sizes == {'data': num_devices, 'fsdp': 1, 'context': 1, 'expert': 1, 'tensor': 1, 'pipeline': 1}


@pytest.mark.parametrize('parallel, num_devices, expected', [
    ({'data': -1, 'fsdp': 2, 'tensor': 2}, 8, (2, 2, 1, 1, 2, 1)),
    ({'data': 2, 'fsdp': -1, 'tensor': 1}, 8, (2, 4, 1, 1, 1, 1)),
    ({'data': 1, 'fsdp': 1, 'tensor': -1}, 4, (1, 1, 1, 1, 4, 1)),
    ({'data': 2, 'fsdp': 2, 'tensor': 2}, 8, (2, 2, 1, 1, 2, 1)),  # no -1 at all
    ({'data': -1, 'context': 4}, 8, (2, 1, 4, 1, 1, 1)),
])
def test_mesh_shape_resolves_the_free_axis(parallel, num_devices, expected):
  config = base_with({f'parallel.{axis}': size for axis, size in parallel.items()})
  assert tuple(mesh_shape(config.parallel, num_devices).values()) == expected


def test_config_surface_is_snapshotted():
  assert flat_keys(base.get_config()) == BASE_KEYS


@pytest.mark.parametrize('name', ['tiny', 'llama_109m', 'moe_tiny', 'moe_1b'])
def test_variants_only_change_values(name):
  assert flat_keys(CONFIGS[name].get_config()) == flat_keys(base.get_config())


def run_train(*flags, run_dir):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)  # exactly one CPU device, whatever the caller forces
  return subprocess.run(
      [sys.executable, '-m', 'maxlite.train', '--config=configs/tiny.py',
       f'--config.train.run_dir={run_dir}', *flags],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unknown_override_is_rejected(tmp_path):
  result = run_train('--config.model.not_a_field=1', run_dir=tmp_path / 'run')
  assert result.returncode != 0
  assert 'not_a_field' in result.stderr


def test_bad_value_is_one_error_line(tmp_path):
  result = run_train('--config.parallel.tensor=3', run_dir=tmp_path / 'run')
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  last = [line for line in result.stderr.splitlines() if line.strip()][-1]
  # On one device tensor=3 cannot be resolved against data=-1: mesh_shape's message.
  assert last.startswith('error: parallel')
  assert 'tensor=3' in last
  assert not (tmp_path / 'run').exists()  # validation runs before anything is written
