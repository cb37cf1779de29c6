"""maxlite: Llama-style pretraining in JAX/Flax NNX on a named SPMD mesh.

maxlite.load_model(run_dir, step=None) gives a trained run's model as a
function of token arrays (maxlite.inference).
"""


def __getattr__(name):
  # Imported on first use, so that `import maxlite` (and every `python -m
  # maxlite.x`) stays light: the model brings in JAX, Flax and Orbax.
  if name in ('load_model', 'Model'):
    from maxlite import inference
    return getattr(inference, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['load_model', 'Model']
