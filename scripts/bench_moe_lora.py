"""Benchmark one MoE-LoRA projection (base GEMM + grouped LoRA) against the plain base GEMM.

Usage: python scripts/bench_moe_lora.py [--out benchmarks/results/moe_lora_h200.json] [--impls pallas_gpu,xla]
       [--filter SUBSTRING] [--reps 50]

Timing: one jit runs the function ``reps`` times in a ``fori_loop`` (each call's input depends on the
previous output), so host dispatch is out of the figure; per-call time = loop wall time / reps, minus
the same loop around a trivial body; the median of 5 runs. ``x_vs_base`` divides by the base GEMM
(``x @ W``, XLA/cuBLAS) timed the same way in the same run. ``bound`` is the memory-traffic bound of
the row: (W + touched experts + x + y bytes) / (W + x + y bytes). ``peak_mb`` is XLA's temp allocation
of the compiled call (``memory_analysis().temp_size_in_bytes``): transient memory beyond inputs and output.
Caveat: for calls much shorter than ~40 us the loop's own cost dominates and the figure is noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels.grouped_lora import api, shapes  # noqa: E402


def _looped(fn, reps: int):
    """One jit that runs ``fn`` ``reps`` times on the device; each call's x depends on the last output
    (one element, updated in place) so XLA cannot hoist or merge the calls."""

    def many(x, *rest):
        def body(_, x):
            y = fn(x, *rest)
            return x.at[0, 0].add((y[0, 0] * 0).astype(x.dtype))

        return jax.lax.fori_loop(0, reps, body, x)

    return jax.jit(many)


def _time(fn, args, reps: int) -> float:
    """Per-call device time: median over 5 runs of an in-jit loop of ``reps`` calls, minus the same loop
    around a trivial body (the loop's own per-iteration cost)."""

    def per_call(f):
        looped = _looped(f, reps)
        jax.block_until_ready(looped(*args))
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(looped(*args))
            runs.append((time.perf_counter() - t0) / reps * 1e6)
        return statistics.median(runs)

    return per_call(fn) - per_call(lambda x, *rest: x[:1, :1])


def _bound(case: shapes.Case, expert_ids: jax.Array) -> float:
    touched = len(np.unique(np.asarray(expert_ids)))
    itemsize = 2
    w = case.d_in * case.d_out * itemsize
    xy = case.num_tokens * (case.d_in + case.d_out) * itemsize
    experts = touched * case.rank * (case.d_in + case.d_out) * itemsize
    return (w + experts + xy) / (w + xy)


def bench(cases, impls, reps: int, out_path: str | None) -> list[dict]:
    rows = []
    for case in cases:
        inp = shapes.make_inputs(case, jax.random.key(0))
        base = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
        n_reps = max(5, min(reps, int(4e5 / max(1, case.num_tokens))))
        t_base = _time(base, (inp["x"], inp["w"]), n_reps)
        bound = _bound(case, inp["expert_ids"])
        args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])
        ref = None
        for impl in impls:
            fn = jax.jit(
                lambda x, w, a, b, ids, ew, impl=impl, s=inp["scaling"]: api.grouped_lora_fused(
                    x, w, a, b, ids, ew, scaling=s, implementation=impl
                )
            )
            try:
                compiled = fn.lower(*args).compile()
                mem = compiled.memory_analysis()
                peak_mb = (mem.temp_size_in_bytes / 2**20) if mem is not None else float("nan")
                y = np.asarray(fn(*args), np.float32)
                if ref is None:
                    ref = y
                err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                us = _time(fn, args, n_reps)
            except Exception as e:  # keep going: a failing row is reported, not fatal
                print(f"{case.name} {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            row = {
                "d_in": case.d_in,
                "d_out": case.d_out,
                "T": case.num_tokens,
                "E": case.num_experts,
                "r": case.rank,
                "k": case.top_k,
                "routing": case.routing,
                "impl": impl,
                "us": round(us, 2),
                "base_us": round(t_base, 2),
                "x_vs_base": round(us / t_base, 3),
                "bound": round(bound, 4),
                "peak_mb": round(peak_mb, 2),
                "rel_err_vs_first_impl": round(err, 5),
            }
            rows.append(row)
            print(
                f"{case.d_in:>5}->{case.d_out:<5} T={case.num_tokens:<5} E={case.num_experts:<4} r={case.rank:<2} "
                f"k={case.top_k} {case.routing:<7} {impl:<10} {us:9.1f}us base {t_base:8.1f}us "
                f"x{us / t_base:6.3f} bound {bound:.3f} peak {peak_mb:8.1f}MB err {err:.1e}",
                flush=True,
            )
        if out_path:
            _write(rows, out_path)
    return rows


def _write(rows: list[dict], out_path: str) -> None:
    doc = {
        "device": str(jax.devices()[0].device_kind),
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "timing": "in-jit fori_loop of reps calls, wall time / reps minus an empty loop, median of 5",
        "rows": rows,
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, out_path)


def jax_triton_check() -> str:
    """Whether the jax-triton wheel imports and runs one Triton kernel through ``triton_call``."""
    try:
        import jax_triton as jt
        import triton
        import triton.language as tl

        @triton.jit
        def add_kernel(x_ptr, y_ptr, o_ptr, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(o_ptr + i, tl.load(x_ptr + i) + tl.load(y_ptr + i))

        x = jnp.arange(1024, dtype=jnp.float32)
        out = jt.triton_call(
            x, x, kernel=add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(8,), BLOCK=128
        )
        ok = bool(jnp.allclose(out, 2 * x))
        return f"jax_triton {jt.__version__} with triton {triton.__version__}: triton_call ran, correct={ok}"
    except Exception as e:  # report, do not fail the benchmark
        return f"jax_triton failed: {type(e).__name__}: {str(e)[:300]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/moe_lora_h200.json")
    parser.add_argument("--impls", default="pallas_gpu,xla")
    parser.add_argument("--filter", default="")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--jax-triton-check", action="store_true")
    opts = parser.parse_args()
    if opts.jax_triton_check:
        print(jax_triton_check(), flush=True)
    cases = [c for c in shapes.bench_cases() if opts.filter in c.name]
    bench(cases, opts.impls.split(","), opts.reps, opts.out)


if __name__ == "__main__":
    main()
