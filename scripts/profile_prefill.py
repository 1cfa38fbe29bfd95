"""Where prefill time goes: kernel time by kind (GEMM, attention, grouped-LoRA kernels, other XLA fusions,
copies) for one prompt of ``--tokens`` tokens, per grouped-LoRA path, beside the same model with experts off.

Issue 5 asks for a 4096-token prefill no slower than HF transformers' base model. ``bench_generate.py`` gives
the end-to-end times; this script says which kernels make the difference. For each variant it compiles the
sampler's prefill (``generate.sampler._prefill``: forward, KV-cache write, last-position logits, first
token) once, times it without the profiler (median wall ms of ``--reps``), then runs it once under
``jax.profiler.trace`` and sums the device kernels by kind (``kind_of``). On CPU there are no device kernels
in the trace; the script says so and still times the prefill.

    python3 scripts/profile_prefill.py                            # H200: Llama-3-8B shapes, 4096 tokens
    python3 scripts/profile_prefill.py --tiny --tokens 64 --reps 1   # CPU smoke test

Writes ``$OUT/profile_prefill.json`` (else benchmarks/results/profile_prefill.json) and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hlo_dump  # noqa: E402
from variant_knobs import KNOBS, knobs_set, parse_variant  # noqa: E402

from meteora_jax.io import write_text_atomic  # noqa: E402
from pallas_kernels import timing  # noqa: E402

# First match wins: our Pallas kernels are named lora_* (pallas_gpu.py, pallas_gpu_decode.py); cuDNN's
# attention kernels carry fmha/flash; cuBLAS / cuBLASLt / XLA's Triton GEMM fusions carry gemm, xmma, nvjet.
KINDS = (
    ("copy", re.compile(r"memcpy|memset", re.I)),
    ("lora_kernel", re.compile(r"lora_", re.I)),
    ("attention", re.compile(r"fmha|flash|cudnn|attention|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma", re.I)),
)


def kind_of(kernel_name: str) -> str:
    """The kind of one device kernel, from its name; ``other`` = XLA's own fusions (norms, RoPE, routing...)."""
    for kind, pattern in KINDS:
        if pattern.search(kernel_name):
            return kind
    return "other"


def kernels_by_kind(kernels: list[tuple[float, float, str]], top: int) -> dict:
    """``timing.gpu_kernel_events``' (start us, duration us, name) of ONE prefill -> ms and counts per kind,
    busy ms (union of the intervals: streams overlap) and the top kernels by summed time."""
    ms: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    busy, end = 0.0, float("-inf")
    for ts, dur, name in sorted(kernels):
        kind = kind_of(name)
        ms[kind] += dur / 1e3
        count[kind] += 1
        by_name[name].append(dur)
        busy += max(0.0, ts + dur - max(ts, end))
        end = max(end, ts + dur)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "busy_ms": busy / 1e3,
        "ms_by_kind": dict(ms),
        "kernels_by_kind": dict(count),
        "top_kernels": [
            {"name": n[:120], "kind": kind_of(n), "calls": len(d), "ms": sum(d) / 1e3} for n, d in ranked
        ],
    }


# +f32gate: the float32 gate GEMMs of before split_gate_logits (session 8's A/B), i.e. +split_gate=inf
_ALIASES = {"f32gate": "split_gate=inf"}


def profile_variant(model, variant: str, args: argparse.Namespace) -> dict:  # noqa: ANN001
    name, knobs = parse_variant(variant, _ALIASES)
    with knobs_set(knobs):
        return _profile_variant(model, variant, name, args)


