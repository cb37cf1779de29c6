"""maxlite.generate: KV-cache decoding against full recomputation, sampling
filters against NumPy, and a briefly trained tiny run through the API and CLI."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from maxlite import generate as gen
from maxlite.data.tokenizers import ByteTokenizer
from maxlite.model.llama import KVCache, LlamaConfig
from maxlite.state import abstract_model
from maxlite.train import train

REPO = pathlib.Path(__file__).resolve().parent.parent


def small_config(**overrides) -> LlamaConfig:
  values = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=True,
                init_std=0.2, param_dtype='float32')
  values.update(overrides)
  return LlamaConfig(**values)


def random_params(cfg: LlamaConfig, seed: int):
  """Parameters as the initialiser draws them (norm scales 1), but from NumPy:
  no compiles."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape) if path[-1].key == 'scale'
                       else cfg.init_std * rng.standard_normal(x.shape)).astype(x.dtype),
      abstract_model(cfg)[1])


def full_recompute(cfg, params, prompts, num_new):
  """Greedy decoding that reruns every whole sequence at every step: (tokens, logits) per row.

  The sequences sit at the start of a fixed-size buffer so that one jit serves
  every step; causal attention keeps the padding after them out of their logits.
  """
  graphdef = abstract_model(cfg)[0]
  forward = jax.jit(
      lambda p, t: nnx.merge(graphdef, p)(t, jnp.ones_like(t), jnp.arange(t.shape[1])[None]))
  buffer = np.zeros((len(prompts), 32), np.int32)
  lengths = np.array([len(prompt) for prompt in prompts])
  for row, prompt in enumerate(prompts):
    buffer[row, :len(prompt)] = prompt
  step_logits = []
  for _ in range(num_new):
    logits = np.asarray(forward(params, buffer))[np.arange(len(prompts)), lengths - 1]
    step_logits.append(logits)
    buffer[np.arange(len(prompts)), lengths] = logits.argmax(-1)
    lengths += 1
  tokens = [buffer[row, len(prompt):length].tolist()
            for row, (prompt, length) in enumerate(zip(prompts, lengths))]
  return tokens, np.stack(step_logits, axis=1)


