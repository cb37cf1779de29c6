"""Sampling from a trained run: restore the parameters, prefill a KV cache, decode.

    python -m maxlite.generate --run_dir=runs/tiny --prompt='import os' \
        [--prompt=... | --prompt_file=F] [--temperature=0 ...]

With one prompt, the prompt is printed and its completion streams after it as
it is generated. With several, all are generated as one batch, and each
prompt and its completion is printed under a `==> prompt N <==` line once it
is complete, in prompt order. A completion ends at EOS or after
--max_new_tokens. Only text goes to stdout; the rest goes to stderr.

A prompt begins as the run's training documents began: after BOS unless the
data was prepared with --no_add_bos (recorded in the run's tokenizer/ folder;
runs without that record get BOS). --bos / --no_bos override it.

Shape legend: B batch (one row per prompt), T padded prompt length, S cache
slots, V vocab.

The prompts, right-padded to a bucket, go through the model in one jitted
call that fills the KV cache; then a jitted step per token feeds each row its
last token at the row's own position. The cache is donated to every call, so
it is updated in place. The host reads a step's tokens while the next step
runs.
"""
import dataclasses
import functools
import math
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from jax.sharding import PartitionSpec as P

from maxlite import checkpoint, mesh as mesh_lib, state as state_lib, xla_flags
from maxlite.config import padded_vocab_size
from maxlite.data import tokenizers
from maxlite.model.llama import CACHE, KVCache, LlamaConfig

# Prompts are padded to a multiple of this, so that new lengths rarely recompile.
PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k=0 and top_p=1 switch those filters off."""
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f'temperature={self.temperature} must be >= 0 (0 is greedy)')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0 keeps every token)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1 keeps every token)')


def filter_logits(logits_BV, top_k: int, top_p: float):
  """Sets the logits outside the top_k and outside the top-p nucleus to -inf.

  The nucleus is the smallest set of most likely tokens whose probability
  reaches top_p (after the top-k cut). Ties at a cut-off are all kept.
  """
  neg_inf = jnp.array(-jnp.inf, logits_BV.dtype)
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, neg_inf)
  if top_p < 1:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # A token is in the nucleus when the tokens above it hold less than top_p.
    above_BV = jnp.pad(cumulative_BV[:, :-1], ((0, 0), (1, 0)))
    cutoff_B1 = jnp.min(jnp.where(above_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, neg_inf)
  return logits_BV


def sample_tokens(logits_BV, key, sampling: Sampling):
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
  logits_BV = logits_BV / sampling.temperature
  logits_BV = filter_logits(logits_BV, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class Sampler:
  """A model placed on a mesh, with its jitted prefill and decode step.

  `params` (the nested parameter dict) is placed on `mesh` by the rule table
  (a no-op for parameters restored there) and cast to compute_dtype once, as
  training casts it for every step.
  """

  def __init__(self, cfg: LlamaConfig, params, mesh, *, max_seq_len: int, compute_dtype='float32'):
    self.cfg, self.mesh, self.max_seq_len = cfg, mesh, max_seq_len
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.graphdef, abstract, logical = state_lib.abstract_model(cfg)
    shardings = mesh_lib.tree_shardings(mesh, logical, abstract)
    params = jax.device_put(params, shardings)
    self.params = jax.tree.map(lambda p: p.astype(self.compute_dtype), params)
    self.param_specs = jax.tree.map(lambda s: s.spec, shardings)
    self._prefill = jax.jit(self._prefill_fn, static_argnames='sampling', donate_argnames='cache')
    self._step = jax.jit(self._step_fn, static_argnames='sampling', donate_argnames='cache')

  def _decode(self, params, tokens_BT, positions_BT, cache: KVCache):
    """The model's decode, run per device on the tensor-split weights and cache."""
    def per_device(params, tokens_BT, positions_BT, cache):
      model = nnx.merge(self.graphdef, params)
      return model.decode(tokens_BT, positions_BT, cache, compute_dtype=self.compute_dtype)
    cache_spec = self._cache_spec(cache.k_LBSKH.shape)
    return mesh_lib.per_device(
        per_device, self.mesh, in_specs=(self.param_specs, P(), P(), KVCache(cache_spec, cache_spec)),
        out_specs=(P(), KVCache(cache_spec, cache_spec)))(params, tokens_BT, positions_BT, cache)

  def _cache_spec(self, shape):
    return mesh_lib.logical_to_spec(CACHE, shape, dict(self.mesh.shape))

  def _prefill_fn(self, params, cache, tokens_BT, lengths_B, key, *, sampling):
    """Fills the cache with the prompts; samples each row's first new token."""
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    logits_BTV, cache = self._decode(params, tokens_BT, positions_BT, cache)
    last_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    key, now = jax.random.split(key)
    return cache, sample_tokens(last_BV, now, sampling), lengths_B, key

  def _step_fn(self, params, cache, tokens_B, positions_B, key, *, sampling):
    """Feeds each row its newest token at its own position; samples the next."""
    logits_B1V, cache = self._decode(params, tokens_B[:, None], positions_B[:, None], cache)
    key, now = jax.random.split(key)
    return cache, sample_tokens(logits_B1V[:, 0], now, sampling), positions_B + 1, key

  def _on_mesh(self, fn, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return fn(*args, **kwargs)

  def stream(self, prompts: Sequence[np.ndarray], max_new_tokens: int, sampling: Sampling,
             seed: int = 0, eos_id: int = -1) -> Iterator[np.ndarray]:
    """Yields each step's new token per row, -1 for rows that have ended.

    A row ends at eos_id (not yielded); the stream stops when every row has
    ended or after max_new_tokens steps. Prompts are token ids, specials
    included.
    """
    lengths_B = np.array([len(ids) for ids in prompts], np.int32)
    if not len(prompts) or lengths_B.min() < 1:
      raise ValueError('every prompt needs at least one token')
    longest = int(lengths_B.max())
    if max_new_tokens < 1 or longest + max_new_tokens > self.max_seq_len:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1 and fit with the longest '
                       f'prompt ({longest} tokens) in model.max_seq_len={self.max_seq_len}')
    # The cache never outgrows max_seq_len: the bucket shrinks to fit when needed.
    padded = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_seq_len - max_new_tokens)
    # Padding is never attended to, so any token id will do.
    tokens_BT = np.zeros((len(prompts), padded), np.int32)
    for row, ids in enumerate(prompts):
      tokens_BT[row, :len(ids)] = ids

    cache = self._on_mesh(self._new_cache, len(prompts), padded + max_new_tokens)
    cache, tokens_B, positions_B, key = self._on_mesh(
        self._prefill, self.params, cache, tokens_BT, lengths_B, jax.random.key(seed),
        sampling=sampling)
    ended_B = np.zeros(len(prompts), bool)
    for i in range(max_new_tokens):
      if i + 1 < max_new_tokens:  # dispatch the next step before waiting for this one's tokens
        cache, next_B, positions_B, key = self._on_mesh(
            self._step, self.params, cache, tokens_B, positions_B, key, sampling=sampling)
      new_B = np.asarray(tokens_B)
      ended_B |= new_B == eos_id
      yield np.where(ended_B, -1, new_B)
      if ended_B.all():
        return
      tokens_B = next_B

  def _new_cache(self, batch: int, length: int) -> KVCache:
    make = functools.partial(KVCache.zeros, self.cfg, batch, length, self.compute_dtype)
    shape = (self.cfg.num_layers, batch, length, self.cfg.num_kv_heads, self.cfg.head_dim)
    sharding = jax.sharding.NamedSharding(self.mesh, self._cache_spec(shape))
    return jax.jit(make, out_shardings=KVCache(sharding, sharding))()


