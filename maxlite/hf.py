"""Hugging Face Llama export and import.

    python -m maxlite.hf export --run_dir=runs/tiny --out=hf/tiny [--step=N] [--dtype=bfloat16]
    python -m maxlite.hf config --hf_dir=hf/tiny   # prints the matching --config.model.X=Y flags

An exported folder loads with `transformers.LlamaForCausalLM.from_pretrained`;
`import_params` reads such a folder (ours or any Llama without biases or rope
scaling) back into maxlite's parameter layout. A µP model's forward multipliers
are folded into its weights on the way out and back out on the way in
(maxlite.model.parametrization.fold). A Mixture of Experts with every layer MoE
and no shared expert (maxlite.model.moe) is a Mixtral: it exports to
`MixtralForCausalLM` in the classic layout (`block_sparse_moe.experts.{e}.w1`,
w2, w3 and `block_sparse_moe.gate`, which transformers 4 and 5 both read) and
imports back; other MoE shapes are refused with the reason.

Shape legend: L layers, D hidden, N query heads, K kv heads, H head dim,
F mlp width, V vocab.

Rotary: maxlite rotates the pairs (i, i + H/2) with frequencies theta^(-2i/H),
which is exactly HF's `rotate_half` convention, so q and k kernels are exported
unpermuted. (The permutation in HF's own conversion script undoes Meta's
interleaved pairs (2i, 2i + 1), a layout maxlite never uses.)
"""
import argparse
import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np

from maxlite import checkpoint, state as state_lib
from maxlite.data import hf_tokenizer, tokenizers
from maxlite.model import parametrization
from maxlite.model.llama import LlamaConfig

DTYPES = ('float32', 'bfloat16')
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'  # sharded HF checkpoints
# maxlite field -> HF config.json key, for every field the parameters depend on.
FIELDS = (('vocab_size', 'vocab_size'), ('hidden_size', 'hidden_size'),
          ('num_layers', 'num_hidden_layers'), ('num_heads', 'num_attention_heads'),
          ('num_kv_heads', 'num_key_value_heads'), ('head_dim', 'head_dim'),
          ('intermediate_size', 'intermediate_size'), ('rope_theta', 'rope_theta'),
          ('norm_eps', 'rms_norm_eps'), ('tie_embeddings', 'tie_word_embeddings'))
# Per-layer tensors: HF name -> (maxlite path under 'blocks', in-dims of the maxlite kernel).
# HF Linear weights are [out, in]; maxlite kernels are [*in_dims, *out_dims].
LAYER_TENSORS = {
    'self_attn.q_proj': (('attention', 'q', 'kernel'), 1),  # [D, N, H] <-> [N*H, D]
    'self_attn.k_proj': (('attention', 'k', 'kernel'), 1),  # [D, K, H] <-> [K*H, D]
    'self_attn.v_proj': (('attention', 'v', 'kernel'), 1),
    'self_attn.o_proj': (('attention', 'o', 'kernel'), 2),  # [N, H, D] <-> [D, N*H]
    'mlp.gate_proj': (('mlp', 'gate', 'kernel'), 1),  # [D, F] <-> [F, D]
    'mlp.up_proj': (('mlp', 'up', 'kernel'), 1),
    'mlp.down_proj': (('mlp', 'down', 'kernel'), 1),  # [F, D] <-> [D, F]
    'input_layernorm': (('attention_norm', 'scale'), 0),
    'post_attention_layernorm': (('mlp_norm', 'scale'), 0),
}
# Mixtral's MoE tensors: HF name -> (maxlite path under 'moe_blocks', in-dims), per expert
# for the experts ({e}); the router is Mixtral's `gate`, maxlite's gate is w1.
MOE_TENSORS = {
    'block_sparse_moe.gate': (('mlp', 'router', 'kernel'), 1),  # [D, E] <-> [E, D]
    'block_sparse_moe.experts.{e}.w1': (('mlp', 'gate'), 1),  # [D, F] <-> [F, D]
    'block_sparse_moe.experts.{e}.w3': (('mlp', 'up'), 1),
    'block_sparse_moe.experts.{e}.w2': (('mlp', 'down'), 1),  # [F, D] <-> [D, F]
}
# Top-level tensors: HF name -> (maxlite path, in-dims); lm_head only when untied.
TOP_TENSORS = {
    'model.embed_tokens': (('embed', 'table'), 0),  # [V, D] in both
    'model.norm': (('final_norm', 'scale'), 0),
    'lm_head': (('lm_head', 'kernel'), 1),  # [D, V] <-> [V, D]
}


