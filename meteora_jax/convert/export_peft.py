"""One expert of a model directory -> a PEFT LoRA adapter directory (the inverse of ``peft_lora``).

What for: an expert trained further inside MeteoRA (``train-gate --set mode=gate_and_experts``) is a plain
LoRA again, usable alone with transformers + PEFT; and any expert can be checked against its source adapter.

Each (layer, projection) where the expert contributes (scaling != 0 and a non-zero factor) is written as
PEFT writes it: ``base_model.model.<module>.lora_A.weight`` = ``A[:, :r].T`` [r, d_in] and ``lora_B.weight``
= ``B[:r].T`` [d_out, r], float32, where r is the expert's own rank there: the stacked factors are zero-padded
to the model's r_max, and the padding stays exactly zero under training (each padded column of A meets a zero
row of B, so neither gets a gradient). ``target_modules`` lists the full module names (PEFT matches them
exactly); ``lora_alpha = scaling * r`` (plain LoRA scaling ``alpha / r``), with ``rank_pattern`` /
``alpha_pattern`` for the modules whose rank or scaling differs from the most common one. Only the tensors of
that one expert are read (safetensors slices), so exporting from an 8B model does not load the model.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import numpy as np

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.convert.peft_lora import CONFIG_FILE, SAFETENSORS_FILE, hf_module_name
from meteora_jax.convert.stack_experts import ATTN_PROJECTIONS
from meteora_jax.errors import MeteoraInputError
from meteora_jax.io import (
    WEIGHTS_FILE,
    atomic_directory,
    from_stored,
    read_model_config,
    stored_bf16_names,
    write_json_atomic,
)


def _expert_index(moe: MoEConfig, expert: str, model_dir: str) -> int:
    if expert not in moe.expert_names:
        raise MeteoraInputError(
            f"{model_dir}: no expert named {expert!r}; its experts are {list(moe.expert_names)} "
            "(`meteora-jax info` lists them)."
        )
    return moe.expert_names.index(expert)


def _effective_rank(a_dr: np.ndarray, b_ro: np.ndarray) -> int:
    """1 + the last rank column where A or B is non-zero (0: the expert adds nothing here)."""
    used = np.flatnonzero(np.any(a_dr != 0, axis=0) | np.any(b_ro != 0, axis=1))
    return int(used[-1]) + 1 if used.size else 0


def expert_modules(
    model_dir: str, expert: str
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, float]], ModelConfig, dict]:
    """``{hf module name: (lora_A.weight [r, d_in], lora_B.weight [d_out, r], scaling)}`` of one expert, in
    float32, read slice by slice from the model directory; with its base config and the directory's config."""
    from safetensors import safe_open

    cfg_dict = read_model_config(model_dir)
    cfg, moe = ModelConfig.from_dict(cfg_dict["model"]), MoEConfig.from_dict(cfg_dict["moe"])
    e = _expert_index(moe, expert, model_dir)
    path = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise MeteoraInputError(f"{path}: missing weights file; re-run `meteora-jax convert`.")

    modules = {}
    with safe_open(path, framework="numpy") as f:
        bf16 = stored_bf16_names(f.metadata())
        names = set(f.keys())

        def row(key: str) -> np.ndarray:
            if key not in names:
                raise MeteoraInputError(
                    f"{path}: tensor {key!r} is missing (the config lists {list(moe.target_modules)} as "
                    "expert targets). The directory is incomplete; `meteora-jax info --check` lists what is wrong."
                )
            return from_stored(key, np.asarray(f.get_slice(key)[e]), bf16).astype(np.float32)

        for layer in range(cfg.num_hidden_layers):
            for proj in moe.target_modules:
                prefix = f"layers.{layer}.{'attn' if proj in ATTN_PROJECTIONS else 'mlp'}.{proj}"
                a_dr, b_ro = row(f"{prefix}.lora_a_edr"), row(f"{prefix}.lora_b_ero")
                scaling = float(row(f"{prefix}.scaling_e"))
                r = _effective_rank(a_dr, b_ro)
                if r == 0 or scaling == 0.0:
                    continue
                if not (np.isfinite(a_dr).all() and np.isfinite(b_ro).all() and np.isfinite(scaling)):
                    raise MeteoraInputError(
                        f"{path}: expert {expert!r} holds NaN/Inf values at {hf_module_name(layer, proj)}; "
                        "the model was saved after a diverged run. Export from a healthy checkpoint."
                    )
                modules[hf_module_name(layer, proj)] = (
                    np.ascontiguousarray(a_dr[:, :r].T),
                    np.ascontiguousarray(b_ro[:r].T),
                    scaling,
                )
    return modules, cfg, cfg_dict


def adapter_config(modules: dict[str, tuple[np.ndarray, np.ndarray, float]], base: str | None) -> dict:
    """A PEFT ``LoraConfig`` dict whose per-module rank and ``alpha / r`` are exactly those of ``modules``."""
    rank_alpha = {name: (a.shape[0], scaling * a.shape[0]) for name, (a, _, scaling) in modules.items()}
    (r0, alpha0), _ = collections.Counter(rank_alpha.values()).most_common(1)[0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(n): r for n, (r, _) in rank_alpha.items() if r != r0},
        "alpha_pattern": {re.escape(n): a for n, (_, a) in rank_alpha.items() if a != alpha0},
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }


def export_peft_adapter(
    model_dir: str | os.PathLike, expert: str, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> str:
    """Writes expert ``expert`` of ``model_dir`` as a PEFT adapter directory ``out_dir`` (atomically)."""
    from safetensors.numpy import save_file

    model_dir = os.fspath(model_dir)
    modules, _, cfg_dict = expert_modules(model_dir, expert)
    if not modules:
        raise MeteoraInputError(
            f"{model_dir}: expert {expert!r} is zero everywhere (no module where it contributes); there is "
            "no adapter to export."
        )
    base = (cfg_dict.get("converted_from") or {}).get("base")
    tensors = {}
    for name, (a_rd, b_or, _) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_rd
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_or
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})
        write_json_atomic(os.path.join(tmp, CONFIG_FILE), adapter_config(modules, base))
    return os.path.abspath(os.fspath(out_dir))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-adapter",
        help="Write experts of a model back out as PEFT LoRA adapters.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a model directory (from `convert` or `train-gate`)")
    p.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="NAME",
        help="the expert to export; repeat for several, or `all` for every expert",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the adapter directory to create; with several experts, one sub-directory per expert",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list(args.expert)
    if names == ["all"]:
        names = list(MoEConfig.from_dict(read_model_config(args.model)["moe"]).expert_names)
    for name in names:
        out = args.out if len(names) == 1 else os.path.join(args.out, name)
        print(
            f"wrote {export_peft_adapter(args.model, name, out, overwrite=args.overwrite)} (expert {name!r})"
        )
    return 0
