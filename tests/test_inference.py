"""maxlite.load_model: a run's logits against the model run directly and through
its KV-cache path, on one device and on a tensor mesh. (tests/test_evaluate.py
checks them against the eval step's loss on a trained run.)"""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maxlite
from configs import tiny
from maxlite import checkpoint, inference, state as state_lib
from maxlite.data import tokenizers
from maxlite.model.llama import KVCache, LlamaConfig

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A run directory as training writes it, with random weights: 4 heads, 4 kv
  heads and an MLP of 64 split over 4 of the 8 devices; an untied LM head."""
  run_dir = tmp_path_factory.mktemp('inference') / 'run'
  config = tiny.get_config()
  config.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      intermediate_size=64, max_seq_len=32, tie_embeddings=False)
  cfg = LlamaConfig.from_config(config.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
                        state_lib.abstract_model(cfg)[1])
  checkpointer = checkpoint.Checkpointer(run_dir, interval=1, max_to_keep=1)
  checkpointer.save(5, state_lib.TrainState(step=jnp.int32(5), params=params, opt_state=()),
                    config.to_json_best_effort(), {}, {'source_tokens': [0]})
  checkpointer.close()
  tokenizers.save_tokenizer(tokenizers.ByteTokenizer(), run_dir / 'tokenizer', add_bos=True,
                            add_eos=True)
  return run_dir, cfg, params


def tokens(batch: int, length: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 264, (batch, length), dtype=np.int32)


@pytest.fixture(scope='module')
def one_device(run):
  return maxlite.load_model(run[0], devices=jax.devices()[:1])


def test_logits_equal_the_models_on_one_device(run, one_device):
  run_dir, cfg, params = run
  model = one_device
  assert (model.step, model.vocab_size, model.max_seq_len, model.add_bos) == (5, 264, 32, True)
  assert isinstance(model.tokenizer, tokenizers.ByteTokenizer) and model.mesh.size == 1
  tokens_BT = tokens(3, 16, seed=1)
  logits = model(tokens_BT)
  assert logits.dtype == jnp.float32 and logits.shape == (3, 16, 264)

  # The model itself, outside any mesh, on the parameters as saved.
  graphdef = state_lib.abstract_model(cfg)[0]
  positions_BT = np.broadcast_to(np.arange(16, dtype=np.int32), tokens_BT.shape)
  direct = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, jnp.ones_like(t), positions_BT))
  np.testing.assert_allclose(logits, direct(params, tokens_BT), rtol=1e-6, atol=1e-6)
  # Generation's path: the same tokens through a KV cache.
  cached = jax.jit(lambda p, t: nnx.merge(graphdef, p).decode(
      t, positions_BT, KVCache.zeros(cfg, 3, 16, jnp.float32))[0])
  np.testing.assert_allclose(logits, cached(params, tokens_BT), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def on_tensor_mesh(run):
  return maxlite.load_model(run[0])  # every device that splits the model evenly


@pytest.mark.parametrize('length', [16, 13])  # sequence-parallel blocks, and whole-length ones
def test_a_tensor_mesh_gives_the_one_device_logits(on_tensor_mesh, one_device, length):
  model = on_tensor_mesh
  assert dict(model.mesh.shape) == {'data': 1, 'fsdp': 1, 'context': 1, 'expert': 1, 'tensor': 4, 'pipeline': 1}
  tokens_BT = tokens(2, length, seed=length)
  logits = model(tokens_BT)
  assert logits.shape == (2, length, 264)  # the true vocabulary, not the mesh's padding
  np.testing.assert_allclose(logits, one_device(tokens_BT), rtol=1e-5, atol=1e-5)


def test_packed_rows_score_each_document_alone(on_tensor_mesh):
  model = on_tensor_mesh
  first, second = tokens(1, 5, seed=3), tokens(1, 11, seed=4)
  packed = np.concatenate([first, second], axis=1)
  segment_ids = np.array([[1] * 5 + [2] * 11])
  positions = np.array([[*range(5), *range(11)]])
  logits = model(packed, segment_ids, positions)
  np.testing.assert_allclose(logits[:, :5], model(first), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], model(second), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('call,message', [
    (lambda m: m(np.arange(4)), r'tokens must be a \[batch, length\] integer array, got int64 of shape \(4,\)'),
    (lambda m: m(np.zeros((1, 4))), 'got float64 of shape'),
    (lambda m: m(np.array([[1, 264]])), r'token ids must be in \[0, 264\); got ids from 1 to 264'),
    (lambda m: m(np.ones((1, 4), int), np.ones((1, 3), int)), 'must have the shape of tokens'),
])
def test_bad_tokens_are_one_line_errors(one_device, call, message):
  with pytest.raises(ValueError, match=message):
    call(one_device)


def test_importing_maxlite_stays_light():
  code = ('import sys, maxlite; assert "jax" not in sys.modules; '
          'print(maxlite.load_model is maxlite.inference.load_model)')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and result.stdout == 'True\n', result.stderr
  assert inference.load_model.__doc__
