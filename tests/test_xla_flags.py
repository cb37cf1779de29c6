"""maxlite.xla_flags: every flag it names is known to the installed jaxlib, unknown ones are
left out, the user's XLA_FLAGS win flag by flag, GPU flags never reach a CPU run, and CPU
runs get the malloc settings of maxlite.host_memory."""
import pytest

from maxlite import xla_flags


@pytest.fixture
def env(monkeypatch, tmp_path):
  """A clean XLA_FLAGS, a fresh cache folder, and a backend not yet started."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.delenv(xla_flags.ENV_SWITCH, raising=False)
  monkeypatch.setattr(xla_flags, 'backend_started', lambda: False)
  # Its effect is tested in a process of its own (test_host_memory.py), not this one.
  monkeypatch.setattr(xla_flags.host_memory, 'keep_freed_memory', lambda: 'malloc: kept')
  return monkeypatch


def test_every_flag_named_is_known_to_the_installed_jaxlib():
  named = {**xla_flags.GPU_FLAGS, **xla_flags.CPU_FLAGS, **xla_flags.SUGGESTED_GPU_FLAGS}
  assert xla_flags.probe(named) == dict.fromkeys(named, True)
  # ... and the probe can fail: XLA names the unknown flag, the others pass.
  answers = xla_flags.probe({'xla_gpu_no_such_flag': 'true', **xla_flags.GPU_FLAGS})
  assert answers == {'xla_gpu_no_such_flag': False, **dict.fromkeys(xla_flags.GPU_FLAGS, True)}


def test_gpu_run_gets_the_gpu_flags_the_user_wins_and_unknown_ones_are_left_out(env, tmp_path):
  env.setitem(xla_flags.GPU_FLAGS, 'xla_gpu_no_such_flag', 'true')
  probed = []

  def probe(flags):
    probed.append(set(flags))
    return {name: name != 'xla_gpu_no_such_flag' for name in flags}

  env.setattr(xla_flags, 'probe', probe)
  env.setenv('XLA_FLAGS', '--xla_gpu_enable_pipelined_all_reduce=false --xla_dump_to=/tmp/d')
  line = xla_flags.apply('gpu')
  words = xla_flags.os.environ['XLA_FLAGS'].split()
  assert words[-2:] == ['--xla_gpu_enable_pipelined_all_reduce=false', '--xla_dump_to=/tmp/d']
  assert '--xla_gpu_enable_pipelined_all_reduce=true' not in words
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in words
  assert not any('no_such' in w for w in words) and 'left out: xla_gpu_no_such_flag' in line
  # Answers are cached per jaxlib version: later starts probe only what is new.
  assert list(tmp_path.glob('maxlite/xla_flags-jaxlib-*.json'))
  assert 'xla_gpu_enable_pipelined_all_reduce' not in probed[0]
  for _ in range(2):
    env.setenv('XLA_FLAGS', '')
    xla_flags.apply('gpu')
  assert probed[1:] == [{'xla_gpu_enable_pipelined_all_reduce'}]


def test_cpu_runs_get_no_gpu_flag(env):
  for configured, jax_platforms in (('cpu', 'cuda'), ('', 'cpu')):
    env.setenv('JAX_PLATFORMS', jax_platforms)
    env.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
    assert xla_flags.guess_platform(configured) == 'cpu'
    assert xla_flags.apply(configured).endswith('; malloc: kept')  # CPU runs keep freed memory
    assert 'xla_gpu' not in xla_flags.os.environ['XLA_FLAGS']
    assert '--xla_force_host_platform_device_count=8' in xla_flags.os.environ['XLA_FLAGS']
  env.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert xla_flags.guess_platform() == 'gpu'


def test_switched_off_or_too_late_leaves_xla_flags_alone(env):
  env.setattr(xla_flags, 'probe', lambda flags: pytest.fail('nothing to probe'))
  env.setenv(xla_flags.ENV_SWITCH, 'none')
  assert xla_flags.apply('gpu') == 'XLA flags (gpu): none'
  assert xla_flags.apply('cpu') == 'XLA flags (cpu): none'  # nor the malloc settings
  assert xla_flags.os.environ['XLA_FLAGS'] == ''
  env.delenv(xla_flags.ENV_SWITCH)
  env.setattr(xla_flags, 'backend_started', lambda: True)
  assert 'already started' in xla_flags.apply('gpu')
  assert xla_flags.os.environ['XLA_FLAGS'] == ''
