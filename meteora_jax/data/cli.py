"""``meteora-jax data ...``: prepare task data. Thin: parse, call one library function, print."""

from __future__ import annotations

import argparse
import json
from typing import Any

from meteora_jax.errors import MeteoraInputError

_BIGBENCH_HELP = """\
Build MeteoRA's BIG-bench tasks in the task-data layout: OUT/<task>/train.jsonl and test.jsonl, one
{"prompt", "response", "subtask"} object a line, plus OUT/bigbench_manifest.json (counts, seed, source).

The examples come from BIG-bench's task.json files: by default inside the PyPI sdist bigbench==1.0.0
(358 MB), read, never installed or extracted. Without --sdist it is downloaded once into
~/.cache/meteora-jax/ (or $METEORA_JAX_CACHE) and checked against a pinned sha256. That sdist may no longer
be downloadable from PyPI: --sdist also takes a checkout of https://github.com/google/BIG-bench (its root,
bigbench/ or bigbench/benchmark_tasks/) or GitHub's archive tarball of it (BIG-bench-main.tar.gz), whose
task data may differ from the 1.0.0 release in detail (the manifest records the source and its digest).

Sub-tasks (e.g. logical_deduction/three_objects) are merged into their task, as MeteoRA did. Prompts are
stored without a chat template; the trainer adds it. The split is per sub-task and deterministic given
--seed: --test-size of each sub-task is held out (at least 16 examples), BIG-bench's own rule by default.
The output appears all at once (built in OUT.tmp-*, then renamed).
"""


def _test_size(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give a fraction in (0, 1) or a count >= 1")


def register(subparsers: Any) -> None:
    """Add the ``data`` command and its sub-commands to the top-level CLI."""
    data = subparsers.add_parser(
        "data",
        help="Prepare task data (e.g. the 22 BIG-bench tasks MeteoRA used).",
        description="Prepare task data in MeteoRA's layout: DATA/<task>/{train,test}.jsonl.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SOURCE")
    bb = sub.add_parser(
        "bigbench",
        help="Import MeteoRA's 22 BIG-bench tasks (bigbench==1.0.0 sdist, or a BIG-bench checkout/archive).",
        description=_BIGBENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bb.add_argument("--out", required=True, help="Output directory (refused if it exists and is not empty).")
    bb.add_argument(
        "--tasks",
        default=None,
        help="Comma-separated task names (default: MeteoRA's 22 BIG-bench tasks).",
    )
    bb.add_argument(
        "--sdist",
        default=None,
        help="The bigbench-1.0.0 sdist, a GitHub archive of google/BIG-bench (.tar.gz), or a BIG-bench "
        "checkout directory (default: the cached sdist, else download).",
    )
    bb.add_argument(
        "--seed", type=int, default=0, help="Seed of the train/test split and choice order (default 0)."
    )
    bb.add_argument(
        "--test-size",
        type=_test_size,
        default=0.2,
        help="Held out per sub-task: a fraction in (0, 1) or a count (default 0.2, as BIG-bench's split).",
    )
    bb.add_argument(
        "--min-test", type=int, default=16, help="Hold out at least this many per sub-task (default 16)."
    )
    bb.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out.")
    bb.add_argument("--quiet", action="store_true", help="No progress bars.")
    bb.set_defaults(func=_run_bigbench)
    data.set_defaults(func=lambda args: _no_source(data))


def _no_source(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _run_bigbench(args: argparse.Namespace) -> int:
    from meteora_jax.data.bigbench import build_bigbench

    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise MeteoraInputError("--tasks is empty; give comma-separated task names or leave it out.")
    summary = build_bigbench(
        args.out,
        sdist=args.sdist,
        tasks=tasks,
        seed=args.seed,
        test_size=args.test_size,
        min_test=args.min_test,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    width = max(len(t) for t in summary["tasks"])
    for task, info in summary["tasks"].items():
        print(
            f"{task:<{width}}  train {info['train']:>6}  test {info['test']:>6}  subtasks {len(info['subtasks'])}"
        )
    if not summary["sdist_is_pinned_release"]:
        # A checkout or GitHub archive is not the 1.0.0 sdist MeteoRA's data came from: tasks may differ.
        what = {
            "directory": "a BIG-bench checkout",
            "archive": "a BIG-bench archive",
        }.get(summary["source_kind"], "not the bigbench 1.0.0 release (sha256 differs)")
        print(
            f"warning: {summary['sdist']} is {what}, so the data may differ from the bigbench 1.0.0 release "
            "in detail; the manifest records the source and its digest."
        )
    print(json.dumps({"out": summary["out"], "tasks": len(summary["tasks"])}))
    return 0
