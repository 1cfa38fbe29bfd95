"""Where decode time goes, per grouped-LoRA path: kernels per token, kernel time, launch gaps, top kernels.

For each variant and each decode batch it compiles the sampler's decode loop once and:

* counts the instructions of the compiled while-loop body (one decode step) by opcode -- on GPU each
  fusion / custom-call (cuBLAS, TopK, cuDNN) is about one kernel -- and lists any ``copy`` (a KV-cache copy
  per step would show here);
* times ``--steps`` tokens without the profiler (wall ms per token);
* runs once more under ``jax.profiler.trace(create_perfetto_trace=True)`` and reads the plain-JSON
  ``*.trace.json.gz`` it writes: device kernels per token, summed kernel time, the time the device was busy
  (union of kernel intervals), and the top kernels. ``wall - busy`` is the device idle time per token:
  launch overhead and host sync. On CPU there are no device kernels in the trace; the script says so.

Variants: ``base`` (the same model, experts off), ``auto`` (the default backend) or a grouped_lora
implementation: ``xla_dense`` (the old dense path: shrink + expand with one-hot contractions),
``xla_masked`` (= ``xla`` now: one [T, E] coefficient mask), ``xla_masked_batched`` (the same with the
shrink as a matmul batched over experts), ``xla_gather`` (gathers the chosen experts),
``reference``, ``pallas_gpu`` (at decode batches up to ``--decode-max-tokens``, default
``pallas_gpu_decode.DECODE_MAX_TOKENS`` = 1: one kernel per projection, ``pallas_gpu_decode.py``),
``pallas_gpu_decode`` (that kernel at T=1, ``xla`` otherwise; what ``auto`` picks on GPU for 28 experts).
Any of them may carry ``+KNOB=N`` suffixes (``KNOBS``): a trace-time token-count threshold of the automatic
path set for that variant only, e.g. ``auto+group_route=inf`` (one top-k per projection, not per group),
``auto+lowp=1`` (bf16 sum at decode), ``auto+batched=64`` (shrink batched over experts),
``auto+split_gate=1`` (the bf16 split gate GEMM at decode), ``auto+shared_shrink=2`` (one shrink GEMM for
the projections that share an input), ``auto+argmax_topk=2`` (top-k as argmax passes, no sort),
``auto+packed=2`` (one GEMM per group for every shrink and gate, from weights packed once per model state),
``auto+packed_gates=0`` (the shared gate GEMV's gates concatenated at every step again, as before session 10),
``auto+gate_rows=1`` (the gate packs stored [N, D]: the gate GEMV as a row reduction),
``auto+group_decode=1`` (batch 1: q/k/v in one decode-kernel launch, gate/up in another),
``auto+packed_max=64`` (the packed path only up to 64 tokens), ``auto+kernel_route=1`` (batch 1: the decode
kernel routes from the gate logits itself, no top-k / softmax kernels), ``auto+fused_expand=64`` (batched
decode: each group's base GEMMs with their expands as one extra K block, ``pallas_gpu_expand``).
``--dump-hlo F.tar.gz`` keeps each variant's compiled decode program, to find what a kernel in the trace is.

XLA reads ``XLA_FLAGS`` once, when jax initialises its backend, so flags must be set before this process
starts: ``XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 scripts/profile_decode.py``. ``--flag-sets``
does that for you: it reruns this script once per set, in a fresh process, and merges the JSON.

    python3 scripts/profile_decode.py                                  # H200: 8B shapes, b1 and b64
    python3 scripts/profile_decode.py --tiny --steps 4 --batches 1     # CPU smoke test
    python3 scripts/profile_decode.py --flag-sets 'default=;no_cmdbuf=--xla_gpu_enable_command_buffer='
"""

# ruff: noqa: E402  (XLA_FLAGS and the allocator setting must be fixed before jax is imported)
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import hlo_dump  # noqa: E402
from variant_knobs import KNOBS, knobs_set, parse_variant  # noqa: E402, F401 (parse_variant: tests)

from meteora_jax.io import write_text_atomic  # noqa: E402
from pallas_kernels import timing  # noqa: E402

# Opcodes that launch nothing (or are free views) in a compiled HLO computation.
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id"}
# `%name = shape opcode(`, the shape a tuple `(f32[2]{0}, s8[64]{0})` for cuBLAS gemms and TopK.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\(")