def _profile_variant(model, variant: str, name: str, args: argparse.Namespace) -> dict:  # noqa: ANN001
    import jax
    import jax.numpy as jnp

    from meteora_jax.generate.sampler import GREEDY, inference_packs, prefill_program
    from meteora_jax.generate.static_graph import split as split_static

    base = name == "base"
    model.set_lora_implementation(None if base or name == "auto" else name)
    jax.clear_caches()  # the backend choice is model state that jit's cache keys do not see: trace afresh
    graphdef, state = split_static(model)  # as the sampler: the graph hashed once, not at every jit call
    ids = jax.random.randint(jax.random.key(args.tokens), (1, args.tokens), 0, model.config.vocab_size)
    fixed = (ids.astype(jnp.int32), jnp.ones((1, args.tokens), jnp.int32), jax.random.key(0), jnp.int32(0))
    eos = jnp.asarray([-1], jnp.int32)
    kw = dict(
        routing=model.routing_options(no_experts=base), params=GREEDY, return_routing=False, new_bucket=16
    )
    packs = inference_packs(graphdef, state)  # as the sampler does: once per model state, outside the timing
    t0 = time.perf_counter()
    compiled = prefill_program().lower(graphdef, state, *fixed, eos, **kw, packs=packs).compile()
    row: dict = {"variant": variant, "tokens": args.tokens, "compile_s": time.perf_counter() - t0}
    row["implementation"] = "none (experts off)" if base else model.kernel_implementation
    if args.dump_hlo:
        member = hlo_dump.member_name(variant, f"_t{args.tokens}.hlo.txt")
        hlo_dump.add_to_tar(args.dump_hlo, member, compiled.as_text())

    def once() -> float:
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, *fixed, eos, packs=packs))
        return time.perf_counter() - t

    once()  # warm-up (autotuning, allocations)
    row["wall_ms"] = 1e3 * statistics.median(once() for _ in range(args.reps))
    if args.no_trace:
        return row
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                once()
            kernels = timing.gpu_kernel_events(timing.read_trace(tmp))
    except Exception as e:  # noqa: BLE001 (no profiler or no trace file: keep the timing)
        row["trace"] = {"note": f"profiler failed: {type(e).__name__}: {str(e)[:200]}"}
        return row
    if not kernels:
        row["trace"] = {"note": "no device kernels in the trace (CPU backend)"}
    else:
        row["trace"] = kernels_by_kind(kernels, args.top)
    return row


def print_table(rows: list[dict], top: int) -> None:
    kinds = [k for k, _ in KINDS] + ["other"]
    print(f"{'variant':<20}{'impl':<22}{'wall ms':>9}{'busy ms':>9}" + "".join(f"{k:>13}" for k in kinds))
    for r in rows:
        tr = r.get("trace", {})
        cells = [f"{r['variant']:<20}{r['implementation'][:21]:<22}{r['wall_ms']:>9.2f}"]
        if "busy_ms" in tr:
            cells.append(f"{tr['busy_ms']:>9.2f}")
            cells += [f"{tr['ms_by_kind'].get(k, 0.0):>13.2f}" for k in kinds]
        else:
            cells.append(f"{'-':>9}")
        print("".join(cells))
    for r in rows:
        tr = r.get("trace", {})
        print(f"\n== {r['variant']}: " + tr.get("note", f"kernels by kind {tr.get('kernels_by_kind')}"))
        for k in tr.get("top_kernels", [])[:top]:
            print(f"   {k['ms']:9.3f} ms {k['calls']:5d} calls  {k['kind']:<12} {k['name']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny config (a CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (faster compiles)")
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length (one row)")
    ap.add_argument(
        "--variants",
        default="base,auto,xla_masked",
        help="comma list: base, auto or a grouped_lora implementation (auto at prefill on GPU: the dense "
        "masked path with the bf16 sum; xla_masked: the same with the float32 sum), each optionally +KNOB=N "
        f"(KNOB in {list(KNOBS)}, see meteora_jax/knobs.py); +f32gate (= +split_gate=inf) computes the "
        "gates in float32 GEMMs instead of split_gate_logits",
    )
    ap.add_argument("--attention", default=None, help="attention implementation (default: cudnn on GPU)")
    ap.add_argument("--reps", type=int, default=5, help="timed prefills per variant (median)")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    ap.add_argument("--no-trace", action="store_true", help="skip the profiler run")
    ap.add_argument(
        "--dump-hlo",
        default=None,
        help="tar.gz: each variant's compiled prefill HLO text (which fusion a kernel is, and its backend config)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/profile_prefill.json)")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "profile_prefill.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    import jax
    from bench_generate import build_model, llama3_8b
    from flax import nnx

    cfg = llama3_8b(args.tiny)
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    gpu = jax.default_backend() == "gpu"
    model = build_model(cfg, 28, 8)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    attention = args.attention or ("cudnn" if gpu else "einsum")
    model.set_attention_implementation(attention)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python3 scripts/profile_prefill.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": ("tiny" if args.tiny else "llama3-8b") + f", {cfg.num_hidden_layers} layers",
        "experts": 28,
        "rank": 8,
        "top_k": 2,
        "attention": attention,
        "rows": [],
    }
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            row = profile_variant(model, variant, args)
        except Exception as e:  # noqa: BLE001 (one failing path, e.g. pallas_gpu on CPU, must not lose the rest)
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["rows"].append(row)
        write_text_atomic(out, json.dumps(result, indent=2))
        print(f"{variant} done", flush=True)
    print(
        f"\n{result['device']} ({result['backend']}), {result['config']}, {args.tokens} tokens, {attention}"
    )
    print_table([r for r in result["rows"] if "error" not in r], args.top)
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']}: {r['error']}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
