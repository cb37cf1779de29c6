"""HF Llama export and import, checked against transformers' LlamaForCausalLM on CPU."""
import json
import os
import subprocess
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # everything here is local files

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import torch
import transformers
from safetensors.numpy import load_file

from configs import tiny
from maxlite import checkpoint, hf, state as state_lib
from maxlite.checkpoint import Checkpointer
from maxlite.config import ConfigError
from maxlite.data import hf_tokenizer, tokenizers
from maxlite.model.llama import LlamaConfig
from maxlite.train import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 32


def run_config(run_dir, **model):
  """A small byte-level Llama: GQA, head_dim != hidden / heads, a padded vocab, a non-default theta."""
  config = tiny.get_config()
  config.train.run_dir = str(run_dir)
  config.train.update(steps=2, eval_steps=0, log_interval=1, micro_batch_size=8)
  config.model.update(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=24, intermediate_size=96, max_seq_len=SEQ_LEN, rope_theta=500.0,
                      init_std=0.2)
  config.model.update(model)
  # Large constant-lr Adam steps move every parameter, norm scales included,
  # by about lr: a mislabelled norm then changes the logits visibly.
  config.optim.update(lr=0.1, min_lr=0.0, warmup_steps=0, decay='constant')
  return config


@pytest.fixture(scope='module')
def untied_run(tmp_path_factory):
  """A genuine run directory: two steps of maxlite.train."""
  run_dir = tmp_path_factory.mktemp('untied') / 'run'
  train(run_config(run_dir, tie_embeddings=False))
  return run_dir


@pytest.fixture(scope='module')
def tied_run(tmp_path_factory):
  """A multi-query, tied-embedding run written by train's Checkpointer without
  training (compiling a second train step would double this file's time)."""
  run_dir = tmp_path_factory.mktemp('tied') / 'run'
  config = run_config(run_dir, tie_embeddings=True, num_kv_heads=1)
  cfg = LlamaConfig.from_config(config.model)
  rng = np.random.default_rng(1)

  def draw(path, x):  # NumPy draws: an eager init_params takes seconds here
    if 'scale' in jax.tree_util.keystr(path):  # norm scales away from 1, so each one matters
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    return jnp.asarray(rng.normal(0.0, cfg.init_std, x.shape), x.dtype)

  _, abstract, logical = state_lib.abstract_model(cfg)
  params = jax.tree_util.tree_map_with_path(draw, abstract)
  # The padding rows of the vocabulary are zeros, as maxlite initialises and keeps them.
  params = state_lib.resize_vocab(state_lib.resize_vocab(params, logical, cfg.vocab_size),
                                  logical, cfg.vocab_rows)
  tokenizers.save_tokenizer(tokenizers.ByteTokenizer(), run_dir / 'tokenizer')
  checkpointer = Checkpointer(run_dir, interval=1, max_to_keep=1)
  state = state_lib.TrainState(step=jnp.int32(3), params=params, opt_state=())
  checkpointer.save(3, state, config.to_json_best_effort(), {}, {'source_tokens': [0]})
  checkpointer.close()
  return run_dir


@pytest.fixture(scope='module')
def exported(untied_run, tied_run, tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  return {name: hf.export(run, root / name, log=lambda _: None)
          for name, run in (('untied', untied_run), ('tied', tied_run))}


def checkpoint_model(run_dir):
  """(LlamaConfig, params) of a run's newest checkpoint, read without maxlite.hf."""
  step, config = checkpoint.read_config(run_dir)
  cfg = LlamaConfig.from_config(config.model)
  return cfg, checkpoint.load_params(run_dir, step, state_lib.abstract_model(cfg)[1],
                                     jax.sharding.SingleDeviceSharding(jax.devices()[0]))


@pytest.mark.parametrize('variant', ['untied', 'tied'])
def test_transformers_logits_match_maxlite(variant, exported, request):
  cfg, params = checkpoint_model(request.getfixturevalue(f'{variant}_run'))
  assert np.std(np.asarray(params['blocks']['mlp_norm']['scale'])) > 0.05  # norms are told apart
  tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, SEQ_LEN))
  positions_BT = np.broadcast_to(np.arange(SEQ_LEN), tokens_BT.shape)
  ours_BTV = np.asarray(nnx.merge(state_lib.abstract_model(cfg)[0], params)(
      jnp.asarray(tokens_BT), jnp.ones_like(tokens_BT), jnp.asarray(positions_BT),
      compute_dtype=jnp.float32))

  model = transformers.LlamaForCausalLM.from_pretrained(exported[variant], dtype=torch.float32)
  with torch.no_grad():
    theirs_BTV = model(torch.tensor(tokens_BT)).logits.numpy()
  assert theirs_BTV.shape == (3, SEQ_LEN, cfg.vocab_size)
  assert theirs_BTV.std() > 0.5  # far from zero, so 1e-4 is a real bound
  assert np.abs(theirs_BTV - ours_BTV).max() <= 1e-4


