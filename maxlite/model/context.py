"""Context parallelism: every row split along its length over the `context` mesh axis.

Shape legend: B batch (this device's rows), T the row's length, t = T / CP
this device's tokens, C = T / (2 CP) a chunk, N query heads, K kv heads, H
head dim; CP is the size of `context`.

Each device holds t of a row's T tokens, so every activation is [B, t, ...]
and per-device activation memory falls as 1/CP. A block works token by token
except in attention, where a query needs the keys and values of the whole row
(up to itself).

Attention all-gathers K and V over `context`, in the compute dtype, and each
device attends its own queries to the whole row; the gradient of the gather
is a reduce-scatter of dK and dV. What moves per layer is the row's K and V,
2 K H numbers a token: with grouped-query attention G = N / K times less than
the queries would be. A device receives (CP - 1) / CP of it, in proportion
to T, while its attention work is T^2 / CP, so the gather's share of the
step shrinks as rows grow. Nothing of the row's length
is kept for the backward pass: the attention, gather included, is
rematerialised from this device's q, k, v (Megatron's selective recompute of
core attention), which gathers again, as maxlite.model.parallel.project does
fsdp-split weights. So per-device activations are O(T / CP) whatever
`model.remat` is, at the price of running the attention's forward twice. A ring
(K/V blocks passed from device to device, each step overlapped with one
block of attention) moves the same bytes but hides them behind compute; it
needs the attention split into CP partial softmaxes merged by their
log-sum-exp, forward and backward, and dK/dV travelling the ring back.
benchmarks/context.py measures the gather's bytes against that ideal, and
benchmarks/NOTES.md says when the difference would matter.

Load balancing. Under a causal mask the query at index i attends to i + 1
keys, so the device with the last T / CP tokens of a row would do 2 CP - 1
times the attention work of the first. Instead each row is cut into 2 CP
chunks of C tokens and device c holds chunks c and 2 CP - 1 - c, in that
order: chunk n's queries see about (n + 1/2) C^2 pairs, so every device sees
2 CP C^2 = T^2 / (2 CP), an equal share. `token_indices` gives each local
token's index in the row, which the causal masks compare (maxlite.model.
attention); the gathered K and V are put back in row order, so the kernel's
tile schedule sees keys that increase along the row, as without context
parallelism.

Where the reorder happens: on device, at the start of the per-device step
(`balance`). Callers hand the steps rows in their natural order, as the
loader writes them; the rule table splits a batch's 'length' over `context`
in contiguous slices, so device c receives chunks 2c and 2c + 1, and two
collective-permutes of the batch's int fields (inputs, targets, segment ids,
positions, loss mask: 20 bytes a token, once per step) move every chunk to
its place. So the train loop, evaluation, the tests and the benchmarks keep
handing natural rows, and nothing outside the step needs to know the layout;
the loss is a sum over tokens and does not depend on where they are.
Generation and HF export never see it.

Outside a shard_map, or with context = 1, every function here is the identity
(or plain attention).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from maxlite.model import attention as attention_lib, parallel

AXIS = 'context'


# -- the layout, on whole rows (host or device): for tests and benchmarks ----------------

def chunk_order(num_shards: int) -> np.ndarray:
  """The row's chunks in device order: 0, 2CP - 1, 1, 2CP - 2, ..., CP - 1, CP."""
  order = np.empty(2 * num_shards, np.int32)
  order[0::2] = np.arange(num_shards)
  order[1::2] = 2 * num_shards - 1 - np.arange(num_shards)
  return order


def balanced_indices(length: int, num_shards: int) -> np.ndarray:
  """[T] the row index of the token at each place of a balanced row: device c's
  contiguous slice of it holds chunks c and 2CP - 1 - c."""
  if length % (2 * num_shards):
    raise ValueError(f'a row of {length} tokens cannot be cut into 2 x {num_shards} chunks')
  chunk = length // (2 * num_shards)
  return (chunk_order(num_shards)[:, None] * chunk + np.arange(chunk)).reshape(-1)


def to_balanced(x, num_shards: int, axis: int = 1):
  """Natural rows -> balanced rows along `axis` (numpy or jax arrays)."""
  index = balanced_indices(x.shape[axis], num_shards)
  return x[(slice(None),) * axis + (index,)]


def from_balanced(x, num_shards: int, axis: int = 1):
  """The inverse of to_balanced."""
  index = np.argsort(balanced_indices(x.shape[axis], num_shards))
  return x[(slice(None),) * axis + (index,)]


