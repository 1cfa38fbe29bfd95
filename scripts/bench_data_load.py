"""How long the study's training data takes to tokenise: ``encode_examples`` (one batched tokenizer call per task
and kind of text, chat_no_system's system head rendered once per tokenizer) against the per-example path it
replaced (one tokenizer call and one head render per text), in the same process, with a token-for-token check.

Needs a study work dir whose ``data`` and ``base`` steps are done (CPU is enough; no GPU, no download):

    python scripts/reproduce_bigbench.py run --work-dir /tmp/study/seed0 --until base
    python scripts/bench_data_load.py --work-dir /tmp/study/seed0

Prints a table and writes ``benchmarks/results/data_load.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meteora_jax.io import write_text_atomic  # noqa: E402


def per_example_encode(examples, tokenizer, cfg, names) -> list:  # noqa: ANN001
    """The path ``encode_examples`` replaced: one tokenizer call per text, the system head rendered per prompt."""
    from meteora_jax.train import data as D
    from meteora_jax.train.conversations import turn_tail_text

    fmt = D.PromptFormatter(tokenizer, cfg.prompt_template)
    tail = turn_tail_text(tokenizer, cfg.prompt_template) if cfg.composite_fraction > 0 else None
    eos = [tokenizer.eos_token_id] if cfg.add_eos else []
    out = []
    for name in names:
        for ex in examples[name]:
            seq = fmt.ids(ex.prompt, cfg.add_bos) + D._encode(tokenizer, ex.response) + eos
            out.append((seq, D._encode(tokenizer, tail(ex.prompt)) if tail else None))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", required=True, help="a study work dir with the data and base steps done")
    ap.add_argument(
        "--config", default="configs/bigbench_small.yaml", help="study config (its gates section)"
    )
    ap.add_argument("--out", default="benchmarks/results/data_load.json", help="JSON path")
    args = ap.parse_args(argv)

    from meteora_jax.data.tasks import read_split
    from meteora_jax.errors import MeteoraInputError
    from meteora_jax.study import config as C
    from meteora_jax.tokenizer import load_tokenizer
    from meteora_jax.train import data as D

    work = Path(args.work_dir)
    if not (work / "data").is_dir() or not (work / "base" / "hf").is_dir():
        raise MeteoraInputError(
            f"{work}: no data/ and base/hf/ here; run `python scripts/reproduce_bigbench.py run --work-dir {work} "
            "--until base` first."
        )
    cfg = C.load_study_config(Path(args.config), [f"work_dir={work}"]).gate_train_config(2)
    tok = load_tokenizer(str(work / "base" / "hf"))
    examples = read_split(str(work / "data"), "train")
    names = sorted(examples)

    t0 = time.perf_counter()
    enc = D.encode_examples(examples, tok, cfg, names, max_len=1 << 20)
    batched_s = time.perf_counter() - t0
    cached_head = D._system_head
    D._system_head = lambda tokenizer, placeholder, render, fresh=False: render(placeholder, False)  # noqa: E731
    try:
        t0 = time.perf_counter()
        ref = per_example_encode(examples, tok, cfg, names)
        per_example_s = time.perf_counter() - t0
    finally:
        D._system_head = cached_head
    identical = len(ref) == len(enc.ids) and all(
        seq == enc.ids[i].tolist() and (t is None or t == enc.tail_ids[i].tolist())
        for i, (seq, t) in enumerate(ref)
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU, {os.cpu_count()} cores",
        "command": "python scripts/bench_data_load.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "prompt_template": cfg.prompt_template,
        "composite_fraction": cfg.composite_fraction,
        "examples": len(enc.ids),
        "per_example_s": per_example_s,
        "batched_s": batched_s,
        "speedup": per_example_s / batched_s,
        "identical": identical,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"{'path':<14}{'examples':>10}{'seconds':>10}")
    print(f"{'per example':<14}{len(ref):>10}{per_example_s:>10.1f}")
    print(f"{'batched':<14}{len(enc.ids):>10}{batched_s:>10.1f}")
    print(f"speedup {result['speedup']:.2f}x, token for token identical: {identical}\nJSON: {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
