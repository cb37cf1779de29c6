"""µP and Muon on the embedded corpus: does the learning rate transfer across widths,
and does Muon reach a lower loss than AdamW in the same steps?

    python benchmarks/mup.py coord [--widths 64,128,256,512,1024] [--steps 10]
    python benchmarks/mup.py sweep [--widths 64,128,256] [--steps 300]
    python benchmarks/mup.py muon [--steps 200]
    python benchmarks/mup.py all            # the three, as recorded in NOTES.md

(a) `coord`, the coordinate check (Tensor Programs V, appendix D.1): models of
    each width (2 layers, 4 heads, MLP 3x) train `--steps` AdamW steps at one
    learning rate; the table gives the mean |x| of the embedding's output,
    each block's output and the logits, and the slope of log |x| against log
    width. Under µP (base width = the smallest) they stay flat; under the
    standard parametrisation they grow. 'mup+muon' is µP with Muon on the
    hidden matrices.
(b) `sweep`: the same models at 3 widths x 7 learning rates, `--steps` steps of
    AdamW (warmup, cosine to lr/10, clipping 1, weight decay 0.1) each, the
    validation loss at the end; the best learning rate per width for
    'standard' and 'mup' (whose base width is the smallest, so its first
    column is the standard one's: the same model bit for bit).
(c) `muon`: configs/tiny.py's model (4 layers, width 128), 200 steps of 8 x
    128 tokens, AdamW against Muon (update RMS matched to AdamW's, so one lr
    grid serves both), each at its best of 5 learning rates: validation loss.

Every learning rate of a sweep trains at once: the models are one vmapped
dimension of a single jitted step on the same batches. The optimizer is
maxlite.optim's (with the µP multipliers of maxlite.model.parametrization)
built at lr 1, so its schedule is the shape, and each model's update is
multiplied by its own lr: exactly AdamW (or Muon) at that lr, since optax's
decoupled weight decay is multiplied by the lr too.

`--out DIR` (default benchmarks/plots) receives each part's results as JSON
and, when matplotlib is installed (`pip install -e '.[plot]'`), the plots
mup_coord.png and mup_lr_sweep.png. `--replot` redraws them from the JSON.
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base, tiny  # noqa: E402
from maxlite import optim, state as state_lib, step as step_lib  # noqa: E402
from maxlite.data import embedded, pipeline  # noqa: E402
from maxlite.model import parametrization  # noqa: E402
from maxlite.model.llama import LlamaConfig  # noqa: E402

SWEEP_LRS = tuple(4e-4 * 2 ** k for k in range(7))  # 4e-4 ... 2.56e-2
MUON_LRS = tuple(1e-3 * 2 ** k for k in range(5))  # 1e-3 ... 1.6e-2
VARIANTS = {'standard': ('standard', 'adamw'), 'mup': ('mup', 'adamw'), 'mup+muon': ('mup', 'muon')}


def model_config(width: int, parametrization_name: str, base_width: int, seq_len: int,
                 num_layers: int = 2) -> LlamaConfig:
  """configs/base.py's model at another width: 4 heads (head dim width/4), MLP 3x."""
  model = base.get_config().model
  model.update(hidden_size=width, intermediate_size=3 * width, num_layers=num_layers, num_heads=4,
               num_kv_heads=4, max_seq_len=seq_len, parametrization=parametrization_name,
               mup_base_width=base_width)
  return LlamaConfig.from_config(model)


def optim_config(name: str, steps: int, warmup: int, decay: str = 'cosine'):
  """configs/base.py's optimizer at lr 1 (the schedule's shape; see the docstring)."""
  optim_cfg = base.get_config().optim
  optim_cfg.update(name=name, lr=1.0, min_lr=0.1 if decay == 'cosine' else 1.0, warmup_steps=warmup,
                   decay=decay)
  return optim_cfg


def corpus(seq_len: int, batch: int, steps: int, val_batches: int):
  """(train batches stacked [steps, B, T] per field, validation batches) of the embedded corpus."""
  data = base.get_config().data
  folder = embedded.prepare(data.cache_dir, data.embedded_max_bytes, data.val_fraction)
  datasets, _ = pipeline.open_datasets([(str(folder), None)])
  settings = pipeline.LoaderSettings(seq_len=seq_len, batch_size=batch, seed=0)
  loader = iter(pipeline.train_loader(datasets, settings))
  train = [next(loader) for _ in range(steps)]
  stacked = {k: np.stack([b[k] for b in train]) for k in step_lib.BATCH_FIELDS}
  return stacked, pipeline.validation_batches(datasets, settings, val_batches)


