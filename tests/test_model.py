"""The Llama forward pass against an independent float64 NumPy implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlite.model.llama import Llama, LlamaConfig
from maxlite.state import init_params
from flax import nnx


def small_config(**overrides) -> LlamaConfig:
  values = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=True,
                init_std=0.2, param_dtype='float64')
  values.update(overrides)
  return LlamaConfig(**values)


def numpy_llama(params, tokens, segment_ids, cfg: LlamaConfig):
  """Textbook Llama in float64: K/V repeated per group, index-based causal mask."""
  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

  batch, length = tokens.shape
  # Positions restart at every document boundary.
  positions = np.zeros_like(tokens)
  for b in range(batch):
    for t in range(1, length):
      positions[b, t] = 0 if segment_ids[b, t] != segment_ids[b, t - 1] else positions[b, t - 1] + 1
  half = cfg.head_dim // 2
  freq = cfg.rope_theta ** (-np.arange(half) / half)
  angle = positions[..., None] * freq  # [B, T, half]
  cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]

  def rope(x):
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

  index = np.arange(length)
  mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (index[:, None] >= index[None, :])
  group = cfg.num_heads // cfg.num_kv_heads
  blocks = params['blocks']
  x = params['embed']['table'][tokens]
  for layer in range(cfg.num_layers):
    p = jax.tree.map(lambda a: np.asarray(a)[layer], blocks)
    h = rms(x, p['attention_norm']['scale'])
    q = rope(np.einsum('btd,dnh->btnh', h, p['attention']['q']['kernel']))
    k = rope(np.einsum('btd,dkh->btkh', h, p['attention']['k']['kernel']))
    v = np.einsum('btd,dkh->btkh', h, p['attention']['v']['kernel'])
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum('bnts,bsnh->btnh', probs, v)
    x = x + np.einsum('btnh,nhd->btd', attended, p['attention']['o']['kernel'])
    h = rms(x, p['mlp_norm']['scale'])
    gate = h @ p['mlp']['gate']['kernel']
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ p['mlp']['up']['kernel'])) @ p['mlp']['down']['kernel']
  x = rms(x, params['final_norm']['scale'])
  head = params['embed']['table'].T if cfg.tie_embeddings else params['lm_head']['kernel']
  # The model's vocabulary is padded (maxlite.config.padded_vocab_size); only the true ids count.
  return (x @ head)[..., :cfg.vocab_size], positions


def random_documents(rng, batch, length):
  """Segment ids with several documents of random lengths per row."""
  cuts = np.sort(rng.integers(1, length, size=(batch, 3)), axis=1)
  return 1 + (np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1)


@pytest.mark.parametrize('tie_embeddings', [True, False])
@pytest.mark.parametrize('scan_layers', [True, False])
def test_forward_matches_float64_numpy(tie_embeddings, scan_layers):
  rng = np.random.default_rng()
  cfg = small_config(tie_embeddings=tie_embeddings, scan_layers=scan_layers)
  with jax.enable_x64(True):
    params = init_params(cfg, seed=int(rng.integers(1 << 30)))
    # Norm scales start at 1; perturb them so a wrong scale would show.
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape), params)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 24))
    segment_ids = random_documents(rng, 3, 24)
    expected, positions = numpy_llama(jax.tree.map(np.asarray, params), tokens, segment_ids, cfg)
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))), params)
    logits = model(jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(positions),
                   compute_dtype=jnp.float64)
    assert logits.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-6, atol=1e-9)


def test_documents_do_not_attend_to_each_other():
  """Changing one document's tokens leaves the other documents' logits untouched."""
  rng = np.random.default_rng()
  cfg = small_config(param_dtype='float32')
  params = init_params(cfg, seed=0)
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))), params)
  segment_ids = np.array([[1] * 10 + [2] * 14])
  positions = np.array([list(range(10)) + list(range(14))])
  tokens = rng.integers(0, cfg.vocab_size, size=(1, 24))
  changed = tokens.copy()
  changed[0, :10] = (changed[0, :10] + 1) % cfg.vocab_size
  forward = jax.jit(lambda t: model(t, jnp.asarray(segment_ids), jnp.asarray(positions)))
  logits = [np.asarray(forward(jnp.asarray(t))) for t in (tokens, changed)]
  np.testing.assert_array_equal(logits[0][0, 10:], logits[1][0, 10:])
  assert np.abs(logits[0][0, :10] - logits[1][0, :10]).max() > 1e-3


def test_rotary_uses_exact_angles_and_the_compiled_model_computes_no_sine():
  """Rotary angles come from a float64 table: exact to float32 rounding at any position
  (computed in float32, position x frequency loses ~1e-4 rad by position 4000), and no
  sine or cosine is left in the program for XLA to fuse into every consumer."""
  from maxlite.model import layers
  length, head_dim, theta = 4096, 8, 10_000.0
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, length, 2, head_dim)).astype(np.float32)
  positions = np.arange(length)[None]
  got = np.asarray(layers.rotary(jnp.asarray(x), jnp.asarray(positions), theta, length))
  half = head_dim // 2
  angle = positions[..., None, None] * theta ** (-np.arange(half) / half)
  first, second = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
  expected = np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                             second * np.cos(angle) + first * np.sin(angle)], axis=-1)
  np.testing.assert_allclose(got, expected, atol=3e-6)

  cfg = small_config(param_dtype='float32')
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))),
                    init_params(cfg, seed=0))
  tokens = jnp.zeros((2, 24), jnp.int32)
  segment_ids, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(24), (2, 24))
  hlo = jax.jit(lambda t, s, p: model(t, s, p)).lower(tokens, segment_ids, positions).compile().as_text()
  assert not any(op in hlo for op in (' sine(', ' cosine('))
