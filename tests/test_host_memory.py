"""maxlite.host_memory: with its settings, a large buffer freed by a worker thread is kept,
so the next step's buffer of the same size costs no page faults."""
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# A worker thread allocates, touches and frees 96 MiB three times, as XLA:CPU
# does with a step's temporaries; prints the minor page faults of steps 2 and 3.
STEPS = '''
import ctypes, resource, sys, threading
from maxlite import host_memory
if sys.argv[1] == 'keep':
  print(host_memory.keep_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 96 << 20, []

def steps():
  for step in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(sum(faults[1:]))
'''


def faults(mode: str, **env) -> int:
  clean = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  result = subprocess.run([sys.executable, '-c', STEPS, mode], env={**clean, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
  return int(result.stdout.split()[-1])


def test_freed_memory_is_kept_for_the_next_step():
  pages = (96 << 20) // os.sysconf('SC_PAGE_SIZE')
  assert faults('as_is') > pages  # glibc as it is: each step faults the buffer in again
  assert faults('keep') < pages // 20
  # A MALLOC_* variable is the user's choice: then nothing changes.
  assert faults('keep', MALLOC_ARENA_MAX='8') > pages
