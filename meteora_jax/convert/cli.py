"""``meteora-jax convert``: parse, call ``convert.convert``, print where the model went. Nothing else."""

from __future__ import annotations

import argparse
import sys
import warnings

from meteora_jax.errors import MeteoraInputError

DESCRIPTION = """\
Build a MeteoRA model: a base checkpoint plus N LoRA adapters embedded as experts, with one gate per
adapted projection. Two sources:

  meteora-jax convert --base BASE --adapter NAME=PATH [--adapter NAME=PATH ...] --out DIR
      PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors, or .bin with torch installed).
      Expert order = the order of --adapter. Gates are fresh (small random, --seed): train them next.

  meteora-jax convert --base BASE --meteora-checkpoint FILE --tasks t1,t2,... --out DIR
      An original MeteoRA model.safetensors (base + stacked lora_A/lora_B + moe_gate per projection).
      Its experts are in alphabetical task order; --tasks names them (sorted for you). Trained gates kept.

BASE is an HF checkpoint directory (config.json + safetensors, or pytorch_model.bin read tensors-only with
torch installed) or a .gguf file; its tokenizer is copied.
Load the result with `import meteora_jax as mj; model = mj.load(DIR)`.
"""


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path); checked here rather than by argparse so the message has our form."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise MeteoraInputError(
            f"--adapter {text!r} is not NAME=PATH: give each adapter an expert name, e.g. "
            "--adapter gsm8k=/path/to/gsm8k_lora."
        )
    return name.strip(), path.strip()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="Build a MeteoRA model from a base checkpoint and LoRA adapters.",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, metavar="PATH", help="HF checkpoint directory or .gguf file.")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a PEFT LoRA adapter directory and its expert name; repeat for each expert, in expert order.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to create.")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="experts per token (default 2, or 1 with one expert).",
    )
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="gate softmax temperature.")
    p.add_argument(
        "--routing",
        choices=("topk_then_softmax", "softmax_then_topk"),
        default="topk_then_softmax",
        help="order of top-k and softmax (default: MeteoRA's inference order, topk_then_softmax).",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights dtype.")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh gates (PEFT route).")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists.")
    g = p.add_argument_group("original MeteoRA checkpoint")
    g.add_argument("--meteora-checkpoint", metavar="FILE", help="an original MeteoRA model.safetensors.")
    g.add_argument("--tasks", metavar="t1,t2,...", help="the checkpoint's task names (one per expert).")
    g.add_argument(
        "--meteora-adapter-dir",
        metavar="DIR",
        help="DIR/<task>/adapter_config.json give each expert's lora_alpha / r (as MeteoRA's loader reads them).",
    )
    g.add_argument(
        "--lora-alpha",
        type=float,
        metavar="A",
        help="lora_alpha of every expert when --meteora-adapter-dir is not given (default 2 r, LLaMA-Factory's).",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meteora_jax.convert.convert import convert

    adapters = [parse_adapter(a) for a in args.adapter]
    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise MeteoraInputError("--tasks is empty; pass the task names as t1,t2,...")
    elif args.meteora_checkpoint is None and (args.meteora_adapter_dir or args.lora_alpha is not None):
        raise MeteoraInputError("--meteora-adapter-dir / --lora-alpha only apply with --meteora-checkpoint.")
    n_experts = len(tasks) if tasks is not None else len(adapters)
    top_k = args.top_k if args.top_k is not None else max(1, min(2, n_experts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            out = convert(
                args.base,
                adapters or None,
                args.out,
                meteora_checkpoint=args.meteora_checkpoint,
                tasks=tasks,
                top_k=top_k,
                temperature=args.temperature,
                dtype=args.dtype,
                routing=args.routing,
                overwrite=args.overwrite,
                seed=args.seed,
                lora_alpha=args.lora_alpha,
                meteora_adapter_dir=args.meteora_adapter_dir,
                progress=not args.quiet,
            )
        finally:
            # Our warnings (an adapter saved for another base name, an assumed scaling) as plain lines.
            for w in caught:
                if issubclass(w.category, UserWarning) and not issubclass(w.category, DeprecationWarning):
                    print(f"meteora-jax convert: warning: {w.message}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
