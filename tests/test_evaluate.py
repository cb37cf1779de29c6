"""maxlite.evaluate: a briefly trained run on data prepared without BOS, scored
against the validation loss training logged, on other meshes, through
load_model's logits, and through the CLI."""
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from configs import tiny
from data_prep.prepare import prepare
from maxlite import evaluate as ev
from maxlite import inference
from maxlite.data import hf_tokenizer, pipeline, tokenizers
from maxlite.train import check_run_tokenizer, train

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_STEPS = 2
EVAL_STEPS = 2


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Two prepared datasets of the same documents: bytes without BOS, and the
  same bytes through an HF tokenizer.json (another tokenizer)."""
  root = tmp_path_factory.mktemp('evaluate')
  sources = sorted((pathlib.Path(sysconfig.get_paths()['stdlib']) / 'json').glob('*.py'))
  common = dict(val_documents=2, workers=1, show_progress=False)
  prepare(sources, root / 'no_bos', add_bos=False, **common)
  (root / 'tokenizer.json').write_text(hf_tokenizer.byte_tokenizer_json())
  prepare(sources, root / 'hf', tokenizer='hf', tokenizer_file=root / 'tokenizer.json', **common)
  return root


@pytest.fixture(scope='module')
def run(corpus):
  run_dir = corpus / 'run'
  config = tiny.get_config()
  config.data.source = str(corpus / 'no_bos')
  config.train.update(run_dir=str(run_dir), steps=TRAIN_STEPS, eval_steps=EVAL_STEPS,
                      log_interval=TRAIN_STEPS)
  config.optim.warmup_steps = 1
  config.logging.tensorboard = False
  train(config)
  return run_dir


def logged_val_loss(run_dir) -> float:
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return [r['val_loss'] for r in records if 'val_loss' in r][-1]


def test_training_records_whether_its_data_had_bos(run):
  saved = tokenizers.read_saved_description(run / 'tokenizer')
  assert (saved['add_bos'], saved['add_eos']) == (False, True)
  assert tokenizers.saved_document_specials(run / 'tokenizer') == (False, True)
  assert tokenizers.tokenizer_part(saved) == tokenizers.ByteTokenizer().describe()
  check_run_tokenizer(run, tokenizers.ByteTokenizer())  # the record does not stop a resume


@pytest.mark.parametrize('tensor,fsdp', [(1, 1), (2, 2)])
def test_evaluate_gives_the_validation_loss_training_logged(run, corpus, tensor, fsdp):
  # The run's micro-batch and eval_steps: the batches training scored at its last step.
  result = ev.evaluate(run, str(corpus / 'no_bos'), num_batches=EVAL_STEPS, tensor=tensor, fsdp=fsdp)
  np.testing.assert_allclose(result.loss, logged_val_loss(run), rtol=1e-5)
  assert result.perplexity == pytest.approx(np.exp(result.loss))
  assert (result.step, result.batches, result.batch_size, result.seq_len) == (TRAIN_STEPS, 2, 8, 128)
  assert result.mesh == {'data': 8 // (tensor * fsdp), 'fsdp': fsdp, 'context': 1, 'expert': 1,
                         'tensor': tensor, 'pipeline': 1}
  assert 0 < result.tokens <= 2 * 8 * 128  # concat packing trains every token of its rows


def test_the_whole_split_is_scored_whatever_the_batch_size(run, corpus):
  # Concat packing makes the same rows for any batch size; the last, short
  # batch is padded with rows that score nothing.
  data = str(corpus / 'no_bos')
  by_8, by_16 = (ev.evaluate(run, data, batch_size=rows) for rows in (8, 16))
  assert by_8.tokens == by_16.tokens and by_8.batches > by_16.batches
  np.testing.assert_allclose(by_8.loss, by_16.loss, rtol=1e-6)


def test_load_model_logits_give_the_evaluated_loss(run, corpus):
  """Cross-entropy in float64 NumPy from load_model's logits (on a tensor mesh,
  packed rows) equals what the eval step computed."""
  model = inference.load_model(run)
  assert model.mesh.shape['tensor'] == 2 and not model.add_bos and model.step == TRAIN_STEPS
  datasets, _ = pipeline.open_datasets([(str(corpus / 'no_bos'), None)])
  settings = pipeline.LoaderSettings(seq_len=128, batch_size=8)
  total, count = 0.0, 0
  for batch in pipeline.validation_batches(datasets, settings, EVAL_STEPS):
    logits = np.asarray(model(batch['inputs'], batch['segment_ids'], batch['positions']), np.float64)
    assert logits.shape == (8, 128, model.vocab_size) == (8, 128, 264)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target_log_probs = np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
    total -= np.sum(target_log_probs * batch['loss_mask'])
    count += batch['loss_mask'].sum()
  np.testing.assert_allclose(total / count, logged_val_loss(run), rtol=1e-5)


def run_cli(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'maxlite.evaluate', *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=180)


def test_cli_prints_one_line_or_json(run, corpus):
  data = corpus / 'no_bos'
  result = run_cli(f'--run_dir={run}', f'--data={data}', f'--num_batches={EVAL_STEPS}')
  assert result.returncode == 0, result.stderr
  line, = result.stdout.splitlines()
  assert line.startswith(f'{run} step {TRAIN_STEPS} on {data} validation: loss '
                         f'{logged_val_loss(run):.4f}  perplexity ')
  assert line.endswith(f'({EVAL_STEPS} batches of 8 x 128, 1 device)')

  # Concat packing makes the same rows for any batch size: 4 batches of 4 are the 2 of 8.
  result = run_cli(f'--run_dir={run}', f'--data={data}', '--num_batches=4', '--batch_size=4',
                   f'--step={TRAIN_STEPS}', '--json')
  assert result.returncode == 0, result.stderr
  printed = json.loads(result.stdout)
  assert (printed['step'], printed['batches'], printed['batch_size']) == (TRAIN_STEPS, 4, 4)
  assert printed['mesh'] == {'data': 1, 'fsdp': 1, 'context': 1, 'expert': 1, 'tensor': 1, 'pipeline': 1}
  np.testing.assert_allclose(printed['loss'], logged_val_loss(run), rtol=1e-5)
  assert printed['perplexity'] == pytest.approx(np.exp(printed['loss']))


@pytest.mark.parametrize('args,message', [
    (['--run_dir={tmp}/absent', '--data={corpus}/no_bos'], 'run_dir {tmp}/absent does not exist'),
    (['--run_dir={run}', '--data={tmp}/absent'], '--data={tmp}/absent does not exist'),
    (['--run_dir={run}', '--data={corpus}/no_bos', '--step=7'],
     '{run}/checkpoints has no checkpoint at step 7 (it has [2])'),
    (['--run_dir={run}', '--data={corpus}/hf'],
     "--data={corpus}/hf was tokenized with another tokenizer (hf tokenizer.json) than the run's "
     '(byte)'),
    (['--run_dir={run}', '--data={corpus}/no_bos', '--batch_size=12'],
     '--batch_size=12 is not divisible by the 8 devices that split the batch (data=8 x fsdp=1)'),
    (['--run_dir={run}', '--data={corpus}/no_bos', '--tensor=4'],
     "--tensor=4 does not divide the run's model.num_kv_heads=2"),
    (['--run_dir={run}', '--data={corpus}/no_bos', '--num_batches=-1'], '--num_batches=-1 must be >= 0'),
])
def test_bad_input_is_a_one_line_error(run, corpus, tmp_path, capsys, args, message):
  names = dict(run=run, corpus=corpus, tmp=tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    ev.main([arg.format(**names) for arg in args])
  assert exit_info.value.code == 1
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.splitlines() == [f'error: {message.format(**names)}']
