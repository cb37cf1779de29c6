"""A trained run's model from Python: the logits of token arrays.

    import maxlite
    model = maxlite.load_model('runs/tiny')         # newest checkpoint; step=N for another
    ids = model.tokenizer.encode('import os')
    logits = model(ids[None])                       # [1, T, model.vocab_size] float32

Shape legend: B batch, T length, V vocab (the true one, model.vocab_size).

The parameters are restored as generation restores them (maxlite.generate.load):
onto every device (or `devices`) on the `tensor` axis, as many as split the
heads and MLP evenly, cast once to the compute dtype. A call runs the model per
device, as the train and eval steps do, and returns the whole vocabulary's
logits, the same on every device. Tokens are not prefixed with anything: add
BOS yourself when `model.add_bos` says the training documents began with it.
"""
import pathlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxlite import generate, mesh as mesh_lib


class Model:
  """A run's checkpoint on a mesh, callable on [B, T] token ids.

  step, tokenizer, add_bos (whether its training documents began with BOS),
  vocab_size, max_seq_len, mesh; `sampler` generates with the same weights
  (maxlite.generate.complete).
  """

  def __init__(self, step: int, sampler: generate.Sampler, tokenizer, add_bos: bool):
    self.step, self.sampler, self.tokenizer, self.add_bos = step, sampler, tokenizer, add_bos
    self.vocab_size = sampler.cfg.vocab_size
    self.max_seq_len = sampler.max_seq_len
    self.mesh = sampler.mesh
    self._logits = jax.jit(self._logits_fn)

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None) -> jax.Array:
    """Logits [B, T, vocab_size], float32 (float64 when computing in float64).

    By default each row is one document from position 0. For packed rows give
    segment_ids_BT (documents numbered from 1; a token attends only within its
    own) and positions_BT (restarting at 0 with each document), as in training.
    """
    tokens_BT = np.asarray(tokens_BT)
    if tokens_BT.ndim != 2 or not np.issubdtype(tokens_BT.dtype, np.integer):
      raise ValueError(f'tokens must be a [batch, length] integer array, got {tokens_BT.dtype.name} '
                       f'of shape {tokens_BT.shape}')
    if tokens_BT.size and not 0 <= tokens_BT.min() <= tokens_BT.max() < self.vocab_size:
      raise ValueError(f'token ids must be in [0, {self.vocab_size}); got ids from '
                       f'{tokens_BT.min()} to {tokens_BT.max()}')
    if segment_ids_BT is None:
      segment_ids_BT = np.ones_like(tokens_BT)
    if positions_BT is None:
      positions_BT = np.broadcast_to(np.arange(tokens_BT.shape[1]), tokens_BT.shape)
    arrays = [np.asarray(x, np.int32) for x in (tokens_BT, segment_ids_BT, positions_BT)]
    if any(x.shape != tokens_BT.shape for x in arrays):
      raise ValueError(f'segment_ids and positions must have the shape of tokens {tokens_BT.shape}')
    with jax.set_mesh(self.mesh):
      return self._logits(self.sampler.params, *arrays)

  def _logits_fn(self, params, tokens_BT, segment_ids_BT, positions_BT):
    sampler = self.sampler

    def per_device(params, tokens_BT, segment_ids_BT, positions_BT):
      model = nnx.merge(sampler.graphdef, params)
      return model(tokens_BT, segment_ids_BT, positions_BT, compute_dtype=sampler.compute_dtype)

    # Every device holds the whole batch: the mesh splits only the weights.
    return mesh_lib.per_device(per_device, self.mesh, in_specs=(sampler.param_specs, P(), P(), P()),
                               out_specs=P())(params, tokens_BT, segment_ids_BT, positions_BT)


def load_model(run_dir, step: int | None = None, *, devices=None,
               compute_dtype: str | None = None) -> Model:
  """Checkpoint `step` of a run (None: its newest), parameters only, as a Model.

  devices: those to spread the model over (default: every one; a list of one
  runs it on one device). compute_dtype: default the run's model.compute_dtype.
  """
  step, sampler, tokenizer = generate.load(run_dir, step, compute_dtype=compute_dtype,
                                           devices=devices)
  return Model(step, sampler, tokenizer, generate.prompts_start_with_bos(pathlib.Path(run_dir)))
