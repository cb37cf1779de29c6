"""Rematerialisation policies by name (`model.remat`): what a block keeps for the backward pass.

A policy that saves less recomputes more in the backward pass: 'full' keeps
only each block's input, 'save_matmuls' keeps the weight matmuls' outputs and
recomputes the elementwise work, 'none' keeps everything.
"""
import jax

POLICIES = {
    'none': None,  # no jax.checkpoint at all
    'full': jax.checkpoint_policies.nothing_saveable,
    # Keep weight-matmul outputs, recompute the cheap elementwise work.
    'save_matmuls': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