# -- layout --------------------------------------------------------------------


def _to_hf(kernel: np.ndarray, in_dims: int) -> np.ndarray:
  """A maxlite kernel (one layer) as an HF [out, in] weight; norms and tables pass through."""
  if in_dims == 0:
    return kernel
  num_in = int(np.prod(kernel.shape[:in_dims]))
  return np.ascontiguousarray(kernel.reshape(num_in, -1).T)  # safetensors needs contiguous buffers


def _hf_shape(shape: tuple, in_dims: int) -> tuple:
  if in_dims == 0:
    return tuple(shape)
  return (int(np.prod(shape[in_dims:])), int(np.prod(shape[:in_dims])))


def _from_hf(weight: np.ndarray, shape: tuple, in_dims: int) -> np.ndarray:
  """The inverse of `_to_hf`: an HF weight as a maxlite kernel of `shape` (one layer)."""
  if in_dims == 0:
    return weight.reshape(shape)
  return weight.T.reshape(shape)


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def hf_tensors(params: dict, cfg: LlamaConfig, dtype: str = 'float32') -> dict[str, np.ndarray]:
  """maxlite params (nested dict, stacked layers) -> HF Llama tensors by name, cast to dtype."""
  cast = np.dtype(_numpy_dtype(dtype))
  # The true vocabulary only: the padding rows are maxlite's (config.padded_vocab_size).
  host = state_lib.resize_vocab(jax.tree.map(np.asarray, params), state_lib.abstract_model(cfg)[2],
                                cfg.vocab_size)
  check_exportable(cfg, host)
  # µP's logit and attention multipliers live in the weights of a plain Llama.
  host = parametrization.fold(host, cfg)
  tensors = {}
  for name, (path, in_dims) in TOP_TENSORS.items():
    if name == 'lm_head' and cfg.tie_embeddings:
      continue
    tensors[f'{name}.weight'] = _to_hf(_get(host, path).astype(cast), in_dims)
  for name, (path, in_dims, index) in _layer_tensors(cfg).items():
    tensors[name] = _to_hf(_get(host, path)[index].astype(cast), in_dims)
  return tensors


def check_exportable(cfg: LlamaConfig, params=None):
  """ValueError unless the model is a Llama, or an MoE that Mixtral represents."""
  if not cfg.num_experts:
    return
  why = []
  if cfg.moe_every != 1:
    why.append(f'model.moe_every={cfg.moe_every} (Mixtral has MoE in every layer)')
  if cfg.moe_shared_expert_size:
    why.append(f'model.moe_shared_expert_size={cfg.moe_shared_expert_size} (Mixtral has no shared expert)')
  if params is not None and np.any(np.asarray(params['moe_blocks']['mlp']['bias']) != 0):
    why.append('a non-zero router bias from model.moe_bias_update_rate (Mixtral routes without one)')
  if why:
    raise ValueError(f'this Mixture of Experts has no transformers equivalent: {"; ".join(why)}')


def _layer_tensors(cfg: LlamaConfig) -> dict:
  """HF name -> (maxlite path, in-dims, index into the stacked parameter) of every per-layer tensor."""
  out = {}
  stack = 'moe_blocks' if cfg.num_experts else 'blocks'
  for layer in range(cfg.num_layers):
    prefix = f'model.layers.{layer}'
    for name, (path, in_dims) in LAYER_TENSORS.items():
      if cfg.num_experts and name.startswith('mlp.'):
        continue
      out[f'{prefix}.{name}.weight'] = ((stack, *path), in_dims, (layer,))
    if cfg.num_experts:
      for name, (path, in_dims) in MOE_TENSORS.items():
        for e in range(cfg.num_experts if '{e}' in name else 1):
          index = (layer, e) if '{e}' in name else (layer,)
          out[f'{prefix}.{name.format(e=e)}.weight'] = (('moe_blocks', *path), in_dims, index)
  return out


