"""Small pieces every backend shares: tile arithmetic, the float32 dot precision, the routing coefficient
and the base term (``reference.py`` stays apart: it is the independent check)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_precision(dtype: jnp.dtype) -> lax.Precision | None:
    """HIGHEST for float32 operands, else the default. Without it float32 dots are not float32: Triton takes
    them as TF32 (seen on jax 0.11.2: 4e-4 error), the TPU MXU as one bf16 pass, XLA on GPU as TF32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def coef_tk(
    expert_ids_tk: Int[Array, "T K"], expert_weights_tk: Float[Array, "T K"], scaling_e: Float[Array, " E"]
) -> Float[Array, "T K"]:
    """Each slot's routing weight times its expert's scaling, in float32 whatever the input dtype."""
    return expert_weights_tk.astype(jnp.float32) * scaling_e.astype(jnp.float32)[expert_ids_tk]


def add_base(x_td: Array, w_do: Array | None, y_to: Float[Array, "T O"]) -> Array:
    """``y + x @ w`` (when ``w`` is given) in float32, cast to x's dtype: how every backend's forward ends."""
    if w_do is not None:
        y_to = y_to + jnp.dot(
            x_td, w_do, preferred_element_type=jnp.float32, precision=dot_precision(x_td.dtype)
        )
    return y_to.astype(x_td.dtype)


def add_base_low_precision(x_td: Array, w_do: Array | None, y_to: Array) -> Array:
    """``add_base`` for a bf16 / f16 inference forward, with no [T, O] float32 array.

    The base GEMM writes x's dtype (it still accumulates in float32) and ``y``, already in x's dtype, is added
    to it: XLA can then fold the add into the GEMM's epilogue (cuBLAS's C input), where ``add_base`` writes
    and re-reads two float32 [T, O] arrays (4x the bytes of the output; at a 4096-token Llama-3-8B prefill,
    ~190 MB per 4096-wide projection, ESTIMATED ~12 ms a prompt on an H200). The cost: y is rounded once
    more (to x's dtype) before the sum, an error of at most half an ulp of y, which is the small term.
    """
    y_to = y_to.astype(x_td.dtype)
    if w_do is None:
        return y_to
    return jnp.dot(x_td, w_do, preferred_element_type=x_td.dtype) + y_to


def kernel_first(fallback: Any, name: str, kernel: Callable[..., Array | None]) -> Any:
    """``fallback`` (an ops object) renamed ``name``, whose inference forward is ``kernel(*args)`` where that
    serves the call (it returns None where it does not) and ``fallback``'s forward otherwise (None: the generic
    shrink / expand path)."""

    def forward(*args: Any) -> Array | None:
        y = kernel(*args)
        if y is None and fallback.forward is not None:
            y = fallback.forward(*args)
        return y

    return dataclasses.replace(fallback, name=name, forward=forward)
