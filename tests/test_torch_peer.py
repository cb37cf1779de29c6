"""benchmarks/torch_peer.py computes what maxlite computes: from maxlite's initial parameters
its first two losses and gradient norms agree in float32 on CPU (so the model, the loss
mask, the optimizer and the learning rate agree), and its schedule is maxlite's."""
import jax
import numpy as np
import pytest
import torch

from benchmarks import torch_peer
from benchmarks.batches import make_batch
from configs import tiny
from maxlite import config as config_lib, mesh as mesh_lib, optim, state as state_lib, step as step_lib
from maxlite.model.llama import LlamaConfig

ONE_DEVICE = {'data': 1, 'fsdp': 1, 'tensor': 1, 'pipeline': 1}


def small_config(tie_embeddings: bool):
  config = tiny.get_config()  # GQA: 4 heads, 2 kv heads
  config.model.num_layers, config.model.max_seq_len = 2, 32
  config.model.tie_embeddings = tie_embeddings
  config.train.micro_batch_size, config.train.steps = 4, 10
  config.optim.warmup_steps, config.optim.grad_clip = 1, 0.5  # step 1 at full lr, clipped
  return config


def maxlite_steps(config, batch, num_steps: int):
  """(initial params on the host, [(loss, grad_norm)] of the first steps)."""
  mesh = mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1])
  model_cfg = LlamaConfig.from_config(config.model, **config_lib.model_fields(config, ONE_DEVICE))
  _, _, logical = state_lib.abstract_model(model_cfg)
  tx = optim.make_optimizer(config.optim, config.train.steps, logical)
  with jax.set_mesh(mesh):
    steps = step_lib.build(config, model_cfg, mesh, tx)
    _, _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, config.seed, False)
    params = jax.device_get(state.params)
    batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
    metrics = []
    for _ in range(num_steps):
      state, m = steps.train(state, batch)
      metrics.append((float(m['loss']), float(m['grad_norm'])))
  return params, metrics


@pytest.fixture
def one_torch_thread():
  # The maths does not need two; OpenMP's spinning threads crawl on a loaded CPU.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize('tie_embeddings', [True, False])
def test_first_losses_agree_from_the_same_initial_parameters(tie_embeddings, one_torch_thread):
  config = small_config(tie_embeddings)
  batch = make_batch(4, 32, config.model.vocab_size, documents=2, seed=1)  # packed rows
  params, expected = maxlite_steps(config, batch, 2)
  peer = torch_peer.Peer(config, config.train.steps)
  peer.load_maxlite_params(params)
  tensors = peer.batch(batch)
  got = [tuple(float(x) for x in peer.train_step(tensors)) for _ in range(2)]
  assert expected[0][1] > config.optim.grad_clip  # the update was clipped
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_peer_initialisation_matches_maxlites_distribution():
  config = tiny.get_config()
  model = torch_peer.Llama(torch_peer.PeerConfig.from_model(config.model))
  torch_peer.init_weights(model, config.model.init_std, seed=0)
  for name, p in model.named_parameters():
    values = p.detach().numpy()
    if p.ndim == 1:
      assert (values == 1).all(), name  # norm scales
    else:
      assert abs(values.std() - config.model.init_std) < 0.1 * config.model.init_std, name


@pytest.mark.parametrize('decay', ['cosine', 'linear', 'constant', 'wsd'])
def test_learning_rate_is_maxlites_schedule(decay):
  config = tiny.get_config()
  config.optim.decay, config.optim.warmup_steps, config.optim.anneal_start_step = decay, 5, 12
  schedule = optim.learning_rate_schedule(config.optim, 20)
  for step in range(25):
    assert torch_peer.learning_rate(step, config.optim, 20) == pytest.approx(
        float(schedule(step)), rel=1e-6), step