class Sweep:
  """len(lrs) models of one config, trained together (vmapped) from one init."""

  def __init__(self, cfg: LlamaConfig, optim_cfg, steps: int, lrs, seed: int = 0):
    self.graphdef, _, logical = state_lib.abstract_model(cfg)
    tx = optim.make_optimizer(optim_cfg, steps, logical,
                              lr_multipliers=parametrization.lr_multipliers(cfg, logical, optim_cfg))
    settings = step_lib.StepSettings()
    graphdef = self.graphdef

    def loss(params, batch):
      objective, (_, count) = step_lib.loss_sums(params, graphdef, batch, settings)
      return objective / count

    def train_step(params, opt_state, lr, batch):
      value, grads = jax.value_and_grad(loss)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return jax.tree.map(lambda p, u: p + lr * u, params, updates), opt_state, value

    def eval_step(params, batch):
      _, (ce, count) = step_lib.loss_sums(params, graphdef, batch, settings)
      return ce, count

    self._train = jax.jit(jax.vmap(train_step, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))
    self._eval = jax.jit(jax.vmap(eval_step, in_axes=(0, None)))
    self.lrs = jnp.asarray(lrs, jnp.float32)
    params = jax.jit(lambda: state_lib.init_params(cfg, seed))()
    self.params = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(lrs), *x.shape)), params)
    self.opt_state = jax.jit(jax.vmap(tx.init))(self.params)

  def step(self, batch) -> np.ndarray:
    self.params, self.opt_state, losses = self._train(self.params, self.opt_state, self.lrs, batch)
    return losses

  def val_loss(self, batches) -> np.ndarray:
    sums = [self._eval(self.params, b) for b in batches]
    ce = sum(np.asarray(s[0], np.float64) for s in sums)
    count = sum(np.asarray(s[1], np.float64) for s in sums)
    return ce / count

  def scales(self, batch, index: int = 0) -> dict[str, float]:
    params = jax.tree.map(lambda x: x[index], self.params)
    scales = jax.jit(lambda p, b: parametrization.activation_scales(
        nnx.merge(self.graphdef, p), b['inputs'], b['segment_ids'], b['positions']))(params, batch)
    return {k: float(v) for k, v in scales.items()}


def _slope(widths, values) -> float:
  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


# -- (a) coordinate check ------------------------------------------------------------


def coordinate_check(widths, steps: int, lr: float, seq_len: int = 64, batch: int = 8,
                     variants=tuple(VARIANTS)) -> dict:
  train, val = corpus(seq_len, batch, steps, 1)
  results = {}
  for variant in variants:
    param_name, optimizer = VARIANTS[variant]
    rows = {}
    for width in widths:
      cfg = model_config(width, param_name, widths[0], seq_len)
      sweep = Sweep(cfg, optim_config(optimizer, steps, warmup=0, decay='constant'), steps, [lr])
      for t in range(steps):
        sweep.step({k: v[t] for k, v in train.items()})
      rows[width] = sweep.scales(val[0])
      print(f'{variant:9s} width {width:5d}: ' +
            '  '.join(f'{k} {v:.4g}' for k, v in rows[width].items()), flush=True)
    results[variant] = rows
  return {'widths': list(widths), 'steps': steps, 'lr': lr, 'results': results}


def coordinate_table(report) -> str:
  widths = report['widths']
  names = list(next(iter(report['results'].values()))[widths[0]])
  lines = [f'mean |x| after {report["steps"]} steps at lr {report["lr"]:g}; slope of log |x| against '
           'log width', '',
           '| variant | width | ' + ' | '.join(names) + ' |',
           '|---|---|' + '---|' * len(names)]
  for variant, rows in report['results'].items():
    rows = {int(w): r for w, r in rows.items()}
    for width in widths:
      lines.append(f'| {variant} | {width} | ' + ' | '.join(f'{rows[width][n]:.4g}' for n in names) + ' |')
    slopes = [_slope(widths, [rows[w][n] for w in widths]) for n in names]
    lines.append(f'| {variant} | slope | ' + ' | '.join(f'{s:+.2f}' for s in slopes) + ' |')
  return '\n'.join(lines)


# -- (b) learning-rate sweep ------------------------------------------------------------