# ----------------------------------------------------------------------------- compiled HLO
def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = "ENTRY" if line.startswith("ENTRY") else m.group(1)
            comps[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            comps[name].append(line)
    return comps


def hlo_step_summary(hlo_text: str) -> dict:
    """Op counts of one decode step: the body of the outermost while loop of the compiled module.

    ``call`` / command-buffer computations are opened (their ops run once per step too); fusions are counted
    as one op each (one kernel on GPU). ``copies`` lists copy ops (shape) -- a whole-KV-cache copy per step
    would be one of them.
    """
    comps = _computations(hlo_text)
    body = None
    for comp in ["ENTRY", *comps]:  # the entry's loop; else the first loop anywhere (a wrapped entry)
        for line in comps.get(comp, []):
            m = re.search(r"\bwhile\(.*body=%?([\w.\-]+)", line)
            if m:
                body = m.group(1)
                break
        if body is not None:
            break
    if body is None:
        return {"error": "no while loop in the compiled module"}
    counts: collections.Counter = collections.Counter()
    targets: collections.Counter = collections.Counter()
    copies: list[str] = []

    def walk(comp: str, depth: int) -> None:
        for line in comps.get(comp, []):
            m = _INSTR.match(line)
            if not m:
                continue
            shape, op = m.group(2), m.group(3)
            if op in _FREE_OPS:
                continue
            if op == "call" and depth < 4:
                callee = re.search(r"to_apply=%?([\w.\-]+)", line)
                if callee:
                    counts["call"] += 1
                    walk(callee.group(1), depth + 1)
                    continue
            counts[op] += 1
            if op == "custom-call":
                t = re.search(r'custom_call_target="([^"]+)"', line)
                targets[t.group(1) if t else "?"] += 1
            elif op == "fusion":
                kind = re.search(r"kind=(\w+)", line)
                targets[f"fusion:{kind.group(1) if kind else '?'}"] += 1
            if op == "copy":
                copies.append(shape)

    walk(body, 0)
    launches = sum(v for k, v in counts.items() if k not in ("call",))
    return {
        "ops_per_step": launches,
        "by_opcode": dict(counts.most_common()),
        "by_target": dict(targets.most_common()),
        "copies": copies,
    }


# ----------------------------------------------------------------------------- profiler trace
def kernel_summary(kernels: list[tuple[float, float, str]], steps: int, top: int) -> dict:
    """Per-token kernel counts and times from ``timing.gpu_kernel_events``' (start us, duration us, name)
    events; ``busy_us`` is the union of the intervals (streams overlap), memcpy/memset counted apart."""
    is_copy = re.compile(r"memcpy|memset|MemcpyD2H|MemcpyH2D", re.I)
    kernels = [(name, ts, dur) for ts, dur, name in kernels]
    kern = [k for k in kernels if not is_copy.search(k[0])]
    copies = [k for k in kernels if is_copy.search(k[0])]
    busy, end = 0.0, float("-inf")
    for _, ts, dur in sorted(kernels, key=lambda k: k[1]):
        if ts >= end:
            busy += dur
            end = ts + dur
        elif ts + dur > end:
            busy += ts + dur - end
            end = ts + dur
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, _, dur in kern:
        by_name[name].append(dur)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    span = (max(ts + d for _, ts, d in kernels) - min(ts for _, ts, _ in kernels)) if kernels else 0.0
    return {
        "kernels_per_token": len(kern) / steps,
        "kernel_us_per_token": sum(d for _, _, d in kern) / steps,
        "memcpy_per_token": len(copies) / steps,
        "memcpy_us_per_token": sum(d for _, _, d in copies) / steps,
        "busy_us_per_token": busy / steps,
        "traced_span_us_per_token": span / steps,
        "top_kernels": [
            {"name": n[:120], "calls_per_token": len(d) / steps, "us_per_token": sum(d) / steps}
            for n, d in ranked
        ],
    }


# ----------------------------------------------------------------------------- the runs
def profile_variant(model, variant: str, batch: int, args: argparse.Namespace) -> dict:  # noqa: ANN001
    name, knobs = parse_variant(variant)
    with knobs_set(knobs):
        return _profile_variant(model, variant, name, batch, args)


def _profile_variant(model, variant: str, name: str, batch: int, args: argparse.Namespace) -> dict:  # noqa: ANN001
    import jax
    import jax.numpy as jnp
    from bench_generate import fresh_decode_state

    from meteora_jax.generate.sampler import _decode, inference_packs
    from meteora_jax.generate.sampling import SamplingParams
    from meteora_jax.generate.static_graph import split as split_static

    base = name == "base"
    model.set_lora_implementation(None if base or name == "auto" else name)
    jax.clear_caches()  # the backend choice is model state that jit's cache keys do not see: trace afresh
    routing = model.routing_options(no_experts=base)
    graphdef, state = split_static(model)  # as the sampler: the graph hashed once, not at every jit call
    packs = inference_packs(graphdef, state)  # as the sampler does: once per model state, outside the timing
    stop, pad, eos = jnp.int32(args.steps + 1), jnp.int32(0), jnp.asarray([-1], jnp.int32)
    fresh = lambda: jax.block_until_ready(fresh_decode_state(model, batch, args.prompt, args.steps))
    t0 = time.perf_counter()
    compiled = _decode.lower(
        graphdef,
        state,
        fresh(),
        stop,
        pad,
        eos,
        routing=routing,
        params=SamplingParams(),
        return_routing=False,
        packs=packs,
    ).compile()
    row: dict = {"variant": variant, "batch": batch, "compile_s": time.perf_counter() - t0}
    hlo_text = compiled.as_text()
    row["hlo"] = hlo_step_summary(hlo_text)
    if args.dump_hlo:
        hlo_dump.add_to_tar(args.dump_hlo, hlo_dump.member_name(variant, f"_b{batch}.hlo.txt"), hlo_text)

    def once() -> float:
        carry = fresh()
        t = time.perf_counter()
        compiled(state, carry, stop, pad, eos, packs=packs).out_bn.block_until_ready()
        return time.perf_counter() - t

    once()  # warm-up (autotuning, allocations)
    wall = statistics.median(once() for _ in range(args.reps))
    row["wall_ms_per_token"] = 1e3 * wall / args.steps
    row["tok_s"] = batch * args.steps / wall
    if not args.no_trace:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                carry = fresh()
                with jax.profiler.trace(tmp, create_perfetto_trace=True):
                    compiled(state, carry, stop, pad, eos, packs=packs).out_bn.block_until_ready()
                try:
                    trace = timing.read_trace(tmp)
                except FileNotFoundError:
                    trace = None
        except Exception as e:  # no profiler on this image: keep the timings and the HLO counts
            row["trace"] = {"note": f"profiler failed: {type(e).__name__}: {str(e)[:200]}"}
            return row
        kernels = timing.gpu_kernel_events(trace) if trace is not None else []
        if not kernels:
            row["trace"] = {"note": "no device kernels in the trace (CPU backend, or no trace file written)"}
        else:
            row["trace"] = kernel_summary(kernels, args.steps, args.top)
            row["trace"]["idle_us_per_token"] = (
                1e3 * row["wall_ms_per_token"] - row["trace"]["busy_us_per_token"]
            )
    return row


def print_table(rows: list[dict], top: int) -> None:
    head = f"{'variant':<28}{'B':>4}{'ms/tok':>9}{'tok/s':>9}{'HLO ops':>9}{'kernels':>9}{'kern ms':>9}"
    print(head + f"{'busy ms':>9}{'idle ms':>9}{'compile s':>10}")
    for r in rows:
        tr = r.get("trace", {})
        k = tr.get("kernels_per_token")
        cells = [
            f"{r['variant']:<28}{r['batch']:>4}{r['wall_ms_per_token']:>9.3f}{r['tok_s']:>9.1f}",
            f"{r['hlo'].get('ops_per_step', -1):>9}",
            f"{k:>9.0f}" if k is not None else f"{'-':>9}",
            f"{tr['kernel_us_per_token'] / 1e3:>9.3f}" if k is not None else f"{'-':>9}",
            f"{tr['busy_us_per_token'] / 1e3:>9.3f}" if k is not None else f"{'-':>9}",
            f"{tr['idle_us_per_token'] / 1e3:>9.3f}" if k is not None else f"{'-':>9}",
            f"{r['compile_s']:>10.1f}",
        ]
        print("".join(cells))
    for r in rows:
        print(f"\n== {r['variant']} b{r['batch']}: compiled step by opcode {r['hlo'].get('by_opcode')}")
        print(f"   by target {r['hlo'].get('by_target')}")
        if r["hlo"].get("copies"):
            print(f"   copies per step: {r['hlo']['copies']}")
        tr = r.get("trace", {})
        if "note" in tr:
            print(f"   trace: {tr['note']}")
        for kern in tr.get("top_kernels", [])[:top]:
            print(
                f"   {kern['us_per_token']:9.1f} us/tok {kern['calls_per_token']:7.1f} calls/tok  {kern['name']}"
            )


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value, given as ``option VALUE`` or ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def run_flag_sets(args: argparse.Namespace, out: str) -> int:
    """Reruns this script once per ``name=FLAGS`` set (XLA_FLAGS is read at start-up) and merges the JSON."""
    merged = {}
    argv = without_option(sys.argv[1:], "--flag-sets")
    for item in [s for s in args.flag_sets.split(";") if s.strip()]:
        name, _, flags = item.partition("=")
        sub_out = f"{out}.{name.strip()}.json"
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
        print(f"\n##### flag set {name!r}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), *argv, "--out", sub_out], env=env)
        merged[name.strip()] = json.load(open(sub_out)) if os.path.exists(sub_out) else {"rc": rc}
        _save(out, merged)
    return 0


def _save(path: str, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny config (a CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (faster compiles)")
    ap.add_argument(
        "--variants",
        default="base,auto,xla_masked",
        help="comma list: base, auto or a grouped_lora implementation, each optionally +KNOB=N (N or inf; "
        f"KNOB one of {list(KNOBS)}: a trace-time threshold for that variant, e.g. auto+group_route=inf)",
    )
    ap.add_argument("--batches", default="1,64", help="comma list of decode batch sizes")
    ap.add_argument("--steps", type=int, default=32, help="tokens per timed decode call")
    ap.add_argument("--prompt", type=int, default=128, help="tokens already in the cache")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15, help="kernels listed per run")
    ap.add_argument("--no-trace", action="store_true", help="skip the profiler run (timings and HLO only)")
    ap.add_argument("--dump-hlo", default=None, help="tar.gz: each variant's compiled decode HLO text")
    ap.add_argument("--flag-sets", default=None, help="'name=XLA FLAGS;name2=...': one process per set")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/profile_decode.json)")
    ap.add_argument(
        "--decode-max-tokens",
        type=int,
        default=None,
        help="pallas_gpu: largest tokens per call (= decode batch) for the one-launch decode kernel",
    )
    args = ap.parse_args()
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "profile_decode.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.flag_sets is not None:
        return run_flag_sets(args, out)

    import dataclasses

    import jax
    from bench_generate import build_model, llama3_8b
    from flax import nnx

    from pallas_kernels.grouped_lora import pallas_gpu_decode

    if args.decode_max_tokens is not None:
        pallas_gpu_decode.DECODE_MAX_TOKENS = args.decode_max_tokens

    cfg = llama3_8b(args.tiny)
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": ("tiny" if args.tiny else "llama3-8b") + f", {cfg.num_hidden_layers} layers",
        "experts": 28,
        "rank": 8,
        "top_k": 2,
        "steps": args.steps,
        "prompt": args.prompt,
        "decode_max_tokens": pallas_gpu_decode.DECODE_MAX_TOKENS,
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }
    t0 = time.perf_counter()
    model = build_model(cfg, 28, 8)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    model.set_attention_implementation("einsum")
    result["build_model_s"] = time.perf_counter() - t0
    for batch in [int(b) for b in args.batches.split(",")]:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            try:
                row = profile_variant(model, variant, batch, args)
            except Exception as e:  # one failing path (e.g. pallas_gpu on CPU) must not lose the others
                row = {"variant": variant, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["rows"].append(row)
            _save(out, result)
            print(f"[{time.perf_counter() - t0:7.1f}s] {variant} b{batch} done", flush=True)
    good = [r for r in result["rows"] if "error" not in r]
    print(
        f"\n{result['device']} ({result['backend']}), {result['config']}, XLA_FLAGS={result['xla_flags']!r}"
    )
    print_table(good, args.top)
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']} b{r['batch']}: {r['error']}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
