"""``meteora-jax info``: what a model directory holds, read from its config and the safetensors header.

Without ``--check`` no tensor is read (only the header: names, dtypes, shapes), so it is instant on an 8B
model. ``--check`` also reads every tensor, one at a time, and reports each NaN / Inf one, and compares every
name and shape with the model its config builds: the quick answer to "is this directory intact?".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError
from meteora_jax.io import (
    CONFIG_FILE,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    from_stored,
    read_model_config,
    stored_bf16_names,
)
from meteora_jax.model.params_io import non_finite_count

REPORT_FILE = "training_report.json"  # train.loop.REPORT_FILE (not imported: that pulls in optax and orbax)
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "U16": 2,
    "I64": 8,
    "I32": 4,
    "U8": 1,
    "I8": 1,
    "BOOL": 1,
}


def _role(name: str) -> str:
    """Which parameter role a flat name is (``meteora_jax.params``): what trains, what is frozen."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gate_de":
        return "gates"
    if leaf in ("lora_a_edr", "lora_b_ero", "scaling_e"):
        return "experts"
    return "base"


def _header(path: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], set[str]]:
    """{name: (shape, safetensors dtype)} and the names stored as bf16 bits, from the header alone."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise MeteoraInputError(f"{path}: missing weights file; re-run `meteora-jax convert`.")
    try:
        with safe_open(path, framework="numpy") as f:
            bf16 = stored_bf16_names(f.metadata())
            return {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
            }, bf16
    except (SafetensorError, OSError, ValueError) as e:
        raise MeteoraInputError(
            f"{path}: cannot read the safetensors header ({e}). The file is truncated or not safetensors; "
            "re-create it with `meteora-jax convert`."
        ) from e


def _non_finite(path: str, bf16: set[str]) -> list[str]:
    """Names of the tensors holding NaN or Inf, reading one tensor at a time."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return [k for k in f.keys() if non_finite_count(from_stored(k, f.get_tensor(k), bf16))]


def model_info(model_dir: str | os.PathLike, *, check: bool = False) -> dict:
    """A JSON-able summary of a model directory; ``check`` adds ``problems`` (an empty list: intact)."""
    from meteora_jax.model.params_io import expected_shapes

    model_dir = os.fspath(model_dir)
    cfg = read_model_config(model_dir)
    model_cfg, moe = ModelConfig.from_dict(cfg["model"]), MoEConfig.from_dict(cfg["moe"])
    weights = os.path.join(model_dir, WEIGHTS_FILE)
    header, bf16 = _header(weights)
    params = {"base": 0, "experts": 0, "gates": 0}
    nbytes = dict.fromkeys(params, 0)
    for name, (shape, dtype) in header.items():
        n = math.prod(shape)
        params[_role(name)] += n
        nbytes[_role(name)] += n * _ITEMSIZE.get(dtype, 4)
    training = cfg.get("training")
    report_path = os.path.join(model_dir, REPORT_FILE)
    held_out = None
    if os.path.isfile(report_path):
        with open(report_path) as f:
            held_out = (json.load(f) or {}).get("held_out")
    info = {
        "model_dir": os.path.abspath(model_dir),
        "dtype": cfg.get("dtype"),
        "architecture": {
            "layers": model_cfg.num_hidden_layers,
            "hidden_size": model_cfg.hidden_size,
            "intermediate_size": model_cfg.intermediate_size,
            "attention_heads": model_cfg.num_attention_heads,
            "kv_heads": model_cfg.num_key_value_heads,
            "vocab_size": model_cfg.vocab_size,
            "context": model_cfg.max_position_embeddings,
        },
        "experts": list(moe.expert_names),
        "rank": moe.rank,
        "target_modules": list(moe.target_modules),
        "routing": {"top_k": moe.top_k, "temperature": moe.temperature, "mode": moe.routing},
        "implementation": moe.implementation,
        "gates_trained": training is not None,
        "training": training,
        "held_out": held_out,
        "params": params,
        "bytes": nbytes,
        "weights_file_bytes": os.path.getsize(weights),
        "tokenizer_files": [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, f))],
        "provenance": {k: cfg[k] for k in ("converted_from", "added_adapter") if k in cfg},
    }
    if check:
        want = expected_shapes(model_cfg, moe)
        got = {k: v[0] for k, v in header.items()}
        problems = [f"missing tensor {k} {want[k]}" for k in sorted(set(want) - set(got))]
        problems += [f"unexpected tensor {k} {got[k]}" for k in sorted(set(got) - set(want))]
        problems += [
            f"tensor {k} has shape {got[k]}, the config expects {want[k]}"
            for k in sorted(set(want) & set(got))
            if tuple(got[k]) != tuple(want[k])
        ]
        problems += [f"tensor {k} holds NaN/Inf values" for k in _non_finite(weights, bf16)]
        info["problems"] = problems
    return info


