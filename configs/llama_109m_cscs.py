"""Llama 109M on 2 nodes x 4 GPUs, the CSCS tutorial layout: data=2 across the nodes, tensor=4 within each.

    CONFIG=configs/llama_109m_cscs.py NETWORK=slingshot sbatch --nodes=2 launch/slurm.sbatch

Run it from the repository root on a shared filesystem (train.run_dir is
written by both nodes). On Alps the job runs in a container: an environment
definition file (~/.edf/maxlite.toml) names a JAX CUDA image with maxlite
installed and enables the Container Engine's aws-ofi-nccl hook, the libfabric
plugin that NETWORK=slingshot's NCCL_NET names; add
SRUN_EXTRA=--environment=maxlite to the command above.
"""
from configs import llama_109m


def get_config():
  config = llama_109m.get_config()
  # Only the data axis crosses nodes: one gradient all-reduce per step goes
  # over the network, while tensor parallelism's per-layer collectives stay on
  # a node's NVLink. fsdp and pipeline stay 1 (the base's defaults).
  config.parallel.data = 2
  config.parallel.tensor = 4
  config.distributed.mode = 'slurm'
  config.train.run_dir = 'runs/llama_109m_cscs'
  return config
