"""Rotary position embeddings, HF layout (``rotate_half`` over two halves), with ``linear`` and ``llama3`` scaling."""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from meteora_jax.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], in float32 as transformers computes them."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(
    positions_bt: Int[Array, "B T"], inv_freq: Float[Array, " H"]
) -> tuple[Float[Array, "B T Dh"], Float[Array, "B T Dh"]]:
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return jnp.cos(emb_btd), jnp.sin(emb_btd)


def apply_rope(
    x_btnd: Float[Array, "B T N Dh"], cos_btd: Float[Array, "B T Dh"], sin_btd: Float[Array, "B T Dh"]
) -> Float[Array, "B T N Dh"]:
    half = x_btnd.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnd[..., half:], x_btnd[..., :half]], axis=-1)
    cos = cos_btd[:, :, None, :].astype(x_btnd.dtype)
    sin = sin_btd[:, :, None, :].astype(x_btnd.dtype)
    return x_btnd * cos + rotated * sin
