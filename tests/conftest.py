"""Tests run on 8 fake CPU devices; the flag must be set before jax is imported."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib
import tempfile

# The embedded corpus is prepared on first use into the cache; keep tests off
# the user's ~/.cache. One folder for all test processes: preparation renames
# a finished folder into place, so concurrent workers cannot see a partial one.
os.environ['XDG_CACHE_HOME'] = str(pathlib.Path(tempfile.gettempdir()) / f'maxlite-test-cache-{os.getuid()}')
