"""The Grain pipeline: packing, sharding, mixtures, determinism and exact resume."""
import collections
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from maxlite.data import embedded, pipeline, shards

BOS, EOS = 1, 2
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_dataset(folder, lengths, *, first_doc=0, val_lengths=(5, 7), tokenizer_sha='t0'):
  """Documents whose tokens say where they come from: (doc + 1) * 1000 + position, BOS first."""
  folder.mkdir(parents=True)
  splits = {}
  for split, split_lengths, offset in (('train', lengths, first_doc), ('validation', val_lengths, 900 + first_doc)):
    writer = shards.ShardWriter(folder, split, 'uint32', docs_per_shard=7)
    for i, length in enumerate(split_lengths):
      doc = (offset + i + 1) * 1000 + np.arange(length)
      doc[0] = BOS
      writer.write(doc)
    splits[split] = writer.close()
  meta = {'format_version': shards.FORMAT_VERSION,
          'tokenizer': {'kind': 'byte', 'file': None, 'sha256': tokenizer_sha, 'vocab_size': 264,
                        'bos_id': BOS, 'eos_id': EOS, 'pad_id': 0},
          'vocab_size': 264, 'bos_id': BOS, 'eos_id': EOS, 'add_bos': True, 'add_eos': False,
          'token_dtype': 'uint32', 'splits': splits}
  (folder / shards.METADATA_FILE).write_text(json.dumps(meta))
  return folder


def random_lengths(count, seed, low=2, high=60):
  return list(np.random.default_rng(seed).integers(low, high, count))


def documents_of(lengths, first_doc=0):
  return {(first_doc + i + 1) * 1000 + j for i, n in enumerate(lengths) for j in range(1, n)}


def follows(token, target):
  """Whether `target` is the token after `token` in a document of write_dataset."""
  return target == token + 1 if token != BOS else target % 1000 == 1


def check_rows(batch, seq_len):
  """Segment ids, positions, targets and loss mask agree with the tokens of each row."""
  inputs, seg, pos, targets, mask = (batch[k] for k in ('inputs', 'segment_ids', 'positions', 'targets', 'loss_mask'))
  assert inputs.shape[1] == seq_len
  for r in range(len(inputs)):
    for t in range(seq_len):
      if seg[r, t] == 0:  # padding, only at the end of a row
        assert inputs[r, t] == 0 and mask[r, t] == 0 and np.all(seg[r, t:] == 0)
        continue
      starts_segment = t == 0 or seg[r, t - 1] != seg[r, t]
      if starts_segment:
        assert t == 0 or seg[r, t] == seg[r, t - 1] + 1
        assert pos[r, t] == 0
      else:
        assert pos[r, t] == pos[r, t - 1] + 1
        # Within a segment the tokens are consecutive positions of one document.
        if inputs[r, t] != BOS:
          assert inputs[r, t] == inputs[r, t - 1] + 1 or inputs[r, t - 1] == BOS
      if t + 1 < seq_len:  # a segment that ends inside the row is a document's end: no target
        same_next = seg[r, t + 1] == seg[r, t]
        assert mask[r, t] == int(same_next)
        if same_next:
          assert targets[r, t] == inputs[r, t + 1]
      elif mask[r, t]:  # the row's last token, trained on the next row's first when its document runs on
        assert follows(inputs[r, t], targets[r, t]) or (inputs[r, t] == BOS and pos[r, t] == 0)


def real_tokens(batch):
  return batch['inputs'][batch['segment_ids'] > 0]


def packed_rows(folder, lengths, **settings):
  """One unshuffled epoch of `lengths` documents packed into rows of 32, each as a batch of one."""
  ds, _ = pipeline.open_datasets([(str(write_dataset(folder, lengths)), None)])
  settings = pipeline.LoaderSettings(seq_len=32, batch_size=4, shuffle=False, **settings)
  documents = pipeline.process_documents(ds[0], 0, settings).to_iter_dataset()
  packed = pipeline.pack_documents(documents, ds, settings)
  return [pipeline.model_batch({k: v[None] for k, v in row.items()}, 1) for row in packed]


