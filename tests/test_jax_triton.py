"""The ``jax_triton`` backend: its decode kernel, written in plain Triton, equals ``reference``.

jax-triton itself needs a GPU jaxlib, so on the CPU the kernel runs through Triton's own interpreter
(``jax_triton_interpret``, in a child process with ``TRITON_INTERPRET=1``) and is compiled for sm_90 by
Triton's compiler; both need the ``triton`` package in ``.triton/`` (``make test`` installs it). The
``gpu``-marked test runs the real ``triton_call`` path.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_lora_cases import assert_matches_reference, llama_projection_inputs

from pallas_kernels.grouped_lora import api, jax_triton_decode, pallas_gpu_decode, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_DIR = os.path.join(ROOT, ".triton")
needs_triton = pytest.mark.skipif(
    not os.path.isdir(os.path.join(TRITON_DIR, "triton")),
    reason="triton not in .triton/ (make test installs it)",
)

# Every case differs from a plain one in one way or two: masked d_in / d_out tails, ranks 1, 3, 4, 8, 16 and 64,
# k = 1, 3 and 4 (padded slots), several K splits, E up to 1024, skewed routing, empty experts, all tokens on one
# expert pair, one expert on every slot, a zero routing weight, both base products at T = 1, the dot path at
# T = 2 to 16; float32 and bfloat16.
SMALL = {"block_n": 32, "block_k": 64}
CASES = [
    {"T": 1, "D": 200, "O": 72, "E": 6, "r": 3, "k": 2, "dtype": "float32", "tiles": SMALL},
    {
        "T": 1,
        "D": 200,
        "O": 72,
        "E": 6,
        "r": 3,
        "k": 2,
        "dtype": "bfloat16",
        "tiles": {**SMALL, "base_dot": "fma"},
    },
    {
        "T": 1,
        "D": 256,
        "O": 64,
        "E": 8,
        "r": 16,
        "k": 4,
        "dtype": "float32",
        "routing": "repeat",
        "zero_weight": 1,
    },
    {
        "T": 1,
        "D": 96,
        "O": 48,
        "E": 28,
        "r": 8,
        "k": 2,
        "dtype": "bfloat16",
        "tiles": {"block_n": 16, "block_k": 32, "split_k": 3},
    },
    {"T": 3, "D": 200, "O": 72, "E": 6, "r": 3, "k": 2, "dtype": "float32", "tiles": SMALL},
    {
        "T": 5,
        "D": 128,
        "O": 64,
        "E": 4,
        "r": 4,
        "k": 3,
        "dtype": "bfloat16",
        "tiles": {"block_n": 32, "block_k": 32},
    },
    {"T": 16, "D": 130, "O": 40, "E": 5, "r": 8, "k": 1, "dtype": "float32", "tiles": SMALL},
    {"T": 2, "D": 64, "O": 40, "E": 1024, "r": 1, "k": 2, "dtype": "float32", "routing": "skewed"},
    {"T": 1, "D": 128, "O": 96, "E": 8, "r": 64, "k": 2, "dtype": "bfloat16", "tiles": SMALL},
    {"T": 7, "D": 96, "O": 64, "E": 12, "r": 16, "k": 2, "dtype": "bfloat16", "routing": "empty_experts"},
    {"T": 4, "D": 64, "O": 32, "E": 6, "r": 4, "k": 2, "dtype": "float32", "routing": "one_expert"},
]
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def _child(mode: str, cases: list[dict], interpret: bool) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TRITON_DIR, ROOT]), "JAX_PLATFORMS": "cpu"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "jax_triton_child.py"), mode, json.dumps(cases)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _tiles(**changes) -> pallas_gpu_decode.DecodeConfig:
    """The default tiles (``DecodeConfig.for_shape``) with ``changes``."""
    return dataclasses.replace(pallas_gpu_decode.DecodeConfig.for_shape(1, 4096, 4096), **changes)


def test_launch_params_cover_d_in_with_no_empty_split():
    for d_in in (96, 200, 4096, 14336):
        for split_k in (0, 3, 64):
            p = jax_triton_decode.launch_params(1, d_in, 4096, 8, 2, _tiles(split_k=split_k))
            c = p["constexprs"]
            assert p["grid"] == (64, p["splits"])
            assert c["K_PER_SPLIT"] % c["BLOCK_K"] == 0
            assert (p["splits"] - 1) * c["K_PER_SPLIT"] < d_in <= p["splits"] * c["K_PER_SPLIT"]
    one = jax_triton_decode.launch_params(1, 4096, 4096, 8, 2)["constexprs"]
    assert (one["BLOCK_T"], one["BLOCK_TL"], one["USE_DOT"], one["BLOCK_KS"]) == (16, 1, True, 2)
    fma = jax_triton_decode.launch_params(1, 4096, 4096, 8, 2, _tiles(base_dot="fma"))
    assert (fma["constexprs"]["BLOCK_T"], fma["constexprs"]["USE_DOT"]) == (1, False)
    three = jax_triton_decode.launch_params(3, 4096, 4096, 3, 3)["constexprs"]
    assert (three["BLOCK_T"], three["BLOCK_TL"], three["BLOCK_KS"], three["BLOCK_R"]) == (16, 16, 4, 4)
    with pytest.raises(ValueError, match="base_dot"):
        jax_triton_decode.launch_params(1, 64, 64, 8, 2, _tiles(base_dot="wgmma"))


def test_names_and_refusal_on_cpu():
    assert api.resolve_implementation("jax_triton_interpret") == "jax_triton_interpret"
    with pytest.raises(ValueError, match="unknown grouped_lora implementation"):
        api.resolve_implementation("xla_interpret")
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the backend may run")
    x = jnp.ones((1, 8))
    with pytest.raises(NotImplementedError, match="jax_triton needs a GPU"):
        api.grouped_lora_fused(
            x,
            jnp.ones((8, 4)),
            jnp.ones((3, 8, 2)),
            jnp.ones((3, 2, 4)),
            jnp.zeros((1, 2), jnp.int32),
            jnp.ones((1, 2)),
            scaling=jnp.ones(3),
            implementation="jax_triton",
        )


def test_shape_mismatch_is_refused_before_launch():
    with pytest.raises(ValueError, match="do not agree"):
        jax_triton_decode.decode_forward(
            jnp.ones((1, 8)),
            jnp.ones((8, 4)),
            jnp.ones((3, 9, 2)),
            jnp.ones((3, 2, 4)),
            jnp.zeros((1, 2), jnp.int32),
            jnp.ones((1, 2)),
            jnp.ones(3),
            call=lambda *a, **k: pytest.fail("launched"),
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_are_the_xla_paths(dtype):
    """Under differentiation the backend is ``xla``'s shrink / expand (the kernel is inference only): its output
    and every gradient equal ``reference``, and no Triton is needed for that."""
    case = shapes.Case(f"jt_grad_{dtype}", 5, 24, 20, 6, 4, 2, "skewed", dtype, ("jax_triton",))
    assert_matches_reference(case, "jax_triton_interpret", fused=True)


@needs_triton
def test_interpreted_kernel_matches_reference():
    cases = [{**c, "seed": i} for i, c in enumerate(CASES)]
    results = _child("interpret", cases, interpret=True)
    assert [r["case"] for r in results] == cases
    for got in results:
        case = got["case"]
        assert got["rel_err"] <= TOL[case["dtype"]], got
        assert got["lora_scale"] > 0.1, got  # the LoRA term is 10x either tolerance: dropping it would fail
    assert results[3]["splits"] == 3  # the case that asks for 3 K splits ran with 3


@needs_triton
def test_compiles_for_sm90_at_llama_shapes():
    """Triton's own front end and ptxas accept the kernel at the shapes a Llama-3-8B decode gives it: no register
    spills, the K loop's loads pipelined (asynchronous copies), and two blocks' shared memory fit an SM."""
    cases = [
        {"T": 1, "D": 4096, "O": 4096, "r": 8, "k": 2, "dtype": "bfloat16"},
        {"T": 1, "D": 14336, "O": 4096, "r": 8, "k": 2, "dtype": "bfloat16"},
        {"T": 16, "D": 4096, "O": 14336, "r": 8, "k": 2, "dtype": "bfloat16"},
    ]
    out = _child("compile", cases, interpret=False)
    assert [r["case"] for r in out] == cases
    for r in out:
        assert r["stack"] == 0 and r["local"] == 0, r  # no spills
        assert r["async_copies"] > 0, r
        assert 2 * r["shared"] <= 227 * 1024, r


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_matches_reference(num_tokens, dtype):
    x, w, a, b, ids, weights, scaling = llama_projection_inputs(num_tokens, dtype, seed=num_tokens)
    got = api.grouped_lora_fused(x, w, a, b, ids, weights, scaling=scaling, implementation="jax_triton")
    ref = api.grouped_lora_fused(x, w, a, b, ids, weights, scaling=scaling, implementation="reference")
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= TOL[dtype]
