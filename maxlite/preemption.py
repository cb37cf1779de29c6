"""Graceful stops: SIGTERM or SIGINT asks the train loop to finish its step, save and exit 0.

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a
job; Ctrl-C sends SIGINT. Either only sets a flag. A second signal gets the
default behaviour back, so a stuck process can still be interrupted.

With several processes, each may see its signal at a different step, so they
agree on the stop with a small all-gather, and only at log steps, where the
loop syncs with the host anyway: a stop waits for at most train.log_interval
steps there.
"""
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """A context manager that turns SIGTERM and SIGINT into a flag the loop polls."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only; nothing to install
    for sig in _SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name
    for sig, handler in self._previous.items():  # a second signal acts at once
      signal.signal(sig, handler)

  def should_stop(self, at_sync_point: bool) -> bool:
    """True on every process at the same step once any process has a signal."""
    if jax.process_count() == 1:
      return self.received is not None
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))
