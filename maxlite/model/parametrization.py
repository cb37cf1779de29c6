"""How the model's scales follow its width: the standard parametrisation, or µP.

`model.parametrization='mup'` is µP in its Adam form: Tensor Programs V (Yang
et al. 2022, arXiv:2203.03466), table 3. With the width multiplier
m = hidden_size / mup_base_width, and every parameter told apart by its logical
axes (`role`):

  parameter                               init std          Adam lr   in the forward pass
  embedding   ('vocab', 'embed')          init_std          lr        -
  hidden      (embed <-> heads, mlp)      init_std/sqrt(m)  lr/m      -
  readout     ('embed', 'vocab'), or the  init_std          lr        logits x 1/m
              table when tied
  norm scales ('norm')                    1                 lr        -
  attention                                                           q.k x sqrt(H0)/H, not 1/sqrt(H)

H is the head dim and H0 the base model's (`model.mup_base_head_dim`, by
default H/m: widening with a fixed head count). Table 3 gives the readout an
init variance of 1/fan_in^2 and an Adam lr of 1/fan_in; a logit multiplier of
1/m with the base init and lr is the same function with the same training
(Adam's step ignores the scale of the gradient), and it also suits a table
tied to the embedding, which keeps its own init and lr. At m = 1 every
multiplier is exactly 1.0: 'mup' at its base width is the standard model, bit
for bit. MLP width and heads x head_dim are taken to scale with hidden_size, so
every hidden matrix's fan-in grows by m.

Why not Nanotron's rule: Nanotron's spectral µTransfer gives each hidden
matrix lr x fan_out/fan_in, the SGD learning rate of the spectral condition
(Yang, Simon & Bernstein 2023, arXiv:2310.17813, parametrisation 1), and uses it
with Adam. Adam's step has entries of about +-lr whatever the gradient's size,
and for a hidden matrix it is close to rank one, so its effect on the next
layer's input grows with fan_in: a square matrix keeps its lr at every width
and its update outgrows the activations as the model widens. The Adam form
divides by fan_in instead. Nanotron's mup README notes that its spectral runs
at 1B/8B blew up and recommends µTransfer over spectral µTransfer.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# Dims that stack independent copies of a weight (the scanned layers): neither fan-in nor fan-out.
STACK_AXES = ('layers',)
# Dims that grow with the model's width; any other dim (vocab) stays fixed.
WIDTH_AXES = ('embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm')
EMBEDDING, HIDDEN, READOUT, VECTOR = 'embedding', 'hidden', 'readout', 'vector'


@dataclasses.dataclass(frozen=True)
class Role:
  kind: str  # EMBEDDING, HIDDEN, READOUT or VECTOR
  fan_in_dims: tuple[int, ...]  # dims of the array; () for a vector
  fan_out_dims: tuple[int, ...]


def role(logical) -> Role:
  """What a parameter is, from its logical axes alone.

  Every matrix in maxlite maps the residual stream ('embed') to something or
  back: kernels are [*in_dims, *out_dims] with 'embed' on one side, and the
  embedding table [vocab, embed] is a lookup (one-hot input, fan-in vocab).
  """
  logical = tuple(logical)
  dims = [d for d, name in enumerate(logical) if name not in STACK_AXES]
  names = [logical[d] for d in dims]
  if len(dims) == 1:
    return Role(VECTOR, (), tuple(dims))
  if names[0] == 'embed':
    fan_in, fan_out = tuple(dims[:1]), tuple(dims[1:])
  elif names[-1] == 'embed':
    fan_in, fan_out = tuple(dims[:-1]), tuple(dims[-1:])
  else:
    raise ValueError(f'no µP / Muon rule for a parameter with logical axes {logical}: '
                     "neither its first nor its last dim is 'embed'")
  wide_in = any(logical[d] in WIDTH_AXES for d in fan_in)
  wide_out = any(logical[d] in WIDTH_AXES for d in fan_out)
  kind = {(True, True): HIDDEN, (False, True): EMBEDDING, (True, False): READOUT}.get((wide_in, wide_out))
  if kind is None:
    raise ValueError(f'a parameter with logical axes {logical} has no dim that grows with width')
  return Role(kind, fan_in, fan_out)


def width_multiplier(cfg) -> float:
  """m = hidden_size / mup_base_width; 1.0 under the standard parametrisation."""
  if cfg.parametrization == 'standard':
    return 1.0
  return cfg.hidden_size / cfg.mup_base_width


def logit_multiplier(cfg) -> float:
  return 1.0 / width_multiplier(cfg)


def query_multiplier(cfg) -> float:
  """Multiplies q so that attention's q.k/sqrt(H) becomes q.k x sqrt(H0)/H (µP's 1/H,
  equal to the standard scale at the base head dim H0)."""
  if cfg.parametrization == 'standard':
    return 1.0
  base_head_dim = cfg.mup_base_head_dim or cfg.head_dim / width_multiplier(cfg)
  return math.sqrt(base_head_dim / cfg.head_dim)


def init_std_multiplier(cfg, logical) -> float:
  return width_multiplier(cfg) ** -0.5 if role(logical).kind == HIDDEN else 1.0


def scale_init(model: nnx.Module, cfg):
  """Rescales the freshly drawn hidden matrices of `model` to their µP init."""
  if width_multiplier(cfg) == 1.0:
    return
  for _, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      scale = init_std_multiplier(cfg, variable.get_metadata()['logical_axes'])
      if scale != 1.0:
        variable[...] = variable[...] * jnp.asarray(scale, variable[...].dtype)


def lr_multipliers(cfg, logical_tree, optim):
  """Each parameter's learning-rate multiplier: a tree like `logical_tree` (of
  PartitionSpecs of logical names) of floats.

  Under µP only hidden matrices move: by m^-1 under AdamW (table 3). Muon's
  orthogonalised step has every singular value near lr x its shape scale, so
  the spectral condition (update spectral norm ~ sqrt(fan_out/fan_in)) asks
  for m^-1/2 when its RMS is matched to AdamW's (`optim.muon_rms_match`:
  scale ~ sqrt(max(fan_in, fan_out))) and for nothing with Keller Jordan's
  sqrt(max(1, fan_out/fan_in)).
  """
  m = width_multiplier(cfg)
  if m == 1.0:
    return jax.tree.map(lambda _: 1.0, logical_tree)
  exponent = 1.0 if optim.name == 'adamw' else (0.5 if optim.muon_rms_match else 0.0)
  return jax.tree.map(lambda logical: m ** -exponent if role(logical).kind == HIDDEN else 1.0,
                      logical_tree)


# The forward multipliers, each with the parameter it folds into for export:
# the query's into q's kernel (rotary is linear), the logits' into the final
# norm's scale, which only the readout reads (so a tied table stays tied).
def folded_multipliers(cfg) -> dict[tuple[str, ...], float]:
  return {('blocks', 'attention', 'q', 'kernel'): query_multiplier(cfg),
          ('final_norm', 'scale'): logit_multiplier(cfg)}


def fold(params: dict, cfg, *, inverse: bool = False) -> dict:
  """params with the forward multipliers multiplied into the weights (or, with
  inverse, divided out): a plain Llama (Hugging Face's) then computes what the
  µP model computes."""
  def scaled(tree, path, factor):
    head, *rest = path
    return {**tree, head: scaled(tree[head], rest, factor) if rest else tree[head] * factor}

  for path, multiplier in folded_multipliers(cfg).items():
    if multiplier != 1.0:
      params = scaled(params, path, 1.0 / multiplier if inverse else multiplier)
  return params


def activation_scales(model, tokens_BT, segment_ids_BT, positions_BT) -> dict[str, jax.Array]:
  """Mean |x| (float32 scalars) of the embedding's output, each block's output
  and the logits, on one device: the coordinate check of TP5 (appendix D.1).
  Jit it around nnx.merge."""
  cfg = model.cfg
  table_VD = model.embed.gather(jnp.float32) if cfg.tie_embeddings else None
  x_BTD = model.embed(tokens_BT, jnp.float32, table_VD)
  scales = {'embedding': jnp.mean(jnp.abs(x_BTD))}
  graphdef, stacked = nnx.split(model.blocks)
  for layer in range(cfg.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], stacked))
    x_BTD, _, _ = block(x_BTD, segment_ids_BT, positions_BT)
    scales[f'block {layer}'] = jnp.mean(jnp.abs(x_BTD))
  scales['logits'] = jnp.mean(jnp.abs(model(tokens_BT, segment_ids_BT, positions_BT)))
  return scales
