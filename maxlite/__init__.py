"""maxlite: Llama-style pretraining in JAX/Flax NNX on a named SPMD mesh."""
