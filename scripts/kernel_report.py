"""What the GPU compiler makes of our Pallas decode kernels, on a CPU-only host: registers, spills, shared
memory, resident blocks per SM, and what each main loop loads, synchronously or through the async pipeline.

Pallas lowers each kernel to Triton IR here (``lower(lowering_platforms=("cuda",))``); this script writes that
IR out and compiles it for sm_90 with the ``triton`` package's own compiler and ``ptxas`` (no GPU, no driver),
then reads the PTX and the cubin's resource usage. It answers, before a GPU is lent, questions such as "are the
expert-row gathers inside the K loop pipelined (``cp.async``) or does every step wait on them
(``ld.global``)?" and "does a tile config spill or fit two blocks per SM?". It does not time anything: XLA
compiles the same IR with its own bundled Triton, whose pass pipeline may differ in details.

Triton is not a dependency (and is 190 MB): install it once into the git-ignored ``.triton/``,

    pip install --no-deps --target .triton triton==3.6.0     # the GPU image's version
    python scripts/kernel_report.py                           # the four Llama-3-8B projections + two groups
    python scripts/kernel_report.py --configs default,32x512x4x3 --out /tmp/report.json

``--configs`` takes ``default`` (``DecodeConfig.for_shape``) and the benchmark's tile spec
``BNxBKxWxS[xK][f]`` (``scripts/bench_moe_lora.py``: split_k, base_dot="fma").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM_REGISTERS, SM_SHARED_BYTES, SM_THREADS, SM_BLOCKS = 65536, 227 * 1024, 2048, 32  # sm_90 (H100 / H200)
# (name, d_in, d_outs[, kind]): one kernel per projection, and the two groups ``decode_forward_group`` launches
# (kind "decode", T = 1); the decode kernel routing from the logits ("routed", T = 1); the fused expand of
# batched decode ("expand", T = 64, ``pallas_gpu_expand``), its routed variant ("expand_routed") and a single
# projection's given-routing variant ("expand_given": ids / weights given, the batched shrink [E, T, R]). The
# expand kinds take their default tiles (``ExpandConfig.default()``) whatever ``--configs`` says.
CASES = (
    ("q_o", 4096, (4096,)),
    ("k_v", 4096, (1024,)),
    ("gate_up", 4096, (14336,)),
    ("down", 14336, (4096,)),
    ("group_qkv", 4096, (4096, 1024, 1024)),
    ("group_gate_up", 4096, (14336, 14336)),
    ("routed_qkv", 4096, (4096, 1024, 1024), "routed"),
    ("routed_down", 14336, (4096,), "routed"),
    ("expand_qkv_b64", 4096, (4096, 1024, 1024), "expand"),
    ("expand_gate_up_b64", 4096, (14336, 14336), "expand"),
    ("expand_routed_qkv_b64", 4096, (4096, 1024, 1024), "expand_routed"),
    ("expand_given_o_b64", 4096, (4096,), "expand_given"),
    ("expand_given_up_b64", 4096, (14336,), "expand_given"),
)
DEFAULT_CASES = tuple(c[0] for c in CASES if len(c) == 3)


# ------------------------------------------------------------------------------------ lowering (this venv)
def _walk(op):  # noqa: ANN202
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _walk(child.operation)


def _lowering_call(kind: str, d_in: int, d_outs: tuple[int, ...], experts: int, rank: int, top_k: int):  # noqa: ANN202
    """(fn, args) of the new kinds (see ``CASES``), as abstract bf16 inputs."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_lora import pallas_gpu_decode, pallas_gpu_expand
    from pallas_kernels.grouped_lora.gating import RouteSpec

    spec, bf16, n = jax.ShapeDtypeStruct, jnp.bfloat16, len(d_outs)
    ws = [spec((d_in, o), bf16) for o in d_outs]
    scalings = [spec((experts,), jnp.float32) for _ in d_outs]
    if kind == "routed":
        x = spec((1, d_in), bf16)
        args = (
            x,
            ws,
            [spec((experts, d_in, rank), bf16)] * n,
            [spec((experts, rank, o), bf16) for o in d_outs],
        )
        args = (*args, spec((1, n, experts), jnp.float32), scalings)
        return (lambda *a: pallas_gpu_decode.decode_forward_group_routed(*a, spec=RouteSpec(top_k))), args
    x = spec((64, d_in), bf16)
    bs = [spec((experts * rank, o), bf16) for o in d_outs]
    if kind == "expand":
        return pallas_gpu_expand.expand_forward_group, (x, ws, [spec((64, experts * rank), bf16)] * n, bs)
    if kind == "expand_given":
        h = spec((experts, 64, rank), jnp.float32)
        routing = (spec((64, top_k), jnp.int32), spec((64, top_k), bf16))
        fn = lambda x, w, h, i, wt, b, s: pallas_gpu_expand.expand_forward_given(  # noqa: E731
            x, w, h, i, wt, b, s, expert_major=True
        )
        return fn, (x, ws[0], h, *routing, bs[0], scalings[0])
    a_cols = n * experts * rank
    routed = pallas_gpu_expand.Routed.of_pack(RouteSpec(top_k), experts, rank, n, halves=True)
    wide = spec((64, a_cols + 2 * n * experts), jnp.float32)
    return (lambda *a: pallas_gpu_expand.expand_forward_group_routed(*a, routed=routed)), (
        x,
        ws,
        wide,
        bs,
        scalings,
    )


