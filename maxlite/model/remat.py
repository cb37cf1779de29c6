"""Rematerialisation policies by name (`model.remat`): what a block keeps for the backward pass.

A policy that saves less recomputes more in the backward pass: 'full' keeps
only each block's input, 'save_matmuls' keeps the weight matmuls' outputs and
recomputes the elementwise work, 'none' keeps everything.

Policies name what they keep: the weight matmuls run inside
maxlite.model.parallel.project, whose own dots a policy cannot see, so their
outputs carry names (layers.Dense's `checkpoint_as`): 'qkv' (the q, k and v
projections), 'mlp_in' (gate and up) and 'block_out' (o and down).
"""
import jax

POLICIES = {
    'none': None,  # no jax.checkpoint at all
    'full': jax.checkpoint_policies.nothing_saveable,
    # Keep the weight matmuls' outputs, recompute the cheap elementwise work.
    'save_matmuls': jax.checkpoint_policies.save_only_these_names('qkv', 'mlp_in', 'block_out'),
}
