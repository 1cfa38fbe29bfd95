"""``meteora-jax train-gate``: parse, load the config, call ``train_gates``, print. Nothing else lives here."""

from __future__ import annotations

import argparse

_EPILOG = """\
The config is the defaults, then --config FILE (YAML; see configs/train_gate.yaml), then each --set key=value
(typed: --set learning_rate=3e-4 --set response_only=true). --help-config lists every key.
Checkpoints and metrics.jsonl go to OUT.train/ (or work_dir); OUT itself appears, complete, at the end.
Multi-host: launch one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set
(or METEORA_JAX_DISTRIBUTED=1 on SLURM / Cloud TPU); every process runs the same command.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-gate",
        help="Train the gates (base and experts frozen).",
        description="Train MeteoRA's per-projection gates on task data (gate CE against the task id + LM loss).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model directory from `meteora-jax convert`")
    p.add_argument("--data", help="task-data directory: <task>/train.jsonl (+ test.jsonl)")
    p.add_argument("--out", help="output model directory (must not exist, unless --overwrite)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the config)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT.train/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meteora_jax.errors import MeteoraInputError
    from meteora_jax.train.config import describe, load_config

    if args.help_config:
        print(describe())
        return 0
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        raise MeteoraInputError(f"missing {', '.join(missing)} (see meteora-jax train-gate --help).")
    cfg = load_config(args.config, args.set, steps=args.steps)

    from meteora_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from meteora_jax.train.loop import train_gates

    train_gates(args.model, args.data, args.out, cfg, resume=args.resume, overwrite=args.overwrite)
    return 0
