"""Routing ablation: MeteoRA with its first layers answered by one known expert, its own gates elsewhere.

Why: on the BIG-bench study MeteoRA trails the oracle (the task's own adapter everywhere) although every test
prompt's majority expert is right; the tokens its gates misroute sit mostly in the first layers, whose q/k/v
and gate/up inputs hold little or no context (benchmarks/RESULTS.md, seed 1). Forcing the task's expert in
the first L layers measures how much of the gap those layers explain.

How, with weights only (so one compiled program serves every task): in each MoE projection of a forced layer,
every expert slot gets the chosen expert's A, B and scaling, and the gate is zeroed. Whatever top-k then picks,
it is that expert, with weights summing to 1: exactly the expert alone (``force_expert``) in those layers.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from meteora_jax.model.llama import MeteoraLlama
from meteora_jax.params import ExpertParam, GateParam

_EXPERT_LEAVES = ("lora_a_edr", "lora_b_ero", "scaling_e")
_ROUTED = nnx.Any(ExpertParam, GateParam)


def _layer_of(path: tuple) -> int | None:
    """The decoder layer a state path belongs to (``('layers', 3, 'mlp', ...)`` -> 3), else None."""
    for a, b in zip(path, path[1:]):
        if a == "layers" and isinstance(b, int):
            return b
    return None


class FirstLayersForced:
    """Forces, in layers ``0 .. layers - 1`` of ``model`` (in place), the expert named by ``use(name)``;
    ``use(None)`` restores the trained experts and gates. Keeps a host copy of the originals it overwrites."""

    def __init__(self, model: MeteoraLlama, layers: int):
        if not model.expert_names:
            raise ValueError("FirstLayersForced needs a model with experts")
        if not 0 < layers <= model.config.num_hidden_layers:
            raise ValueError(f"layers={layers} must be in 1..{model.config.num_hidden_layers}")
        self.model, self.layers = model, layers
        flat = nnx.to_flat_state(nnx.state(model, _ROUTED))
        self._originals = {
            path: np.asarray(var[...])
            for path, var in flat
            if (layer := _layer_of(path)) is not None and layer < layers
        }

    def use(self, expert: str | None) -> None:
        import jax.numpy as jnp

        e = None if expert is None else self.model.expert_names.index(expert)
        updates = []
        for path, var in nnx.to_flat_state(nnx.state(self.model, _ROUTED)):
            if path not in self._originals:
                continue
            val = self._originals[path]
            if e is not None:
                if path[-1] in _EXPERT_LEAVES:  # expert axis first: every slot holds expert e
                    val = np.broadcast_to(val[e : e + 1], val.shape)
                elif path[-1] == "gate_de":
                    val = np.zeros_like(val)
            updates.append((path, var.replace(value=jnp.asarray(val, var[...].dtype))))
        nnx.update(self.model, nnx.from_flat_state(updates))
