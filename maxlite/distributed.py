"""jax.distributed start-up: one controller process per host (or per GPU), the same program everywhere.

Where the process layout comes from (config.distributed.mode):
  slurm  srun's variables: process = SLURM_PROCID of SLURM_NTASKS, coordinator =
         the first host of SLURM_STEP_NODELIST on a port derived from the job id.
  env    explicit variables, for Kubernetes or any other cluster:
         MAXLITE_COORDINATOR_ADDRESS=host:port  MAXLITE_NUM_PROCESSES=N
         MAXLITE_PROCESS_ID=i  [MAXLITE_LOCAL_DEVICE_IDS=0,1,...]
  none   a single process.
  auto   env if MAXLITE_COORDINATOR_ADDRESS is set, else slurm under an srun
         step of more than one task, else none.

This must run before anything touches a JAX device.
"""
import dataclasses
import glob
import os
import socket
import time

import jax
from jax.experimental import multihost_utils

from maxlite.config import DISTRIBUTED_MODES as MODES

ENV_COORDINATOR = 'MAXLITE_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'MAXLITE_NUM_PROCESSES'
ENV_PROCESS_ID = 'MAXLITE_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'MAXLITE_LOCAL_DEVICE_IDS'
ENV_COORDINATOR_PORT = 'MAXLITE_COORDINATOR_PORT'

_SLURM_REQUIRED = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')


class DistributedError(RuntimeError):
  """A process layout that cannot be used or a coordinator that cannot be reached; one line."""


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None  # None: every device this process sees
  source: str  # 'slurm' or 'env', for the log


def _int_var(name: str, environ) -> int:
  value = environ.get(name, '')
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f'{name}={value!r} must be an integer') from None


def first_host(node_list: str) -> str:
  """The first host of a SLURM node list: 'nid[001-004,009],gpu7' -> 'nid001'."""
  head = node_list.split(',')[0]
  if '[' not in head:
    return head
  prefix, _, ranges = node_list.partition('[')
  return prefix + ranges.split(',')[0].split('-')[0].rstrip(']')


def visible_gpu_count(environ) -> int | None:
  """GPUs this process can see, without starting a GPU runtime; None where unknown."""
  listed = environ.get('CUDA_VISIBLE_DEVICES')
  if listed is not None:
    return len([d for d in listed.split(',') if d.strip()])
  if environ.get('SLURM_GPUS_ON_NODE', '').isdigit():
    return int(environ['SLURM_GPUS_ON_NODE'])
  return len(glob.glob('/dev/nvidia[0-9]*')) or None


def _explicit_device_ids(environ) -> tuple[int, ...] | None:
  value = environ.get(ENV_LOCAL_DEVICE_IDS, '').strip()
  if not value:
    return None
  try:
    return tuple(int(d) for d in value.split(','))
  except ValueError:
    raise DistributedError(f'{ENV_LOCAL_DEVICE_IDS}={value!r} must be comma-separated integers') from None


def slurm_layout(environ) -> ProcessLayout:
  missing = [name for name in _SLURM_REQUIRED if name not in environ]
  if missing:
    raise DistributedError(f"distributed.mode='slurm' but {', '.join(missing)} are not set; "
                           'start the processes with srun')
  num_processes = _int_var('SLURM_NTASKS', environ)
  port = environ.get(ENV_COORDINATOR_PORT) or str(20000 + _int_var('SLURM_JOB_ID', environ) % 20000)
  nodes = int(environ.get('SLURM_STEP_NUM_NODES') or environ.get('SLURM_NNODES') or 1)
  device_ids = _explicit_device_ids(environ)
  if device_ids is None:
    gpus = visible_gpu_count(environ)
    if environ.get('SLURM_GPUS_PER_TASK', '').isdigit():
      # srun --gpus-per-task=n: bound to the task, its GPUs are its devices
      # 0..n-1; where the site does not bind, the task sees the whole node and
      # takes its own n by local rank.
      per_task = int(environ['SLURM_GPUS_PER_TASK'])
      first = 0 if gpus == per_task else _int_var('SLURM_LOCALID', environ) * per_task
      device_ids = tuple(range(first, first + per_task))
    elif num_processes // max(nodes, 1) > 1:
      # One task per GPU: SLURM either bound one GPU to each task (it is then
      # device 0 of the task) or lets every task see all of the node's GPUs.
      device_ids = (0,) if gpus == 1 else (_int_var('SLURM_LOCALID', environ),)
    elif gpus:
      # One task per node takes all the node's GPUs. Naming them keeps
      # jax.distributed from restricting the task to GPU SLURM_LOCALID.
      device_ids = tuple(range(gpus))
  return ProcessLayout(f'{first_host(environ["SLURM_STEP_NODELIST"])}:{port}', num_processes,
                       _int_var('SLURM_PROCID', environ), device_ids, 'slurm')