def _numpy_dtype(dtype: str):
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {DTYPES}')
  if dtype == 'bfloat16':
    import ml_dtypes  # numpy has no bfloat16; jax ships ml_dtypes
    return ml_dtypes.bfloat16
  return np.float32


# -- config.json -------------------------------------------------------------------


def hf_config(cfg: LlamaConfig, max_seq_len: int, tokenizer, dtype: str) -> dict:
  """The config.json of a LlamaForCausalLM with maxlite's architecture."""
  def special(name):
    token_id = getattr(tokenizer, name, -1) if tokenizer is not None else -1
    return token_id if token_id >= 0 else None

  moe = {}
  if cfg.num_experts:  # Mixtral: the experts' width is its intermediate_size
    moe = {'architectures': ['MixtralForCausalLM'], 'model_type': 'mixtral',
           'intermediate_size': cfg.moe_intermediate_size or cfg.intermediate_size,
           'num_local_experts': cfg.num_experts, 'num_experts_per_tok': cfg.experts_per_token,
           'router_jitter_noise': 0.0, 'output_router_logits': False, 'sliding_window': None}
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': cfg.vocab_size,  # the model's vocab (which may exceed the tokenizer's)
      'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': max_seq_len,
      'rms_norm_eps': cfg.norm_eps,
      # Older readers look for rope_theta, transformers >= 5 for rope_parameters.
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'rope_scaling': None,
      'attention_bias': False,
      'attention_dropout': 0.0,
      'mlp_bias': False,
      'tie_word_embeddings': cfg.tie_embeddings,
      'initializer_range': cfg.init_std,
      'bos_token_id': special('bos_id'),
      'eos_token_id': special('eos_id'),
      'pad_token_id': special('pad_id'),
      'use_cache': True,
      'torch_dtype': dtype,  # transformers < 5
      'dtype': dtype,
      **moe,
  }


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f'{path} is not valid JSON: {error}') from None


def model_overrides(hf_dir) -> dict:
  """maxlite `model` fields (maxlite names) that reproduce an HF Llama's architecture.

  model.max_seq_len is left out: data.seq_len follows it, and HF's
  max_position_embeddings (often 128K) is rarely the length to train at.
  Raises ValueError for what maxlite's Llama cannot represent.
  """
  path = pathlib.Path(hf_dir) / 'config.json'
  hf = _read_json(path)
  unsupported = []
  if hf.get('model_type') not in ('llama', 'mixtral'):
    unsupported.append(f"model_type={hf.get('model_type')!r} (only 'llama' and 'mixtral')")
  if hf.get('hidden_act', 'silu') != 'silu':
    unsupported.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
  for key in ('attention_bias', 'mlp_bias'):
    if hf.get(key):
      unsupported.append(f'{key}=true')
  rope = hf.get('rope_parameters') or {}
  for key in ('rope_scaling', 'rope_parameters'):
    kind = (hf.get(key) or {}).get('rope_type', (hf.get(key) or {}).get('type', 'default'))
    if kind != 'default':
      unsupported.append(f'{key} of type {kind!r} (only plain rotary)')
  if unsupported:
    raise ValueError(f'{path} is not supported: {"; ".join(unsupported)}')
  for key in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
              'intermediate_size'):
    if not isinstance(hf.get(key), int):
      raise ValueError(f'{path} has no integer {key}')
  moe = {}
  if hf.get('model_type') == 'mixtral':
    moe = {'num_experts': hf.get('num_local_experts', 8), 'experts_per_token': hf.get('num_experts_per_tok', 2),
           'moe_intermediate_size': hf['intermediate_size'], 'moe_every': 1, 'moe_shared_expert_size': 0}
  return {
      **moe,
      'vocab_size': hf['vocab_size'],
      'hidden_size': hf['hidden_size'],
      'num_layers': hf['num_hidden_layers'],
      'num_heads': hf['num_attention_heads'],
      # HF's defaults where a key is absent.
      'num_kv_heads': hf.get('num_key_value_heads') or hf['num_attention_heads'],
      'head_dim': hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'],
      'intermediate_size': hf['intermediate_size'],
      'rope_theta': float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0))),
      'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
  }


