"""``meteora-jax add-adapter``: one more expert in a trained MeteoRA model, without starting over.

The new PEFT adapter is read by the converter's reader and laid out by ``stack_experts`` (a one-expert
stack), then appended as expert E: every ``lora_a_edr`` / ``lora_b_ero`` / ``scaling_e`` grows by one expert
(ranks zero-padded to the larger of the two, which adds exactly nothing), and every gate ``gate_de`` [d, E]
grows by one column drawn like a converted gate's (small, seeded), the trained columns kept as they are.
A projection only one side targets gets zero factors and scaling 0 on the other side.

Then the gates train briefly (gate-only by default, so no base or expert weight moves). The data should hold
the new task *and* the old ones: with the new task alone, the gate CE would teach every token to pick the
new expert. Tasks of the data that are missing are reported.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from meteora_jax.errors import MeteoraInputError

_EXPERT_KEYS = ("lora_a_edr", "lora_b_ero", "scaling_e", "gate_de")


def extend_model(model_dir: str, name: str, adapter_dir: str, *, seed: int = 0):  # noqa: ANN201 (MeteoraLlama)
    """The model of ``model_dir`` with adapter ``adapter_dir`` appended as expert ``name`` (fresh gate column)."""
    import dataclasses

    from meteora_jax.config import PROJECTIONS
    from meteora_jax.convert.peft_lora import load_peft_adapter
    from meteora_jax.convert.stack_experts import module_prefix, stack_experts
    from meteora_jax.io import load
    from meteora_jax.model.params_io import build_model, flat_params

    model = load(model_dir)
    cfg, moe = model.config, model.moe_config
    if name in moe.expert_names:
        raise MeteoraInputError(
            f"{model_dir} already has an expert named {name!r} (experts: {list(moe.expert_names)}); pick a new NAME."
        )
    adapter = load_peft_adapter(adapter_dir, cfg)
    new_moe, new_flat = stack_experts(cfg, [name], [adapter], top_k=1, seed=seed + len(moe.expert_names))
    old = {k: np.asarray(v) for k, v in flat_params(model).items()}
    e_old = moe.num_experts
    rank = max(moe.rank, new_moe.rank)
    targets = tuple(p for p in PROJECTIONS if p in set(moe.target_modules) | set(new_moe.target_modules))
    flat = {k: v for k, v in old.items() if k.rsplit(".", 1)[-1] not in _EXPERT_KEYS}
    rng = np.random.default_rng(seed)
    for layer in range(cfg.num_hidden_layers):
        for proj in targets:
            d_in, d_out = cfg.projection_shape(proj)
            p = module_prefix(layer, proj)
            a = np.zeros((e_old + 1, d_in, rank), np.float32)
            b = np.zeros((e_old + 1, rank, d_out), np.float32)
            s = np.zeros((e_old + 1,), np.float32)
            g = np.zeros((d_in, e_old + 1), np.float32)
            if f"{p}.lora_a_edr" in old:
                a[:e_old, :, : moe.rank] = old[f"{p}.lora_a_edr"]
                b[:e_old, : moe.rank] = old[f"{p}.lora_b_ero"]
                s[:e_old] = old[f"{p}.scaling_e"]
                g[:, :e_old] = old[f"{p}.gate_de"]
            else:
                g[:, :e_old] = 0.02 * rng.standard_normal((d_in, e_old))
            if f"{p}.lora_a_edr" in new_flat:
                a[e_old, :, : new_moe.rank] = new_flat[f"{p}.lora_a_edr"][0]
                b[e_old, : new_moe.rank] = new_flat[f"{p}.lora_b_ero"][0]
                s[e_old] = new_flat[f"{p}.scaling_e"][0]
                g[:, e_old] = new_flat[f"{p}.gate_de"][:, 0]
            else:
                g[:, e_old] = 0.02 * rng.standard_normal(d_in)
            flat.update({f"{p}.lora_a_edr": a, f"{p}.lora_b_ero": b, f"{p}.scaling_e": s, f"{p}.gate_de": g})
    moe2 = dataclasses.replace(moe, expert_names=(*moe.expert_names, name), rank=rank, target_modules=targets)
    out = build_model(cfg, moe2, flat, dtype=model.dtype, source=f"{model_dir} + {adapter_dir}")
    out.model_dir = model.model_dir
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "add-adapter",
        help="Add an adapter to a trained model and train briefly.",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--model", required=True, help="a MeteoRA model directory (converted or trained)")
    p.add_argument(
        "--adapter", required=True, metavar="NAME=PATH", help="the new PEFT LoRA adapter directory"
    )
    p.add_argument(
        "--data", required=True, help="task data holding the new task (and, ideally, the old ones)"
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=100, help="gate-training steps (default 100)")
    p.add_argument("--config", default=None, help="YAML train config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meteora_jax.data.tasks import list_tasks
    from meteora_jax.train.config import load_config
    from meteora_jax.train.loop import train_gates

    if "=" not in args.adapter:
        raise MeteoraInputError(f"--adapter {args.adapter!r}: expected NAME=PATH.")
    name, path = args.adapter.split("=", 1)
    cfg = load_config(args.config, args.set, steps=args.steps)
    tasks = list_tasks(args.data)
    if name not in tasks:
        raise MeteoraInputError(
            f"{args.data}: no task folder {name!r} for the new adapter: add {name}/train.jsonl so its gate column "
            "can learn."
        )
    model = extend_model(args.model, name, path, seed=cfg.seed)
    missing = [t for t in model.expert_names[:-1] if t not in tasks]
    if missing:
        print(f"note: no data for the old tasks {missing}: their routing may drift toward {name!r}.")
    train_gates(
        args.model,
        args.data,
        args.out,
        cfg,
        overwrite=args.overwrite,
        model=model,
        extra_config={"added_adapter": {"name": name, "path": os.path.abspath(path)}},
    )
    return 0