def lower_case(
    d_in: int, d_outs: tuple[int, ...], config, *, experts: int, rank: int, top_k: int, kind: str = "decode"
) -> list[dict]:  # noqa: ANN001
    """The Triton kernels (IR text, warps, stages, grid) that one call of ``kind`` lowers to for CUDA."""
    import jax
    import jax.numpy as jnp
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    from pallas_kernels.grouped_lora import pallas_gpu_decode

    spec, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    per = [
        (
            spec((d_in, o), bf16),
            spec((experts, d_in, rank), bf16),
            spec((experts, rank, o), bf16),
            spec((1, top_k), jnp.int32),
            spec((1, top_k), jnp.float32),
            spec((experts,), jnp.float32),
        )
        for o in d_outs
    ]
    x = spec((1, d_in), bf16)
    if kind != "decode":
        fn, args = _lowering_call(kind, d_in, d_outs, experts, rank, top_k)
        if kind == "routed":  # the decode kernel's tiles
            fn = (lambda f: lambda *a: pallas_gpu_decode_config(config, f, *a))(fn)
    elif len(d_outs) == 1:
        fn = lambda x, *a: pallas_gpu_decode.decode_forward(x, *a, config=config)  # noqa: E731
        args = (x, *per[0])
    else:
        fn = lambda x, *a: pallas_gpu_decode.decode_forward_group(x, *a, config=config)  # noqa: E731
        args = (x, *([p[i] for p in per] for i in range(6)))
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    kernels = []
    for op in _walk(lowered.compiler_ir("stablehlo").operation):
        if op.name != "stablehlo.custom_call" or "mhlo.backend_config" not in op.attributes:
            continue
        cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
        ctx = ir.Context()
        triton.dialect.register_dialect(ctx)
        with ctx:
            text = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes).operation.get_asm(
                enable_debug_info=False
            )
        num = lambda key, cfg=cfg: int(str(cfg[key]).split()[0])  # noqa: E731 ("4 : i32")
        kernels.append(
            {
                "name": str(cfg["name"]).strip('"'),
                "ttir": text,
                "num_warps": num("num_warps"),
                "num_stages": num("num_stages"),
                "grid": [num("grid_x"), num("grid_y"), num("grid_z")],
            }
        )
    return kernels


def pallas_gpu_decode_config(config, fn, *args):  # noqa: ANN001, ANN201
    """``fn(*args)`` traced under the decode kernel's tile override ``config`` (None: the defaults)."""
    from pallas_kernels.grouped_lora import pallas_gpu_decode

    saved = pallas_gpu_decode.DECODE_CONFIG_OVERRIDE
    pallas_gpu_decode.DECODE_CONFIG_OVERRIDE = config
    try:
        return fn(*args)
    finally:
        pallas_gpu_decode.DECODE_CONFIG_OVERRIDE = saved