def env_layout(environ) -> ProcessLayout:
  missing = [name for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not environ.get(name)]
  if missing:
    raise DistributedError(f"distributed.mode='env' but {', '.join(missing)} are not set")
  address = environ[ENV_COORDINATOR]
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise DistributedError(f'{ENV_COORDINATOR}={address!r} must be host:port')
  device_ids = _explicit_device_ids(environ)
  if device_ids is None:
    # Naming every visible GPU keeps jax.distributed from guessing a device
    # subset from whatever cluster variables it finds (SLURM's, say).
    gpus = visible_gpu_count(environ)
    device_ids = tuple(range(gpus)) if gpus else None
  return ProcessLayout(address, _int_var(ENV_NUM_PROCESSES, environ), _int_var(ENV_PROCESS_ID, environ),
                       device_ids, 'env')


def resolve_layout(mode: str, environ=None) -> ProcessLayout | None:
  """The process layout the mode asks for; None for a single process."""
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise DistributedError(f'distributed.mode={mode!r} is not one of {MODES}')
  if mode == 'auto':
    if environ.get(ENV_COORDINATOR):
      mode = 'env'
    elif all(name in environ for name in _SLURM_REQUIRED) and environ['SLURM_NTASKS'] != '1':
      mode = 'slurm'
    else:
      mode = 'none'
  if mode == 'none':
    return None
  layout = slurm_layout(environ) if mode == 'slurm' else env_layout(environ)
  if layout.num_processes < 1 or not 0 <= layout.process_id < layout.num_processes:
    raise DistributedError(f'process id {layout.process_id} is not in [0, {layout.num_processes}) '
                           f'({layout.source} variables)')
  return layout


def wait_for_coordinator(address: str, timeout_s: float):
  """Polls the coordinator's port until it accepts a connection.

  jax.distributed aborts the whole process (no Python exception) when it
  cannot register in time; checking first turns the common failure (wrong
  address, process 0 not started or already gone) into one readable line.
  """
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=5):
        return
    except OSError as error:  # refused, unresolvable (a pod not up yet), timed out
      if time.monotonic() >= deadline:
        raise DistributedError(
            f'could not reach the coordinator {address} within distributed.init_timeout_s='
            f'{timeout_s:g}s ({type(error).__name__}: {error}); is process 0 running?') from None
      time.sleep(1)


def initialize(settings) -> ProcessLayout | None:
  """Joins this process to the others per `settings` (config.distributed); None if alone."""
  layout = resolve_layout(settings.mode)
  if layout is None or layout.num_processes == 1:
    return None
  if jax.distributed.is_initialized():
    return layout
  # CPU collectives across processes need gloo; GPU collectives use NCCL either way.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  print(f'distributed: process {layout.process_id} of {layout.num_processes} ({layout.source}), '
        f'coordinator {layout.coordinator_address}', flush=True)
  start = time.monotonic()
  if layout.process_id != 0:
    wait_for_coordinator(layout.coordinator_address, settings.init_timeout_s)
  remaining = max(1, int(settings.init_timeout_s - (time.monotonic() - start)))
  jax.distributed.initialize(
      coordinator_address=layout.coordinator_address, num_processes=layout.num_processes,
      process_id=layout.process_id,
      local_device_ids=list(layout.local_device_ids) if layout.local_device_ids else None,
      initialization_timeout=remaining, heartbeat_timeout_seconds=settings.heartbeat_timeout_s)
  return layout


def barrier(name: str):
  """Waits until every process gets here; nothing to wait for when alone."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
