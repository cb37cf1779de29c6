"""A jax.profiler trace over a range of training steps (train.profile_steps), into the run dir.

'START:STOP' traces steps START to STOP - 1. The trace opens once the steps
before START have finished on the devices and closes once step STOP - 1 has,
so it holds exactly those steps, with what the host did meanwhile (the
loader, dispatch, logging). It lands in <run_dir>/profile (one folder per
process when there are several); TensorBoard's profile plugin reads the
.xplane.pb, Perfetto (ui.perfetto.dev) the .trace.json.gz.
"""
import pathlib

import jax

from maxlite.config import profile_range


class StepTrace:

  def __init__(self, spec: str, run_dir: pathlib.Path):
    self.range = profile_range(spec)  # (start, stop) or None: off
    self.folder = run_dir / 'profile'
    if jax.process_count() > 1:  # the same host name in every process on one machine
      self.folder = self.folder / f'process_{jax.process_index()}'
    self.active = False

  def before(self, step: int, state):
    """Call before dispatching `step`; `state` is the previous step's output."""
    if self.range and step == self.range[0]:
      jax.block_until_ready(state)  # earlier steps stay out of the trace
      jax.profiler.start_trace(str(self.folder))
      self.active = True

  def after(self, step: int, outputs, is_last: bool):
    """Call after dispatching `step`; `outputs` are its results."""
    if self.active and (step == self.range[1] - 1 or is_last):
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
