"""Rematerialisation policies by name (`model.remat`): what a block keeps for the backward pass.

A policy that saves less recomputes more in the backward pass: 'full' keeps
only each block's input, 'save_matmuls' keeps the weight matmuls' outputs and
recomputes the elementwise work, 'none' keeps everything.

Policies name what they keep: the weight matmuls run inside
maxlite.model.parallel.project, whose own dots a policy cannot see, so their
outputs carry names (layers.Dense's `checkpoint_as`): 'qkv' (the q, k and v
projections), 'mlp_in' (gate and up) and 'block_out' (o and down); and
Attention names the attention op's output 'attention'.
"""
import jax

_names = jax.checkpoint_policies.save_only_these_names

POLICIES = {
    'none': None,  # no jax.checkpoint at all
    'full': jax.checkpoint_policies.nothing_saveable,
    # Keep the weight matmuls' outputs, recompute the cheap elementwise work.
    'save_matmuls': _names('qkv', 'mlp_in', 'block_out'),
    # Keep the q, k, v projections (3 of a block's 7 matmuls, and the inputs of
    # attention); recompute attention and the MLP.
    'save_qkv': _names('qkv'),
    # Keep attention's inputs and output: the backward pass recomputes neither
    # the projections nor the attention op's forward for the o projection and
    # the MLP that follow it; the attention gradient still recomputes what it
    # needs internally (dense scores for 'xla'; the kernel's forward for 'pallas').
    'save_attention': _names('qkv', 'attention'),
    # As save_attention, but the attention outputs go to pinned host memory
    # between the passes: [B, T, N, H] per layer off the device, paid in
    # host-device copies that overlap compute on GPUs.
    'offload_attention': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=['qkv'], names_which_can_be_offloaded=['attention'],
        offload_src='device', offload_dst='pinned_host'),
}
