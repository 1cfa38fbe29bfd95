"""N LoRA adapters -> the flat expert and gate params of the MoE-LoRA layers.

Every reader (PEFT directories, the original MeteoRA checkpoint) produces ``LoraAdapter`` objects: for each
(layer, projection) the adapter touches, torch's ``lora_A.weight`` [r, d_in], ``lora_B.weight`` [d_out, r]
and its scaling. ``stack_experts`` lays them out for ``MoELoRALinear``:

    lora_a_edr [E, d_in, r_max]  = lora_A.weight.T   (x @ A: torch computes x @ lora_A.weight.T)
    lora_b_ero [E, r_max, d_out] = lora_B.weight.T
    scaling_e  [E] float32
    gate_de    [d_in, E] float32

for every (layer, projection) of the union of all adapters' targets. A lower-rank adapter is zero-padded up
to r_max (the padded rank columns of A meet zero rows of B, so they add exactly nothing); an adapter that
does not touch a (layer, projection) gets zero A/B and scaling 0 there, so it contributes nothing.

Gates: MeteoRA trains them from scratch, so a converted model's gates are placeholders. They are drawn
N(0, GATE_INIT_STD^2), seeded per (seed, layer, projection) so that the result does not depend on the order
in which projections are visited; small logits keep the first steps of gate training near uniform routing.
A reader that has trained gates (the original checkpoint) passes them in ``gates``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from meteora_jax.config import PROJECTIONS, ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError

GATE_INIT_STD = 0.02
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted projection, in torch's layout."""

    a_rd: np.ndarray  # lora_A.weight [r, d_in]
    b_or: np.ndarray  # lora_B.weight [d_out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a_rd.shape[0])


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One expert: its modules by (layer index, projection name), and where it came from (for messages)."""

    source: str
    modules: Mapping[tuple[int, str], LoraModule]

    @property
    def projections(self) -> set[str]:
        return {p for _, p in self.modules}

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def module_prefix(layer: int, projection: str) -> str:
    """The flat-param prefix of one projection, e.g. ``layers.3.attn.q_proj``."""
    block = "attn" if projection in ATTN_PROJECTIONS else "mlp"
    return f"layers.{layer}.{block}.{projection}"


def init_gate(seed: int, layer: int, projection: str, d_in: int, num_experts: int) -> np.ndarray:
    rng = np.random.default_rng([seed, layer, PROJECTIONS.index(projection)])
    return (GATE_INIT_STD * rng.standard_normal((d_in, num_experts))).astype(np.float32)


def stack_experts(
    cfg: ModelConfig,
    names: Sequence[str],
    adapters: Sequence[LoraAdapter],
    *,
    top_k: int = 2,
    temperature: float = 1.0,
    routing: str = "topk_then_softmax",
    seed: int = 0,
    gates: Mapping[tuple[int, str], np.ndarray] | None = None,
) -> tuple[MoEConfig, dict[str, np.ndarray]]:
    """The ``MoEConfig`` and the flat expert + gate params (no base params) for ``adapters`` in order."""
    if len(names) != len(adapters):
        raise ValueError("one name per adapter")
    if not adapters:
        raise MeteoraInputError("no adapters given: pass at least one --adapter NAME=PATH.")
    union = {p for a in adapters for p in a.projections}
    targets = tuple(p for p in PROJECTIONS if p in union)
    r_max = max(a.max_rank for a in adapters)
    moe = MoEConfig(
        expert_names=tuple(names),
        target_modules=targets,
        rank=r_max,
        top_k=top_k,
        temperature=temperature,
        routing=routing,
    )
    n = len(adapters)
    flat: dict[str, np.ndarray] = {}
    for layer in range(cfg.num_hidden_layers):
        for proj in targets:
            d_in, d_out = cfg.projection_shape(proj)
            a_edr = np.zeros((n, d_in, r_max), np.float32)
            b_ero = np.zeros((n, r_max, d_out), np.float32)
            scaling_e = np.zeros((n,), np.float32)
            for e, adapter in enumerate(adapters):
                mod = adapter.modules.get((layer, proj))
                if mod is None:
                    continue  # not targeted here: zeros and scaling 0
                r = mod.rank
                a_edr[e, :, :r] = np.asarray(mod.a_rd, np.float32).T
                b_ero[e, :r, :] = np.asarray(mod.b_or, np.float32).T
                scaling_e[e] = mod.scaling
            prefix = module_prefix(layer, proj)
            flat[f"{prefix}.lora_a_edr"] = a_edr
            flat[f"{prefix}.lora_b_ero"] = b_ero
            flat[f"{prefix}.scaling_e"] = scaling_e
            if gates is not None:
                gate = np.asarray(gates[(layer, proj)], np.float32)
                if gate.shape != (d_in, n):
                    raise ValueError(f"gate for {prefix} has shape {gate.shape}, expected {(d_in, n)}")
                flat[f"{prefix}.gate_de"] = gate
            else:
                flat[f"{prefix}.gate_de"] = init_gate(seed, layer, proj, d_in, n)
    return moe, flat