def test_import_of_a_model_saved_by_transformers(tmp_path):
  config = transformers.LlamaConfig(
      vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
      num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=2000.0, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, weight in model.named_parameters():
      scale = 1.0 if 'norm' in name else 0.15  # random norms too, so each one matters
      weight.copy_(scale * torch.randn_like(weight) + (1.0 if 'norm' in name else 0.0))
  model.save_pretrained(tmp_path)

  cfg = LlamaConfig(**config_fields(tmp_path))
  assert (cfg.head_dim, cfg.rope_theta, cfg.num_kv_heads) == (8, 2000.0, 3)
  params = hf.import_params(tmp_path, cfg)
  tokens_BT = np.random.default_rng(1).integers(0, 100, (2, 16))
  ours_BTV = np.asarray(nnx.merge(state_lib.abstract_model(cfg)[0], params)(
      jnp.asarray(tokens_BT), jnp.ones_like(tokens_BT), jnp.broadcast_to(jnp.arange(16), (2, 16)),
      compute_dtype=jnp.float32))
  with torch.no_grad():
    theirs_BTV = model(torch.tensor(tokens_BT)).logits.numpy()
  assert theirs_BTV.std() > 0.5 and np.abs(theirs_BTV - ours_BTV).max() <= 1e-4


def test_byte_tokenizer_export_matches_maxlite(exported):
  theirs = transformers.AutoTokenizer.from_pretrained(exported['untied'])
  ours = tokenizers.ByteTokenizer()
  for text in ('hello wörld\n\tdef f():', '  日本語 🙂 <s></s>\x00', ''):
    ids = theirs.encode(text, add_special_tokens=False)
    assert ids == ours.encode(text).tolist()
    assert theirs.decode(ids) == ours.decode(ids) == text
    assert theirs(text)['input_ids'] == [ours.bos_id, *ids]
  assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (256, 257, 258)


def test_a_run_trained_without_bos_exports_tokenizers_without_bos(tmp_path):
  """The tokenizer files follow the run's record of its data (data_prep --no_add_bos)."""
  ours = tokenizers.ByteTokenizer()
  for add_bos in (True, False):
    folder = tmp_path / str(add_bos)
    folder.mkdir()
    assert hf_tokenizer.write_files(ours, folder, SEQ_LEN, add_bos=add_bos) is None
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ids = ours.encode('def f').tolist()
    assert theirs('def f')['input_ids'] == ([ours.bos_id] if add_bos else []) + ids


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_sentencepiece_export(model_type, tmp_path):
  import sentencepiece
  lines = [f'def f{i}(x):  return x * {i} + "wörld"' for i in range(300)]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(tmp_path / 'sp'), model_type=model_type,
      vocab_size=300, byte_fallback=True, normalization_rule_name='identity',
      remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
  ours = tokenizers.SentencePieceTokenizer(tmp_path / 'sp.model')
  (tmp_path / 'out').mkdir()
  why = hf_tokenizer.write_files(ours, tmp_path / 'out', SEQ_LEN)
  if model_type == 'unigram':
    assert 'non-BPE' in why and not any((tmp_path / 'out').iterdir())
    return
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  # Texts that start with whitespace differ: transformers 5 never doubles the leading '▁'.
  for text in ('def g(y):\n\treturn  "wörld" 日本', 'x'):
    ids = theirs.encode(text, add_special_tokens=False)
    assert ids == ours.encode(text).tolist() and theirs.decode(ids) == text
    assert theirs(text)['input_ids'] == [ours.bos_id, *ids]


def test_tokenizer_json_export(tmp_path):
  (tmp_path / 'tokenizer.json').write_text(hf_tokenizer.byte_tokenizer_json())
  ours = tokenizers.HFTokenizer(tmp_path / 'tokenizer.json')
  (tmp_path / 'out').mkdir()
  assert hf_tokenizer.write_files(ours, tmp_path / 'out', SEQ_LEN) is None
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  text = ' hello wörld'
  assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).tolist()
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
      ours.bos_id, ours.eos_id, ours.pad_id)


