"""Per-token routing: gate logits -> (expert ids, weights), in either of MeteoRA's two orders.

``topk_then_softmax``: softmax over the k largest logits / T (MeteoRA's inference path).
``softmax_then_topk``: softmax over all logits / T, keep the top k, renormalise (its training path).
With k = 1 both give weight 1, so the gate then learns only from the gate loss.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora.gating import RouteSpec, route, softmax_sorted, top_k_values


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
    """Run-time routing knobs; hashable so that jit can treat them as static.

    ``force_expert`` (an index) sends every token to that expert with weight 1 and skips the gate.
    ``no_experts`` turns every expert contribution (and gate) off: the plain base model, for baselines.
    ``detach_gate_input`` (training only; the forward is unchanged) stops gradients at each gate's input, so a
    gate's loss trains that gate alone, never the layers (or LoRA factors) that wrote its input.
    """

    top_k: int = 2
    temperature: float = 1.0
    mode: str = "topk_then_softmax"
    force_expert: int | None = None
    no_experts: bool = False
    detach_gate_input: bool = False

    @property
    def spec(self) -> RouteSpec:
        """The top-k, temperature and mode as the kernels take them."""
        return RouteSpec(top_k=self.top_k, temperature=self.temperature, mode=self.mode)


# The routing math itself is the kernels' (``pallas_kernels.grouped_lora.gating``): the decode kernel can route
# inside itself, checked against that module. Re-exported here for the model and for users.
__all__ = ["RoutingOptions", "forced", "route", "softmax_sorted", "top_k_values"]


def forced(num_tokens: int, expert: int) -> tuple[Int[Array, "T 1"], Float[Array, "T 1"]]:
    return jnp.full((num_tokens, 1), expert, jnp.int32), jnp.ones((num_tokens, 1), jnp.float32)