@pytest.mark.parametrize('packing,bos_aligned', [('concat', False), ('concat', True), ('first_fit', False)])
def test_packing_trains_every_token_exactly_once(tmp_path, packing, bos_aligned):
  """What holds for one epoch of documents, whichever packing cuts them:

  - every token except the first of each document (BOS here) is a target
    exactly once, predicted from the token before it in its document; no
    other target is trained;
  - every token is an input exactly once, except that bos_aligned puts BOS in
    the input slot of each token at a cut (that token is still a target, of
    the previous row's last token).
  """
  lengths = random_lengths(80, seed=1, high=90)  # some longer than a row
  rows = packed_rows(tmp_path / 'd', lengths, packing=packing, bos_aligned=bos_aligned)
  for row in rows:
    check_rows(row, 32)
  trained = [(int(i), int(t)) for row in rows
             for i, t in zip(row['inputs'][row['loss_mask'] > 0], row['targets'][row['loss_mask'] > 0])]
  targets = collections.Counter(t for _, t in trained)
  assert set(targets) == documents_of(lengths) and max(targets.values()) == 1
  assert len(trained) == sum(lengths) - len(lengths)
  # A row whose last token is trained ends inside a document: its last target begins the next row.
  at_cuts = {int(row['targets'][0, -1]) for row in rows if row['loss_mask'][0, -1]}
  assert len(at_cuts) > 5
  cut = at_cuts if bos_aligned else set()  # tokens whose input slot holds BOS
  assert all(follows(i, t) or (i == BOS and t - 1 in cut) for i, t in trained)
  inputs = collections.Counter(int(t) for row in rows for t in real_tokens(row) if t != BOS)
  assert set(inputs) == documents_of(lengths) - cut and max(inputs.values()) == 1
  assert sum(int((row['inputs'] == BOS).sum()) for row in rows) == len(lengths) + len(cut)
  fill = sum(len(real_tokens(r)) for r in rows) / (32 * len(rows))
  if packing == 'concat':  # only the last row may be partly padding
    assert all(len(real_tokens(r)) == 32 for r in rows[:-1])
  else:
    assert fill > 0.8, fill


@pytest.mark.parametrize('packing', ['concat', 'first_fit'])
def test_a_row_cut_inside_a_document_trains_its_last_token_on_the_next_rows_first(tmp_path, packing):
  # Concat rows overlap by one token: where a document runs on into the next
  # row, the last target of a row is the first input of the next. First-fit
  # cuts only documents longer than a row, and each piece's last target is the
  # first input of the next piece, wherever in its row that piece lies.
  lengths = random_lengths(40, seed=11, high=120)
  rows = packed_rows(tmp_path / 'd', lengths, packing=packing)
  ends = [(i, int(row['targets'][0, -1])) for i, row in enumerate(rows) if row['loss_mask'][0, -1]]
  piece_starts = [(i, int(x)) for i, row in enumerate(rows)  # pieces that begin mid-document
                  for x in row['inputs'][(row['positions'] == 0) & (row['segment_ids'] > 0) & (row['inputs'] != BOS)]]
  assert len(ends) > 5 and sorted(t for _, t in ends) == sorted(x for _, x in piece_starts)
  if packing == 'concat':
    assert [(i + 1, target) for i, target in ends] == piece_starts


def test_bos_aligned_starts_every_piece_with_bos(tmp_path):
  lengths = random_lengths(40, seed=2, high=100)
  ds, _ = pipeline.open_datasets([(str(write_dataset(tmp_path / 'd', lengths)), None)])
  settings = pipeline.LoaderSettings(seq_len=32, batch_size=4, bos_aligned=True, shuffle=False)
  loader = iter(pipeline.train_loader(ds, settings))
  for _ in range(5):
    batch = next(loader)
    starts = (batch['positions'] == 0) & (batch['segment_ids'] > 0)
    assert np.all(batch['inputs'][starts] == BOS)
    check_rows(batch, 32)


