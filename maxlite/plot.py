"""Loss curves of runs from their metrics.jsonl, one line per run.

    python -m maxlite.plot runs/a runs/b -o curves.png [--x=tokens] [--smooth=10]

Panels: train loss, val loss, learning rate, tokens/s and MFU (the panels a
run has data for), against step or tokens seen (step x tokens per step, from
the run's config.json). Needs matplotlib (pip install 'maxlite[plot]'); without
it, or with --text, it prints a summary table instead.
"""
import argparse
import json
import pathlib
import sys

PANELS = (('loss', 'train loss'), ('val_loss', 'val loss'), ('lr', 'learning rate'),
          ('tokens_per_second', 'tokens/s'), ('mfu', 'MFU'))


def read_run(run_dir) -> dict:
  """{'name', 'tokens_per_step', metric: [(step, value), ...]} of a run directory."""
  run_dir = pathlib.Path(run_dir)
  path = run_dir / 'metrics.jsonl'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: is {run_dir} a run directory?')
  series = {name: {} for name, _ in PANELS}
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      raise ValueError(f'{path}:{number} is not a JSON line') from None
    for name in series:
      if record.get(name) is not None:
        series[name][int(record['step'])] = float(record[name])  # a resumed step: the later value
  tokens_per_step = None
  config_path = run_dir / 'config.json'
  if config_path.is_file():
    config = json.loads(config_path.read_text())
    train = config.get('train', {})
    tokens_per_step = (train.get('micro_batch_size', 0) * train.get('grad_accum_steps', 1)
                       * config.get('data', {}).get('seq_len', 0)) or None
  return {'name': run_dir.name or str(run_dir), 'tokens_per_step': tokens_per_step,
          **{name: sorted(points.items()) for name, points in series.items()}}


def smooth(values: list[float], window: int) -> list[float]:
  """Trailing mean over `window` points (1: unchanged)."""
  out, total = [], 0.0
  for i, value in enumerate(values):
    total += value
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def summary(runs: list[dict]) -> str:
  """A table: each run's last step, last and best train/val loss, mean tokens/s and MFU."""
  header = f'{"run":<24} {"step":>7} {"loss":>8} {"val_loss":>9} {"best_val":>9} {"tok/s":>10} {"MFU":>6}'
  lines = [header, '-' * len(header)]
  for run in runs:
    last = lambda name: run[name][-1][1] if run[name] else float('nan')
    steps = [s for name, _ in PANELS for s, _ in run[name]]
    best = min((v for _, v in run['val_loss']), default=float('nan'))
    speed = [v for _, v in run['tokens_per_second']]
    mfu = [v for _, v in run['mfu']]
    lines.append(f'{run["name"][:24]:<24} {max(steps, default=0):>7} {last("loss"):>8.4f} '
                 f'{last("val_loss"):>9.4f} {best:>9.4f} '
                 f'{(sum(speed) / len(speed) if speed else float("nan")):>10,.0f} '
                 + (f'{100 * sum(mfu) / len(mfu):>5.1f}%' if mfu else f'{"-":>6}'))
  return '\n'.join(lines)


def plot(runs: list[dict], output, x: str = 'step', window: int = 1):
  """Writes the figure to `output` (any format matplotlib knows by its extension)."""
  import matplotlib
  matplotlib.use('Agg')  # files only: no display needed
  import matplotlib.pyplot as plt
  panels = [(name, title) for name, title in PANELS if any(run[name] for run in runs)]
  if not panels:
    raise ValueError('the runs have no metrics to plot yet')
  if x == 'tokens' and any(run['tokens_per_step'] is None for run in runs):
    missing = next(run['name'] for run in runs if run['tokens_per_step'] is None)
    raise ValueError(f'--x=tokens needs each run\'s config.json; {missing} has none')
  figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (name, title) in zip(axes[0], panels):
    for run in runs:
      if not run[name]:
        continue
      steps, values = zip(*run[name])
      xs = [s * run['tokens_per_step'] for s in steps] if x == 'tokens' else steps
      ys = smooth(list(values), window) if name in ('loss', 'tokens_per_second', 'mfu') else values
      ax.plot(xs, ys, label=run['name'], marker='o' if name == 'val_loss' else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel('tokens' if x == 'tokens' else 'step')
    if name == 'lr':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(output, dpi=120)
  plt.close(figure)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m maxlite.plot',
                                   description='Loss curves of runs from their metrics.jsonl.')
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
  parser.add_argument('-o', '--output', default='curves.png', help='image file (default curves.png)')
  parser.add_argument('--x', default='step', choices=('step', 'tokens'))
  parser.add_argument('--smooth', type=int, default=1, help='trailing mean over N log points')
  parser.add_argument('--text', action='store_true', help='print the summary only, draw nothing')
  args = parser.parse_args(argv)
  try:
    if args.smooth < 1:
      raise ValueError(f'--smooth={args.smooth} must be >= 1')
    runs = [read_run(d) for d in args.run_dirs]
    print(summary(runs))
    if args.text:
      return
    try:
      import matplotlib  # noqa: F401
    except ImportError:
      print("matplotlib is not installed (pip install 'maxlite[plot]'): printed the summary only",
            file=sys.stderr)
      return
    plot(runs, args.output, args.x, args.smooth)
    print(f'wrote {args.output}')
  except (ValueError, OSError) as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