# ------------------------------------------------------------------------------------ compiling (triton)
def compile_ttir(path: str, num_warps: int, num_stages: int) -> dict:
    """Runs in a child process whose ``sys.path`` has the triton package (see ``_compile_in_child``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(
        path, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cubin = path + ".cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run(
        [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True
    ).stdout
    return {"ptx": kernel.asm["ptx"], "shared": int(kernel.metadata.shared), "usage": usage}


def _compile_in_child(path: str, num_warps: int, num_stages: int, triton_path: str | None) -> dict:
    env = dict(os.environ)
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join([triton_path, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--compile-one", path, str(num_warps), str(num_stages)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError("triton compile failed:\n" + "\n".join(tail))
    return json.loads(done.stdout.splitlines()[-1])


# ------------------------------------------------------------------------------------ reading the PTX
_LOOP_HEAD = re.compile(r"^(\$L__BB\d+_\d+):.*Inner Loop Header: Depth=1")
_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)")


def loops(ptx: str) -> list[Counter]:
    """Per outermost loop of the PTX: how often each instruction class occurs in its body."""
    lines = ptx.splitlines()
    out = []
    for i, line in enumerate(lines):
        head = _LOOP_HEAD.match(line)
        if head is None:
            continue
        label = head.group(1)
        end = max(
            j for j in range(i, len(lines)) if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", lines[j])
        )
        counts = Counter()
        for body in lines[i + 1 : end + 1]:
            m = _INSTR.match(body)
            if m is None:
                continue
            op = m.group(1)
            if op.startswith("cp.async") and "shared.global" in op:
                counts["cp.async"] += 1
            elif op.startswith("ld.global"):
                counts["ld.global"] += 1
            elif op.startswith(("mma", "wgmma")):
                counts["mma"] += 1
            elif op.startswith("bar.sync"):
                counts["bar.sync"] += 1
            elif op.startswith(("fma", "mul.f32", "add.f32")):
                counts["fp32"] += 1
            counts["instructions"] += 1
        out.append(counts)
    return out


def resources(usage: str, shared: int, num_warps: int) -> dict:
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    threads = 32 * num_warps
    smem = max(shared, static_shared)
    by_regs = SM_REGISTERS // max(1, regs * threads)
    by_smem = SM_SHARED_BYTES // smem if smem else SM_BLOCKS
    blocks = min(by_regs, by_smem, SM_THREADS // threads, SM_BLOCKS)
    return {"regs": regs, "spill_bytes": local, "shared_bytes": smem, "blocks_per_sm": blocks}


# ------------------------------------------------------------------------------------ the report
def parse_config(spec: str):  # noqa: ANN201
    if spec == "default":
        return None
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_moe_lora import parse_impl

    return parse_impl("pallas_gpu@" + spec)[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--compile-one":
        print(json.dumps(compile_ttir(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default", help="comma list: default and/or BNxBKxWxS[xK][f]")
    ap.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma list of " + ", ".join(c[0] for c in CASES) + " (default: the decode kernels)",
    )
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--triton-path", default=os.path.join(ROOT, ".triton"), help="where triton is installed")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    triton_path = args.triton_path if os.path.isdir(args.triton_path) else None
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    cases = {c[0]: c for c in CASES}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs.split(","):
            config = parse_config(spec)
            for name in args.cases.split(","):
                _, d_in, d_outs, *kind = cases[name]
                kw = dict(
                    experts=args.experts, rank=args.rank, top_k=args.top_k, kind=(kind or ["decode"])[0]
                )
                for i, k in enumerate(lower_case(d_in, d_outs, config, **kw)):
                    path = os.path.join(tmp, f"{name}_{spec}_{i}.ttir")
                    with open(path, "w") as f:
                        f.write(k["ttir"])
                    got = _compile_in_child(path, k["num_warps"], k["num_stages"], triton_path)
                    body = loops(got["ptx"])
                    total = sum(body, Counter())
                    row = {
                        "case": name,
                        "d_in": d_in,
                        "d_outs": list(d_outs),
                        "config": spec,
                        "kernel": k["name"],
                        "grid": k["grid"],
                        "num_warps": k["num_warps"],
                        "num_stages": k["num_stages"],
                        **resources(got["usage"], got["shared"], k["num_warps"]),
                        "loops": len(body),
                        **{
                            f"loop_{key}": total[key]
                            for key in ("cp.async", "ld.global", "mma", "bar.sync", "instructions")
                        },
                    }
                    rows.append(row)
                    print(_line(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"target": "sm_90", "rows": rows}, f, indent=1)
    return 0


def _line(r: dict) -> str:
    return (
        f"{r['case']:<14} {r['config']:<14} grid {r['grid'][0]:>4}x{r['grid'][1]:<2} regs {r['regs']:>3} "
        f"spill {r['spill_bytes']:>4} smem {r['shared_bytes'] // 1024:>4} KiB blocks/SM {r['blocks_per_sm']}  "
        f"loop: cp.async {r['loop_cp.async']:>3} ld.global {r['loop_ld.global']:>3} mma {r['loop_mma']:>3} "
        f"bar {r['loop_bar.sync']:>2}"
    )


if __name__ == "__main__":
    sys.exit(main())
