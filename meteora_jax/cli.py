"""The ``meteora-jax`` command. Thin: each sub-command lives in the module that does the work.

Each module named in ``SUBCOMMANDS`` exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Modules are imported lazily so that ``--help`` stays fast and a missing optional
dependency of one command does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from meteora_jax import knobs
from meteora_jax.errors import MeteoraInputError

# sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("meteora_jax.convert.cli", "Build a MeteoRA model from a base checkpoint and LoRA adapters."),
    "data": ("meteora_jax.data.cli", "Prepare task data (e.g. the 22 BIG-bench tasks MeteoRA used)."),
    "train-gate": ("meteora_jax.train.cli", "Train the gates (base and experts frozen)."),
    "add-adapter": ("meteora_jax.train.add_adapter", "Add an adapter to a trained model and train briefly."),
    "generate": ("meteora_jax.generate.cli", "Generate text with a converted model."),
    "eval": ("meteora_jax.eval.cli", "Evaluate per task, with base / oracle baselines."),
    "serve": ("meteora_jax.serve.cli", "Serve a model over HTTP (OpenAI-compatible completions and chat)."),
    "info": ("meteora_jax.info", "Show what a model directory holds; --check verifies it."),
    "export-adapter": ("meteora_jax.convert.export_peft", "Write experts back out as PEFT LoRA adapters."),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meteora-jax",
        description=(
            "MeteoRA in JAX: embed many task LoRA adapters as experts of one model, train per-token gates, "
            "and generate / evaluate with no task label at inference."
        ),
        epilog=(
            "Compiled programs are kept in JAX's persistent cache (~/.cache/meteora-jax/xla, or "
            "$XDG_CACHE_HOME/meteora-jax/xla), so a second run starts faster; METEORA_JAX_COMPILE_CACHE=DIR moves "
            "it, METEORA_JAX_COMPILE_CACHE=0 turns it off."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("meteora_jax"):
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv or "-h" in argv or "--help" in argv else 2
    try:
        knobs.set_from_env()
        if args.command != "data":  # every other command compiles a model's programs
            from meteora_jax import compile_cache

            compile_cache.enable()
        return int(args.func(args) or 0)
    except MeteoraInputError as e:
        print(f"meteora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output path.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
