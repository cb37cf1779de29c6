"""maxlite.plot on metrics.jsonl files written as training writes them (no training here)."""
import builtins
import json

import pytest

from maxlite import plot


def write_run(folder, steps, *, val_every=4, mfu=True, seq_len=64, batch=8):
  folder.mkdir(parents=True)
  (folder / 'config.json').write_text(json.dumps(
      {'train': {'micro_batch_size': batch, 'grad_accum_steps': 2}, 'data': {'seq_len': seq_len}}))
  with open(folder / 'metrics.jsonl', 'w') as f:
    for step in range(2, steps + 1, 2):
      record = {'step': step, 'loss': 5.0 / step, 'lr': 1e-3, 'tokens_per_second': 1000.0 + step,
                'grad_norm': 1.0}
      if mfu:
        record['mfu'] = 0.25
      f.write(json.dumps(record) + '\n')
      if step % val_every == 0:
        f.write(json.dumps({'step': step, 'val_loss': 6.0 / step}) + '\n')
  return folder


def test_reads_series_and_tokens_per_step(tmp_path):
  run = plot.read_run(write_run(tmp_path / 'a', 8))
  assert run['tokens_per_step'] == 8 * 2 * 64
  assert run['loss'] == [(s, 5.0 / s) for s in (2, 4, 6, 8)]
  assert run['val_loss'] == [(4, 1.5), (8, 0.75)]
  assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_cli_draws_a_png_with_one_line_per_run(tmp_path, capsys):
  pytest.importorskip('matplotlib')
  a, b = write_run(tmp_path / 'a', 8), write_run(tmp_path / 'b', 12, mfu=False)
  out = tmp_path / 'curves.png'
  plot.main([str(a), str(b), '-o', str(out), '--x', 'tokens', '--smooth', '2'])
  printed = capsys.readouterr().out
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000
  lines = printed.splitlines()
  assert lines[2].split()[:5] == ['a', '8', '0.6250', '0.7500', '0.7500'] and '25.0%' in lines[2]
  assert lines[3].split()[:2] == ['b', '12'] and lines[3].endswith('-')


def test_without_matplotlib_it_prints_the_summary(tmp_path, capsys, monkeypatch):
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name.startswith('matplotlib'):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_matplotlib)
  run = write_run(tmp_path / 'a', 4)
  plot.main([str(run), '-o', str(tmp_path / 'x.png')])
  captured = capsys.readouterr()
  assert 'best_val' in captured.out and 'matplotlib is not installed' in captured.err
  assert not (tmp_path / 'x.png').exists()


def test_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / 'missing')])
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'metrics.jsonl does not exist' in err and err.count('\n') == 1
