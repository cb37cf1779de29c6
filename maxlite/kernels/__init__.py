"""Pallas kernels. Each module exposes the op, a pure-jnp `*_reference` with the
same signature, and `interpret=` so that tests run it on CPU."""