def tensor_size(model, num_devices: int) -> int:
  """The most devices (at most num_devices) that split the model's heads and MLP evenly."""
  return max(t for t in range(1, num_devices + 1)
             if model.num_heads % t == 0 and model.num_kv_heads % t == 0
             and model.intermediate_size % t == 0)


def tensor_mesh(model, devices=None):
  """Devices (default: every one) on the 'tensor' axis, as many as split the
  model evenly: decoding reads every weight once per token, so splitting
  weights beats gathering them (fsdp)."""
  devices = jax.devices() if devices is None else list(devices)
  devices = devices[:tensor_size(model, len(devices))]
  return mesh_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': len(devices), 'pipeline': 1}, devices)


def read_run(run_dir, step: int | None = None, compute_dtype: str | None = None):
  """(step, resolved config, tokenizer, compute dtype) of checkpoint `step` of a run
  (None: its newest); compute_dtype None is the run's model.compute_dtype."""
  run_dir = pathlib.Path(run_dir)
  if not run_dir.is_dir():
    raise FileNotFoundError(f'run_dir {run_dir} does not exist')
  step, config = checkpoint.read_config(run_dir, step)
  tokenizer = tokenizers.load_saved_tokenizer(run_dir / 'tokenizer')
  compute_dtype = compute_dtype or config.model.compute_dtype
  if compute_dtype not in ('bfloat16', 'float32', 'float64'):
    raise ValueError(f'compute_dtype={compute_dtype!r} is not one of bfloat16, float32, float64')
  if 'float64' in (config.model.param_dtype, compute_dtype):
    jax.config.update('jax_enable_x64', True)
  return step, config, tokenizer, compute_dtype


