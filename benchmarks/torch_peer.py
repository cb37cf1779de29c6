"""A plain PyTorch Llama with maxlite's shapes, initialisation and optimizer: the peer
that benchmarks/train_step.py times maxlite against.

Shape legend: B batch, T length, D hidden, N query heads, K kv heads, H head
dim, F mlp width, V vocab.

The same model as maxlite.model.llama: pre-norm blocks (RMSNorm with float32
statistics), rotary embeddings in the half-split layout (pairs (i, i + H/2))
at each token's position within its document, grouped-query attention that
never crosses packed documents, a SwiGLU MLP, no biases, and the embedding
reused as the LM head when tied. The same initialisation: every matrix
normal(0, init_std), norm scales 1 (`load_maxlite_params` copies maxlite's
own values instead, to check the maths). The same optimizer: AdamW (b1, b2,
eps) with weight decay on matrices only, global-norm clipping, and the
learning rate of maxlite.optim.learning_rate_schedule, restated below in
plain Python so that a test can hold the two against each other.

The vocabulary is the true one: maxlite pads its table to a multiple of 128
rows (zeros whose logits are masked), which changes neither the loss nor the
gradients of the real rows, but does add ~0.1-2% to its LM-head FLOPs.

On GPUs the blocks run under torch.compile, attention through
scaled_dot_product_attention (flash attention for one document per row; a
boolean mask, and so the memory-efficient kernel, for packed rows), and
matmuls in bfloat16 under autocast when maxlite computes in bfloat16. On CPU
everything runs eagerly.
"""
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float
  norm_eps: float
  tie_embeddings: bool
  init_std: float

  @classmethod
  def from_model(cls, model) -> 'PeerConfig':
    """From maxlite's `model` sub-config (head_dim 0 means hidden // heads)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model.items() if k in fields}
    values['head_dim'] = model.head_dim or model.hidden_size // model.num_heads
    return cls(**values)


class RMSNorm(nn.Module):

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x32 = x.float()  # statistics in float32, as maxlite's
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (normed * self.weight.float()).to(x.dtype)


def rotary_tables(positions_BT, head_dim: int, theta: float):
  """(cos, sin), each [B, T, 1, H/2] float32, at each token's position in its document."""
  half = head_dim // 2
  inv_freq = theta ** (-torch.arange(half, dtype=torch.float32, device=positions_BT.device) / half)
  angle_BTH = positions_BT.float()[..., None] * inv_freq
  return torch.cos(angle_BTH)[:, :, None, :], torch.sin(angle_BTH)[:, :, None, :]


def rotate(x_BTNH, cos, sin):
  half = x_BTNH.shape[-1] // 2
  x = x_BTNH.float()
  first, second = x[..., :half], x[..., half:]
  return torch.cat([first * cos - second * sin, second * cos + first * sin], -1).to(x_BTNH.dtype)


class Attention(nn.Module):

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.n, self.k, self.h = n, k, h
    self.q = nn.Linear(d, n * h, bias=False)
    self.k_proj = nn.Linear(d, k * h, bias=False)
    self.v = nn.Linear(d, k * h, bias=False)
    self.o = nn.Linear(n * h, d, bias=False)

  def forward(self, x_BTD, cos, sin, mask_B1TT):
    batch, length, _ = x_BTD.shape
    q_BTNH = rotate(self.q(x_BTD).view(batch, length, self.n, self.h), cos, sin)
    k_BTKH = rotate(self.k_proj(x_BTD).view(batch, length, self.k, self.h), cos, sin)
    v_BTKH = self.v(x_BTD).view(batch, length, self.k, self.h)
    # One document per row: the causal flag, which the flash kernel takes; packed
    # rows: the document mask, which needs the memory-efficient kernel.
    out_BNTH = F.scaled_dot_product_attention(
        q_BTNH.transpose(1, 2), k_BTKH.transpose(1, 2), v_BTKH.transpose(1, 2),
        attn_mask=mask_B1TT, is_causal=mask_B1TT is None, enable_gqa=self.k != self.n)
    return self.o(out_BNTH.transpose(1, 2).reshape(batch, length, self.n * self.h))


class Block(nn.Module):

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
    self.attention = Attention(cfg)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
    self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

  def forward(self, x_BTD, cos, sin, mask_B1TT):
    x_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos, sin, mask_B1TT)
    h_BTD = self.mlp_norm(x_BTD)
    return x_BTD + self.down(F.silu(self.gate(h_BTD)) * self.up(h_BTD))


