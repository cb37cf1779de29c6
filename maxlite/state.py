"""The train state, born sharded: shapes from eval_shape, values from a jit with out_shardings."""
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from maxlite import mesh as mesh_lib
from maxlite.model.llama import Llama, LlamaConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # nested dict of float arrays, the master weights
  opt_state: optax.OptState


def _nested(flat_items):
  tree = {}
  for path, value in flat_items:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


@functools.cache  # traced once per model config: train.py and create_train_state both ask
def abstract_model(cfg: LlamaConfig):
  """(graphdef, params as ShapeDtypeStructs, logical axis names), all nested dicts."""
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  flat = list(nnx.to_flat_state(state))
  shapes = _nested((path, jax.ShapeDtypeStruct(v.shape, v.dtype)) for path, v in flat)
  logical = _nested((path, v.get_metadata()['logical_axes']) for path, v in flat)
  return graphdef, shapes, logical


def init_params(cfg: LlamaConfig, seed: int):
  return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed))))


def state_shardings(mesh, abstract_state: TrainState, logical_params, tx, zero1: bool):
  """Params follow the rule table; optimizer moments mirror their params (plus
  `data` under ZeRO-1); everything else (step, counters) is replicated.

  A moment is found by its key path, which ends in its parameter's (e.g.
  `...mu['blocks']['mlp']['up']['kernel']`), and by its shape: unlike
  optax.tree_map_params this also sees through optax.partition's masked
  states (optim.name='muon').
  """
  del tx  # the state's own paths say which leaves are moments
  params = mesh_lib.tree_shardings(mesh, logical_params, abstract_state.params)
  opt_rules = mesh_lib.ZERO1_RULES if zero1 else mesh_lib.LOGICAL_AXIS_RULES
  replicated = NamedSharding(mesh, P())
  logical_by_path = {tuple(k.key for k in path): logical for path, logical in
                     jax.tree_util.tree_flatten_with_path(logical_params)[0]}
  shapes_by_path = {tuple(k.key for k in path): x.shape for path, x in
                    jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}

  def sharding(path, x):
    keys = []  # the trailing dict keys of the path: the parameter's own path, if any
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, entry.key)
    keys = tuple(keys)
    if keys in logical_by_path and shapes_by_path[keys] == x.shape:
      return mesh_lib.named_sharding(mesh, logical_by_path[keys], x.shape, opt_rules)
    return replicated

  opt_state = jax.tree_util.tree_map_with_path(sharding, abstract_state.opt_state)
  return TrainState(step=replicated, params=params, opt_state=opt_state)


def _initializer(cfg: LlamaConfig, tx, seed: int):
  def init():
    params = init_params(cfg, seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract_train_state(cfg: LlamaConfig, tx, mesh, zero1: bool):
  """(the train state as ShapeDtypeStructs carrying their shardings, the shardings):
  enough to compile a step ahead of time without allocating anything."""
  _, _, logical = abstract_model(cfg)
  abstract_state = jax.eval_shape(_initializer(cfg, tx, 0))
  shardings = state_shardings(mesh, abstract_state, logical, tx, zero1)
  with_shardings = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, shardings)
  return with_shardings, shardings


def create_train_state(cfg: LlamaConfig, tx, mesh, seed: int, zero1: bool):
  """Returns (graphdef, logical names, state, shardings); no array ever exists unsharded."""
  graphdef, _, logical = abstract_model(cfg)
  _, shardings = abstract_train_state(cfg, tx, mesh, zero1)
  state = jax.jit(_initializer(cfg, tx, seed), out_shardings=shardings)()
  return graphdef, logical, state, shardings


def state_from_params(params, tx, shardings: TrainState) -> TrainState:
  """A step-0 train state around given parameters (host arrays, e.g. imported)."""
  params = jax.device_put(params, shardings.params)

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)


def resize_vocab(params, logical_params, rows: int):
  """Pads with zeros, or cuts, every parameter's 'vocab' dimension to `rows`.

  The padding of the vocabulary depends on the mesh (maxlite.config.
  padded_vocab_size); its rows are zeros, so this moves parameters between
  paddings, and cuts them to the true vocabulary for export.
  """
  def resize(x, logical):
    if 'vocab' not in tuple(logical):
      return x
    dim = tuple(logical).index('vocab')
    if x.shape[dim] >= rows:
      return x[(slice(None),) * dim + (slice(0, rows),)]
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, rows - x.shape[dim])
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)
  return jax.tree.map(resize, params, logical_params)


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds for a sharded pytree (shards are equal-sized here)."""
  total = 0
  for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += np.prod(sharding.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize
  return int(total)
