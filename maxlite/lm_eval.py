"""Downstream evals of a checkpoint with EleutherAI's lm-evaluation-harness.

    python -m maxlite.lm_eval --run_dir=runs/tiny --tasks=hellaswag,arc_easy [--limit=100]
    python -m maxlite.lm_eval --run_dir=runs/tiny --tasks=my_task --include_path=tasks/ --json

or, from lm-eval's own command line once this module is imported, the model
class `maxlite` (model_args run_dir=..., step=..., batch_size=...).

The harness asks three things of a model, each answered here with the run's
tokenizer and its BOS setting (a request's tokens begin as the training
documents began: after BOS unless the data was prepared with --no_add_bos):
- loglikelihood(context, continuation): the continuation's summed log-prob and
  whether greedy decoding would have produced it, from the logits of
  maxlite.inference.Model, in batches of --batch_size rows padded to a few
  lengths so that few shapes compile;
- loglikelihood_rolling(text): the whole text's log-prob in windows of
  model.max_seq_len tokens (the harness's own windowing);
- generate_until(context, until): greedy text from maxlite.generate, cut at
  the first stop string.

Shape legend: B batch (rows of requests), T padded length, V vocab.

The model runs on every device (or those given) as inference.load_model
places it; a request longer than model.max_seq_len keeps its last tokens, as
lm-eval's own HF model does.
"""
import argparse
import json
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from maxlite import generate, inference, mesh as mesh_lib

_MIN_BUCKET = 16


def _bucket(length: int, cap: int) -> int:
  """Rows are padded to a power of two (at least 16, at most `cap`): few shapes compile."""
  return min(cap, max(_MIN_BUCKET, 1 << (length - 1).bit_length()))