def _same_folder(first, second):
  a, b = load_file(first / hf.WEIGHTS_FILE), load_file(second / hf.WEIGHTS_FILE)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  for name in ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'):
    assert json.loads((first / name).read_text()) == json.loads((second / name).read_text()), name


@pytest.mark.parametrize('variant,dtype', [('untied', 'float32'), ('tied', 'bfloat16')])
def test_import_then_export_is_the_identity(variant, dtype, exported, request, tmp_path):
  run_dir = request.getfixturevalue(f'{variant}_run')
  cfg, original = checkpoint_model(run_dir)
  folder = exported[variant] if dtype == 'float32' else hf.export(run_dir, tmp_path / 'a', dtype=dtype)
  params = hf.import_params(folder, cfg)
  abstract = state_lib.abstract_model(cfg)[1]
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  for x, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
    assert isinstance(x, np.ndarray) and (x.shape, x.dtype) == (want.shape, want.dtype)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(hf._numpy_dtype(dtype)).astype(np.float32), original)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, rounded))

  again = hf.write_folder(tmp_path / 'b', params, cfg, max_seq_len=SEQ_LEN, dtype=dtype,
                          tokenizer=tokenizers.ByteTokenizer())
  _same_folder(folder, again)
  assert load_file(again / hf.WEIGHTS_FILE)['model.norm.weight'].dtype.name == dtype


def config_fields(folder) -> dict:
  """LlamaConfig fields for an exported folder: its model_overrides plus training-only fields."""
  return {**hf.model_overrides(folder), 'init_std': 0.2, 'param_dtype': 'float32'}


def test_config_mismatch_names_the_field(exported):
  cfg = config_fields(exported['untied'])
  with pytest.raises(ValueError, match=r'^model.num_layers=3 but .*config.json has num_hidden_layers=2$'):
    hf.import_params(exported['untied'], LlamaConfig(**{**cfg, 'num_layers': 3}))
  with pytest.raises(ValueError) as error:
    hf.import_params(exported['untied'], LlamaConfig(**{**cfg, 'num_kv_heads': 4, 'tie_embeddings': True}))
  assert 'model.num_kv_heads=4' in str(error.value) and 'tie_word_embeddings=False' in str(error.value)
  assert '\n' not in str(error.value)


def test_model_overrides_rebuild_the_config(exported, untied_run):
  _, config = checkpoint.read_config(untied_run)
  expected = LlamaConfig.from_config(config.model)
  # Whether the layers run scanned or unrolled is not part of the exported model.
  fields = {**config_fields(exported['untied']), 'scan_layers': expected.scan_layers}
  assert LlamaConfig(**fields) == expected


@pytest.mark.parametrize('change,message', [
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}, "rope_scaling of type 'llama3'"),
    ({'attention_bias': True}, 'attention_bias=true'),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
    ({'model_type': 'mistral'}, "model_type='mistral'"),
])
def test_unsupported_hf_configs_are_refused(change, message, exported, tmp_path):
  config = json.loads((exported['tied'] / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, **change}))
  with pytest.raises(ValueError, match=f'config.json is not supported: .*{message}'):
    hf.model_overrides(tmp_path)


