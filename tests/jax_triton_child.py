"""Child process of ``test_jax_triton.py``: runs where the ``triton`` package is importable (``.triton/``).

``interpret`` (TRITON_INTERPRET=1 set by the parent): the ``jax_triton_interpret`` backend on each case of a
JSON list, against ``reference`` on the same fresh random inputs; prints one JSON line of results.
``compile``: ``lora_decode_kernel`` through Triton's own compiler and ptxas for sm_90 (no GPU needed), at the
constexprs ``launch_params`` gives for each case, with jax-triton's alignment hints; prints shared memory,
registers, spills (stack / local bytes) and the PTX's asynchronous copies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def interpret(cases: list[dict]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.grouped_lora import api, jax_triton_decode, pallas_gpu_decode, shapes

    out = []
    for case in cases:
        if case.get("tiles"):  # the default tiles, but for what the case names
            base = {"block_n": 64, "block_k": 256, "num_stages": 3, "split_k": 0}
            pallas_gpu_decode.DECODE_CONFIG_OVERRIDE = pallas_gpu_decode.DecodeConfig(
                **{**base, **case["tiles"]}
            )
        t, d, o, e, r, k = (case[n] for n in ("T", "D", "O", "E", "r", "k"))
        dtype = jnp.dtype(case["dtype"])
        rng = np.random.default_rng(case["seed"])
        x = jnp.asarray(rng.standard_normal((t, d)), dtype)
        w = jnp.asarray(rng.standard_normal((d, o)) / np.sqrt(d), dtype)
        a = jnp.asarray(rng.standard_normal((e, d, r)) / np.sqrt(d), dtype)
        b = jnp.asarray(rng.standard_normal((e, r, o)), dtype)
        routing = case.get("routing", "uniform")
        if routing == "repeat":  # every slot of every token on one expert
            ids = np.full((t, k), e - 1)
        else:  # the suite's named routings: uniform, skewed, empty_experts, one_expert
            ids = np.asarray(shapes.routing_ids(jax.random.key(case["seed"]), t, e, k, routing))
        weights = rng.dirichlet(np.ones(k), t)
        if case.get("zero_weight"):
            weights[:, 0] = 0.0
        ids, weights = jnp.asarray(ids, jnp.int32), jnp.asarray(weights, dtype)
        scaling = jnp.asarray(rng.uniform(0.5, 2.0, e), jnp.float32)
        args = (x, w, a, b, ids, weights)
        got = api.grouped_lora_fused(*args, scaling=scaling, implementation="jax_triton_interpret")
        ref = api.grouped_lora_fused(*args, scaling=scaling, implementation="reference")
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        lora = np.asarray(
            api.grouped_lora(x, a, b, ids, weights, scaling=scaling, implementation="reference")
        )
        out.append(
            {
                "case": case,
                "rel_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
                "lora_scale": float(np.abs(lora).max() / np.abs(ref).max()),
                "splits": jax_triton_decode.launch_params(t, d, o, r, k)["splits"],
            }
        )
        pallas_gpu_decode.DECODE_CONFIG_OVERRIDE = None
    return out


def compile_sm90(cases: list[dict]) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pallas_kernels.grouped_lora.jax_triton_decode import launch_params
    from pallas_kernels.grouped_lora.jax_triton_kernel import lora_decode_kernel

    out = []
    for case in cases:
        p = launch_params(case["T"], case["D"], case["O"], case["r"], case["k"])
        elem = {"bfloat16": "bf16", "float32": "fp32"}[case["dtype"]]
        ptrs = {
            "x_ptr": elem,
            "w_ptr": elem,
            "a_ptr": elem,
            "b_ptr": elem,
            "ids_ptr": "i32",
            "coef_ptr": "fp32",
        }
        signature = {name: f"*{ty}" for name, ty in ptrs.items()}
        signature["out_ptr"] = "*fp32"
        signature.update({name: "constexpr" for name in p["constexprs"]})
        # jax-triton tells Triton that every buffer is 16-byte aligned (XLA's are); without it no load is
        # vectorised or pipelined (cp.async needs >= 4-byte copies)
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(signature) - len(p["constexprs"]))}
        src = ASTSource(lora_decode_kernel, signature, constexprs=p["constexprs"], attrs=aligned)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": p["num_warps"], "num_stages": p["num_stages"]},
        )
        with tempfile.TemporaryDirectory() as d:
            cubin = os.path.join(d, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            usage = subprocess.run(
                [tool, "--dump-resource-usage", cubin], capture_output=True, text=True
            ).stdout
        found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
        ptx = kernel.asm["ptx"]
        out.append(
            {
                "case": case,
                "shared": int(kernel.metadata.shared),
                "registers": int(found["REG"]),
                "stack": int(found["STACK"]),
                "local": int(found["LOCAL"]),
                "async_copies": ptx.count("cp.async."),
                "ptx_lines": ptx.count("\n"),
            }
        )
    return out


if __name__ == "__main__":
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    result = interpret(spec) if mode == "interpret" else compile_sm90(spec)
    print(json.dumps(result))