@jax.jit
def _target_stats(logits_BTV, targets_BT):
  """(log-prob of each target, whether it is the argmax), in float32 or wider."""
  logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
  """Log-likelihoods of token sequences under a maxlite.inference.Model; no lm-eval needed."""

  def __init__(self, model: inference.Model, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    self.model, self.batch_size = model, batch_size
    tokenizer = model.tokenizer
    # An empty context is conditioned on what starts a training document: BOS,
    # or (without BOS) the EOS that ended the previous one.
    self.prefix_id = tokenizer.bos_id if model.add_bos and tokenizer.bos_id >= 0 else tokenizer.eos_id
    if self.prefix_id < 0:
      raise ValueError(f'the run\'s {tokenizer.kind} tokenizer has neither BOS nor EOS to '
                       'condition an empty context on')

  def encode(self, text: str) -> list[int]:
    return [int(i) for i in self.model.tokenizer.encode(text)]

  def with_bos(self, context: list[int]) -> list[int]:
    """The context as a training document would begin: after BOS when the run's did."""
    bos = self.model.tokenizer.bos_id
    if self.model.add_bos and bos >= 0 and context[:1] != [bos]:
      return [bos, *context]
    return context

  def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(summed log-prob of continuation, whether it is the greedy one) for each
    (context, continuation) of token ids; contexts hold at least one token."""
    max_len = self.model.max_seq_len
    rows = []
    for context, continuation in pairs:
      if not context or not continuation:
        raise ValueError('a request needs a context token and a continuation token')
      if len(continuation) > max_len:
        raise ValueError(f'a continuation of {len(continuation)} tokens does not fit '
                         f'model.max_seq_len={max_len}')
      whole = (list(context) + list(continuation))[-(max_len + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    # Longest first: a batch's rows have similar lengths, and a too-long batch fails first.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = _bucket(len(rows[chunk[0]][0]), max_len)
      tokens_BT = np.zeros((self.batch_size, length), np.int32)
      targets_BT = np.zeros((self.batch_size, length), np.int32)
      for row, index in enumerate(chunk):
        inputs, targets, _ = rows[index]
        tokens_BT[row, :len(inputs)], targets_BT[row, :len(targets)] = inputs, targets
      logits_BTV = self.model(tokens_BT)
      with jax.set_mesh(self.model.mesh):
        logp_BT, greedy_BT = jax.device_get(_target_stats(logits_BTV, targets_BT))
      for row, index in enumerate(chunk):
        inputs, _, count = rows[index]
        span = slice(len(inputs) - count, len(inputs))
        results[index] = (float(np.sum(logp_BT[row, span], dtype=np.float64)),
                          bool(greedy_BT[row, span].all()))
    return results

  def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token of a text once, each
    with as much context as model.max_seq_len leaves (lm-eval's windowing)."""
    from lm_eval import utils  # the harness's own windowing, so scores compare with its models
    windows = utils.get_rolling_token_windows(tokens, self.prefix_id, self.model.max_seq_len, 1)
    return [utils.make_disjoint_window(w) for w in windows]


def _register():
  """The lm-eval model class `maxlite`, registered when lm-eval is installed."""
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model

  @register_model('maxlite')
  class MaxliteLM(TemplateLM):
    """A maxlite run's checkpoint for lm-eval: model_args run_dir=...[,step=N][,batch_size=8]."""

    def __init__(self, run_dir=None, step=None, batch_size=8, compute_dtype=None, model=None,
                 max_gen_toks=256, **unused):
      super().__init__()
      if model is None:
        if not run_dir:
          raise ValueError('model_args: run_dir=... is required')
        model = inference.load_model(run_dir, None if step in (None, '') else int(step),
                                     compute_dtype=compute_dtype)
      batch_size = 8 if batch_size in (None, '', 'auto') else int(batch_size)
      self.scorer = Scorer(model, batch_size)
      self.model, self.max_gen_toks = model, int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
      return self.model.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
      return self.scorer.prefix_id

    @property
    def max_length(self) -> int:
      return self.model.max_seq_len

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
      return self.scorer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
      return self.model.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
      pairs = [(self.scorer.with_bos(context), continuation)
               for _, context, continuation in requests]
      results = self.scorer.score(pairs)
      for (key, _, _), result in zip(requests, results):
        self.cache_hook.add_partial('loglikelihood', key, result)
      return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
      windows, owners = [], []
      for index, request in enumerate(requests):
        for context, continuation in self.scorer.rolling_windows(self.tok_encode(request.args[0])):
          windows.append((self.scorer.with_bos(context), continuation))
          owners.append(index)
      totals = [0.0] * len(requests)
      for owner, (logp, _) in zip(owners, self.scorer.score(windows)):
        totals[owner] += logp
      for request, total in zip(requests, totals):
        self.cache_hook.add_partial('loglikelihood_rolling', (request.args[0],), total)
      return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
      results = [''] * len(requests)
      groups: dict[str, list[int]] = {}
      for index, request in enumerate(requests):  # one batch per distinct gen_kwargs
        groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
      for key, indices in groups.items():
        kwargs = dict(json.loads(key))
        until = kwargs.pop('until', None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text and eos_text not in until:
          until.append(eos_text)
        max_new = min(int(kwargs.pop('max_gen_toks', self.max_gen_toks)), self.max_length - 1)
        if kwargs.get('do_sample') or float(kwargs.get('temperature', 0) or 0) > 0:
          logging.warning('maxlite lm_eval: generation is greedy; sampling settings %s ignored', kwargs)
        for start in range(0, len(indices), self.scorer.batch_size):
          chunk = indices[start:start + self.scorer.batch_size]
          texts = generate.complete(
              self.model.sampler, self.model.tokenizer, [requests[i].args[0] for i in chunk],
              max_new_tokens=max_new, sampling=generate.Sampling(temperature=0.0),
              warn=lambda _: None, bos=self.model.add_bos)
          for index, text in zip(chunk, texts):
            for stop in until:
              if stop:
                text = text.split(stop)[0]
            results[index] = text
            self.cache_hook.add_partial('generate_until', requests[index].args, text)
      return results

  return MaxliteLM


try:
  MaxliteLM = _register()
except ImportError:  # lm-eval is an extra: Scorer works without it
  MaxliteLM = None


def _require_lm_eval():
  if MaxliteLM is None:
    raise ImportError("lm-eval is not installed: pip install 'maxlite[eval]'")


def evaluate(model: inference.Model, tasks: Sequence[str], *, include_path: str | None = None,
             default_tasks: bool = True, limit: float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, seed: int = 0,
             log_samples: bool = False) -> dict:
  """lm-eval's results of `tasks` for a loaded model: {'scores': {'task/metric': value},
  'raw': the harness's output}. default_tasks False looks tasks up in include_path
  only, which skips indexing the harness's thousands of task files (seconds)."""
  _require_lm_eval()
  import lm_eval
  from lm_eval.tasks import TaskManager
  task_manager = TaskManager(include_path=include_path, include_defaults=default_tasks)
  raw = lm_eval.simple_evaluate(
      model=MaxliteLM(model=model, batch_size=batch_size), tasks=list(tasks), limit=limit,
      num_fewshot=num_fewshot, task_manager=task_manager, log_samples=log_samples,
      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
      bootstrap_iters=0)
  return {'scores': scores(raw), 'raw': raw}


def scores(raw: dict) -> dict:
  """{'task/metric': value} of lm-eval's results, the stderr entries and non-numbers left out."""
  flat = {}
  for task, metrics in raw['results'].items():
    for name, value in metrics.items():
      if ('stderr' in name or name == 'sample_len' or not isinstance(value, (int, float))
          or isinstance(value, bool)):
        continue
      if isinstance(value, float) and math.isnan(value):
        continue
      flat[f'{task}/{name.split(",")[0]}'] = float(value)
  return flat


class TrainingHarness:
  """train.eval_harness_tasks run on the live parameters during training.

  The model runs on every device of the training mesh laid out as inference
  lays it out: the training `tensor` axis splits heads, MLP and vocab as in
  training, and the other devices hold whole copies (data), each scoring the
  same rows. The parameters are copied into that layout at each call, so no
  checkpoint is read; one inference.Model is kept, so its compiled functions
  are reused.
  """

  def __init__(self, config, model_cfg, mesh, tokenizer, add_bos: bool):
    _require_lm_eval()
    train = config.train
    self.tasks = [t.strip() for t in train.eval_harness_tasks.split(',') if t.strip()]
    self.interval = train.eval_harness_interval or train.eval_interval
    self.limit = train.eval_harness_limit or None
    self.include_path = train.eval_harness_include_path or None
    self.default_tasks = self.include_path is None or _needs_defaults(self.tasks, self.include_path)
    self.batch_size = train.micro_batch_size
    devices, tensor = mesh.devices.flatten(), mesh.shape['tensor']
    self.mesh = mesh_lib.make_mesh(
        {'data': len(devices) // tensor, 'fsdp': 1, 'tensor': tensor, 'pipeline': 1}, devices)
    self.settings = (model_cfg, config.model.max_seq_len, config.model.compute_dtype)
    self.tokenizer, self.add_bos, self.model = tokenizer, add_bos, None

  def __call__(self, params) -> dict:
    """{'task/metric': value} of the tasks for `params`."""
    model_cfg, max_seq_len, compute_dtype = self.settings
    if self.model is None:
      sampler = generate.Sampler(model_cfg, params, self.mesh, max_seq_len=max_seq_len,
                                 compute_dtype=compute_dtype)
      self.model = inference.Model(-1, sampler, self.tokenizer, self.add_bos)
    else:  # the first call's layout and dtype: nothing recompiles
      sampler = self.model.sampler
      self.model.sampler.params = jax.tree.map(
          lambda p, old: jax.device_put(p, old.sharding).astype(sampler.compute_dtype),
          params, sampler.params)
    return evaluate(self.model, self.tasks, include_path=self.include_path,
                    default_tasks=self.default_tasks, limit=self.limit,
                    batch_size=self.batch_size)['scores']


def _needs_defaults(tasks, include_path) -> bool:
  """Whether some task is not named by a YAML file under include_path (then lm-eval's own
  task index is needed; building it takes seconds)."""
  import pathlib
  import yaml
  names = set()
  for path in pathlib.Path(include_path).rglob('*.yaml'):
    try:
      entry = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
      return True
    if isinstance(entry, dict):
      names.update(str(entry.get(key)) for key in ('task', 'group') if entry.get(key))
  return not set(tasks) <= names


# -- command line ---------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m maxlite.lm_eval',
                                   description='lm-evaluation-harness tasks on a checkpoint.')
  parser.add_argument('--run_dir', required=True, help='the training run directory')
  parser.add_argument('--tasks', required=True, help='comma-separated lm-eval task names')
  parser.add_argument('--step', type=int, default=None, help='default: the newest checkpoint')
  parser.add_argument('--include_path', default=None, help='a folder of task YAML files of your own')
  parser.add_argument('--no_default_tasks', action='store_true',
                      help="look tasks up in --include_path only, not among lm-eval's own")
  parser.add_argument('--limit', type=float, default=None,
                      help='documents per task (a fraction if < 1); default: all')
  parser.add_argument('--num_fewshot', type=int, default=None)
  parser.add_argument('--batch_size', type=int, default=8, help='rows per model call')
  parser.add_argument('--compute_dtype', default=None, choices=['bfloat16', 'float32', 'float64'],
                      help="default: the run's model.compute_dtype")
  parser.add_argument('--output', default=None, help='also write the harness\'s results JSON here')
  parser.add_argument('--json', action='store_true', help='print the scores as one JSON object')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  try:
    _require_lm_eval()
    model = inference.load_model(args.run_dir, args.step, compute_dtype=args.compute_dtype)
    result = evaluate(model, [t for t in args.tasks.split(',') if t], include_path=args.include_path,
                      default_tasks=not args.no_default_tasks, limit=args.limit,
                      num_fewshot=args.num_fewshot, batch_size=args.batch_size)
  except (ValueError, OSError, ImportError, KeyError) as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr)
    sys.exit(1)
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(result['raw'], f, indent=2, default=str)
  if args.json:
    print(json.dumps({'run_dir': args.run_dir, 'step': model.step, **result['scores']}))
  else:
    for name, value in result['scores'].items():
      print(f'{args.run_dir} step {model.step}  {name}  {value:.4f}')


if __name__ == '__main__':
  main()
