"""CPU runs keep freed host memory for the next step (glibc malloc settings).

XLA:CPU allocates each execution's temporaries anew and frees them when it
ends; configs/tiny.py's train step has 88 MiB of them. glibc serves a request
that large with an mmap of its own and unmaps it on free (its mmap threshold
grows to 32 MiB at most, and a thread's arena holds at most 64 MiB), so every
step page-faults the same memory in again: ~24,100 faults per step, 13-15% of
the step's CPU time spent in the kernel (benchmarks/NOTES.md). With one arena,
no mmap and no trimming, freed memory stays in the heap, where the next step
finds it.

The settings change only later allocations, so `keep_freed_memory` runs before
the backend starts (maxlite.xla_flags.apply calls it for CPU runs). A MALLOC_*
variable in the environment means the user chose glibc's settings: then
nothing changes. GPU runs are left alone: their big buffers live on the device.
"""
import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
USER_SETTINGS = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_',
                 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_')


def keep_freed_memory() -> str:
  """Sets glibc's malloc to keep freed memory; returns what was done, for the log."""
  if any(name in os.environ for name in USER_SETTINGS):
    return "glibc malloc: the environment's MALLOC_* settings"
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to set
    return 'malloc: as it is (no glibc mallopt)'
  # Arenas first: a thread that already has an arena of its own keeps it.
  done = [mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, -1)]
  if not all(done):
    return 'glibc malloc: as it is (mallopt refused the settings)'
  return 'glibc malloc: one arena, no mmap, no trim (freed memory is kept for the next step)'
