"""The plain-JAX reference: gather each token's experts, two einsums, all in float32.

Boring on purpose: every other backend is checked against this one.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def grouped_lora_reference(
    x_td: Float[Array, "T D"],
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    expert_ids_tk: Int[Array, "T K"],
    expert_weights_tk: Float[Array, "T K"],
    *,
    scaling_e: Float[Array, " E"],
) -> Float[Array, "T O"]:
    out_dtype = x_td.dtype
    x_td = x_td.astype(jnp.float32)
    a_tkdr = jnp.take(lora_a_edr, expert_ids_tk, axis=0).astype(jnp.float32)
    b_tkro = jnp.take(lora_b_ero, expert_ids_tk, axis=0).astype(jnp.float32)
    coef_tk = expert_weights_tk.astype(jnp.float32) * jnp.take(scaling_e, expert_ids_tk).astype(jnp.float32)
    h_tkr = jnp.einsum("td,tkdr->tkr", x_td, a_tkdr, precision=jax.lax.Precision.HIGHEST)
    y_to = jnp.einsum("tkr,tkro,tk->to", h_tkr, b_tkro, coef_tk, precision=jax.lax.Precision.HIGHEST)
    return y_to.astype(out_dtype)
