"""``convert``: a base checkpoint + N LoRA adapters (or one original MeteoRA checkpoint) -> a model directory.

One pipeline for both sources:

    base params (load_base)  ─┐
    experts + gates           ├─> flat params ──> build_model (strict accounting) ──> io.save (atomic)
    (PEFT dirs | MeteoRA ckpt)┘

Cheap argument checks (names, top-k, the output path) run before anything is read, so a typo fails in
milliseconds. Every failure is a ``MeteoraInputError`` and leaves no output (nor temp) directory behind:
the only write is ``io.save``, which renames a complete temp directory into place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from meteora_jax.config import ROUTING_MODES
from meteora_jax.convert.base import BaseCheckpoint, load_base
from meteora_jax.convert.peft_lora import load_peft_adapter
from meteora_jax.convert.stack_experts import GATE_INIT_STD, stack_experts
from meteora_jax.errors import MeteoraInputError
from meteora_jax.io import save
from meteora_jax.model.params_io import build_model

DTYPES = ("float32", "bfloat16")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def check_expert_names(names: Sequence[str], *, what: str = "--adapter NAME") -> None:
    for name in names:
        if not _NAME.fullmatch(name):
            raise MeteoraInputError(
                f"expert name {name!r} ({what}) is empty or has characters other than letters, digits, '_', '.' "
                "and '-'; choose a simple name such as the task name."
            )
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise MeteoraInputError(
            f"duplicate expert names {dup} ({what}): every expert needs a distinct name; rename one of them."
        )


def _check_options(
    n_experts: int, top_k: int, temperature: float, dtype: str, routing: str, out: str, overwrite: bool
) -> None:
    if not 1 <= top_k <= n_experts:
        raise MeteoraInputError(
            f"--top-k {top_k} must be between 1 and the number of experts ({n_experts}); pass a smaller --top-k "
            "or more adapters."
        )
    if not temperature > 0:
        raise MeteoraInputError(f"--temperature must be > 0, got {temperature}.")
    if dtype not in DTYPES:
        raise MeteoraInputError(f"--dtype {dtype!r} is not supported; choose one of {list(DTYPES)}.")
    if routing not in ROUTING_MODES:
        raise MeteoraInputError(f"routing {routing!r} unknown; choose one of {list(ROUTING_MODES)}.")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise MeteoraInputError(
            f"{out}: output path already exists. Choose a new --out, or pass --overwrite to replace it."
        )


def convert(
    base: str,
    adapters: list[tuple[str, str]] | None,
    out: str,
    *,
    meteora_checkpoint: str | None = None,
    tasks: Sequence[str] | None = None,
    top_k: int = 2,
    temperature: float = 1.0,
    dtype: str = "float32",
    routing: str = "topk_then_softmax",
    overwrite: bool = False,
    seed: int = 0,
    lora_alpha: float | None = None,
    meteora_adapter_dir: str | None = None,
    progress: bool = True,
) -> str:
    """Builds and writes a MeteoRA model directory; returns its absolute path.

    Args:
      base: an HF checkpoint directory or a ``.gguf`` file (config, tokenizer, and base weights).
      adapters: ``[(name, peft_adapter_dir), ...]`` in expert order; or None with ``meteora_checkpoint``.
      out: the model directory to create (must not exist unless ``overwrite``).
      meteora_checkpoint: an original MeteoRA ``model.safetensors``; ``tasks`` names its experts (they are
        stored in alphabetical task order). Its LoRA scaling comes from ``meteora_adapter_dir/<task>/
        adapter_config.json`` or ``lora_alpha`` (see ``meteora_original``).
      top_k, temperature, routing: the saved routing defaults.
      dtype: storage/compute dtype of base and experts; gates and scalings stay float32.
      seed: seeds the fresh gates (N(0, 0.02^2)) of the PEFT route; the MeteoRA route keeps its trained gates.
    """
    from tqdm import tqdm

    gates = None
    if meteora_checkpoint is not None:
        if adapters:
            raise MeteoraInputError(
                "pass either --adapter NAME=PATH ... or --meteora-checkpoint FILE --tasks ..., not both."
            )
        if not tasks:
            raise MeteoraInputError(
                f"{meteora_checkpoint}: --tasks t1,t2,... is required with --meteora-checkpoint: the checkpoint "
                "stores its experts by position only (alphabetical task order), so name them."
            )
        names = sorted(tasks)
        check_expert_names(names, what="--tasks")
        _check_options(len(names), top_k, temperature, dtype, routing, out, overwrite)
        from meteora_jax.convert.meteora_original import load_meteora_checkpoint

        base_ckpt, experts, gates = load_meteora_checkpoint(
            meteora_checkpoint,
            base,
            names,
            lora_alpha=lora_alpha,
            adapter_dir=meteora_adapter_dir,
        )
        provenance = {"meteora_checkpoint": os.path.abspath(meteora_checkpoint), "tasks": names}
    else:
        if not adapters:
            raise MeteoraInputError(
                "no experts given: pass one or more --adapter NAME=PATH (PEFT LoRA directories), or "
                "--meteora-checkpoint FILE --tasks t1,t2,..."
            )
        names = [n for n, _ in adapters]
        check_expert_names(names)
        _check_options(len(names), top_k, temperature, dtype, routing, out, overwrite)
        base_ckpt = load_base(base)
        experts = []
        bar = tqdm(adapters, desc="adapters", unit="adapter", disable=not progress, leave=False)
        for name, path in bar:
            bar.set_postfix_str(name)
            experts.append(load_peft_adapter(path, base_ckpt.config, base_source=base_ckpt.source))
        provenance = {
            "adapters": {n: os.path.abspath(p) for n, p in adapters},
            "gate_init_std": GATE_INIT_STD,
            "gate_seed": seed,
        }
    return _assemble(
        base_ckpt,
        names,
        experts,
        gates,
        out,
        top_k=top_k,
        temperature=temperature,
        routing=routing,
        dtype=dtype,
        seed=seed,
        overwrite=overwrite,
        provenance=provenance,
    )


def _assemble(
    base_ckpt: BaseCheckpoint,
    names: Sequence[str],
    experts: list,
    gates: dict | None,
    out: str,
    *,
    top_k: int,
    temperature: float,
    routing: str,
    dtype: str,
    seed: int,
    overwrite: bool,
    provenance: dict,
) -> str:
    moe, flat = stack_experts(
        base_ckpt.config,
        names,
        experts,
        top_k=top_k,
        temperature=temperature,
        routing=routing,
        seed=seed,
        gates=gates,
    )
    clash = sorted(set(flat) & set(base_ckpt.params))
    if clash:  # a base loader that emitted expert keys would silently shadow the adapters
        raise ValueError(f"base params already hold expert keys {clash[:3]}")
    flat.update(base_ckpt.params)
    model = build_model(base_ckpt.config, moe, flat, dtype=dtype, source=base_ckpt.source)
    provenance = {"base": base_ckpt.source, **provenance}
    return save(
        model,
        out,
        tokenizer_dir=base_ckpt.tokenizer_dir,
        overwrite=overwrite,
        extra_config={"converted_from": provenance},
    )
