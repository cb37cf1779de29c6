"""data_prep --format nanogpt_bin on files this test writes in each layout: nanoGPT's raw
uint16, modded-nanogpt's header + uint16, NeMo's header + uint16/uint32."""
import json

import numpy as np
import pytest

from data_prep import nanogpt_bin
from data_prep.__main__ import main
from maxlite.data import pipeline, shards
from maxlite.data.shards import decode_record

EOT = 50256


def docs(seed: int, count: int, vocab: int = EOT) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, rng.integers(1, 40)) for _ in range(count)]


def write_nanogpt(path, documents):
  """nanoGPT's prepare.py: each document's ids, then EOT; raw uint16."""
  np.concatenate([np.append(d, EOT) for d in documents]).astype('<u2').tofile(path)


def write_header_file(path, documents, magic, itemsize=2, count=None, bos=EOT):
  """modded-nanogpt (magic 20240520) and NeMo (278895051): EOT/BOS, then each document."""
  tokens = np.concatenate([np.insert(d, 0, bos) for d in documents])
  header = np.zeros(256, '<i4')
  header[:4] = magic, 1, len(tokens) if count is None else count, itemsize
  with open(path, 'wb') as f:
    f.write(header.tobytes())
    f.write(tokens.astype('<u2' if itemsize == 2 else '<u4').tobytes())
  return tokens


def records(folder, split):
  meta = shards.read_metadata(folder)
  from array_record.python import array_record_module
  out = []
  for path in shards.shard_paths(folder, meta, split):
    reader = array_record_module.ArrayRecordReader(path)
    out += [decode_record(r, meta['token_dtype']) for r in reader.read_all()]
    reader.close()
  return out


@pytest.mark.parametrize('block', [1 << 22, 7])  # 7: documents cross the read blocks
def test_nanogpt_train_and_val_files(tmp_path, monkeypatch, block):
  monkeypatch.setattr(nanogpt_bin, '_BLOCK', block)
  train_docs, val_docs = docs(0, 30), docs(1, 5)
  write_nanogpt(tmp_path / 'train.bin', train_docs)
  write_nanogpt(tmp_path / 'val.bin', val_docs)
  out = tmp_path / 'ds'
  assert main(['prepare', '--format', 'nanogpt_bin', '--input', str(tmp_path / 'train.bin'),
               str(tmp_path / 'val.bin'), '--vocab_size', '50304', '--output', str(out)]) == 0
  meta = json.loads((out / 'metadata.json').read_text())
  assert meta['tokenizer']['kind'] == 'ids' and meta['vocab_size'] == 50304
  assert (meta['add_bos'], meta['add_eos'], meta['eos_id']) == (False, True, EOT)
  assert meta['source']['layout'] == 'nanogpt'
  for split, expected in (('train', train_docs), ('validation', val_docs)):
    got = records(out, split)
    assert len(got) == len(expected)
    for record, doc in zip(got, expected):
      np.testing.assert_array_equal(record, np.append(doc, EOT))
  # The trainer reads it: its tokenizer is the ids' vocabulary, and text needs a tokenizer file.
  datasets, tokenizer = pipeline.open_datasets([(str(out), None)])
  assert tokenizer.vocab_size == 50304 and datasets[0].split('train')['documents'] == 30
  with pytest.raises(ValueError, match='without a tokenizer file'):
    tokenizer.encode('hello')


def test_modded_nanogpt_shards_and_a_hash_split(tmp_path):
  for index, seed in enumerate((2, 3)):
    write_header_file(tmp_path / f'fineweb_train_{index:06d}.bin', docs(seed, 200),
                      nanogpt_bin.MODDED_MAGIC)
  out = tmp_path / 'ds'
  meta = nanogpt_bin.prepare_bin([tmp_path], out, vocab_size=50257, val_fraction=0.1)
  assert meta['source']['layout'] == 'modded-nanogpt' and (meta['add_bos'], meta['bos_id']) == (True, EOT)
  got = records(out, 'train') + records(out, 'validation')
  assert len(got) == 400 and all(r[0] == EOT and (r[1:] != EOT).all() for r in got)
  assert 10 < meta['splits']['validation']['documents'] < 80  # about 10% by the hash of the ids
  expected = {tuple(np.insert(d, 0, EOT)) for seed in (2, 3) for d in docs(seed, 200)}
  assert {tuple(r) for r in got} == expected


def test_nemo_uint32_with_a_tokenizer_file(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {f'w{i}': i for i in range(99)} | {'<|endoftext|>': 99}
  model = tokenizers.models.WordLevel(vocab, unk_token='<|endoftext|>')
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / 'tokenizer.json'))
  documents = docs(4, 20, vocab=99)
  write_header_file(tmp_path / 'dataset.bin', documents, nanogpt_bin.NEMO_MAGIC, itemsize=4, bos=99)
  out = tmp_path / 'ds'
  assert main(['prepare', '--format', 'nanogpt_bin', '--input', str(tmp_path / 'dataset.bin'),
               '--tokenizer_file', str(tmp_path / 'tokenizer.json'), '--bos_token', '<|endoftext|>',
               '--val_documents', '2', '--output', str(out)]) == 0
  meta = json.loads((out / 'metadata.json').read_text())
  assert meta['tokenizer']['kind'] == 'hf' and meta['source']['layout'] == 'nemo'
  assert [list(r) for r in records(out, 'validation') + records(out, 'train')] == \
      [[99, *d] for d in documents]
  _, tokenizer = pipeline.open_datasets([(str(out), None)])
  assert tokenizer.decode(records(out, 'train')[0][1:3]) == ' '.join(
      f'w{i}' for i in documents[2][:2])


@pytest.mark.parametrize('damage,message', [
    (dict(count=10_000), 'the header says 10,000 tokens but the file holds'),
    (dict(magic=nanogpt_bin.MODDED_MAGIC, version=2), 'header version 2, expected 1'),
    (dict(odd=True), 'is not a whole number of uint16 tokens'),
    (dict(big_id=True), 'holds token id 60000, not below the vocabulary size 50304'),
])
def test_bad_files_are_one_line_errors(tmp_path, capsys, damage, message):
  path = tmp_path / 'train.bin'
  if damage.get('odd'):
    path.write_bytes(b'\x01\x02\x03')
  elif damage.get('big_id'):
    write_nanogpt(path, [np.array([1, 60000])])
  else:
    write_header_file(path, docs(5, 3), damage.get('magic', nanogpt_bin.MODDED_MAGIC),
                      count=damage.get('count'))
    if 'version' in damage:
      with open(path, 'r+b') as f:
        f.seek(4)
        f.write(np.int32(damage['version']).tobytes())
  assert main(['prepare', '--format', 'nanogpt_bin', '--input', str(path), '--vocab_size', '50304',
               '--output', str(tmp_path / 'ds')]) == 1
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1 and not (tmp_path / 'ds').exists()


def test_a_tokenizer_or_vocab_size_is_required(tmp_path, capsys):
  write_nanogpt(tmp_path / 'train.bin', docs(6, 2))
  assert main(['prepare', '--format', 'nanogpt_bin', '--input', str(tmp_path / 'train.bin'),
               '--output', str(tmp_path / 'ds')]) == 1
  assert 'needs --tokenizer_file' in capsys.readouterr().err
