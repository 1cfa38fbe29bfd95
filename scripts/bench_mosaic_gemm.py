"""Does a Mosaic GPU GEMM reach cuBLAS here, and what would a K-extended fused MoE-LoRA GEMM cost?

Usage: python scripts/bench_mosaic_gemm.py [--tokens 4096] [--shapes 4096x4096,4096x1024,...] [--extra-k 256]
       [--configs 128x128x64x4xNx8xN,...] [--calls 30] [--out benchmarks/results/mosaic_gemm.json]

The question behind it (issue 3, "Mosaic GPU where it wins on Hopper"): at prefill sizes the only fused form of
the dense MoE-LoRA that runs on tensor cores is one GEMM over a longer K, ``[x | hc] @ [W ; B_flat]``, where
``hc`` is the routed, scaled shrink ``[T, E*r]`` (zero for experts a token did not pick; 224 columns for E=28,
r=8, padded to ``--extra-k``). Such a kernel is worth building in Mosaic GPU only if a Mosaic GPU GEMM runs at
cuBLAS speed on this device. Rows, per projection shape, every time beside XLA's own ``x @ W`` (the base) in
the same run, with the profiler timer of ``pallas_kernels/timing.py`` (GPU kernel time per call, inputs
cycled through copies larger than L2):
- ``xla``: ``x @ W`` (the base; XLA picks cuBLAS or its Triton GEMM);
- ``xla+c``: ``x @ W + c`` (c bf16 ``[T, d_out]``: what the expand's output costs when added in the epilogue);
- ``xla_k+N``: ``xx @ ww`` with K = d_in + N (inputs pre-concatenated): the FLOPs and bytes of the fused form
  at XLA's GEMM speed, i.e. the best a K-extended fused kernel could do;
- ``mosaic@CFG``, ``mosaic_k+N@CFG``, ``mosaic+c@CFG``: the same three products through JAX's own Hopper
  Mosaic GPU matmul (``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, warp-specialized, TMA, wgmma)
  with tile config CFG = ``tile_m x tile_n x tile_k x stages x grid_minor(M|N) x grid_width x wg_dim(M|N)``;
- ``fused@BMxBNxBKxS``: our kernel (``pallas_mosaic_gpu.fused_matmul``: one warpgroup, two pipelined K loops
  into one accumulator) on ``x @ W + hc @ B`` with N = ``--extra-k`` expert columns: what the ``mosaic_gpu``
  backend runs after XLA's shrink.
A config the kernel rejects (e.g. shared memory) is recorded with its error, not fatal. GPU only (Hopper).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from meteora_jax.io import write_text_atomic  # noqa: E402
from pallas_kernels import timing  # noqa: E402

SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # Llama-3-8B q/o, k/v, gate/up, down
DEFAULT_FUSED = ("128x128x64x4", "128x128x64x3", "128x64x64x4")
DEFAULT_CONFIGS = ("128x128x64x4xNx8xN", "128x128x64x4xMx8xM", "128x256x64x3xNx8xN", "256x128x64x3xMx8xM")


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    tile_m: int
    tile_n: int
    tile_k: int
    stages: int
    grid_minor: str  # "M" or "N"
    grid_width: int
    wg_dim: str  # "M" or "N"

    @classmethod
    def parse(cls, spec: str) -> MosaicConfig:
        parts = spec.split("x")
        if len(parts) != 7 or parts[4] not in ("M", "N") or parts[6] not in ("M", "N"):
            raise ValueError(
                f"config {spec!r}: expected tile_m x tile_n x tile_k x stages x M|N x width x M|N"
            )
        m, n, k, s = (int(p) for p in parts[:4])
        return cls(m, n, k, s, parts[4], int(parts[5]), parts[6])

    def jax_config(self):  # noqa: ANN201
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

        dim = hm.MatmulDimension
        return hm.TuningConfig(
            tile_m=self.tile_m,
            tile_n=self.tile_n,
            tile_k=self.tile_k,
            max_concurrent_steps=self.stages,
            epi_tile_m=64,
            epi_tile_n=64,
            grid_minor_dim=dim[self.grid_minor],
            grid_tile_width=self.grid_width,
            wg_dimension=dim[self.wg_dim],
        )


def _mosaic(config: MosaicConfig, with_c: bool):  # noqa: ANN202
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    cfg = config.jax_config()
    if with_c:
        return jax.jit(lambda x, w, c: hm.matmul(x, w, c, cfg))
    return jax.jit(lambda x, w: hm.matmul(x, w, None, cfg))


def _time(fn, arg_sets, calls: int) -> tuple[float, bool, str]:  # noqa: ANN001
    t = timing.time_profile(fn, arg_sets, calls=calls)
    return t.us, t.valid, t.note


def _fused(spec: str):  # noqa: ANN202
    from pallas_kernels.grouped_lora import pallas_mosaic_gpu

    bm, bn, bk, stages = (int(v) for v in spec.split("x"))
    cfg = pallas_mosaic_gpu.MosaicConfig(block_m=bm, block_n=bn, block_k=bk, stages=stages)
    return jax.jit(lambda x, w, hc, b: pallas_mosaic_gpu.fused_matmul(x, w, hc, b, config=cfg))


def bench_shape(
    d_in: int, d_out: int, tokens: int, extra_k: int, configs: list[str], calls: int, fused: list[str]
) -> list[dict]:
    """Rows for one shape: XLA's three products, JAX's Mosaic matmul's per config, then our fused kernel's per
    tile spec, all against XLA's ``x @ W``."""
    keys = jax.random.split(jax.random.key(d_in * 7 + d_out), 5)
    bf16 = jnp.bfloat16
    x = jax.random.normal(keys[0], (tokens, d_in), bf16)
    w = (jax.random.normal(keys[1], (d_in, d_out), bf16) * d_in**-0.5).astype(bf16)
    c = jax.random.normal(keys[2], (tokens, d_out), bf16)
    xx = jnp.concatenate([x, jax.random.normal(keys[3], (tokens, extra_k), bf16)], axis=1)
    ww = jnp.concatenate([w, jax.random.normal(keys[4], (extra_k, d_out), bf16) * 0.01], axis=0).astype(bf16)
    sets = {
        "": timing.cold_copies([x, w]),
        "+c": timing.cold_copies([x, w, c]),
        f"_k+{extra_k}": timing.cold_copies([xx, ww]),
        "+hc@B": timing.cold_copies([x, w, xx[:, d_in:], ww[d_in:]]),
    }
    ref = {
        "": np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32)),
        "+c": np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32) + c.astype(jnp.float32)),
        f"_k+{extra_k}": np.asarray(jnp.dot(xx, ww, preferred_element_type=jnp.float32)),
    }
    ref["+hc@B"] = ref[f"_k+{extra_k}"]  # the same sum, from two operand pairs
    xla_fns = {
        "": jax.jit(lambda x, w: x @ w),
        "+c": jax.jit(lambda x, w, c: x @ w + c),
        f"_k+{extra_k}": jax.jit(lambda x, w: x @ w),
    }
    rows = []
    base_us, base_ok, _ = _time(xla_fns[""], sets[""], calls)

    def row(impl: str, kind: str, fn) -> dict:  # noqa: ANN001
        out = {"d_in": d_in, "d_out": d_out, "T": tokens, "impl": impl, "product": kind or "x@W"}
        try:
            got = np.asarray(fn(*sets[kind][0]), np.float32)
            err = float(np.abs(got - ref[kind]).max() / max(1e-6, np.abs(ref[kind]).max()))
            us, ok, note = _time(fn, sets[kind], calls)
        except Exception as e:  # noqa: BLE001 - a rejected config is a row, not a crash
            out.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return out
        out.update(
            us=round(us, 2),
            x_vs_base=round(us / base_us, 4) if base_us > 0 else None,
            valid=bool(ok and base_ok),
            max_rel_err=err,
            note=note,
        )
        return out

    for kind, fn in xla_fns.items():
        rows.append(row(f"xla{kind}", kind, fn))
    for cfg_spec in configs:
        cfg = MosaicConfig.parse(cfg_spec)
        for kind in ("", "+c", f"_k+{extra_k}"):
            rows.append(row(f"mosaic{kind}@{cfg_spec}", kind, _mosaic(cfg, kind == "+c")))
    for spec in fused:
        rows.append(row(f"fused@{spec}", "+hc@B", _fused(spec)))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| shape | T | impl | us | x_vs_base | max rel err | valid |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = f"{r['d_in']}->{r['d_out']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['T']} | {r['impl']} | - | - | - | {r['error'][:60]} |")
            continue
        lines.append(
            f"| {shape} | {r['T']} | {r['impl']} | {r['us']:.1f} | {r['x_vs_base']:.3f} | "
            f"{r['max_rel_err']:.1e} | {'yes' if r['valid'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--tokens", type=int, default=4096, help="rows of x (T)")
    parser.add_argument(
        "--shapes",
        default=",".join(f"{a}x{b}" for a, b in SHAPES),
        help="d_in x d_out pairs, comma-separated (default: Llama-3-8B's four projection shapes)",
    )
    parser.add_argument("--extra-k", type=int, default=256, help="K added by the fused form (E*r padded)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="Mosaic GPU tile configs")
    parser.add_argument(
        "--fused",
        default=",".join(DEFAULT_FUSED),
        help="our fused kernel's tiles, BMxBNxBKxSTAGES, comma-separated",
    )
    parser.add_argument("--calls", type=int, default=30, help="profiled dispatches per row")
    parser.add_argument("--out", default="benchmarks/results/mosaic_gemm.json")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        MosaicConfig.parse(c)  # reject a bad spec before any work
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    if jax.default_backend() != "gpu":
        print("bench_mosaic_gemm: needs a GPU (Hopper) - Mosaic GPU kernels do not run here", file=sys.stderr)
        return 2
    rows = []
    for d_in, d_out in shapes:
        fused = [f for f in args.fused.split(",") if f]
        rows += bench_shape(d_in, d_out, args.tokens, args.extra_k, configs, args.calls, fused)
        print(format_table([r for r in rows if (r["d_in"], r["d_out"]) == (d_in, d_out)]), flush=True)
    result = {
        "device": jax.devices()[0].device_kind,
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
