"""``meteora-jax eval``: per-task scores of a model beside base / oracle / single-adapter baselines.

Thin: read the task folders (``data.tasks.read_split``), call ``eval.harness.evaluate``, write the report.
``--composite N`` (repeatable) adds MeteoRA's composite-N prompts (``eval.composite``).
"""

from __future__ import annotations

import argparse
import sys

from meteora_jax.generate.options import add_model_options, apply_model_options
from meteora_jax.train.data import PROMPT_TEMPLATE_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="Evaluate per task, with base / oracle baselines.")
    p.add_argument("--model", required=True, help="a model directory written by `meteora-jax convert`")
    p.add_argument("--data", required=True, help="task folders, each with test.jsonl (`meteora-jax data`)")
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: every task folder)")
    p.add_argument(
        "--baseline",
        action="append",
        default=None,
        help="oracle | base | adapter:NAME (repeatable; default: base and oracle)",
    )
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--composite", type=int, action="append", default=None, help="composite-N (3, 5 or 10)")
    p.add_argument("--composite-samples", type=int, default=200)
    p.add_argument(
        "--composite-protocol",
        default="numbered",
        choices=["numbered", "turns"],
        help="numbered: all questions, then one generation writing 'Answer i:' for each (MeteoRA's format); "
        "turns: one multi-turn chat, one answer per turn (small models that end after one answer)",
    )
    p.add_argument("--prompt-template", default="auto", help=PROMPT_TEMPLATE_HELP)
    add_model_options(p)
    p.add_argument("--out", default="eval_out", help="output directory (results.json, results.md, PNGs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import meteora_jax as mj
    from meteora_jax.data.tasks import read_split
    from meteora_jax.errors import MeteoraInputError
    from meteora_jax.eval.harness import evaluate, markdown_table, write_report
    from meteora_jax.tokenizer import load_tokenizer

    if args.limit is not None and args.limit < 1:
        raise MeteoraInputError(f"--limit must be >= 1, got {args.limit}.")
    from meteora_jax.train.data import prompt_format_for

    tokenizer = load_tokenizer(args.model)
    prompt_format = prompt_format_for(args.model, args.prompt_template)
    examples = read_split(args.data, args.split, args.tasks)
    if args.limit:
        examples = {t: ex[: args.limit] for t, ex in examples.items()}
    model = mj.load(args.model, dtype=args.dtype)
    apply_model_options(model, args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = evaluate(
        model,
        tokenizer,
        examples,
        baselines=args.baseline if args.baseline is not None else ["base", "oracle"],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        prompt_format=prompt_format,
        progress=log,
    )
    if args.composite:
        from meteora_jax.eval.composite import evaluate_composite

        report["composite"] = {
            str(n): evaluate_composite(
                model,
                tokenizer,
                args.data,
                n,
                num_samples=args.composite_samples,
                protocol=args.composite_protocol,
                prompt_format=prompt_format,
                progress=log,
            )
            for n in args.composite
        }
    paths = write_report(report, args.out)
    print(markdown_table(report))
    print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
    return 0
