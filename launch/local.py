"""Start N processes of one command on this machine, as a multi-host job would.

Each process gets the variables a cluster would give it, so the real
jax.distributed start-up path runs, on loopback:

  python launch/local.py --processes=2 --cpu_devices=4 -- \\
      python -m maxlite.train --config=configs/tiny.py

--cpu_devices=M   each process sees M fake CPU devices (collectives over gloo)
                  (the only XLA flag set here; maxlite/xla_flags.py adds the rest in each process)
--gpus_per_process=G   process i owns GPUs i*G .. i*G+G-1 of this machine
--via=env         MAXLITE_COORDINATOR_ADDRESS, MAXLITE_NUM_PROCESSES, ... (Kubernetes style)
--via=slurm       srun's variables (SLURM_PROCID, SLURM_STEP_NODELIST, ...)

Output lines are relayed with a '[i] ' prefix. When a process fails, the
others get --grace_s seconds to notice and exit on their own (maxlite's
heartbeat does that) before they are terminated; the launcher exits with the
first failing code. Ctrl-C is passed on to every process.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from maxlite.distributed import (ENV_COORDINATOR, ENV_COORDINATOR_PORT, ENV_LOCAL_DEVICE_IDS,
                                 ENV_NUM_PROCESSES, ENV_PROCESS_ID)

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
TERMINATE_TIMEOUT_S = 10


def log(message: str):
  print(f'[launch] {message}', file=sys.stderr, flush=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(base: dict, *, process_id: int, num_processes: int, port: int, via: str = 'env',
              cpu_devices: int = 0, gpus_per_process: int = 0) -> dict:
  """The environment of process `process_id`: `base` without any inherited
  cluster variables, plus what a cluster would set for that process."""
  env = {k: v for k, v in base.items() if not k.startswith(('MAXLITE_', 'SLURM_'))}
  env['PYTHONUNBUFFERED'] = '1'  # lines arrive as they are printed, not at exit
  if cpu_devices:
    env['JAX_PLATFORMS'] = 'cpu'
    kept = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env['XLA_FLAGS'] = ' '.join(kept + [f'{DEVICE_COUNT_FLAG}={cpu_devices}'])
  gpu_ids = ''
  if gpus_per_process:
    gpu_ids = ','.join(str(process_id * gpus_per_process + g) for g in range(gpus_per_process))
  if via == 'env':
    env.update({ENV_COORDINATOR: f'127.0.0.1:{port}', ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(process_id)})
    if gpu_ids:
      env[ENV_LOCAL_DEVICE_IDS] = gpu_ids
  elif via == 'slurm':
    # One node, num_processes tasks on it: what `srun --ntasks=N` sets up.
    env.update({'SLURM_JOB_ID': str(port), 'SLURM_STEP_NODELIST': '127.0.0.1',
                'SLURM_NTASKS': str(num_processes), 'SLURM_PROCID': str(process_id),
                'SLURM_LOCALID': str(process_id), 'SLURM_STEP_NUM_NODES': '1', 'SLURM_NNODES': '1',
                ENV_COORDINATOR_PORT: str(port)})
    if gpu_ids:
      # As srun --gpus-per-task binds them: each task sees only its own GPUs.
      env.update(CUDA_VISIBLE_DEVICES=gpu_ids, SLURM_GPUS_PER_TASK=str(gpus_per_process))
  else:
    raise ValueError(f'--via={via!r} is not one of env, slurm')
  return env


def relay(stream, prefix: str):
  for line in stream:
    sys.stdout.write(prefix + line)
    sys.stdout.flush()


def run(command: list[str], num_processes: int, envs: list[dict], grace_s: float) -> int:
  processes = []

  # Installed before the first process starts, so that no signal can arrive between
  # a process starting and the launcher passing signals on.
  def forward(signum, _frame):
    for p in list(processes):
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)

  for i, env in enumerate(envs):
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors='replace')
    log(f'process {i}: pid {process.pid}')
    processes.append(process)
  relays = [threading.Thread(target=relay, args=(p.stdout, f'[{i}] '), daemon=True)
            for i, p in enumerate(processes)]
  for thread in relays:
    thread.start()

  exit_code, failed_at, terminated_at = 0, None, None
  reported = set()
  while True:
    for i, p in enumerate(processes):
      code = p.poll()
      if code is not None and i not in reported:
        reported.add(i)
        log(f'process {i} exited with code {code}')
        if code != 0 and exit_code == 0:
          exit_code, failed_at = code, time.monotonic()
    if len(reported) == num_processes:
      break
    now = time.monotonic()
    if failed_at is not None and terminated_at is None and now - failed_at > grace_s:
      log(f'terminating the processes still running {grace_s:g}s after the first failure')
      for p in processes:
        if p.poll() is None:
          p.terminate()
      terminated_at = now
    if terminated_at is not None and now - terminated_at > TERMINATE_TIMEOUT_S:
      for p in processes:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  for thread in relays:
    thread.join(timeout=5)
  # A negative code (killed by a signal) becomes 128 + signal, as a shell reports it.
  return exit_code if exit_code >= 0 else 128 - exit_code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--processes', type=int, required=True, help='number of processes')
  devices = parser.add_mutually_exclusive_group()
  devices.add_argument('--cpu_devices', type=int, default=0, help='fake CPU devices per process')
  devices.add_argument('--gpus_per_process', type=int, default=0, help='GPUs per process')
  parser.add_argument('--port', type=int, default=0, help='coordinator port; 0: a free one')
  parser.add_argument('--via', choices=('env', 'slurm'), default='env')
  parser.add_argument('--grace_s', type=float, default=30,
                      help='after a failure, seconds before the other processes are terminated')
  parser.add_argument('--dry_run', action='store_true', help='print each process environment and exit')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command to run')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  if args.processes < 1:
    parser.error(f'--processes={args.processes} must be >= 1')
  if args.cpu_devices < 0 or args.gpus_per_process < 0:
    parser.error('--cpu_devices and --gpus_per_process must be >= 0')
  port = args.port or free_port()
  envs = [child_env(dict(os.environ), process_id=i, num_processes=args.processes, port=port,
                    via=args.via, cpu_devices=args.cpu_devices, gpus_per_process=args.gpus_per_process)
          for i in range(args.processes)]
  if args.dry_run:
    for i, env in enumerate(envs):
      added = {k: v for k, v in env.items() if os.environ.get(k) != v}
      print(f'process {i}: ' + ' '.join(f'{k}={v}' for k, v in sorted(added.items())))
    print('command: ' + ' '.join(command))
    return 0
  return run(command, args.processes, envs, args.grace_s)


if __name__ == '__main__':
  sys.exit(main())
