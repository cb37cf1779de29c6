"""The launch files: the SLURM script's dry runs, that no launcher sets XLA flags of its
own (maxlite/xla_flags.py does), the Kubernetes manifest's fields against
maxlite.distributed, and the CSCS config's mesh."""
import os
import pathlib
import re
import shlex
import subprocess

import pytest
import yaml

from configs import llama_109m, llama_109m_cscs
from maxlite import config as config_lib
from maxlite import distributed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SBATCH = REPO_ROOT / 'launch' / 'slurm.sbatch'
MANIFEST = REPO_ROOT / 'launch' / 'kubernetes.yaml'
CONFIG = 'configs/llama_109m_cscs.py'
SLURM_JOB = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_GPUS_ON_NODE': '4'}


def run_sbatch(*args, **variables):
  # A clean environment: nothing from a real SLURM job or from conftest's XLA_FLAGS leaks in.
  env = {'PATH': os.environ['PATH'], **variables}
  return subprocess.run(['bash', str(SBATCH), *args], env=env, capture_output=True, text=True,
                        timeout=30, cwd=REPO_ROOT)


def dry_run(*args, **variables):
  result = run_sbatch(*args, DRY_RUN='1', CONFIG=CONFIG, **SLURM_JOB, **variables)
  assert result.returncode == 0, result.stderr
  srun_lines = [line for line in result.stdout.splitlines() if line.startswith('srun ')]
  assert len(srun_lines) == 1, result.stdout
  exports = dict(shlex.split(line)[1].split('=', 1) for line in result.stdout.splitlines()
                 if line.startswith('export '))
  return shlex.split(srun_lines[0]), exports


def srun_flag(words, name):
  values = [w.split('=', 1)[1] for w in words if w.startswith(f'--{name}=')]
  assert len(values) == 1, (name, words)
  return values[0]


def test_script_parses():
  subprocess.run(['bash', '-n', str(SBATCH)], check=True, timeout=10)
  header = SBATCH.read_text()
  for directive in ('--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=4', '--exclusive',
                    '--output=%x-%j.out'):
    assert f'#SBATCH {directive}\n' in header
  assert re.search(r'^#SBATCH --time=\S+$', header, re.M)


def test_dry_run_one_task_per_node():
  words, exports = dry_run('--config.train.steps=10', OVERRIDES='--config.optim.lr=1e-4 --config.seed=3')
  program = words[words.index('python'):]
  assert program == ['python', '-m', 'maxlite.train', f'--config={CONFIG}', '--config.distributed.mode=slurm',
                     '--config.optim.lr=1e-4', '--config.seed=3', '--config.train.steps=10']
  launcher = words[:words.index('python')]
  assert (srun_flag(launcher, 'nodes'), srun_flag(launcher, 'ntasks'), srun_flag(launcher, 'ntasks-per-node'),
          srun_flag(launcher, 'gpus-per-node')) == ('2', '2', '1', '4')
  assert exports['NCCL_DEBUG'] == 'WARN' and float(exports['XLA_PYTHON_CLIENT_MEM_FRACTION']) < 1
  assert 'XLA_FLAGS' not in exports  # maxlite/xla_flags.py sets them in each process
  assert 'FI_PROVIDER' not in exports  # Slingshot settings only when asked for


def test_dry_run_one_task_per_gpu():
  words, exports = dry_run(TASKS='gpu', PYTHON='/opt/venv/bin/python', SRUN_EXTRA='--environment=maxlite',
                           NETWORK='slingshot', XLA_FLAGS='--xla_dump_to=/tmp/dump')
  launcher = words[:words.index('/opt/venv/bin/python')]
  assert (srun_flag(launcher, 'nodes'), srun_flag(launcher, 'ntasks'), srun_flag(launcher, 'ntasks-per-node'),
          srun_flag(launcher, 'gpus-per-task')) == ('2', '8', '4', '1')
  assert '--environment=maxlite' in launcher
  assert f'--config={CONFIG}' in words and '--config.distributed.mode=slurm' in words
  assert exports['FI_PROVIDER'] == 'cxi' and exports['NCCL_NET'] == 'AWS Libfabric'
  # The submitter's own XLA flags reach the tasks untouched, through the environment.
  assert 'XLA_FLAGS' not in exports


