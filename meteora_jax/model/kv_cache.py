"""A static-shape KV cache: one [B, S_max, K, H] buffer pair per layer and one shared write index.

Batches are left-padded, so every row writes its next token into the same slot; padding slots are masked
through the attention mask the sampler keeps, never by per-row indices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k: Float[Array, "B S K H"]
    v: Float[Array, "B S K H"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]
    index: Int[Array, ""]

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[1]

    @classmethod
    def zeros(
        cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
    ) -> KVCache:
        shape = (batch, max_len, num_kv_heads, head_dim)
        layers = tuple(
            LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)
        )
        return cls(layers=layers, index=jnp.zeros((), jnp.int32))