PROMPTS = [[5, 17, 3, 40, 8], [22], [9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]  # ragged on purpose
NUM_NEW = 10


@pytest.fixture(scope='module')
def small_sampler():
  """One sampler for several tests, so they share its compiled steps."""
  cfg = small_config()
  return gen.Sampler(cfg, random_params(cfg, seed=1), gen.tensor_mesh(cfg), max_seq_len=64)


def greedy_tokens(sampler, **kwargs):
  prompts = [np.array(p) for p in PROMPTS]
  steps = sampler.stream(prompts, NUM_NEW, gen.Sampling(temperature=0), **kwargs)
  return np.stack(list(steps), axis=1)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_kv_cache_decoding_equals_full_recompute(scan_layers, small_sampler):
  cfg = small_config(scan_layers=scan_layers, tie_embeddings=scan_layers)
  params = random_params(cfg, seed=1)
  want_tokens, want_logits = full_recompute(cfg, params, PROMPTS, NUM_NEW)

  # The model's cache path, step by step: right-padded prefill, then one token per row.
  graphdef = abstract_model(cfg)[0]
  decode = jax.jit(lambda p, *args: nnx.merge(graphdef, p).decode(*args))
  lengths = np.array([len(p) for p in PROMPTS])
  tokens = np.zeros((len(PROMPTS), 16), np.int32)
  for row, prompt in enumerate(PROMPTS):
    tokens[row, :len(prompt)] = prompt
  cache = KVCache.zeros(cfg, len(PROMPTS), 16 + NUM_NEW, jnp.float32)
  logits, cache = decode(params, tokens, np.broadcast_to(np.arange(16), tokens.shape), cache)
  got_logits = [np.asarray(logits)[np.arange(len(PROMPTS)), lengths - 1]]
  for step in range(NUM_NEW - 1):
    fed = np.array([row_tokens[step] for row_tokens in want_tokens])
    logits, cache = decode(params, fed[:, None], (lengths + step)[:, None], cache)
    got_logits.append(np.asarray(logits)[:, 0])
  np.testing.assert_allclose(np.stack(got_logits, axis=1), want_logits, rtol=1e-5, atol=1e-5)

  # The jitted sampler, sharded over all 8 devices, picks the same tokens.
  sampler = small_sampler  # built from the same config and parameters
  if not scan_layers:
    sampler = gen.Sampler(cfg, params, gen.tensor_mesh(cfg), max_seq_len=64)
  assert greedy_tokens(sampler).tolist() == want_tokens


def test_moe_sampler_equals_full_recompute():
  """An MoE (a dense layer, then one of 4 experts top-2 with a shared expert)
  decodes through the sampler on the tensor mesh as the whole forward pass does."""
  cfg = small_config(num_experts=4, experts_per_token=2, moe_intermediate_size=16, moe_every=2,
                     moe_shared_expert_size=16)
  params = random_params(cfg, seed=2)
  want_tokens, _ = full_recompute(cfg, params, PROMPTS, NUM_NEW)
  sampler = gen.Sampler(cfg, params, gen.tensor_mesh(cfg), max_seq_len=64)
  assert greedy_tokens(sampler).tolist() == want_tokens


def test_rows_stop_at_eos_and_the_rest_go_on(small_sampler):
  tokens = greedy_tokens(small_sampler)
  eos = int(tokens[0, 3])
  stopped = greedy_tokens(small_sampler, eos_id=eos)
  assert (stopped[0, 3:] == -1).all()
  for row, want in zip(stopped, tokens):
    ends = list(want).index(eos) if eos in want else len(want)
    assert row[:ends].tolist() == want[:ends].tolist() and (row[ends:] == -1).all()


def test_top_k_1_is_greedy_and_seeds_reproduce(small_sampler):
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, 61)), jnp.float32)
  top_1 = gen.sample_tokens(logits, jax.random.key(3), gen.Sampling(temperature=1.5, top_k=1))
  np.testing.assert_array_equal(top_1, np.argmax(logits, axis=-1))

  prompts = [np.array(p) for p in PROMPTS]

  def run(seed):
    hot = gen.Sampling(temperature=1.5, top_p=0.95)
    return np.stack(list(small_sampler.stream(prompts, NUM_NEW, hot, seed)))

  np.testing.assert_array_equal(run(seed=7), run(seed=7))
  assert (run(seed=7) != run(seed=8)).any()


def numpy_filter(logits, top_k, top_p):
  """The kept tokens, by the textbook definitions, in float64."""
  keep = np.zeros(logits.shape, bool)
  for row, values in enumerate(logits.astype(np.float64)):
    order = np.argsort(-values, kind='stable')[:top_k or None]
    probs = np.exp(values[order] - values[order].max())
    probs /= probs.sum()
    # The smallest prefix of the most likely tokens whose mass reaches top_p.
    size = int(np.searchsorted(np.cumsum(probs), top_p)) + 1 if top_p < 1 else len(order)
    keep[row, order[:size]] = True
  return keep


@pytest.mark.parametrize('top_k,top_p',
                         [(0, 0.5), (0, 0.9), (0, 0.999), (5, 0.7), (12, 1.0), (1, 1.0)])
def test_filters_keep_exactly_the_top_k_and_the_smallest_nucleus(top_k, top_p):
  rng = np.random.default_rng(top_k * 1000 + int(top_p * 1000))
  logits = rng.standard_normal((16, 50)).astype(np.float32) * 3
  kept = np.isfinite(np.asarray(gen.filter_logits(jnp.asarray(logits), top_k, top_p)))
  np.testing.assert_array_equal(kept, numpy_filter(logits, top_k, top_p))
  kept_logits = np.asarray(gen.filter_logits(jnp.asarray(logits), top_k, top_p))[kept]
  np.testing.assert_array_equal(kept_logits, logits[kept])