def test_process_shards_are_disjoint_and_cover_the_epoch(tmp_path):
  lengths = random_lengths(53, seed=3)
  ds, _ = pipeline.open_datasets([(str(write_dataset(tmp_path / 'd', lengths)), None)])
  settings = pipeline.LoaderSettings(seq_len=32, batch_size=2, seed=5)
  parts = [[int(d['tokens'][1]) // 1000 - 1 for d in pipeline.process_documents(ds[0], 0, settings, p, 3)]
           for p in range(3)]
  everything = [doc for part in parts for doc in part]
  assert sorted(everything) == list(range(53)) and len(set(everything)) == 53
  assert everything != sorted(everything)  # shuffled
  # The next epoch is a new permutation, again split disjointly over the processes.
  epoch_2 = [[int(d['tokens'][1]) // 1000 - 1 for d in
              pipeline.process_documents(ds[0], 0, settings, p, 3).repeat()[len(parts[p]):2 * len(parts[p])]]
             for p in range(3)]
  assert sorted(doc for part in epoch_2 for doc in part) == list(range(53))
  assert epoch_2 != parts


def take(loader, count):
  iterator = iter(loader)
  return [next(iterator) for _ in range(count)]


def test_loader_is_deterministic_and_seeded(tmp_path):
  ds, _ = pipeline.open_datasets([(str(write_dataset(tmp_path / 'd', random_lengths(60, 4))), None)])
  settings = pipeline.LoaderSettings(seq_len=16, batch_size=4, seed=3, row_shuffle_window=8)
  a, b = take(pipeline.train_loader(ds, settings), 6), take(pipeline.train_loader(ds, settings), 6)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
  other = take(pipeline.train_loader(ds, pipeline.LoaderSettings(seq_len=16, batch_size=4, seed=4)), 6)
  assert not all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, other))


@pytest.mark.parametrize('packing,workers,stop', [
    ('concat', 0, 17), ('concat', 0, 0), ('concat', 0, 5), ('first_fit', 0, 17), ('concat', 1, 17)])
def test_resume_yields_exactly_the_same_batches(tmp_path, packing, workers, stop):
  paths = [write_dataset(tmp_path / 'a', random_lengths(70, 5, high=80)),
           write_dataset(tmp_path / 'b', random_lengths(40, 6, high=20), first_doc=500)]
  ds, _ = pipeline.open_datasets([(str(paths[0]), 0.6), (str(paths[1]), 0.4)])
  settings = pipeline.LoaderSettings(seq_len=24, batch_size=3, packing=packing, seed=2,
                                     row_shuffle_window=5, worker_count=workers)
  straight = take(pipeline.train_loader(ds, settings), 40)  # several epochs of source b
  interrupted = iter(pipeline.train_loader(ds, settings))
  for _ in range(stop):
    next(interrupted)
  saved = json.loads(json.dumps(interrupted.get_state()))  # as it goes through a checkpoint
  resumed = iter(pipeline.train_loader(ds, settings))
  resumed.set_state(pipeline.state_from_json(saved))
  for expected in straight[stop:]:
    got = next(resumed)
    for key in expected:
      assert np.asarray(got[key]).tobytes() == np.asarray(expected[key]).tobytes(), (key, saved)