def lr_sweep(widths, steps: int, lrs=SWEEP_LRS, seq_len: int = 64, batch: int = 16,
             val_batches: int = 16, variants=('standard', 'mup')) -> dict:
  train, val = corpus(seq_len, batch, steps, val_batches)
  results = {}
  for variant in variants:
    results[variant] = {}
    for width in widths:
      if variant == 'mup' and width == widths[0] and 'standard' in results:
        # At its base width µP is the standard model bit for bit (tests/test_parametrization.py).
        results[variant][width] = results['standard'][width]
        continue
      cfg = model_config(width, variant, widths[0], seq_len)
      sweep = Sweep(cfg, optim_config('adamw', steps, warmup=steps // 10), steps, lrs)
      start = time.perf_counter()
      for t in range(steps):
        sweep.step({k: v[t] for k, v in train.items()})
      losses = [float(x) if np.isfinite(x) else float('inf') for x in sweep.val_loss(val)]
      results[variant][width] = losses
      print(f'{variant:8s} width {width:4d} ({time.perf_counter() - start:.0f}s): ' +
            '  '.join(f'{lr:.2e} {loss:.4f}' for lr, loss in zip(lrs, losses)), flush=True)
  return {'widths': list(widths), 'steps': steps, 'lrs': list(lrs), 'results': results}


def sweep_table(report) -> str:
  widths, lrs = report['widths'], report['lrs']
  header = [f'{v} {w}' for v in report['results'] for w in widths]
  lines = [f'validation loss after {report["steps"]} steps (* the best lr of the column)', '',
           '| lr | ' + ' | '.join(header) + ' |', '|---|' + '---|' * len(header)]
  best = {(v, w): int(np.argmin(rows[w] if w in rows else rows[str(w)]))
          for v, rows in report['results'].items() for w in widths}
  for i, lr in enumerate(lrs):
    cells = []
    for v, rows in report['results'].items():
      for w in widths:
        loss = (rows[w] if w in rows else rows[str(w)])[i]
        cells.append(f'{loss:.4f}' + ('*' if best[v, w] == i else ''))
    lines.append(f'| {lr:.2e} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  for v in report['results']:
    moves = [best[v, w] for w in widths]
    lines.append(f'{v}: best lr by width ' + ', '.join(f'{w}: {lrs[i]:.2e}' for w, i in zip(widths, moves))
                 + f'; the optimum moves {max(moves) - min(moves)} grid point(s)')
  return '\n'.join(lines)


# -- (c) Muon against AdamW ---------------------------------------------------------------


def muon_vs_adamw(steps: int, lrs=MUON_LRS, val_batches: int = 16, width: int = 0) -> dict:
  """width: instead of configs/tiny.py's model, the sweep's (2 layers) at this width, 8 x 64 tokens."""
  config = tiny.get_config()
  seq_len, batch = config.data.seq_len, config.train.micro_batch_size
  if width:
    seq_len = 64
  train, val = corpus(seq_len, batch, steps, val_batches)
  cfg = model_config(width, 'standard', width, seq_len) if width else LlamaConfig.from_config(config.model)
  results = {}
  for name in ('adamw', 'muon'):
    optim_cfg = config.optim.copy_and_resolve_references()
    optim_cfg.update(name=name, lr=1.0, min_lr=config.optim.min_lr / config.optim.lr)
    sweep = Sweep(cfg, optim_cfg, steps, lrs)
    sweep.step({k: v[0] for k, v in train.items()})  # compiles
    start = time.perf_counter()
    for t in range(1, steps):
      sweep.step({k: v[t] for k, v in train.items()})
    seconds = (time.perf_counter() - start) / (steps - 1)
    losses = [float(x) if np.isfinite(x) else float('inf') for x in sweep.val_loss(val)]
    results[name] = {'val_loss': losses, 'seconds_per_step': seconds}
    print(f'{name}: ' + '  '.join(f'{lr:.1e} {loss:.4f}' for lr, loss in zip(lrs, losses)) +
          f'  ({seconds:.2f} s per step of {len(lrs)} models)', flush=True)
  model = f'the width-{width} model, 8 x 64 tokens' if width else "configs/tiny.py's model"
  return {'steps': steps, 'lrs': list(lrs), 'results': results, 'model': model}


def muon_table(report) -> str:
  lrs = report['lrs']
  model = report.get('model', "configs/tiny.py's model")
  lines = [f'validation loss after {report["steps"]} steps of {model}', '',
           '| lr | ' + ' | '.join(report['results']) + ' |', '|---|' + '---|' * len(report['results'])]
  for i, lr in enumerate(lrs):
    lines.append(f'| {lr:.1e} | ' + ' | '.join(f'{r["val_loss"][i]:.4f}' for r in report['results'].values())
                 + ' |')
  for name, r in report['results'].items():
    best = int(np.argmin(r['val_loss']))
    lines.append(f'\n{name}: best {r["val_loss"][best]:.4f} at lr {lrs[best]:.1e}; '
                 f'{r["seconds_per_step"]:.2f} s per step of {len(lrs)} models')
  return '\n'.join(lines)


# -- plots ------------------------------------------------------------------------------------


def plot_coordinates(report, path: pathlib.Path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  variants = list(report['results'])
  fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.8), sharey=True, squeeze=False)
  axes = axes[0]
  widths = report['widths']
  for ax, variant in zip(axes, variants):
    rows = {int(w): r for w, r in report['results'][variant].items()}
    for name in rows[widths[0]]:
      ax.plot(widths, [rows[w][name] for w in widths], marker='o', label=name)
    ax.set(xscale='log', yscale='log', xlabel='width (hidden size)', title=variant)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'mean |x| after {report["steps"]} steps')
  axes[-1].legend(fontsize=8)
  fig.suptitle(f'coordinate check: AdamW lr {report["lr"]:g}, base width {widths[0]}')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sweep(report, path: pathlib.Path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  variants = list(report['results'])
  fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.8), sharey=True, squeeze=False)
  axes = axes[0]
  lrs = report['lrs']
  finite = [x for rows in report['results'].values() for r in rows.values() for x in r if math.isfinite(x)]
  for ax, variant in zip(axes, variants):
    for width, losses in report['results'][variant].items():
      line, = ax.plot(lrs, losses, marker='o', label=f'width {width}')
      best = int(np.argmin(losses))
      ax.plot([lrs[best]], [losses[best]], marker='*', markersize=16, color=line.get_color())
    ax.set(xscale='log', xlabel='peak learning rate', title=variant,
           ylim=(min(finite) - 0.05, min(max(finite), min(finite) + 1.5)))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'validation loss after {report["steps"]} steps')
  axes[-1].legend(fontsize=8)
  fig.suptitle(f'learning-rate sweep (AdamW; mup base width {report["widths"][0]}; * best)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


PLOTS = {'coord': ('mup_coord.png', plot_coordinates), 'sweep': ('mup_lr_sweep.png', plot_sweep)}
TABLES = {'coord': coordinate_table, 'sweep': sweep_table, 'muon': muon_table}


def finish(part: str, report: dict, out: pathlib.Path):
  out.mkdir(parents=True, exist_ok=True)
  (out / f'mup_{part}.json').write_text(json.dumps(report, indent=1) + '\n')
  print(f'\n{TABLES[part](report)}\n', flush=True)
  if part in PLOTS:
    name, plot = PLOTS[part]
    try:
      plot(report, out / name)
      print(f'wrote {out / name}')
    except ImportError:
      print(f'no {name}: matplotlib is not installed (pip install -e \'.[plot]\')')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('part', choices=('coord', 'sweep', 'muon', 'all'))
  parser.add_argument('--widths', default='', help='comma-separated hidden sizes')
  parser.add_argument('--steps', type=int, default=0, help='0: the part\'s default')
  parser.add_argument('--coord_lr', type=float, default=1e-2)
  parser.add_argument('--variants', default='', help='coord: which of ' + ', '.join(VARIANTS) +
                      ' (default all); sweep: standard, mup (default both)')
  parser.add_argument('--batch', type=int, default=16, help='sweep: sequences of 64 tokens per step')
  parser.add_argument('--muon_width', type=int, default=0,
                      help="muon: 0 for configs/tiny.py's model, else the sweep's model at this width")
  parser.add_argument('--lrs', default='', help='sweep / muon: comma-separated peak learning rates')
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'plots'))
  parser.add_argument('--replot', action='store_true', help='tables and plots from the saved JSON')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  widths = [int(w) for w in args.widths.split(',')] if args.widths else None
  lrs = tuple(float(x) for x in args.lrs.split(',')) if args.lrs else None
  for part in (('coord', 'sweep', 'muon') if args.part == 'all' else (args.part,)):
    if args.replot:
      report = json.loads((out / f'mup_{part}.json').read_text())
      if part != 'muon':  # JSON made the widths strings
        report['results'] = {v: {int(w): r for w, r in rows.items()} for v, rows in report['results'].items()}
    elif part == 'coord':
      report = coordinate_check(widths or [64, 128, 256, 512, 1024], args.steps or 10, args.coord_lr,
                                variants=args.variants.split(',') if args.variants else tuple(VARIANTS))
    elif part == 'sweep':
      report = lr_sweep(widths or [64, 128, 256], args.steps or 300, lrs or SWEEP_LRS, batch=args.batch,
                        variants=args.variants.split(',') if args.variants else ('standard', 'mup'))
    else:
      report = muon_vs_adamw(args.steps or 200, lrs or MUON_LRS, width=args.muon_width)
    print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}')
    finish(part, report, out)


if __name__ == '__main__':
  main()