def restore_params(run_dir, step: int, model_config, mesh, **fields) -> tuple[LlamaConfig, dict]:
  """(the LlamaConfig for `mesh`, the parameters of checkpoint `step` placed on
  it by the rule table); fields override LlamaConfig fields."""
  cfg = LlamaConfig.from_config(model_config, padded_vocab_size=padded_vocab_size(
      model_config.vocab_size, mesh.shape['tensor']), **fields)
  _, abstract, logical = state_lib.abstract_model(cfg)
  shardings = mesh_lib.tree_shardings(mesh, logical, abstract)
  return cfg, checkpoint.load_params(run_dir, step, abstract, shardings)


def load(run_dir, step: int | None = None, *, compute_dtype: str | None = None, devices=None):
  """(step, Sampler, tokenizer) for checkpoint `step` of a run (None: its newest).

  Only the parameters are read, straight onto `tensor_mesh(model, devices)`.
  """
  step, config, tokenizer, compute_dtype = read_run(run_dir, step, compute_dtype)
  mesh = tensor_mesh(config.model, devices)
  cfg, params = restore_params(run_dir, step, config.model, mesh)
  sampler = Sampler(cfg, params, mesh, max_seq_len=config.model.max_seq_len,
                    compute_dtype=compute_dtype)
  return step, sampler, tokenizer


def prompts_start_with_bos(run_dir, bos: bool | None = None) -> bool:
  """`bos` when given; otherwise whether the run's training documents began with
  BOS (runs that did not record it: yes)."""
  if bos is not None:
    return bos
  return tokenizers.saved_document_specials(pathlib.Path(run_dir) / 'tokenizer')[0]


def _to_stderr(message: str):
  print(message, file=sys.stderr, flush=True)


def encode_prompts(tokenizer, prompts: Sequence[str], room: int,
                   warn: Callable[[str], None] = _to_stderr, *, bos: bool = True) -> list[np.ndarray]:
  """The tokens of each prompt, after BOS when `bos` (and the tokenizer has one):
  a prompt should begin as the training documents began. A prompt longer than
  `room` tokens keeps its last `room` (with a warning)."""
  encoded = []
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f'prompt {i + 1} is empty')
    ids = tokenizer.encode(prompt)
    if bos and tokenizer.bos_id >= 0:
      ids = np.concatenate([[tokenizer.bos_id], ids])
    if len(ids) > room:
      warn(f'warning: prompt {i + 1} has {len(ids)} tokens; keeping its last {room} '
           '(model.max_seq_len less max_new_tokens)')
      ids = ids[-room:]
    encoded.append(np.asarray(ids, np.int32))
  return encoded


class _TextStream:
  """A row's completion as text, growing a token at a time.

  Decodes prompt + completion and cuts the prompt's text off, so tokenizers
  that drop a leading space at the start of a text still print it; a trailing
  U+FFFD (a character whose bytes have not all arrived) is held back.
  """

  def __init__(self, tokenizer, prompt_ids):
    self.tokenizer, self.ids = tokenizer, list(prompt_ids)
    self.prompt_chars = len(tokenizer.decode(self.ids))
    self.text = ''

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    return self._grow(final=False)

  def _grow(self, final: bool) -> str:
    text = self.tokenizer.decode(self.ids)[self.prompt_chars:]
    if not final and text.endswith('\ufffd'):
      return ''
    piece, self.text = text[len(self.text):], text
    return piece

  def finish(self) -> str:
    return self._grow(final=True)


def check_max_new_tokens(max_new_tokens: int, max_seq_len: int):
  if not 0 < max_new_tokens < max_seq_len:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be in [1, {max_seq_len - 1}] '
                     f'(model.max_seq_len={max_seq_len}, and a prompt needs a token)')