def _human(n: float, units: tuple[str, ...], step: float) -> str:
    """``n`` in the largest unit that keeps it >= 1 (``_human(1536, ("B", "KiB"), 1024)`` = "1.5 KiB")."""
    unit = 0
    while n >= step and unit < len(units) - 1:
        n, unit = n / step, unit + 1
    return f"{n:,.0f} {units[0]}" if unit == 0 else f"{n:,.1f} {units[unit]}"


def format_info(info: dict) -> str:
    a = info["architecture"]
    r = info["routing"]
    lines = [
        f"{info['model_dir']}",
        f"  base       {a['layers']} layers, hidden {a['hidden_size']}, mlp {a['intermediate_size']}, "
        f"heads {a['attention_heads']}/{a['kv_heads']} (q/kv), vocab {a['vocab_size']}, context {a['context']}; "
        f"{info['dtype']}",
        f"  experts    {len(info['experts'])}, rank {info['rank']}, on {', '.join(info['target_modules'])}",
        f"             {', '.join(info['experts'])}",
        f"  routing    top-{r['top_k']}, gate temperature {r['temperature']}, {r['mode']}; kernels: "
        f"{info['implementation'] or 'automatic'}",
        "  params     "
        + ", ".join(
            f"{k} {_human(v, ('', 'k', 'M', 'B'), 1000).replace(' ', '')} "
            f"({_human(info['bytes'][k], ('B', 'KiB', 'MiB', 'GiB'), 1024)})"
            for k, v in info["params"].items()
        ),
    ]
    t = info["training"]
    if t:
        lines.append(
            f"  gates      trained: {t.get('steps')} steps, mode {t.get('mode')}, prompt template "
            f"{t.get('prompt_template')}"
        )
    else:
        lines.append(
            "  gates      NOT trained (as converted): run `meteora-jax train-gate` before routing by them"
        )
    held = info.get("held_out") or {}
    if "routing_acc" in held:
        lines.append(f"  held-out   routing accuracy {held['routing_acc']:.3f} (all tokens)")
    lines.append(f"  tokenizer  {', '.join(info['tokenizer_files']) or 'none (token ids only)'}")
    if "problems" in info:
        lines.append(
            "  check      OK: every tensor present, shaped as the config says, finite"
            if not info["problems"]
            else "  check      "
            + f"{len(info['problems'])} problem(s):\n"
            + "\n".join(f"             - {p}" for p in info["problems"])
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="Show what a model directory holds (experts, routing, sizes); --check verifies it.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=f"a model directory (holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    p.add_argument(
        "--check",
        action="store_true",
        help="also read every tensor: report missing / unexpected / misshapen ones and NaN or Inf values "
        "(exit status 1 if any)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model, check=args.check)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    if info.get("problems"):
        print(f"{args.model}: {len(info['problems'])} problem(s) found; see above.", file=sys.stderr)
        return 1
    return 0
