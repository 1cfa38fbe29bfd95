"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus), all jittable.

The knobs live in ``SamplingParams``, a frozen dataclass that the jitted loop takes as a static argument:
``top_k`` has to be static for ``lax.top_k``, and the others only select code paths. Randomness comes from one
key per step (``fold_in(seed_key, step)``), so a seed reproduces a whole generation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from meteora_jax.errors import MeteoraInputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MeteoraInputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise MeteoraInputError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise MeteoraInputError(f"top_k (sampling) must be >= 0 (0 = off), got {self.top_k}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_bv: Float[Array, "B V"], params: SamplingParams) -> Float[Array, "B V"]:
    """Temperature-scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits_bv = logits_bv.astype(jnp.float32) / params.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if params.top_k > 0 and params.top_k < logits_bv.shape[-1]:
        kth_b1 = jax.lax.top_k(logits_bv, params.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, neg_inf, logits_bv)
    if params.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the most likely token always stays.
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        keep_bv = before_bv < params.top_p
        cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff_b1, neg_inf, logits_bv)
    return logits_bv


def sample_next(logits_bv: Float[Array, "B V"], key: jax.Array, params: SamplingParams) -> Int[Array, " B"]:
    """One token per row: argmax when greedy, else a draw from the filtered distribution."""
    if params.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_bv, params), axis=-1).astype(jnp.int32)
