"""maxlite.lm_eval: the lm-eval model class against float64 NumPy on maxlite's own
logits and against transformers on the run's HF export, and the harness run
end to end on tasks defined in local files (hub datasets are offline here)."""
import json
import os
import textwrap

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maxlite
from configs import tiny
from maxlite import checkpoint, hf, lm_eval as maxlite_lm_eval, state as state_lib
from maxlite.data import tokenizers
from maxlite.model.llama import LlamaConfig

lm_eval_api = pytest.importorskip('lm_eval.api.instance')
# The task files below are local; `datasets` may have been imported (and read
# the environment) by another test in this process before the line at the top.
import datasets.config  # noqa: E402
datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

MAX_LEN = 32
CHOICE_DOCS = [
    {'context': 'def add(a, b):\n  return', 'choices': ['a + b', 'a - b', 'None'], 'label': 0},
    {'context': 'import', 'choices': ['os', 'sys', ' numpy'], 'label': 1},
    {'context': 'x = [1, 2, 3]\nprint(len(x))  #', 'choices': ['3', 'three', '[1, 2, 3] has three'],
     'label': 2},
    {'context': 'for i in range(10):', 'choices': ['\n  pass', ' break'], 'label': 0},
]
# 80+ bytes: rolling windows of MAX_LEN tokens.
TEXTS = ['The quick brown fox jumps over the lazy dog; then it naps under the old oak tree.',
         'short one']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A run directory as training writes it, random weights, BOS-prefixed documents."""
  run_dir = tmp_path_factory.mktemp('lm_eval') / 'run'
  config = tiny.get_config()
  config.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=MAX_LEN, tie_embeddings=False)
  cfg = LlamaConfig.from_config(config.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
                        state_lib.abstract_model(cfg)[1])
  checkpointer = checkpoint.Checkpointer(run_dir, interval=1, max_to_keep=1)
  checkpointer.save(3, state_lib.TrainState(step=jnp.int32(3), params=params, opt_state=()),
                    config.to_json_best_effort(), {}, {'source_tokens': [0]})
  checkpointer.close()
  tokenizers.save_tokenizer(tokenizers.ByteTokenizer(), run_dir / 'tokenizer', add_bos=True,
                            add_eos=True)
  return run_dir


@pytest.fixture(scope='module')
def model(run):
  return maxlite.load_model(run)  # a tensor mesh over the fake devices


@pytest.fixture(scope='module')
def lm(model):
  return maxlite_lm_eval.MaxliteLM(model=model, batch_size=4)


@pytest.fixture(scope='module')
def transformers_model(run, tmp_path_factory):
  folder = hf.export(run, tmp_path_factory.mktemp('lm_eval_hf') / 'hf', log=lambda _: None)
  return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_logprob(logits_fn, context: list[int], continuation: list[int]) -> tuple[float, bool]:
  """Float64 log-softmax of one unpadded row's logits; a row longer than MAX_LEN + 1
  keeps its last tokens, as lm-eval's HF model does."""
  whole = np.array(context + continuation)[-(MAX_LEN + 1):]
  context = context[len(context) + len(continuation) - len(whole):]
  # Padded on the right to MAX_LEN: one shape compiles, and causal attention
  # keeps the padding out of the real positions' logits.
  padded = np.zeros((1, MAX_LEN), np.int64)
  padded[0, :len(whole) - 1] = whole[:-1]
  logits = np.asarray(logits_fn(padded)[0, :len(whole) - 1], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  targets = whole[1:]
  span = slice(len(context) - 1, len(whole) - 1)
  picked = logp[np.arange(len(targets)), targets][span]
  return float(picked.sum()), bool((logits.argmax(-1)[span] == targets[span]).all())


def hf_logits(transformers_model):
  def logits(tokens_BT):
    with torch.no_grad():
      return transformers_model(torch.tensor(tokens_BT)).logits.numpy()
  return logits


def requests(kind, arguments):
  return [lm_eval_api.Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def choice_pairs():
  return [(doc['context'], ' ' + choice) for doc in CHOICE_DOCS for choice in doc['choices']]


def test_loglikelihood_matches_numpy_and_transformers(lm, model, transformers_model):
  pairs = choice_pairs() + [('', 'import os')]  # an empty context is conditioned on BOS
  got = lm.loglikelihood(requests('loglikelihood', pairs))
  bos = model.tokenizer.bos_id
  for (context, continuation), (logp, greedy) in zip(pairs, got):
    ids = [bos, *model.tokenizer.encode(context).tolist()]
    cont = model.tokenizer.encode(continuation).tolist()
    ours = reference_logprob(model, ids, cont)
    theirs = reference_logprob(hf_logits(transformers_model), ids, cont)
    assert abs(logp - ours[0]) < 1e-4 and greedy == ours[1]
    assert abs(logp - theirs[0]) < 1e-4 and greedy == theirs[1]
  assert min(logp for logp, _ in got) < -10  # random weights: far from 0, so 1e-4 bounds something


def test_rolling_loglikelihood_scores_every_token_once(lm, model, transformers_model):
  got = lm.loglikelihood_rolling(requests('loglikelihood_rolling', [(t,) for t in TEXTS]))
  bos = model.tokenizer.bos_id
  for text, total in zip(TEXTS, got):
    full = [bos, *model.tokenizer.encode(text).tolist()]
    n = len(full) - 1
    assert n > MAX_LEN or text == TEXTS[1]
    # Token j (full[j + 1]) is scored in block j // MAX_LEN, by a window of at most
    # MAX_LEN tokens that ends where that block ends.
    expected = 0.0
    for first in range(0, n, MAX_LEN):
      end = min(first + MAX_LEN, n)
      start = max(0, end - MAX_LEN)
      window = full[start:end + 1]
      context_len = first - start + 1
      expected += reference_logprob(hf_logits(transformers_model),
                                    window[:context_len], window[context_len:])[0]
    assert abs(total - expected) < 1e-4 * max(1, abs(expected) / 100)


def write_tasks(folder) -> str:
  """Three tasks in local files: multiple choice, rolling perplexity, greedy generation."""
  folder.mkdir(exist_ok=True)
  (folder / 'choice.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in CHOICE_DOCS))
  (folder / 'texts.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS))
  gen_docs = [{'context': 'def f(x):', 'answer': 'return x'}, {'context': 'a = 1\nb =', 'answer': '2'}]
  (folder / 'gen.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in gen_docs))
  common = 'dataset_path: json\ntest_split: test\n'
  (folder / 'choice.yaml').write_text(common + textwrap.dedent(f"""\
      task: tiny_choice
      dataset_kwargs: {{data_files: {{test: {folder / 'choice.jsonl'}}}}}
      output_type: multiple_choice
      doc_to_text: "{{{{context}}}}"
      doc_to_choice: "{{{{choices}}}}"
      doc_to_target: "{{{{label}}}}"
      metric_list: [{{metric: acc}}]
      """))
  (folder / 'rolling.yaml').write_text(common + textwrap.dedent(f"""\
      task: tiny_rolling
      dataset_kwargs: {{data_files: {{test: {folder / 'texts.jsonl'}}}}}
      output_type: loglikelihood_rolling
      doc_to_text: ""
      doc_to_target: "{{{{text}}}}"
      metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
      """))
  (folder / 'gen.yaml').write_text(common + textwrap.dedent(f"""\
      task: tiny_gen
      dataset_kwargs: {{data_files: {{test: {folder / 'gen.jsonl'}}}}}
      output_type: generate_until
      doc_to_text: "{{{{context}}}}"
      doc_to_target: "{{{{answer}}}}"
      generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
      metric_list: [{{metric: exact_match}}]
      """))
  return str(folder)


def test_harness_scores_match_a_direct_computation(model, tmp_path):
  tasks = write_tasks(tmp_path / 'tasks')
  result = maxlite_lm_eval.evaluate(model, ['tiny_choice', 'tiny_rolling', 'tiny_gen'],
                                    include_path=tasks, default_tasks=False,
                                    batch_size=4)
  scores = result['scores']
  bos = model.tokenizer.bos_id
  correct = 0
  for doc in CHOICE_DOCS:
    context = [bos, *model.tokenizer.encode(doc['context']).tolist()]
    logps = [reference_logprob(model, context, model.tokenizer.encode(' ' + c).tolist())[0]
             for c in doc['choices']]
    correct += int(np.argmax(logps) == doc['label'])
  assert scores['tiny_choice/acc'] == correct / len(CHOICE_DOCS)
  # bits per byte: minus the rolling log-likelihood in bits over the UTF-8 bytes.
  lm = maxlite_lm_eval.MaxliteLM(model=model, batch_size=4)
  totals = lm.loglikelihood_rolling(requests('loglikelihood_rolling', [(t,) for t in TEXTS]))
  bits = -sum(totals) / np.log(2) / sum(len(t.encode()) for t in TEXTS)
  assert abs(scores['tiny_rolling/bits_per_byte'] - bits) < 1e-6
  assert scores['tiny_gen/exact_match'] in (0.0, 0.5, 1.0)


def test_greedy_generation_follows_the_logits(lm, model):
  prompts = ['def f(x):', 'a = 1\nb =']
  got = lm.generate_until(requests('generate_until',
                                   [(p, {'until': ['\n'], 'max_gen_toks': 5}) for p in prompts]))
  for prompt, text in zip(prompts, got):
    ids = [model.tokenizer.bos_id, *model.tokenizer.encode(prompt).tolist()]
    new = []
    for _ in range(5):  # greedy decoding by whole-sequence forward passes, no KV cache
      row = np.zeros((1, MAX_LEN), np.int32)
      row[0, :len(ids) + len(new)] = ids + new
      token = int(np.argmax(np.asarray(model(row)[0, len(ids) + len(new) - 1])))
      if token == model.tokenizer.eos_id:
        break
      new.append(token)
    assert text == model.tokenizer.decode(new).split('\n')[0]


def test_cli_prints_scores_and_one_line_errors(run, tmp_path, capsys):
  tasks = write_tasks(tmp_path / 'tasks')
  maxlite_lm_eval.main(['--run_dir', str(run), '--tasks', 'tiny_choice', '--include_path', tasks,
                        '--limit', '2', '--json', '--batch_size', '4', '--no_default_tasks'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['step'] == 3 and 0 <= out['tiny_choice/acc'] <= 1
  with pytest.raises(SystemExit):
    maxlite_lm_eval.main(['--run_dir', str(tmp_path / 'nope'), '--tasks', 'tiny_choice'])
  assert capsys.readouterr().err.strip().count('\n') == 0


def test_training_runs_the_harness_and_logs_to_wandb_offline(tmp_path, monkeypatch, capsys):
  """train.eval_harness_tasks on the live parameters of a data=4 x fsdp=2 mesh, scores
  beside val_loss; W&B offline gets the same scalars; the log line has elapsed and ETA."""
  from maxlite.train import train
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  tasks = write_tasks(tmp_path / 'tasks')
  config = tiny.get_config()
  config.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=MAX_LEN)
  config.parallel.update(data=4, fsdp=2)
  config.train.update(run_dir=str(tmp_path / 'run'), steps=4, log_interval=2, eval_interval=2,
                      eval_steps=1, micro_batch_size=8, eval_harness_tasks='tiny_choice',
                      eval_harness_interval=4, eval_harness_include_path=tasks)
  config.checkpoint.update(interval=0, async_save=False)
  config.optim.warmup_steps = 1
  config.logging.update(wandb_project='maxlite-test', wandb_tags='a,b')
  history = train(config)
  out = capsys.readouterr().out
  assert any('ETA 0:00' in line and 'elapsed 0:0' in line for line in out.splitlines()), out
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  harness = [r for r in records if 'harness/tiny_choice/acc' in r]
  assert [r['step'] for r in harness] == [4] and [h['step'] for h in history if 'val_loss' in h] == [2, 4]
  assert all(r['eta_s'] >= 0 and r['elapsed_s'] > 0 for r in records if 'loss' in r)

  # The harness score is the checkpoint's, scored as python -m maxlite.lm_eval scores it.
  model = maxlite.load_model(tmp_path / 'run')
  again = maxlite_lm_eval.evaluate(model, ['tiny_choice'], include_path=tasks, default_tasks=False,
                                   batch_size=8)['scores']
  assert again['tiny_choice/acc'] == harness[0]['harness/tiny_choice/acc']

  # The offline W&B run, named by the id kept in the run dir, holds the same scalars.
  run_id = (tmp_path / 'run' / 'wandb_id').read_text().strip()
  offline = list((tmp_path / 'run' / 'wandb').glob(f'offline-run-*-{run_id}'))
  assert len(offline) == 1 and (offline[0] / f'run-{run_id}.wandb').is_file()
