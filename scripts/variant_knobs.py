"""``VARIANT+KNOB=N`` for the profiling scripts: a trace-time size threshold of the automatic path, set for one
variant only, so that one process can A/B the choices it makes by token count (``profile_decode.py``,
``profile_prefill.py``)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

# knob -> (module, attribute) of the threshold; ``inf`` (sys.maxsize) = never reached.
KNOBS = {
    "group_route": ("meteora_jax.model.moe_lora", "GROUP_ROUTE_MIN_TOKENS"),
    "split_gate": ("meteora_jax.model.moe_lora", "SPLIT_GATE_MIN_TOKENS"),
    "lowp": ("pallas_kernels.grouped_lora.xla", "LOW_PRECISION_SUM_MIN_TOKENS"),
    "batched": ("pallas_kernels.grouped_lora.xla", "BATCHED_SHRINK_MAX_TOKENS"),
    "shared_shrink": ("pallas_kernels.grouped_lora.api", "SHARED_SHRINK_MIN_TOKENS"),
    "argmax_topk": ("meteora_jax.model.gate", "ARGMAX_TOP_K_MAX"),
    "packed": ("meteora_jax.model.moe_lora", "PACKED_MIN_TOKENS"),
    "packed_gates": ("meteora_jax.model.moe_lora", "PACK_GATES"),
    "gate_rows": ("meteora_jax.model.moe_lora", "GATE_PACK_ROWS"),
    "group_decode": ("pallas_kernels.grouped_lora.api", "GROUP_DECODE_MAX_TOKENS"),
}


def parse_variant(variant: str, aliases: dict[str, str] | None = None) -> tuple[str, dict[str, int]]:
    """``name+knob=N+...`` -> (name, {knob: N}); ValueError names the knobs on a bad one. ``aliases`` maps a
    script's older option names to ``knob=N`` (``profile_prefill.py``'s ``f32gate``)."""
    name, *opts = variant.split("+")
    knobs = {}
    for opt in opts:
        key, _, value = (aliases or {}).get(opt, opt).partition("=")
        if key not in KNOBS or not (value.isdigit() or value == "inf"):
            raise ValueError(
                f"variant {variant!r}: expected +KNOB=N (N an integer or inf), KNOB in {list(KNOBS)}"
            )
        knobs[key] = sys.maxsize if value == "inf" else int(value)
    return name, knobs


@contextlib.contextmanager
def knobs_set(knobs: dict[str, int]) -> Iterator[None]:
    """Sets the knobs' module attributes while a variant is traced, then restores them."""
    saved = []
    try:
        for key, value in knobs.items():
            module = importlib.import_module(KNOBS[key][0])
            saved.append((module, KNOBS[key][1], getattr(module, KNOBS[key][1])))
            setattr(module, KNOBS[key][1], value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