def complete(sampler: Sampler, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             sampling: Sampling, seed: int = 0, on_text: Callable[[int, str], None] | None = None,
             on_done: Callable[[int, str], None] | None = None,
             warn: Callable[[str], None] = _to_stderr, bos: bool = True) -> list[str]:
  """The completion of each prompt (without the prompt and EOS).

  on_text(row, piece) is called as each row's text grows; on_done(row, text)
  once per row, as soon as that row has ended. bos: whether prompts start with
  BOS (see `prompts_start_with_bos`).
  """
  if not prompts:
    raise ValueError('no prompt given')
  check_max_new_tokens(max_new_tokens, sampler.max_seq_len)
  encoded = encode_prompts(tokenizer, prompts, sampler.max_seq_len - max_new_tokens, warn, bos=bos)
  streams = [_TextStream(tokenizer, ids) for ids in encoded]
  open_rows = list(range(len(prompts)))

  def emit(row: int, piece: str):
    if piece and on_text:
      on_text(row, piece)

  def end(row: int):
    emit(row, streams[row].finish())
    open_rows.remove(row)
    if on_done:
      on_done(row, streams[row].text)

  for tokens_B in sampler.stream(encoded, max_new_tokens, sampling, seed, tokenizer.eos_id):
    for row in list(open_rows):
      if tokens_B[row] < 0:
        end(row)
      else:
        emit(row, streams[row].push(tokens_B[row]))
  for row in list(open_rows):  # those that ran out of max_new_tokens
    end(row)
  return [stream.text for stream in streams]


def generate(run_dir, prompts: Sequence[str], *, step: int | None = None, max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             compute_dtype: str | None = None, devices=None, bos: bool | None = None,
             on_text: Callable[[int, str], None] | None = None,
             on_done: Callable[[int, str], None] | None = None,
             warn: Callable[[str], None] = _to_stderr) -> list[str]:
  """Completes each prompt with the run's checkpoint `step` (None: the newest);
  prompts start with BOS when `bos`, or when None as the run's training
  documents did. See `load` and `complete`."""
  sampling = Sampling(temperature, top_k, top_p)  # bad values fail before anything loads
  _, sampler, tokenizer = load(run_dir, step, compute_dtype=compute_dtype, devices=devices)
  return complete(sampler, tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                  seed=seed, on_text=on_text, on_done=on_done, warn=warn,
                  bos=prompts_start_with_bos(run_dir, bos))


# -- command line ----------------------------------------------------------------------

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'The training run directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to load; default: the newest.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'A file with one prompt per line '
                                   '(blank lines are skipped); adds to --prompt.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per prompt at '
                                       'most; a prompt too long to fit with them in '
                                       'model.max_seq_len keeps its last tokens.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of most likely tokens '
                            'whose probability reaches p; 1: all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampling.')
_COMPUTE_DTYPE = flags.DEFINE_enum('compute_dtype', None, ['bfloat16', 'float32', 'float64'],
                                   "Default: the run's model.compute_dtype.")
_BOS = flags.DEFINE_boolean('bos', None, 'Start each prompt with BOS (--no_bos: without); default: '
                            "as the run's training documents began.")


def _read_prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    path = pathlib.Path(_PROMPT_FILE.value)
    if not path.is_file():
      raise FileNotFoundError(f'--prompt_file={path} does not exist')
    prompts += [line for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError('give --prompt="..." (repeatable) or --prompt_file=F')
  return prompts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  xla_flags.apply()  # before anything starts the backend, as train.py does
  try:
    prompts = _read_prompts()
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    step, sampler, tokenizer = load(_RUN_DIR.value, _STEP.value, compute_dtype=_COMPUTE_DTYPE.value)
    bos = prompts_start_with_bos(_RUN_DIR.value, _BOS.value)
    _to_stderr(f'{_RUN_DIR.value} step {step} on {len(sampler.mesh.devices.flat)} x '
               f'{jax.devices()[0].device_kind}, {sampler.compute_dtype.name}, '
               f'prompts {"after" if bos and tokenizer.bos_id >= 0 else "without"} BOS')
    check_max_new_tokens(_MAX_NEW_TOKENS.value, sampler.max_seq_len)
    out = sys.stdout
    if len(prompts) == 1:  # stream the completion after its prompt
      out.write(prompts[0])
      on_text = lambda row, piece: (out.write(piece), out.flush())
      complete(sampler, tokenizer, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, sampling=sampling,
               seed=_SEED.value, on_text=on_text, bos=bos)
      out.write('\n')
      return
    # Several: each prompt and completion once complete, in prompt order.
    finished, next_row = {}, 0

    def on_done(row, text):
      nonlocal next_row
      finished[row] = text
      while next_row in finished:
        out.write(f'==> prompt {next_row + 1} <==\n{prompts[next_row]}{finished.pop(next_row)}\n')
        out.flush()
        next_row += 1

    complete(sampler, tokenizer, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, sampling=sampling,
             seed=_SEED.value, on_done=on_done, bos=bos)
  except (ValueError, FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl flag parsing, but a bad flag is one line, not a usage dump."""
  # absl spells a boolean's negation --nobos; --no_bos is data_prep's spelling (--no_add_bos).
  argv = ['--nobos' if arg == '--no_bos' else arg for arg in argv]
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flag_as_required('run_dir')
  app.run(main, flags_parser=parse_flags)
