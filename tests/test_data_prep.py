"""data_prep: every input format, exact round trips, determinism, the split rules, and one-line errors."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module

from data_prep import prepare as prepare_lib
from data_prep.__main__ import main
from data_prep.prepare import prepare
from data_prep.readers import read_documents
from data_prep.tokenizer_training import train_tokenizer
from maxlite.data import shards
from maxlite.data.tokenizers import ByteTokenizer, load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
# Awkward on purpose: leading/trailing/double spaces, tabs, CRLF, accents, CJK, astral-plane emoji.
TEXTS = ['First document.\nIt has two lines.', '  leading and trailing  ', 'tabs\there\r\nand CRLF',
         'accents: déjà vu, naïve, Ærø', 'CJK 中文字符 and emoji 😀🚀', 'x', 'numbers 1234567890 ' * 20]


def read_shards(folder, split) -> list[np.ndarray]:
  """Documents of a split read straight from the ArrayRecord files (not through data_prep)."""
  meta = json.loads((folder / 'metadata.json').read_text())
  documents = []
  for name in meta['splits'][split]['shards']:
    reader = array_record_module.ArrayRecordReader(str(folder / name))
    documents += [shards.decode_record(r, meta['token_dtype']) for r in reader.read_all()]
    reader.close()
  return documents


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
  return path


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'data_prep', *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
  """A small BPE model trained here, on lines unlike the test texts (byte fallback covers those)."""
  folder = tmp_path_factory.mktemp('sp')
  corpus = folder / 'corpus.txt'
  words = ['the', 'data', 'token', 'shard', 'record', 'model', 'train', 'valid', 'mesh', 'batch']
  rng = np.random.default_rng(0)
  corpus.write_text('\n'.join(' '.join(rng.choice(words, 12)) for _ in range(2000)))
  result = train_tokenizer([corpus], folder / 'sp', vocab_size=300, num_threads=1)
  return pathlib.Path(result['model'])


# -- readers ---------------------------------------------------------------------------------------

def test_text_inputs_as_file_glob_and_folder_with_each_split_by(tmp_path):
  (tmp_path / 'b').mkdir()
  (tmp_path / 'a.txt').write_text('one\ntwo\n\n\nthree\nfour\n')
  (tmp_path / 'b' / 'c.txt').write_text('five\r\n\r\nsix  \n')
  (tmp_path / 'b' / '.hidden').write_text('never read')
  assert list(read_documents(tmp_path / 'a.txt')) == ['one\ntwo\n\n\nthree\nfour\n']
  assert list(read_documents(tmp_path, split_by='line')) == ['one', 'two', 'three', 'four', 'five', 'six  ']
  assert list(read_documents(str(tmp_path / '**' / '*.txt'), split_by='paragraph')) == [
      'one\ntwo', 'three\nfour', 'five', 'six  ']
  (tmp_path / 'crlf.txt').write_bytes(b'a\r\nb\r\n\r\nc\r\n')
  assert list(read_documents(tmp_path / 'crlf.txt', split_by='paragraph')) == ['a\r\nb', 'c']
  assert list(read_documents([tmp_path / 'b' / 'c.txt', tmp_path / 'a.txt'], format='text')) == [
      'five\r\n\r\nsix  \n', 'one\ntwo\n\n\nthree\nfour\n']


def test_structured_inputs_and_template(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  records = [{'title': f'T{i}', 'text': TEXTS[i], 'n': i} for i in range(len(TEXTS))]
  write_jsonl(tmp_path / 'a.jsonl', records)
  (tmp_path / 'list.json').write_text(json.dumps(records), encoding='utf-8')
  write_jsonl(tmp_path / 'lines.json', records)
  pq.write_table(pa.Table.from_pylist(records), tmp_path / 'a.parquet', row_group_size=3)
  for name in ('a.jsonl', 'list.json', 'lines.json', 'a.parquet'):
    assert list(read_documents(tmp_path / name)) == TEXTS, name
  templated = list(read_documents(tmp_path / 'a.parquet', template='{title} #{n}\n\n{text}'))
  assert templated == [f'T{i} #{i}\n\n{t}' for i, t in enumerate(TEXTS)]
  with pytest.raises(ValueError, match=r"column 'body' is not in .*a\.parquet \(it has: title, text, n\)"):
    list(read_documents(tmp_path / 'a.parquet', text_column='body'))
  with pytest.raises(ValueError, match=r"column 'subtitle' is not in .*a\.jsonl line 1"):
    list(read_documents(tmp_path / 'a.jsonl', template='{subtitle}: {text}'))


def test_hugging_face_inputs(tmp_path):
  datasets = pytest.importorskip('datasets')
  records = [{'text': t, 'title': f'T{i}'} for i, t in enumerate(TEXTS)]
  write_jsonl(tmp_path / 'a.jsonl', records)
  assert list(read_documents(tmp_path / 'a.jsonl', format='hf')) == TEXTS  # builder from the extension
  assert list(read_documents(tmp_path / 'a.jsonl', format='hf', hf_builder='json', template='{title}|{text}')) == [
      f'T{i}|{t}' for i, t in enumerate(TEXTS)]
  with pytest.raises(ValueError, match='validation'):
    list(read_documents(tmp_path / 'a.jsonl', format='hf', split='validation'))
  (tmp_path / 'folder').mkdir()
  write_jsonl(tmp_path / 'folder' / 'part.jsonl', records)
  assert list(read_documents(tmp_path / 'folder', format='hf')) == TEXTS  # `datasets` infers the builder

  columns = {'text': TEXTS, 'title': [f'T{i}' for i in range(len(TEXTS))]}
  datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / 'disk'))
  assert list(read_documents(tmp_path / 'disk')) == TEXTS  # auto-detected as hf_disk
  halves = datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': TEXTS[:3]}),
                                 'test': datasets.Dataset.from_dict({'text': TEXTS[3:]})})
  halves.save_to_disk(str(tmp_path / 'dict'))
  assert list(read_documents(tmp_path / 'dict', format='hf_disk', split='test')) == TEXTS[3:]
  with pytest.raises(ValueError, match=r"has no split 'dev' \(it has: train, test\)"):
    read_documents(tmp_path / 'dict', format='hf_disk', split='dev')
  with pytest.raises(ValueError, match="column 'body' is not in"):
    read_documents(tmp_path / 'disk', format='hf_disk', text_column='body')


def test_tfds_dataset_built_and_read_without_tensorflow(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('tensorflow_datasets.core.data_sources')

  class TinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'text': tfds.features.Text(), 'title': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(TEXTS)}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {'text': text, 'title': f'T{i}'}

  TinyCorpus(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  assert 'tensorflow' not in sys.modules
  read = list(read_documents('tiny_corpus', format='tfds', tfds_data_dir=str(tmp_path)))
  assert sorted(read) == sorted(TEXTS)  # TFDS shuffles at build time
  titled = read_documents('tiny_corpus', format='tfds', tfds_data_dir=str(tmp_path), template='{title}:{text}')
  assert sorted(titled) == sorted(f'T{i}:{t}' for i, t in enumerate(TEXTS))
  with pytest.raises(FileNotFoundError, match="'absent_corpus' is not in"):
    read_documents('absent_corpus', format='tfds', tfds_data_dir=str(tmp_path))


# -- prepare ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('add_bos,add_eos', [(True, True), (False, True), (False, False)])
def test_byte_round_trip_specials_and_counts(tmp_path, add_bos, add_eos):
  write_jsonl(tmp_path / 'in.jsonl', [{'text': t} for t in TEXTS] + [{'text': '  \n'}, {'text': None}])
  meta = prepare([tmp_path / 'in.jsonl'], tmp_path / 'out', add_bos=add_bos, add_eos=add_eos,
                 val_documents=2, workers=1, show_progress=False)
  byte = ByteTokenizer()
  documents = read_shards(tmp_path / 'out', 'validation') + read_shards(tmp_path / 'out', 'train')
  expected = [[byte.bos_id] * add_bos + list(t.encode('utf-8')) + [byte.eos_id] * add_eos for t in TEXTS]
  assert [d.tolist() for d in documents] == expected
  assert meta['skipped'] == {'empty_documents': 2, 'no_tokens': 0}
  assert (meta['add_bos'], meta['add_eos'], meta['token_dtype']) == (add_bos, add_eos, 'uint16')
  for split, texts in (('validation', expected[:2]), ('train', expected[2:])):
    assert meta['splits'][split]['documents'] == len(texts)
    assert meta['splits'][split]['tokens'] == sum(map(len, texts))
  assert meta == json.loads((tmp_path / 'out' / 'metadata.json').read_text())
  assert shards.read_metadata(tmp_path / 'out')['tokenizer']['kind'] == 'byte'


def test_sentencepiece_round_trip_through_the_cli(tmp_path, sentencepiece_model):
  (tmp_path / 'in.txt').write_text('\n\n'.join(TEXTS), encoding='utf-8')
  result = run_cli('prepare', '--input', tmp_path / 'in.txt', '--split_by', 'paragraph', '--output',
                   tmp_path / 'out', '--tokenizer', 'sentencepiece', '--tokenizer_file', sentencepiece_model,
                   '--no_add_bos', '--val_fraction', '0', '--workers', '2')
  assert result.returncode == 0, result.stderr
  paragraphs = [p for p in '\n\n'.join(TEXTS).split('\n\n')]
  meta = shards.read_metadata(tmp_path / 'out')
  assert (tmp_path / 'out' / sentencepiece_model.name).read_bytes() == sentencepiece_model.read_bytes()
  sp = load_tokenizer('sentencepiece', tmp_path / 'out' / sentencepiece_model.name)
  assert (meta['bos_id'], meta['eos_id'], meta['vocab_size']) == (1, 2, 300)
  documents = read_shards(tmp_path / 'out', 'train')
  assert [sp.decode(d) for d in documents] == paragraphs
  assert all(d[0] != 1 and d[-1] == 2 and (d[:-1] != 2).all() for d in documents)
  assert meta['splits']['train']['tokens'] == sum(map(len, documents))
  assert meta['command'][:4] == ['python', '-m', 'data_prep', 'prepare']

  shown = run_cli('inspect', tmp_path / 'out', '--num_documents', '2')
  assert shown.returncode == 0, shown.stderr
  for expected in ('sentencepiece', 'vocab        300', f'train        {len(paragraphs)} documents',
                   paragraphs[0], paragraphs[1]):
    assert expected in shown.stdout


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=['<s>', '</s>', '<pad>'],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                           show_progress=False)
  tok.train_from_iterator(TEXTS * 5, trainer)
  tok.save(str(tmp_path / 'tokenizer.json'))
  write_jsonl(tmp_path / 'in.jsonl', [{'text': t} for t in TEXTS])
  meta = prepare(tmp_path / 'in.jsonl', tmp_path / 'out', tokenizer='hf', tokenizer_file=tmp_path / 'tokenizer.json',
                 val_fraction=0, workers=1, show_progress=False)
  assert (meta['bos_id'], meta['eos_id'], meta['tokenizer']['bos_token']) == (0, 1, '<s>')
  hf = load_tokenizer('hf', tmp_path / 'out' / 'tokenizer.json')
  documents = read_shards(tmp_path / 'out', 'train')
  assert [hf.decode(d) for d in documents] == TEXTS
  assert all(d[0] == 0 and d[-1] == 1 for d in documents)

  # A tokenizer without the asked-for specials is refused, naming its file.
  plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({'[UNK]': 0, 'a': 1}, unk_token='[UNK]'))
  plain.save(str(tmp_path / 'plain.json'))
  with pytest.raises(ValueError, match=r'plain\.json has no BOS token'):
    prepare(tmp_path / 'in.jsonl', tmp_path / 'out2', tokenizer='hf', tokenizer_file=tmp_path / 'plain.json')


def test_one_and_two_workers_write_identical_shards(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare_lib, '_CHUNK_DOCUMENTS', 7)  # many chunks, so ordering is exercised
  rng = np.random.default_rng(1)
  lines = [''.join(rng.choice(list('abcdé中 '), rng.integers(1, 60))) for _ in range(500)]
  (tmp_path / 'in.txt').write_text('\n'.join(lines), encoding='utf-8')
  metas = [prepare(tmp_path / 'in.txt', tmp_path / f'out{w}', split_by='line', docs_per_shard=90,
                   val_fraction=0.1, workers=w, show_progress=False) for w in (1, 2)]
  files = sorted(p.name for p in (tmp_path / 'out1').iterdir())
  assert files == sorted(p.name for p in (tmp_path / 'out2').iterdir())
  assert len([f for f in files if f.startswith('train-')]) > 3
  for name in files:
    if name != 'metadata.json':
      assert (tmp_path / 'out1' / name).read_bytes() == (tmp_path / 'out2' / name).read_bytes(), name
  for meta in metas:
    del meta['created'], meta['command']
  assert metas[0] == metas[1]


def test_metadata_records_each_shards_documents_and_bytes(tmp_path):
  # What the trainer checks at start-up (maxlite.data.shards.check_shards) against the files.
  (tmp_path / 'in.txt').write_text('\n'.join(f'line {i} ' * (1 + i % 7) for i in range(250)))
  meta = prepare(tmp_path / 'in.txt', tmp_path / 'out', split_by='line', docs_per_shard=100,
                 val_documents=20, workers=1, show_progress=False)
  for split, expected in (('train', [100, 100, 30]), ('validation', [20])):
    entry = meta['splits'][split]
    assert entry['shard_documents'] == expected
    assert entry['shard_bytes'] == [(tmp_path / 'out' / name).stat().st_size for name in entry['shards']]
    for name, count in zip(entry['shards'], expected):
      reader = array_record_module.ArrayRecordReader(str(tmp_path / 'out' / name))
      assert reader.num_records() == count
      reader.close()
    shards.check_shards(tmp_path / 'out', meta, split)


def test_max_tokens_stops_within_one_document(tmp_path):
  (tmp_path / 'in.txt').write_text('\n'.join(f'line number {i} ' * (1 + i % 5) for i in range(2000)))
  meta = prepare(tmp_path / 'in.txt', tmp_path / 'out', split_by='line', max_tokens=5000, workers=2,
                 show_progress=False)
  documents = read_shards(tmp_path / 'out', 'train') + read_shards(tmp_path / 'out', 'validation')
  total = sum(map(len, documents))
  assert total == meta['splits']['train']['tokens'] + meta['splits']['validation']['tokens']
  assert 5000 <= total < 5000 + max(map(len, documents)) and meta['stopped_at_max_tokens']


def test_validation_split_rules(tmp_path):
  texts = [f'document {i}' for i in range(1000)]
  write_jsonl(tmp_path / 'in.jsonl', [{'text': t} for t in texts + texts[:100]])  # 100 duplicates
  meta = prepare(tmp_path / 'in.jsonl', tmp_path / 'frac', val_fraction=0.2, workers=1, show_progress=False)
  byte = ByteTokenizer()
  val = {byte.decode(d) for d in read_shards(tmp_path / 'frac', 'validation')}
  train = {byte.decode(d) for d in read_shards(tmp_path / 'frac', 'train')}
  assert 150 <= meta['splits']['validation']['documents'] <= 290  # binomial(1100, 0.2): +-5 sigma
  assert not val & train and val | train == set(texts)  # a document's copies share a split

  meta = prepare(tmp_path / 'in.jsonl', tmp_path / 'count', val_documents=30, workers=1, show_progress=False)
  assert [byte.decode(d) for d in read_shards(tmp_path / 'count', 'validation')] == texts[:30]
  assert meta['splits']['train']['documents'] == 1070

  # Two documents and a small fraction: the last one is held out, so validation is never empty.
  write_jsonl(tmp_path / 'two.jsonl', [{'text': 'first'}, {'text': 'second'}])
  meta = prepare(tmp_path / 'two.jsonl', tmp_path / 'two', workers=1, show_progress=False)
  assert [byte.decode(d) for d in read_shards(tmp_path / 'two', 'validation')] == ['second']
  with pytest.raises(ValueError, match='leaves no training document'):
    prepare(tmp_path / 'two.jsonl', tmp_path / 'none', val_documents=2, workers=1, show_progress=False)
  assert not (tmp_path / 'none').exists()


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path):
  (tmp_path / 'in.txt').write_text('new text')
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'precious.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='not a prepared dataset'):
    prepare(tmp_path / 'in.txt', tmp_path / 'out', overwrite=True, workers=1, show_progress=False)
  (tmp_path / 'out' / 'precious.txt').unlink()
  prepare(tmp_path / 'in.txt', tmp_path / 'out', workers=1, show_progress=False)  # empty folder: fine
  (tmp_path / 'in.txt').write_text('newer text')
  prepare(tmp_path / 'in.txt', tmp_path / 'out', overwrite=True, workers=1, show_progress=False)
  assert [ByteTokenizer().decode(d) for d in read_shards(tmp_path / 'out', 'train')] == ['newer text']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['in.txt', 'out']  # no staging left behind


# -- the command line ------------------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors(tmp_path):
  (tmp_path / 'in.jsonl').write_text('{"body": "x"}\n')
  (tmp_path / 'blank.txt').write_text('\n  \n\n')
  (tmp_path / 'bad.txt').write_bytes('héllo\nwörld\n'.encode() + b'\xff\xfe tail')
  (tmp_path / 'ok.txt').write_text('fine')
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'mine.txt').write_text('keep me')
  cases = [
      (['--input', tmp_path / 'missing.txt'], 'missing.txt'),
      (['--input', tmp_path / 'in.jsonl'], "column 'text' is not in"),
      (['--input', tmp_path / 'blank.txt', '--split_by', 'line'], 'empty dataset'),
      (['--input', tmp_path / 'bad.txt'], 'bad.txt: invalid UTF-8 at byte 14'),
      (['--input', tmp_path / 'ok.txt', '--output', tmp_path / 'taken'], 'taken is not empty'),
      (['--input', tmp_path / 'ok.txt', '--tokenizer', 'sentencepiece', '--tokenizer_file',
        tmp_path / 'nope.model'], 'nope.model does not exist'),
  ]
  for args, expected in cases:
    if '--output' not in args:
      args = [*args, '--output', tmp_path / 'out']
    result = run_cli('prepare', *args, '--workers', '1')
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
    assert lines[0].startswith('error: ')
  assert (tmp_path / 'taken' / 'mine.txt').read_text() == 'keep me'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.txt', 'blank.txt', 'in.jsonl', 'ok.txt', 'taken']


def test_train_tokenizer_refuses_to_overwrite(tmp_path, capsys):
  rng = np.random.default_rng(2)
  words = [''.join(rng.choice(list('abcdefghij'), rng.integers(3, 8))) for _ in range(200)]
  (tmp_path / 'in.txt').write_text('\n'.join(' '.join(rng.choice(words, 9)) for _ in range(300)))
  args = ['train-tokenizer', '--input', str(tmp_path / 'in.txt'), '--output', str(tmp_path / 'sp'),
          '--vocab_size', '300', '--model_type', 'unigram']
  assert main(args) == 0
  before = (tmp_path / 'sp.model').read_bytes()
  assert main(args) == 1
  assert 'sp.model exists: pass --overwrite' in capsys.readouterr().err
  assert (tmp_path / 'sp.model').read_bytes() == before
  assert main(args + ['--overwrite']) == 0


@pytest.mark.parametrize('command', ['prepare', 'train-tokenizer', 'inspect', None])
def test_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main([command, '--help'] if command else ['--help'])
  assert exit_info.value.code == 0
  assert 'usage: python -m data_prep' in capsys.readouterr().out