# -- per device ----------------------------------------------------------------------------

def _destination(chunk: int, num_shards: int) -> int:
  return chunk if chunk < num_shards else 2 * num_shards - 1 - chunk


def balance(batch: dict) -> dict:
  """This device's contiguous slice [B, t] of each field -> its balanced chunks.

  Device e holds chunks 2e and 2e + 1. The even chunks go to distinct devices
  (the ones below CP to the even devices, the others to the odd ones), and so
  do the odd chunks, so two collective-permutes move them all; device d
  receives chunk d and chunk 2CP - 1 - d, one even and one odd.
  """
  size = parallel.axis_size(AXIS)
  if size == 1:
    return batch
  halves = [{name: half for name, half in zip(batch, parts)}
            for parts in zip(*(jnp.split(x, 2, axis=1) for x in batch.values()))]
  even, odd = (jax.lax.ppermute(halves[slot], AXIS,
                                [(e, _destination(2 * e + slot, size)) for e in range(size)])
               for slot in (0, 1))
  even_first = parallel.axis_index(AXIS) % 2 == 0
  return {name: jnp.concatenate([jnp.where(even_first, even[name], odd[name]),
                                 jnp.where(even_first, odd[name], even[name])], axis=1)
          for name in batch}


def token_indices(length: int):
  """[t] int32: the row index of each of this device's t tokens (0..t-1 without context
  parallelism)."""
  size = parallel.axis_size(AXIS)
  if size == 1:
    return jnp.arange(length, dtype=jnp.int32)
  chunk = length // 2
  shard = parallel.axis_index(AXIS)
  within = jnp.arange(chunk, dtype=jnp.int32)
  return jnp.concatenate([shard * chunk + within, (2 * size - 1 - shard) * chunk + within])


def gather_row(x_Bt):
  """[B, t, ...] on each device -> [B, T, ...], the whole row in row order.

  The all-gather lays the devices' slices side by side (chunks 0, 2CP-1, 1,
  2CP-2, ...); the even places hold chunks 0..CP-1 and the odd ones, read
  backwards, CP..2CP-1. Its gradient is a reduce-scatter over `context`.
  """
  size = parallel.axis_size(AXIS)
  if size == 1:
    return x_Bt
  whole = jax.lax.all_gather(x_Bt, AXIS, axis=1, tiled=True)
  batch, length = whole.shape[:2]
  chunks = whole.reshape(batch, size, 2, length // (2 * size), *whole.shape[2:])
  return jnp.concatenate([chunks[:, :, 0], chunks[:, ::-1, 1]], axis=1).reshape(whole.shape)


def attention(q_BtNH, k_BtKH, v_BtKH, segment_ids_Bt, positions_Bt, *, backend: str):
  """Causal self-attention of this device's queries to the whole row's keys.

  positions_Bt: position within the document; the masks compare it only
  without context parallelism (with it they compare row indices, the same
  mask on packed rows)."""
  if parallel.axis_size(AXIS) == 1:
    return attention_lib.attention(q_BtNH, k_BtKH, v_BtKH, segment_ids_Bt, positions_Bt,
                                   causal=True, backend=backend)
  return _attend_to_row(q_BtNH, k_BtKH, v_BtKH, segment_ids_Bt, backend)


# Saves only its inputs: anything the attention computed from the gathered row
# (the row's K and V themselves, or a cast or reshape of them; the xla
# backend's [B, N, t, T] probabilities) is computed again in the backward pass.
@functools.partial(jax.checkpoint, static_argnums=(4,),
                   policy=jax.checkpoint_policies.nothing_saveable)
def _attend_to_row(q_BtNH, k_BtKH, v_BtKH, segment_ids_Bt, backend):
  batch, length = segment_ids_Bt.shape
  k_BTKH, v_BTKH = gather_row(k_BtKH), gather_row(v_BtKH)
  kv_segment_ids_BT = gather_row(segment_ids_Bt)
  row_length = kv_segment_ids_BT.shape[1]
  indices_Bt = jnp.broadcast_to(token_indices(length), (batch, length))
  kv_indices_BT = jnp.broadcast_to(jnp.arange(row_length, dtype=jnp.int32), (batch, row_length))
  return attention_lib.attention(q_BtNH, k_BTKH, v_BTKH, segment_ids_Bt, None, causal=True,
                                 backend=backend, kv_segment_ids_BS=kv_segment_ids_BT,
                                 indices_BT=indices_Bt, kv_indices_BS=kv_indices_BT)
