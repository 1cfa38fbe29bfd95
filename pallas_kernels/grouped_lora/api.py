"""The one public entry point for grouped MoE-LoRA.

``implementation=None`` picks the fastest backend that works on the current platform; a name picks one.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora.reference import grouped_lora_reference

IMPLEMENTATIONS = ("reference",)


def grouped_lora(
    x: Float[Array, "T D"],
    lora_a: Float[Array, "E D R"],
    lora_b: Float[Array, "E R O"],
    expert_ids: Int[Array, "T K"],
    expert_weights: Float[Array, "T K"],
    *,
    scaling: Float[Array, " E"],
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "T O"]:
    """LoRA contribution of each token's top-k experts: sum_j w[t,j] * s[e] * x[t] @ A[e] @ B[e]."""
    del implementation  # Only the reference exists so far.
    return grouped_lora_reference(x, lora_a, lora_b, expert_ids, expert_weights, scaling_e=scaling)


def grouped_lora_fused(
    x: Float[Array, "T D"],
    w: Float[Array, "D O"],
    lora_a: Float[Array, "E D R"],
    lora_b: Float[Array, "E R O"],
    expert_ids: Int[Array, "T K"],
    expert_weights: Float[Array, "T K"],
    *,
    scaling: Float[Array, " E"],
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "T O"]:
    """``x @ w`` plus the grouped LoRA contribution."""
    base = jnp.dot(x, w, preferred_element_type=jnp.float32)
    lora = grouped_lora(
        x, lora_a, lora_b, expert_ids, expert_weights, scaling=scaling, implementation=implementation
    )
    return (base + lora.astype(jnp.float32)).astype(x.dtype)


del jax