@pytest.mark.parametrize('kwargs,message', [
    (dict(temperature=-1.0), 'temperature=-1.0 must be >= 0'),
    (dict(top_p=0.0), r'top_p=0.0 must be in \(0, 1\]'),
    (dict(top_k=-2), 'top_k=-2 must be >= 0')])
def test_bad_sampling_settings_are_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gen.Sampling(**kwargs)


def test_long_prompts_keep_their_last_tokens():
  warnings = []
  ids = gen.encode_prompts(ByteTokenizer(), ['abc', 'x' * 20], room=8, warn=warnings.append)
  assert ids[0].tolist() == [ByteTokenizer.bos_id, 97, 98, 99]
  assert ids[1].tolist() == [120] * 8
  assert warnings == ['warning: prompt 2 has 21 tokens; keeping its last 8 '
                      '(model.max_seq_len less max_new_tokens)']
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    gen.encode_prompts(ByteTokenizer(), [''], room=8)


# -- a briefly trained tiny run ------------------------------------------------------------

TRAIN_STEPS = 120
# Typical standard-library source; the last one's continuation is an indented method body.
SOURCE_PROMPTS = ['    def __init__(self', 'import os\nimport sys\n\n\ndef ',
                  '        if value is None:\n            return ',
                  'class Cache:\n    def get(self, key):\n']


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('generate') / 'run'
  config = tiny.get_config()
  config.train.run_dir = str(run_dir)
  # One log line for the whole run: train bounds the steps in flight itself
  # (a deep queue of collectives over fake CPU devices used to time out).
  config.train.update(steps=TRAIN_STEPS, eval_steps=0, log_interval=TRAIN_STEPS)
  config.optim.warmup_steps = 1
  config.logging.tensorboard = False
  train(config)
  return run_dir


def printable_fraction(texts) -> float:
  data = ''.join(texts).encode('utf-8', errors='replace')
  return sum(32 <= b < 127 or b in b'\n\t' for b in data) / max(len(data), 1)


def looks_like_python(greedy, sampled) -> bool:
  """Source-like bytes, and the body after `def ...:` indented past the def."""
  return (printable_fraction(sampled) > 0.95 and printable_fraction(greedy) > 0.95
          and greedy[-1].startswith(' ' * 8))


def test_a_trained_model_continues_stdlib_source(trained_run):
  pieces, done = {}, {}
  greedy = gen.generate(trained_run, SOURCE_PROMPTS, max_new_tokens=48, temperature=0,
                        on_text=lambda row, piece: pieces.setdefault(row, []).append(piece),
                        on_done=lambda row, text: done.setdefault(row, text))
  streamed = {row: ''.join(pieces.get(row, [])) for row in range(len(SOURCE_PROMPTS))}
  assert done == streamed == dict(enumerate(greedy))
  sampled = gen.generate(trained_run, SOURCE_PROMPTS, max_new_tokens=48, temperature=0.7, seed=0)
  assert looks_like_python(greedy, sampled), (greedy, sampled)

  # The same measure on the untrained model fails: it is not trivially met.
  _, sampler, tokenizer = gen.load(trained_run)
  untrained = gen.Sampler(sampler.cfg, random_params(sampler.cfg, seed=0), sampler.mesh,
                          max_seq_len=sampler.max_seq_len)
  greedy0, sampled0 = (gen.complete(untrained, tokenizer, SOURCE_PROMPTS, max_new_tokens=48,
                                    sampling=gen.Sampling(temperature=t)) for t in (0, 0.7))
  assert not looks_like_python(greedy0, sampled0), (greedy0, sampled0)
  assert printable_fraction(sampled0) < 0.6

  # Restored onto one device instead of eight: the same greedy tokens.
  assert gen.generate(trained_run, SOURCE_PROMPTS, max_new_tokens=48, temperature=0,
                      devices=jax.devices()[:1]) == greedy