def test_non_empty_out_dir_is_refused(tied_run, tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not empty'):
    hf.export(tied_run, tmp_path)
  assert [p.name for p in tmp_path.iterdir()] == ['notes.txt']


def test_cli_export_config_and_errors(tied_run, exported, tmp_path, capsys):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XDG_CACHE_HOME': os.environ['XDG_CACHE_HOME']}
  env.pop('XLA_FLAGS', None)

  def start(*args):
    return subprocess.Popen([sys.executable, '-m', 'maxlite.hf', *map(str, args)], cwd=REPO_ROOT,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  # Side by side: each pays the jax import.
  good = start('export', f'--run_dir={tied_run}', f'--out={tmp_path / "out"}', '--step=3')
  missing = start('export', f'--run_dir={tmp_path / "nope"}', f'--out={tmp_path / "out2"}')
  good_stderr, missing_stderr = good.communicate(timeout=300)[1], missing.communicate(timeout=300)[1]
  assert good.returncode == 0, good_stderr
  _same_folder(exported['tied'], tmp_path / 'out')
  assert missing.returncode != 0 and not (tmp_path / 'out2').exists()
  assert missing_stderr.strip().count('\n') == 0 and 'nope does not exist' in missing_stderr, missing_stderr

  hf.main(['config', f'--hf_dir={exported["tied"]}'])
  flags = capsys.readouterr().out.splitlines()
  assert '--config.model.num_kv_heads=1' in flags and '--config.model.tie_embeddings=True' in flags


def test_a_run_starts_from_imported_weights(untied_run, exported, tmp_path):
  config = run_config(tmp_path / 'run', tie_embeddings=False)
  config.checkpoint.init_from_hf = str(exported['untied'])
  # A step of lr 1e-30 is below float32 resolution: the saved weights are the imported ones.
  config.optim.lr = 1e-30
  config.train.steps = 1
  train(config)
  cfg, source = checkpoint_model(untied_run)
  _, started = checkpoint_model(tmp_path / 'run')
  for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(source)):
    np.testing.assert_array_equal(a, b)

  config.train.run_dir = str(tmp_path / 'mismatch')
  config.model.num_layers = 3
  with pytest.raises(ConfigError, match=r'checkpoint\.init_from_hf: model\.num_layers=3 but .*'
                                        r'config\.json has num_hidden_layers=2'):
    train(config)
  assert not (tmp_path / 'mismatch').exists()


def test_mixtral_export_matches_transformers_and_imports_back(tmp_path):
  """An MoE (every layer, top-2 of 4) exports as MixtralForCausalLM with the same
  logits, imports back to the same parameters; MoE shapes Mixtral lacks are refused."""
  config = run_config(tmp_path / 'run', tie_embeddings=False, num_experts=4, experts_per_token=2,
                      moe_intermediate_size=32)
  cfg = LlamaConfig.from_config(config.model)
  rng = np.random.default_rng(2)

  def draw(path, x):
    if 'scale' in jax.tree_util.keystr(path):
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    if 'bias' in jax.tree_util.keystr(path):
      return np.zeros(x.shape, x.dtype)
    return rng.normal(0.0, cfg.init_std, x.shape).astype(x.dtype)

  graphdef, abstract, logical = state_lib.abstract_model(cfg)
  params = jax.tree_util.tree_map_with_path(draw, abstract)
  params = state_lib.resize_vocab(state_lib.resize_vocab(params, logical, cfg.vocab_size),
                                  logical, cfg.vocab_rows)
  folder = hf.write_folder(tmp_path / 'hf', params, cfg, max_seq_len=SEQ_LEN)

  tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ_LEN))
  ours_BTV = np.asarray(nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))(
      jnp.asarray(tokens_BT), jnp.ones_like(tokens_BT),
      jnp.broadcast_to(jnp.arange(SEQ_LEN), tokens_BT.shape), compute_dtype=jnp.float32))
  model = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32)
  with torch.no_grad():
    theirs_BTV = model(torch.tensor(tokens_BT)).logits.numpy()
  assert theirs_BTV.std() > 0.5
  assert np.abs(theirs_BTV - ours_BTV).max() <= 1e-4

  assert hf.model_overrides(folder)['num_experts'] == 4
  back = hf.import_params(folder, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)

  shared = LlamaConfig.from_config(run_config(tmp_path / 'x', num_experts=4, moe_intermediate_size=32,
                                              moe_shared_expert_size=16).model)
  with pytest.raises(ValueError, match='moe_shared_expert_size=16 .Mixtral has no shared expert'):
    hf.write_folder(tmp_path / 'shared', state_lib.init_params(shared, 0), shared,
                    max_seq_len=SEQ_LEN)
