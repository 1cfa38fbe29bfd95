"""Trace-time performance knobs: which of two equivalent computations the model and kernels trace.

Each knob is a module attribute read when a function is traced (a token-count threshold, or 0 / 1), and every
choice computes the same result to rounding; they exist so that one process can A/B them on a GPU
(``scripts/profile_decode.py --variants auto,auto+packed=2``) and so that a user can run the choice that is
faster on their hardware. Set them for a whole run with ``--knob NAME=N`` on ``generate`` / ``eval``, or the
environment variable ``METEORA_JAX_KNOBS="packed=2,gate_rows=1"`` (read by the ``meteora-jax`` command);
``inf`` means "never". Their defaults and the H200 measurements behind them are documented at each attribute
and in ``benchmarks/RESULTS.md``. ``set_knobs`` clears jit's caches when a value changes, since traced
functions would otherwise keep the old choice.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from meteora_jax.errors import MeteoraInputError

ENV_VAR = "METEORA_JAX_KNOBS"
# knob -> (module, attribute); ``inf`` (sys.maxsize) = a threshold never reached.
KNOBS: dict[str, tuple[str, str]] = {
    "group_route": ("meteora_jax.model.moe_lora", "GROUP_ROUTE_MIN_TOKENS"),
    "split_gate": ("meteora_jax.model.moe_lora", "SPLIT_GATE_MIN_TOKENS"),
    "lowp": ("pallas_kernels.grouped_lora.xla", "LOW_PRECISION_SUM_MIN_TOKENS"),
    "batched": ("pallas_kernels.grouped_lora.xla", "BATCHED_SHRINK_MAX_TOKENS"),
    "shared_shrink": ("pallas_kernels.grouped_lora.api", "SHARED_SHRINK_MIN_TOKENS"),
    "argmax_topk": ("pallas_kernels.grouped_lora.gating", "ARGMAX_TOP_K_MAX"),
    "reduce_topk": ("pallas_kernels.grouped_lora.gating", "REDUCE_TOP_K_MIN_ROWS"),
    "packed": ("meteora_jax.model.moe_lora", "PACKED_MIN_TOKENS"),
    "packed_max": ("meteora_jax.model.moe_lora", "PACKED_MAX_TOKENS"),
    "packed_gates": ("meteora_jax.model.moe_lora", "PACK_GATES"),
    "gate_rows": ("meteora_jax.model.moe_lora", "GATE_PACK_ROWS"),
    "group_decode": ("pallas_kernels.grouped_lora.api", "GROUP_DECODE_MAX_TOKENS"),
    "kernel_route": ("pallas_kernels.grouped_lora.api", "ROUTED_DECODE_MAX_TOKENS"),
    "decode_prefetch": ("pallas_kernels.grouped_lora.pallas_gpu_decode", "DECODE_SHRINK_PREFETCH"),
    "fused_expand": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "FUSED_EXPAND_MAX_TOKENS"),
    "expand_route": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_ROUTE"),
    "expand_route_work": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_ROUTE_MAX_WORK"),
    "expand_given": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_GIVEN"),
    "expand_batched": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_BATCHED_SHRINK"),
    "expand_spread": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_SPREAD_LORA"),
    "expand_early": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_EARLY_ROUTING"),
    "expand_bn": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_BLOCK_N"),
    "expand_bk": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_BLOCK_K"),
    "expand_split": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_SPLIT_K"),
    "expand_programs": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_TARGET_PROGRAMS"),
    "expand_stages": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_STAGES"),
    "expand_warps": ("pallas_kernels.grouped_lora.pallas_gpu_expand", "EXPAND_WARPS"),
    "prefill_cublas": ("meteora_jax.generate.sampler", "PREFILL_CUBLAS_GEMMS"),
    "prefill_dot_merger": ("meteora_jax.generate.sampler", "PREFILL_DOT_MERGER"),
    "logit_rows": ("meteora_jax.model.llama", "LAST_LOGITS_ROWS"),
    "attn_barrier": ("meteora_jax.model.llama", "ATTENTION_OUT_BARRIER_MAX_TOKENS"),
    "residual_fold": ("meteora_jax.model.llama", "RESIDUAL_IN_PROJECTION"),
    "pallas_gather": ("pallas_kernels.grouped_lora.pallas_gpu", "GATHER_FORWARD_MAX_ROWS"),
    "pallas_gather_rank": ("pallas_kernels.grouped_lora.pallas_gpu", "GATHER_FORWARD_MAX_RANK"),
    "pack_kernel": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_KERNEL_MAX_TOKENS"),
    "pack_bn": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_BLOCK_N"),
    "pack_bk": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_BLOCK_K"),
    "pack_split": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_SPLIT_K"),
    "pack_programs": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_TARGET_PROGRAMS"),
    "pack_stages": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_STAGES"),
    "pack_warps": ("pallas_kernels.grouped_lora.pallas_gpu_pack", "PACK_WARPS"),
}


def parse_value(name: str, value: str, where: str) -> int:
    """``N`` or ``inf`` for knob ``name``; ``MeteoraInputError`` naming ``where`` and the knobs otherwise."""
    if name not in KNOBS:
        raise MeteoraInputError(f"{where}: unknown knob {name!r}; knobs are {sorted(KNOBS)}.")
    if not (value.isdigit() or value == "inf"):
        raise MeteoraInputError(
            f"{where}: knob {name}={value!r} must be a non-negative integer or inf; knobs are {sorted(KNOBS)}."
        )
    return sys.maxsize if value == "inf" else int(value)


def parse(specs: str | list[str], where: str = "knobs") -> dict[str, int]:
    """``"a=1,b=inf"`` (or a list of ``"a=1"``) -> ``{name: value}``."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    out = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise MeteoraInputError(f"{where}: {item!r} is not NAME=N; knobs are {sorted(KNOBS)}.")
        out[name.strip()] = parse_value(name.strip(), value.strip(), where)
    return out


def current() -> dict[str, int]:
    """Every knob's value now."""
    return {name: getattr(importlib.import_module(mod), attr) for name, (mod, attr) in KNOBS.items()}


def set_knobs(values: dict[str, int]) -> None:
    """Sets knobs for the rest of the process. When a value changes, jit's caches are cleared, so that
    functions traced under the old values trace again (their cache keys do not see module attributes)."""
    changed = False
    for name, value in values.items():
        module, attr = KNOBS[name]
        mod = importlib.import_module(module)
        changed |= getattr(mod, attr) != value
        setattr(mod, attr, value)
    if changed:
        import jax

        jax.clear_caches()


def set_from_env() -> dict[str, int]:
    """Applies ``METEORA_JAX_KNOBS`` when it is set; returns what it set."""
    values = parse(os.environ.get(ENV_VAR, ""), where=f"${ENV_VAR}")
    set_knobs(values)
    return values


@contextlib.contextmanager
def knobs_set(values: dict[str, int]) -> Iterator[None]:
    """The knobs set while the block runs (e.g. while one variant is traced), then restored."""
    saved = current()
    try:
        set_knobs(values)
        yield
    finally:
        set_knobs({name: saved[name] for name in values})