def run_cli(*args):
  env = dict(os.environ)  # one CPU device: the checkpoint was written on eight
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, '-m', 'maxlite.generate', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_streams_the_completion_and_fails_in_one_line(trained_run, tmp_path):
  prompt = SOURCE_PROMPTS[0]
  result = run_cli(f'--run_dir={trained_run}', f'--prompt={prompt}', '--max_new_tokens=24',
                   '--temperature=0')
  assert result.returncode == 0, result.stderr
  expected = gen.generate(trained_run, [prompt], max_new_tokens=24, temperature=0)[0]
  assert result.stdout == prompt + expected + '\n'
  assert f'step {TRAIN_STEPS} on 1 x cpu' in result.stderr

  result = run_cli(f'--run_dir={tmp_path / "missing"}', '--prompt=x')
  assert result.returncode == 1 and result.stdout == '' and 'Traceback' not in result.stderr
  assert result.stderr.splitlines()[-1] == f'error: run_dir {tmp_path / "missing"} does not exist'


# -- BOS: prompts begin as the run's training documents began ------------------------------

def fabricated_run(run_dir, *, add_bos: bool | None):
  """A run directory as train writes it, with a small random model (no training):
  a checkpoint and the byte tokenizer, recorded with the data's add_bos (None:
  no record, as runs saved before it was kept)."""
  from maxlite import checkpoint, state
  from maxlite.data import tokenizers
  config = tiny.get_config()
  config.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, max_seq_len=64)
  cfg = LlamaConfig.from_config(config.model)
  checkpointer = checkpoint.Checkpointer(run_dir, interval=1, max_to_keep=1)
  checkpointer.save(1, state.TrainState(step=jnp.int32(1), params=random_params(cfg, seed=2), opt_state=()),
                    config.to_json_best_effort(), {}, {'source_tokens': [0]})
  checkpointer.close()
  tokenizers.save_tokenizer(ByteTokenizer(), run_dir / 'tokenizer', add_bos=add_bos,
                            add_eos=None if add_bos is None else True)
  return run_dir


@pytest.fixture(scope='module')
def bos_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('bos')
  return {'no_bos': fabricated_run(root / 'no_bos', add_bos=False),
          'unrecorded': fabricated_run(root / 'unrecorded', add_bos=None)}


def test_a_run_whose_data_had_no_bos_generates_without_bos(bos_runs, monkeypatch):
  fed = []
  stream = gen.Sampler.stream

  def recording_stream(self, prompts, *args, **kwargs):
    fed.append([p.tolist() for p in prompts])
    return stream(self, prompts, *args, **kwargs)

  monkeypatch.setattr(gen.Sampler, 'stream', recording_stream)
  bos, ab = ByteTokenizer.bos_id, [97, 98]

  def first_prompt_ids(run, **kwargs):
    gen.generate(bos_runs[run], ['ab'], max_new_tokens=2, temperature=0, devices=jax.devices()[:1],
                 **kwargs)
    return fed[-1][0]

  assert first_prompt_ids('no_bos') == ab
  assert first_prompt_ids('no_bos', bos=True) == [bos, *ab]  # the argument overrides the run
  # A run saved before the record was kept: BOS, as before (the CLI test generates from it).
  assert gen.prompts_start_with_bos(bos_runs['unrecorded'])
  assert not gen.prompts_start_with_bos(bos_runs['unrecorded'], bos=False)
  assert gen.encode_prompts(ByteTokenizer(), ['ab'], room=8, bos=False)[0].tolist() == ab


@pytest.mark.parametrize('run,flag,said', [('no_bos', '--bos', 'after'), ('unrecorded', '--no_bos', 'without')])
def test_cli_bos_flags_override_the_run(bos_runs, run, flag, said):
  result = run_cli(f'--run_dir={bos_runs[run]}', '--prompt=ab', '--max_new_tokens=2',
                   '--temperature=0', flag)
  assert result.returncode == 0, result.stderr
  assert f'step 1 on 1 x cpu, float32, prompts {said} BOS' in result.stderr
