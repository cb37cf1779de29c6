"""FLOPs per token, MFU, and the writers that put metrics on stdout, JSONL and TensorBoard.

MFU (model FLOPs utilisation) follows the PaLM convention (Chowdhery et al.
2022, appendix B): a token costs 6 FLOPs per matmul weight (2 forward, 4
backward) plus 12 x layers x seq x heads x head_dim for attention's two T x T
products (scores and the weighted sum of values: 2 x 2 x seq x heads x head_dim
per layer forward, times 3 with the backward). The causal half is NOT
subtracted: that is the number papers quote, and what dense XLA attention
computes. A causal mask makes half of those products unnecessary, and the
flash-attention kernel skips the tiles above the diagonal, so `mfu_causal`
halves the attention term: the utilisation of the work that kernel does. Both
are logged when the peak is known; they differ by the attention term's share
of the FLOPs, which grows with seq / hidden_size.
"""
import json
import logging
import pathlib
import sys

import jax

from maxlite.config import head_dim
from maxlite.model import moe

# Dense bf16 peak FLOP/s per device (no sparsity), matched on jax's device_kind.
# Longest key first, so 'H100 PCIe' wins over 'H100'.
PEAK_BF16_FLOPS = {
    'H100 PCIe': 756e12,
    'H100': 989e12,
    'H200': 989e12,
    'GH200': 989e12,
    'B200': 2250e12,
    'A100': 312e12,
    'L40S': 362e12,
    'A10G': 125e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """The override if set, else the table's entry; None where unknown (CPU)."""
  if override:
    return override
  for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return PEAK_BF16_FLOPS[key]
  return None


def matmul_params(model) -> int:
  """Weights that take part in a matmul per token: all but the embedding lookup;
  of a Mixture of Experts only the active ones (router, k experts, shared expert)."""
  hd, d = head_dim(model), model.hidden_size
  attention = d * (model.num_heads + 2 * model.num_kv_heads) * hd + model.num_heads * hd * d
  mlp = 3 * d * model.intermediate_size
  dense_layers, moe_layers = moe.layer_counts(model)
  experts = moe_layers * moe.active_params(model) if moe_layers else 0
  return model.num_layers * attention + dense_layers * mlp + experts + model.vocab_size * d  # + LM head


def flops_per_token(model, seq_len: int, causal: bool = False) -> float:
  """Training FLOPs per token of the `model` sub-config, forward + backward (3x forward).

  The PaLM convention (see the module docstring); causal=True halves the
  attention term, counting only the products a causal mask leaves.
  """
  attention = 12 * model.num_layers * seq_len * model.num_heads * head_dim(model)
  return 6 * matmul_params(model) + (attention / 2 if causal else attention)


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, peak: float | None):
  """The share of the devices' peak that the model FLOPs use; None where the peak is unknown."""
  if not peak:
    return None
  return flops_per_token * tokens_per_second / (num_devices * peak)


def _tensorboard_writer(log_dir: pathlib.Path):
  """A SummaryWriter from tensorboardX or PyTorch when either is installed."""
  for module in ('tensorboardX', 'torch.utils.tensorboard'):
    try:
      return __import__(module, fromlist=['SummaryWriter']).SummaryWriter(str(log_dir))
    except ImportError:
      continue
  return None


class MetricWriter:
  """Writes scalars from process 0 only: a line on stdout, a JSONL record, TensorBoard.

  While it is open, the libraries' own logging (Orbax's warnings and
  tracebacks about a damaged or failed checkpoint, say) goes to
  <run_dir>/maxlite.log (maxlite.<process>.log on other processes) instead of
  the console, where maxlite prints one line per event.
  """

  def __init__(self, run_dir: pathlib.Path, tensorboard: bool, wandb=None):
    self.active = jax.process_index() == 0
    self.wandb = wandb  # a wandb_log.WandbLogger, or None
    self.jsonl = None
    self.tensorboard = None
    name = 'maxlite.log' if self.active else f'maxlite.{jax.process_index()}.log'
    self.library_log = logging.FileHandler(run_dir / name)
    self.library_log.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    logging.getLogger().addHandler(self.library_log)
    self.quieted = _quiet_console()
    if self.active:
      self.jsonl = open(run_dir / 'metrics.jsonl', 'a')
      if tensorboard:
        self.tensorboard = _tensorboard_writer(run_dir / 'tensorboard')

  def write(self, step: int, scalars: dict, line: str):
    if not self.active:
      return
    print(line, flush=True)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()
    if self.tensorboard is not None:
      for name, value in scalars.items():
        self.tensorboard.add_scalar(name, value, step)
    if self.wandb is not None:
      self.wandb.log(step, scalars)

  def info(self, message: str):
    if self.active:
      print(message, file=sys.stdout, flush=True)

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tensorboard is not None:
      self.tensorboard.close()
    if self.wandb is not None:
      self.wandb.close()
    logging.getLogger().removeHandler(self.library_log)
    self.library_log.close()
    for handler, level in self.quieted:
      handler.setLevel(level)


def _quiet_console() -> list:
  """Raises absl's console handler (installed by app.run) above ERROR; returns how to undo it."""
  quieted = []
  for handler in logging.getLogger().handlers:
    if type(handler).__name__ == 'ABSLHandler':
      quieted.append((handler, handler.level))
      handler.setLevel(logging.CRITICAL)
  return quieted