@pytest.mark.parametrize('variables', [
    {'DRY_RUN': '1', **SLURM_JOB},  # no CONFIG
    {'DRY_RUN': '1', 'CONFIG': CONFIG, 'TASKS': 'rank', **SLURM_JOB},
    {'DRY_RUN': '1', 'CONFIG': CONFIG, 'SLURM_JOB_NUM_NODES': '2'},  # a job without GPUs
    {'CONFIG': CONFIG},  # neither inside a job nor a dry run
])
def test_mistakes_exit_2_with_usage(variables):
  result = run_sbatch(**variables)
  assert result.returncode == 2
  assert 'error:' in result.stderr and 'usage:' in result.stderr and result.stdout == ''


def test_launchers_set_no_xla_flags_of_their_own():
  """One place sets them (maxlite/xla_flags.py); a launcher repeating one would drift from it."""
  for path in (REPO_ROOT / 'launch').iterdir():
    flags = set(re.findall(r'--xla_\w+', path.read_text()))
    assert flags <= {'--xla_force_host_platform_device_count'}, (path.name, flags)
    if flags:  # local.py's fake CPU devices: a device count, not a tuning flag
      assert path.name == 'local.py'


def load_manifest():
  documents = {doc['kind']: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}
  return documents['Service'], documents['Job']


def test_kubernetes_manifest_is_consistent():
  service, job = load_manifest()
  assert service['spec']['clusterIP'] == 'None'
  spec, pod = job['spec'], job['spec']['template']['spec']
  assert spec['completionMode'] == 'Indexed' and spec['backoffLimit'] == 0
  assert pod['restartPolicy'] == 'Never'
  assert pod['subdomain'] == service['metadata']['name']
  assert service['spec']['selector'] == {'batch.kubernetes.io/job-name': job['metadata']['name']}
  (container,) = pod['containers']
  env = {var['name']: var for var in container['env']}
  assert spec['completions'] == spec['parallelism'] == int(env[distributed.ENV_NUM_PROCESSES]['value'])

  host, port = env[distributed.ENV_COORDINATOR]['value'].rsplit(':', 1)
  assert host == f'{job["metadata"]["name"]}-0.{service["metadata"]["name"]}'
  assert int(port) in [p['containerPort'] for p in container['ports']]
  assert int(port) in [p['port'] for p in service['spec']['ports']]
  assert env[distributed.ENV_PROCESS_ID]['valueFrom']['fieldRef']['fieldPath'] == (
      "metadata.annotations['batch.kubernetes.io/job-completion-index']")
  maxlite_names = {name for name in env if name.startswith('MAXLITE_')}
  assert maxlite_names == {distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID}

  assert container['command'][:3] == ['python', '-m', 'maxlite.train']
  assert '--config.distributed.mode=env' in container['command']
  config_file = next(arg.split('=', 1)[1] for arg in container['command'] if arg.startswith('--config='))
  assert (REPO_ROOT / config_file).is_file()
  assert container['resources']['limits']['nvidia.com/gpu'] >= 1


def test_cscs_config_is_data_2_by_tensor_4_on_8_gpus():
  config = llama_109m_cscs.get_config()
  expected = {'data': 2, 'fsdp': 1, 'context': 1, 'expert': 1, 'tensor': 4, 'pipeline': 1}
  assert config_lib.mesh_shape(config.parallel, 8) == expected
  # validate() reads no data: it checks fields and numbers only.
  assert config_lib.validate(config, 8) == expected
  assert config.distributed.mode == 'slurm'
  assert config.train.run_dir == 'runs/llama_109m_cscs'
  # A variant: everything but these fields is llama_109m's.
  base = llama_109m.get_config().to_dict()
  changed = {(group, key) for group, fields in config.to_dict().items() if isinstance(fields, dict)
             for key, value in fields.items() if base[group][key] != value}
  assert changed == {('parallel', 'data'), ('parallel', 'tensor'), ('distributed', 'mode'), ('train', 'run_dir')}
