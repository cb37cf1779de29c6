"""The device mesh and THE table of logical-axis rules.

Parameters and activations name their dimensions with logical axes ('embed',
'heads', ...). LOGICAL_AXIS_RULES maps each to mesh axes; nothing else in
maxlite decides a sharding. The steps run the model per device on the shards
these rules give (`per_device`); what then crosses devices is written out in
maxlite.model.parallel.
"""
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxlite.config import MESH_AXES

# fsdp shards parameters (ZeRO-3) and the batch; data shards only the batch;
# context splits every row along its length (maxlite.model.context);
# tensor is Megatron column/row parallelism on heads, mlp and vocab (between
# blocks it also splits the residual's length: maxlite.model.parallel);
# pipeline splits the stacked layers into contiguous blocks, one per stage
# (maxlite.model.pipeline); expert splits the experts of MoE layers and, like
# data, the batch (maxlite.model.moe).
LOGICAL_AXIS_RULES: Mapping[str, tuple[str, ...]] = {
    # parameter dimensions
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'mlp': ('tensor',),
    'norm': (),
    'layers': ('pipeline',),
    'experts': ('expert',),
    # activation dimensions
    'batch': ('data', 'fsdp', 'expert'),
    'length': ('context',),
}

# ZeRO-1: the optimizer state's 'embed' dimension is also split over the batch
# axes that replicate the weight (`expert` is already taken by expert weights).
ZERO1_RULES = {**LOGICAL_AXIS_RULES, 'embed': ('fsdp', 'data', 'expert')}


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over all devices, process by process; later axes vary fastest.

  Devices are ordered by process, then id, and the axes pipeline, data, fsdp,
  context, expert, tensor are laid out outermost first. So with several hosts
  the outer axes (pipeline, then data, then fsdp) are the ones that cross
  hosts, and a tensor group stays within a host as long as `tensor` divides
  the devices per host; an expert group (expert x tensor devices, which
  exchange tokens in every MoE layer) as long as expert x tensor does;
  `context`, which all-gathers keys and values every layer, is next.
  An axis missing from `sizes` has size 1.
  Pipeline stages exchange only one micro-batch's activations per iteration,
  point to point, which is why they are the first to cross hosts.
  """
  devices = jax.devices() if devices is None else devices
  devices = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)))
  layout = ('pipeline', *(axis for axis in MESH_AXES if axis != 'pipeline'))
  devices = devices.reshape(tuple(sizes.get(axis, 1) for axis in layout))
  devices = np.moveaxis(devices, 0, MESH_AXES.index('pipeline'))
  return Mesh(devices, MESH_AXES)


def tensor_crosses_processes(mesh: Mesh, axis: str = 'tensor') -> bool:
  """Whether some group along `axis` (tensor-parallel by default) has devices in more than one process."""
  groups = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
  return any(len({d.process_index for d in group}) > 1 for group in groups)


def batch_rows_by_process(sharding: NamedSharding, shape: tuple[int, ...]) -> dict[int, tuple[int, int]]:
  """{process index: (first, end)} rows of a batch that the process's devices hold.

  Processes whose devices differ only along replicated axes (tensor, say)
  hold the same rows; with the mesh laid out by make_mesh each process's rows
  are one contiguous block.
  """
  rows: dict[int, tuple[int, int]] = {}
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    start, stop, _ = index[0].indices(shape[0])
    first, end = rows.get(device.process_index, (start, stop))
    rows[device.process_index] = (min(first, start), max(end, stop))
  return rows


def logical_to_spec(logical: P, shape: tuple[int, ...], mesh_sizes: Mapping[str, int],
                    rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES) -> P:
  """Maps logical names to a PartitionSpec.

  A mesh axis is used at most once per array (the first dimension that asks
  gets it), and a dimension only takes mesh axes whose running product divides
  its size; the rest of that dimension stays replicated (e.g. vocab 50257).
  """
  assert len(logical) == len(shape), (logical, shape)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise KeyError(f'logical axis {name!r} has no rule in LOGICAL_AXIS_RULES')
    axes = []
    for axis in rules[name]:
      split = math.prod(mesh_sizes[a] for a in axes) * mesh_sizes[axis]
      if axis in used or mesh_sizes[axis] == 1 or size % split:
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def named_sharding(mesh: Mesh, logical: P, shape, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical, tuple(shape), dict(mesh.shape), rules))


def tree_shardings(mesh: Mesh, logical_tree, abstract_tree, rules=LOGICAL_AXIS_RULES):
  """Shardings for a pytree of arrays given a matching pytree of logical specs."""
  return jax.tree.map(lambda logical, x: named_sharding(mesh, logical, x.shape, rules),
                      logical_tree, abstract_tree)


def sharded_dim(logical: P, axis: str) -> int | None:
  """The dimension of an array named `logical` that the rules split over mesh `axis`, if any.

  For parameters every such split divides evenly (config.validate checks it),
  so inside the per-device step this is how a weight knows what to gather.
  """
  for dim, name in enumerate(logical):
    if name is not None and axis in LOGICAL_AXIS_RULES[name]:
      return dim
  return None


def per_device(fn, mesh: Mesh, in_specs, out_specs):
  """fn run on every device of `mesh` with its own shards (a shard_map over every axis).

  Inside, arrays are per-device blocks and mesh axes are addressed by name
  (psum, all_gather, ...); the varying-axis checks stay on, so a parameter
  that every device holds gets its gradient summed where JAX can prove it
  must be.
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)