def test_loader_shards_give_the_same_batches_and_state_on_any_split(tmp_path):
  # Four loader shards run by one process, or two by each of two processes:
  # the same global batches, and a state saved under one split resumes the other.
  ds, _ = pipeline.open_datasets([(str(write_dataset(tmp_path / 'd', random_lengths(90, 8))), None)])
  settings = pipeline.LoaderSettings(seq_len=16, batch_size=2, seed=4, row_shuffle_window=4)
  whole = pipeline.ShardedLoader(ds, settings, [0, 1, 2, 3], 4)
  halves = [pipeline.ShardedLoader(ds, settings, [0, 1], 4), pipeline.ShardedLoader(ds, settings, [2, 3], 4)]
  for _ in range(5):
    global_batch = next(whole)
    parts = [next(h) for h in halves]
    assert global_batch['inputs'].shape == (8, 16)
    for key in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'):
      assert np.array_equal(global_batch[key], np.concatenate([p[key] for p in parts])), key
    assert np.array_equal(global_batch['source_tokens'], parts[0]['source_tokens'] + parts[1]['source_tokens'])
  # Each shard reads its own documents: no document is split between two shards' rows.
  docs = [set(np.unique(global_batch['inputs'][2 * s:2 * s + 2] // 1000)) - {0} for s in range(4)]
  assert all(not a & b for i, a in enumerate(docs) for b in docs[i + 1:]), docs

  # The halves' states, merged as a checkpoint merges them, restore the whole loader and back.
  merged = {'num_shards': 4, 'shards': {}}
  for half in halves:
    merged['shards'].update(json.loads(json.dumps(half.get_state()))['shards'])
  expected = [next(whole) for _ in range(4)]
  resumed = pipeline.ShardedLoader(ds, settings, [0, 1, 2, 3], 4)
  assert pipeline.ShardedLoader.state_fits(merged, [0, 1, 2, 3], 4)
  resumed.set_state(merged)
  for batch in expected:
    assert np.array_equal(next(resumed)['inputs'], batch['inputs'])
  whole_state = json.loads(json.dumps(whole.get_state()))
  second_half = pipeline.ShardedLoader(ds, settings, [2, 3], 4)
  second_half.set_state(whole_state)
  assert np.array_equal(next(second_half)['inputs'], next(whole)['inputs'][4:])
  assert not pipeline.ShardedLoader.state_fits(merged, [0], 2)


@pytest.mark.parametrize('case,warns', [
    ('one_long_document', True), ('one_long_document_in_a_window_of_its_epoch', False),
    ('many_short_documents', False), ('one_long_document_unshuffled', False),
    ('a_mixture_with_long_documents', True), ('embedded_default', False)])
def test_row_shuffle_warning(tmp_path, case, warns):
  settings = pipeline.LoaderSettings(seq_len=32, batch_size=4, row_shuffle_window=16)  # 512 tokens
  if case == 'embedded_default':
    config = tiny.get_config()
    folder = embedded.prepare('', config.data.embedded_max_bytes, config.data.val_fraction)
    settings = pipeline.LoaderSettings(seq_len=config.data.seq_len, batch_size=config.train.micro_batch_size,
                                       row_shuffle_window=config.data.row_shuffle_window)
    entries = [(str(folder), None)]
  elif case == 'many_short_documents':
    entries = [(str(write_dataset(tmp_path / 'short', [100] * 50)), None)]
  else:
    entries = [(str(write_dataset(tmp_path / 'book', [5000])), None)]
    if case.endswith('epoch'):
      settings = dataclasses.replace(settings, row_shuffle_window=157)  # 157 rows of 32 >= 5000 tokens
    elif case.endswith('unshuffled'):
      settings = dataclasses.replace(settings, shuffle=False)
    elif case.startswith('a_mixture'):
      entries = [(entries[0][0], 0.1), (str(write_dataset(tmp_path / 'short', [100] * 50, first_doc=5)), 0.9)]
  datasets, _ = pipeline.open_datasets(entries)
  warning = pipeline.row_shuffle_warning(datasets, settings)
  assert (warning is not None) == warns, warning
  if warns:  # one line, naming the source and a window that mixes it
    assert warning.startswith('warning: data.row_shuffle_window=16 rows (512 tokens) holds fewer than 4 '
                              f'average documents of {tmp_path / "book"} (5,000 tokens)')
    assert '\n' not in warning
    wanted = int(warning.split('--config.data.row_shuffle_window=')[1].split()[0])
    assert pipeline.row_shuffle_warning(datasets, dataclasses.replace(settings, row_shuffle_window=wanted)) is None
    assert pipeline.row_shuffle_warning(datasets, dataclasses.replace(settings, row_shuffle_window=wanted - 1))


@pytest.mark.parametrize('mixing,weights,expected', [
    ('weighted', (0.75, 0.25), 0.75),
    ('proportional', (None, None), 3000 / (3000 + 2000)),
])
def test_mixture_shares_follow_the_weights(tmp_path, mixing, weights, expected):
  a = write_dataset(tmp_path / 'a', [60] * 50)  # 3000 tokens in long documents
  b = write_dataset(tmp_path / 'b', [10] * 200, first_doc=100)  # 2000 tokens in short ones
  ds, _ = pipeline.open_datasets([(str(a), weights[0]), (str(b), weights[1])])
  settings = pipeline.LoaderSettings(seq_len=64, batch_size=8, mixing=mixing, seed=1)
  counts = np.zeros(2)
  for batch in take(pipeline.train_loader(ds, settings), 40):
    counts += batch['source_tokens']
    assert batch['source_tokens'].sum() == (batch['segment_ids'] > 0).sum()
  assert counts[0] / counts.sum() == pytest.approx(expected, abs=0.03)


def test_validation_batches_are_fixed_and_in_order(tmp_path):
  ds, _ = pipeline.open_datasets([(str(write_dataset(tmp_path / 'd', [10] * 5, val_lengths=(30, 40, 50))), None)])
  settings = pipeline.LoaderSettings(seq_len=16, batch_size=2, seed=9)
  first = pipeline.validation_batches(ds, settings, 3)
  again = pipeline.validation_batches(ds, pipeline.LoaderSettings(seq_len=16, batch_size=2, seed=1), 3)
  assert len(first) == 3 and 'source_tokens' not in first[0]
  for x, y in zip(first, again):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  tokens = np.concatenate([real_tokens(b) for b in first])
  assert list(tokens[:31]) == [BOS] + [901_001 + i for i in range(29)] + [BOS]


def test_parse_sources():
  assert pipeline.parse_sources('/d/a') == [('/d/a', None)]
  assert pipeline.parse_sources('/d/a:0.7, /d/b:0.3') == [('/d/a', 0.7), ('/d/b', 0.3)]
  assert pipeline.parse_sources('c:/x') == [('c:/x', None)]


@pytest.mark.parametrize('spec,message', [
    ('/d/a:0.7,/d/b', 'give a weight to every source or to none'),
    ('/d/a:-1', 'weights must be positive'),
    ('/d/a,,/d/b', 'empty entry'),
])
def test_bad_source_specs(spec, message):
  with pytest.raises(pipeline.DataError, match=message):
    pipeline.parse_sources(spec)


def test_bad_datasets_name_the_file(tmp_path):
  with pytest.raises(pipeline.DataError, match=r'nothing/metadata\.json does not exist'):
    pipeline.open_datasets([(str(tmp_path / 'nothing'), None)])
  a = write_dataset(tmp_path / 'a', [5, 6])
  b = write_dataset(tmp_path / 'b', [5, 6], tokenizer_sha='t1')
  with pytest.raises(pipeline.DataError, match='tokenized differently'):
    pipeline.open_datasets([(str(a), 1.0), (str(b), 1.0)])
  empty = write_dataset(tmp_path / 'empty', [])
  with pytest.raises(pipeline.DataError, match='train split is empty'):
    pipeline.open_datasets([(str(empty), None)])
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'metadata.json').write_text('{not json')
  with pytest.raises(pipeline.DataError, match=r'bad/metadata\.json is not valid JSON'):
    pipeline.open_datasets([(str(tmp_path / 'bad'), None)])


def damage(folder, case):
  """Damages the prepared dataset `folder` as `case` says; returns the file to be named."""
  meta = json.loads((folder / 'metadata.json').read_text())
  first, second = (folder / name for name in meta['splits']['train']['shards'][:2])
  if case.endswith('without_recorded_sizes'):  # as data_prep wrote metadata.json before it recorded them
    for split in meta['splits'].values():
      del split['shard_documents'], split['shard_bytes']
    (folder / 'metadata.json').write_text(json.dumps(meta))
  if case == 'missing':
    first.unlink()
  elif case.startswith('truncated'):
    first.write_bytes(first.read_bytes()[:first.stat().st_size // 2])
  elif case.startswith('replaced'):  # another shard's complete file in its place
    second.write_bytes(first.read_bytes())
    return folder / 'metadata.json' if case.endswith('without_recorded_sizes') else second
  return first


@pytest.mark.parametrize('case,message', [
    ('missing', r'shard .*/train-00000\.array_record listed in .*metadata\.json is missing'),
    ('truncated', r'shard .*/train-00000\.array_record has [\d,]+ bytes, but .*metadata\.json records [\d,]+'),
    # ArrayRecord files grow in 64 KiB blocks: the same size, another record count.
    ('replaced', r'shard .*/train-00001\.array_record holds 7 documents, but .*metadata\.json records 5;'),
    ('truncated_without_recorded_sizes', r'shard .*/train-00000\.array_record is truncated or damaged'),
    ('replaced_without_recorded_sizes', r'the train shards of .*metadata\.json hold 14 documents, but it records 12'),
])
def test_damaged_shard_is_refused_when_the_dataset_opens(tmp_path, case, message):
  folder = write_dataset(tmp_path / 'd', [10] * 5 + [30] * 7)  # shards of 7 and 5 documents
  named = damage(folder, case)
  with pytest.raises(pipeline.DataError, match=message) as error:
    pipeline.open_datasets([(str(folder), None)])
  assert str(named) in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('case', ['no_dataset', 'missing', 'truncated', 'replaced', 'truncated_without_recorded_sizes'])
def test_bad_data_stops_the_train_command_in_one_line_before_the_run_dir(tmp_path, case):
  folder = write_dataset(tmp_path / 'd', [10] * 5 + [30] * 7)
  if case == 'no_dataset':
    folder, named = tmp_path / 'absent', tmp_path / 'absent' / 'metadata.json'
  else:
    named = damage(folder, case)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-m', 'maxlite.train', '--config=configs/tiny.py', f'--config.data.source={folder}',
       f'--config.train.run_dir={tmp_path / "run"}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.count('\n') == 1 and result.stderr.startswith('error: '), result.stderr
  assert str(named) in result.stderr
  assert not (tmp_path / 'run').exists()