def check_config(hf_dir, cfg: LlamaConfig):
  """ValueError naming every field where the HF config.json and `cfg` disagree."""
  theirs = model_overrides(hf_dir)
  keys = dict(FIELDS)
  path = pathlib.Path(hf_dir) / 'config.json'
  mismatches = []
  if 'num_experts' in theirs:
    # Every layer is MoE: the dense width is unused; the experts' is Mixtral's intermediate_size.
    width = theirs.pop('moe_intermediate_size')
    del theirs['intermediate_size']
    if (cfg.moe_intermediate_size or cfg.intermediate_size) != width:
      mismatches.append(f'model.moe_intermediate_size={cfg.moe_intermediate_size} (experts '
                        f'{cfg.moe_intermediate_size or cfg.intermediate_size} wide) but {path} '
                        f'has intermediate_size={width}')
  mismatches += [f'model.{field}={getattr(cfg, field)} but {path} has {keys.get(field, field)}={value}'
                 for field, value in theirs.items() if getattr(cfg, field) != value]
  if mismatches:
    raise ValueError('; '.join(mismatches))


# -- import ----------------------------------------------------------------------------


def _weight_files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the safetensors file holding it (one file, or a sharded index)."""
  from safetensors import safe_open
  if (hf_dir / INDEX_FILE).is_file():
    index = _read_json(hf_dir / INDEX_FILE)
    return {name: hf_dir / file for name, file in index.get('weight_map', {}).items()}
  if not (hf_dir / WEIGHTS_FILE).is_file():
    raise FileNotFoundError(f'{hf_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}')
  with safe_open(hf_dir / WEIGHTS_FILE, framework='numpy') as f:
    return {name: hf_dir / WEIGHTS_FILE for name in f.keys()}


def import_params(hf_dir, cfg: LlamaConfig) -> dict:
  """An HF Llama safetensors folder as maxlite params: a nested dict of NumPy
  arrays with exactly the shapes and dtypes of `state.abstract_model(cfg)`."""
  from safetensors import safe_open
  hf_dir = pathlib.Path(hf_dir)
  check_config(hf_dir, cfg)
  files = _weight_files(hf_dir)
  expected = {}  # HF name -> (maxlite path, in-dims, layer or None)
  for name, (path, in_dims) in TOP_TENSORS.items():
    if not (name == 'lm_head' and cfg.tie_embeddings):
      expected[f'{name}.weight'] = (path, in_dims, ())
  check_exportable(cfg)
  expected.update(_layer_tensors(cfg))
  missing = sorted(set(expected) - set(files))
  if missing:
    raise ValueError(f'{hf_dir} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}')
  # Tied checkpoints sometimes store lm_head anyway; old ones store rotary tables.
  extra = sorted(n for n in set(files) - set(expected)
                 if not n.endswith('rotary_emb.inv_freq') and n != 'lm_head.weight')
  if extra:
    raise ValueError(f'{hf_dir} has {len(extra)} tensor(s) a maxlite Llama does not use, e.g. {extra[0]}')

  _, abstract, logical = state_lib.abstract_model(cfg)
  # Filled at the true vocabulary's size, then padded with zero rows as the model keeps it.
  # Zeros: what no HF tensor fills (an MoE router's balancing bias) stays zero.
  params = state_lib.resize_vocab(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract),
                                  logical, cfg.vocab_size)
  by_file = {}
  for name in expected:
    by_file.setdefault(files[name], []).append(name)
  for file, names in by_file.items():
    with safe_open(file, framework='numpy') as f:  # one tensor at a time: one copy in memory
      for name in names:
        path, in_dims, index = expected[name]
        target = _get(params, path)
        index = index or ...
        shape = target[index].shape
        weight = f.get_tensor(name)
        want = _hf_shape(shape, in_dims)
        if weight.shape != want:
          raise ValueError(f'{file}: {name} has shape {list(weight.shape)}, expected {list(want)}')
        target[index] = _from_hf(weight, shape, in_dims).astype(target.dtype)
  params = parametrization.fold(params, cfg, inverse=True)  # µP: the multipliers back out
  return state_lib.resize_vocab(params, logical, cfg.vocab_rows)


# -- export -------------------------------------------------------------------------------


def _check_out_dir(out_dir: pathlib.Path):
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f'--out={out_dir} exists and is not empty; pick another folder')


def write_folder(out_dir, params: dict, cfg: LlamaConfig, *, max_seq_len: int, tokenizer=None,
                 add_bos: bool = True, dtype: str = 'float32', log=print) -> pathlib.Path:
  """Writes an HF Llama folder from maxlite params; it appears complete or not at all.

  add_bos: whether the training documents began with BOS (the tokenizer files say so).
  """
  from safetensors.numpy import save_file
  out_dir = pathlib.Path(out_dir).absolute()
  _check_out_dir(out_dir)
  tensors = hf_tensors(params, cfg, dtype)
  staging = out_dir.with_name(f'.{out_dir.name}.tmp-{os.getpid()}')
  staging.mkdir(parents=True)
  try:
    save_file(tensors, staging / WEIGHTS_FILE, metadata={'format': 'pt'})  # transformers asks for 'pt'
    config = hf_config(cfg, max_seq_len, tokenizer, dtype)
    (staging / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    generation = {k: config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
                  if config[k] is not None}
    (staging / 'generation_config.json').write_text(json.dumps(generation, indent=2) + '\n')
    if tokenizer is None:
      log('note: no tokenizer files written (the run has no tokenizer/ folder)')
    elif (why := hf_tokenizer.write_files(tokenizer, staging, max_seq_len, add_bos)) is not None:
      log(f'note: no tokenizer files written: {why}')
    _check_out_dir(out_dir)
    os.replace(staging, out_dir)  # replaces an empty out_dir, fails on a non-empty one
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out_dir


def _host_device():
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # jax_platforms without cpu
    return jax.local_devices()[0]


def export(run_dir, out_dir, step: int | None = None, dtype: str = 'float32', log=print) -> pathlib.Path:
  """Writes checkpoint `step` (default: the newest) of `run_dir` as an HF Llama folder."""
  _numpy_dtype(dtype)  # a bad dtype fails before anything is read
  run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
  if not run_dir.is_dir():
    raise FileNotFoundError(f'--run_dir={run_dir} does not exist')
  _check_out_dir(out_dir)
  step, config = checkpoint.read_config(run_dir, step)
  cfg = LlamaConfig.from_config(config.model)
  params = jax.device_get(checkpoint.load_params(
      run_dir, step, state_lib.abstract_model(cfg)[1],
      jax.sharding.SingleDeviceSharding(_host_device())))
  tokenizer_dir = run_dir / 'tokenizer'
  tokenizer, add_bos = None, True
  if (tokenizer_dir / tokenizers.DESCRIPTION_FILE).is_file():
    tokenizer = tokenizers.load_saved_tokenizer(tokenizer_dir)
    add_bos, _ = tokenizers.saved_document_specials(tokenizer_dir)
  out = write_folder(out_dir, params, cfg, max_seq_len=config.model.max_seq_len, tokenizer=tokenizer,
                     add_bos=add_bos, dtype=dtype, log=log)
  log(f'exported step {step} of {run_dir} to {out}')
  return out


# -- CLI ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv=None):
  parser = _Parser(prog='python -m maxlite.hf', description='Hugging Face Llama export and import.')
  commands = parser.add_subparsers(dest='command', required=True)
  export_parser = commands.add_parser('export', help='a run checkpoint -> an HF Llama folder')
  export_parser.add_argument('--run_dir', required=True)
  export_parser.add_argument('--out', required=True, help='a new (or empty) folder')
  export_parser.add_argument('--step', type=int, default=None, help='default: the newest checkpoint')
  export_parser.add_argument('--dtype', default='float32', choices=DTYPES)
  config_parser = commands.add_parser('config', help='print --config.model flags matching an HF folder')
  config_parser.add_argument('--hf_dir', required=True)
  args = parser.parse_args(argv)
  try:
    if args.command == 'export':
      # Parameters go straight from the checkpoint to files: no accelerator needed.
      jax.config.update('jax_platforms', os.environ.get('JAX_PLATFORMS') or 'cpu')
      export(args.run_dir, args.out, args.step, args.dtype, log=lambda m: print(m, file=sys.stderr))
    else:
      for field, value in model_overrides(args.hf_dir).items():
        print(f'--config.model.{field}={value}')
  except (ValueError, OSError) as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