class Llama(nn.Module):

  def __init__(self, cfg: PeerConfig):
    super().__init__()
    self.cfg = cfg
    self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
    self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                             bias=False)

  def forward(self, tokens_BT, positions_BT, mask_B1TT=None):
    """Logits [B, T, V] in float32."""
    cos, sin = rotary_tables(positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
    x_BTD = self.embed(tokens_BT)
    for block in self.blocks:
      x_BTD = block(x_BTD, cos, sin, mask_B1TT)
    x_BTD = self.final_norm(x_BTD)
    head = self.embed.weight if self.lm_head is None else self.lm_head.weight
    return F.linear(x_BTD, head).float()


def init_weights(model: Llama, std: float, seed: int):
  """Every matrix normal(0, std), norm scales 1: maxlite's initialisation (other draws)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.fill_(1.0)
      else:
        p.copy_(torch.randn(p.shape, generator=generator) * std)


def load_maxlite_params(model: Llama, params):
  """Copies maxlite's parameters (a nested dict of host arrays, layers stacked) into the peer."""
  cfg = model.cfg
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def put(target, value):
    with torch.no_grad():
      target.copy_(torch.tensor(np.asarray(value), dtype=target.dtype))

  put(model.embed.weight, params['embed']['table'][:cfg.vocab_size])  # drop the padding rows
  if model.lm_head is not None:
    put(model.lm_head.weight, params['lm_head']['kernel'][:, :cfg.vocab_size].T)
  put(model.final_norm.weight, params['final_norm']['scale'])
  blocks = params['blocks']
  for i, block in enumerate(model.blocks):
    layer = lambda *path: _at(blocks, path)[i]
    put(block.attention_norm.weight, layer('attention_norm', 'scale'))
    put(block.mlp_norm.weight, layer('mlp_norm', 'scale'))
    # maxlite's kernels are [in..., out...]; torch's Linear weights are [out, in].
    put(block.attention.q.weight, layer('attention', 'q', 'kernel').reshape(d, n * h).T)
    put(block.attention.k_proj.weight, layer('attention', 'k', 'kernel').reshape(d, k * h).T)
    put(block.attention.v.weight, layer('attention', 'v', 'kernel').reshape(d, k * h).T)
    put(block.attention.o.weight, layer('attention', 'o', 'kernel').reshape(n * h, d).T)
    for name in ('gate', 'up', 'down'):
      put(getattr(block, name).weight, layer('mlp', name, 'kernel').T)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def learning_rate(step: int, optim, total_steps: int) -> float:
  """maxlite.optim.learning_rate_schedule at `step` (0-based): linear warmup to lr,
  then cosine, linear, constant or WSD decay to min_lr."""
  lr, min_lr, warmup = optim.lr, optim.min_lr, optim.warmup_steps
  if step < warmup:
    return lr * min(1.0, (step + 1) / max(warmup, 1))
  t, decay_steps = step - warmup, max(total_steps - warmup, 1)
  if optim.decay == 'cosine':
    fraction = 0.5 * (1 + math.cos(math.pi * min(t, decay_steps) / decay_steps))
    return lr * ((1 - min_lr / lr) * fraction + min_lr / lr)
  if optim.decay == 'linear':
    return lr + (min_lr - lr) * min(t, decay_steps) / decay_steps
  if optim.decay == 'constant':
    return lr
  anneal = optim.anneal_start_step - warmup  # wsd
  if t < anneal:
    return lr
  steps = max(total_steps - optim.anneal_start_step, 1)
  return lr + (min_lr - lr) * min(t - anneal, steps) / steps


class Peer:
  """The peer's model, optimizer and train step on one device."""

  def __init__(self, config, total_steps: int, device: str = 'cpu', seed: int = 0):
    self.cfg = PeerConfig.from_model(config.model)
    self.optim, self.total_steps, self.device = config.optim, total_steps, torch.device(device)
    self.model = Llama(self.cfg)
    init_weights(self.model, self.cfg.init_std, seed)
    self.model.to(self.device)
    self.autocast = config.model.compute_dtype == 'bfloat16'
    on_gpu = self.device.type == 'cuda'
    # Weight decay on matrices only; norm scales (the only vectors) are exempt.
    matrices = [p for p in self.model.parameters() if p.ndim > 1]
    vectors = [p for p in self.model.parameters() if p.ndim == 1]
    self.optimizer = torch.optim.AdamW(
        [{'params': matrices, 'weight_decay': self.optim.weight_decay},
         {'params': vectors, 'weight_decay': 0.0}],
        lr=learning_rate(0, self.optim, total_steps), betas=(self.optim.b1, self.optim.b2),
        eps=self.optim.eps, fused=on_gpu)
    self.forward = torch.compile(self.model) if on_gpu else self.model
    self.step_count = 0

  def load_maxlite_params(self, params):
    load_maxlite_params(self.model, params)

  def batch(self, numpy_batch: dict) -> dict:
    """maxlite's batch (numpy [B, T] arrays) as tensors on the device, with the
    document mask when some row holds more than one document."""
    tensors = {name: torch.as_tensor(x, device=self.device).long()
               for name, x in numpy_batch.items()}
    segment_ids_BT = tensors['segment_ids']
    mask_B1TT = None
    if bool((segment_ids_BT != segment_ids_BT[:, :1]).any()):
      length = segment_ids_BT.shape[1]
      causal_TT = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
      mask_B1TT = ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & causal_TT)[:, None]
    tensors['mask'] = mask_B1TT
    tensors['loss_mask'] = tensors['loss_mask'].float()
    return tensors

  def loss(self, batch: dict):
    """Mean cross-entropy over the tokens that loss_mask keeps (float32)."""
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      logits_BTV = self.forward(batch['inputs'], batch['positions'], batch['mask'])
    per_token = F.cross_entropy(logits_BTV.flatten(0, 1), batch['targets'].flatten(),
                                reduction='none')
    weights = batch['loss_mask'].flatten()
    return (per_token * weights).sum() / weights.sum().clamp(min=1)

  def train_step(self, batch: dict):
    """One update; returns (loss, gradient norm before clipping), as tensors on the device."""
    for group in self.optimizer.param_groups:
      group['lr'] = learning_rate(self.step_count, self.optim, self.total_steps)
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(batch)
    loss.backward()
    # clip_grad_norm_ scales by clip / (norm + 1e-6), optax by clip / norm:
    # a relative difference of 1e-6, and only on clipped steps.
    grad_norm = torch.nn.utils.clip_grad_norm_(
        self.model.parameters(), self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf)
    self.optimizer.step()
    self.step_count += 1
    return loss.detach(), grad_norm.detach()
