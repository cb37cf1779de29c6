"""Orbax checkpoints in <run_dir>/checkpoints: train state plus the resolved config.

Saves are asynchronous: the loop goes on while a background thread writes, and
Orbax only makes a step visible once it is complete, so a crash mid-save leaves
the previous checkpoint as the latest.
"""
import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, run_dir: pathlib.Path, interval: int, max_to_keep: int):
    self.interval = interval
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(run_dir.absolute() / 'checkpoints', options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.interval > 0 and step % self.interval == 0)

  def save(self, step: int, state, config_json: str):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json)), force=True)

  def restore(self, step: int, state, shardings):
    """Restores onto `shardings`, whatever mesh wrote the checkpoint."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored.state

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
