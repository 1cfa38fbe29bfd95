"""The Mosaic GPU fused prefill kernel (``pallas_mosaic_gpu.py``): ``x @ W + hc @ B_flat`` in one GEMM.

On the CPU it runs in Mosaic GPU's interpreter (``mosaic_gpu_interpret``) against float64 and ``reference``,
and is lowered for CUDA at Llama-3-8B shapes; the ``gpu``-marked test runs it on a Hopper GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_lora_cases import (
    TOLERANCE,
    assert_matches_reference,
    inputs_for,
    llama_projection_inputs,
    rel_err,
)

from pallas_kernels.grouped_lora import api, pallas_mosaic_gpu, shapes


@pytest.fixture
def any_size(monkeypatch):
    """The kernel serves every token count (its default starts at prefill sizes), and records its launches."""
    monkeypatch.setattr(pallas_mosaic_gpu, "MOSAIC_MIN_TOKENS", 1)
    launches = []
    kernel = pallas_mosaic_gpu.fused_matmul
    monkeypatch.setattr(
        pallas_mosaic_gpu, "fused_matmul", lambda *a, **k: launches.append(a[0].shape) or kernel(*a, **k)
    )
    return launches


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_matmul_matches_float64(dtype):
    """Several tiles in M, N and both K loops (x @ W: 3 steps, hc @ B: 2), more tiles than programs."""
    rng = np.random.default_rng()
    t, d, o, n = 256, 192, 256, 128
    x, w, hc, b = (rng.standard_normal(s) for s in ((t, d), (d, o), (t, n), (n, o)))
    w, b = w / np.sqrt(d), b / np.sqrt(n)
    y = pallas_mosaic_gpu.fused_matmul(*(jnp.asarray(a, dtype) for a in (x, w, hc, b)), interpret=True)
    q = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w, hc, b)]  # the rounded inputs
    want = q[0] @ q[1] + q[2] @ q[3]
    assert y.dtype == jnp.dtype(dtype) and y.shape == (t, o)
    assert rel_err(y, want) <= 4e-3  # one rounding of the float32 sum to 16 bits
    assert np.linalg.norm(q[2] @ q[3]) > 0.5 * np.linalg.norm(want)  # the expand is large: dropping it fails


def test_fused_matmul_refuses_untiled_shapes_and_mixed_dtypes():
    bf = jnp.bfloat16
    with pytest.raises(ValueError, match="tile"):
        pallas_mosaic_gpu.fused_matmul(
            jnp.zeros((100, 64), bf),
            jnp.zeros((64, 128), bf),
            jnp.zeros((100, 64), bf),
            jnp.zeros((64, 128), bf),
        )
    with pytest.raises(ValueError, match="16-bit"):
        pallas_mosaic_gpu.fused_matmul(
            jnp.zeros((128, 64), bf),
            jnp.zeros((64, 128), jnp.float16),
            jnp.zeros((128, 64), bf),
            jnp.zeros((64, 128), bf),
        )
    with pytest.raises(ValueError, match="wgmma"):
        pallas_mosaic_gpu.MosaicConfig(block_m=96)


CASES = [  # T not a multiple of block_m, E * r not of block_k, every routing that stresses the mask
    shapes.Case("mosaic_skewed_tail", 200, 128, 256, 5, 8, 2, "skewed", "bfloat16"),
    shapes.Case("mosaic_one_expert", 128, 64, 128, 6, 1, 2, "one_expert", "bfloat16"),
    shapes.Case("mosaic_empty_r64", 130, 64, 128, 9, 64, 2, "empty_experts", "bfloat16"),
    shapes.Case("mosaic_many_experts", 128, 64, 128, 1024, 1, 1, "skewed", "bfloat16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inference_matches_reference(case, any_size):
    inp = inputs_for(case, case.name)
    args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])
    got = jax.jit(
        lambda *a: api.grouped_lora_fused(*a, scaling=inp["scaling"], implementation="mosaic_gpu_interpret")
    )(*args)
    want = api.grouped_lora_fused(*args, scaling=inp["scaling"], implementation="reference")
    assert any_size == [
        (case.num_tokens + (-case.num_tokens) % 128, case.d_in)
    ]  # the kernel ran, on padded rows
    assert rel_err(got, want) <= TOLERANCE["bfloat16"]
    lora = api.grouped_lora(*args[:1], *args[2:], scaling=inp["scaling"], implementation="reference")
    norm = lambda a: np.linalg.norm(np.asarray(a, np.float64))  # noqa: E731
    assert norm(lora) > 5 * TOLERANCE["bfloat16"] * norm(want)  # the LoRA term is not within the tolerance


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_and_other_sizes_are_the_fallbacks(dtype, any_size):
    """Under differentiation the backend is the decode backend's XLA ops (the kernel is inference only); float32
    never reaches the 16-bit kernel: output and every gradient equal ``reference``."""
    case = shapes.Case(f"mosaic_grad_{dtype}", 6, 64, 128, 6, 4, 2, "skewed", dtype)
    assert_matches_reference(case, "mosaic_gpu_interpret", fused=True)
    assert not any_size


def test_small_calls_go_to_the_decode_backend(monkeypatch):
    """Below ``MOSAIC_MIN_TOKENS`` the forward is ``pallas_gpu_decode``'s, which it wraps."""
    monkeypatch.setattr(pallas_mosaic_gpu, "fused_matmul", lambda *a, **k: pytest.fail("launched"))
    case = shapes.Case("mosaic_small", 8, 64, 128, 6, 4, 2, "uniform", "bfloat16")
    inp = inputs_for(case, case.name)
    args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])
    got = api.grouped_lora_fused(*args, scaling=inp["scaling"], implementation="mosaic_gpu_interpret")
    want = api.grouped_lora_fused(*args, scaling=inp["scaling"], implementation="reference")
    assert rel_err(got, want) <= TOLERANCE["bfloat16"]


def test_names_and_refusal_off_gpu():
    assert api.resolve_implementation("mosaic_gpu_interpret") == "mosaic_gpu_interpret"
    if jax.default_backend() == "gpu":
        pytest.skip("the refusal is for hosts without a GPU")
    with pytest.raises(NotImplementedError, match="mosaic_gpu"):
        api._ops("mosaic_gpu", 4, 8)
    case = shapes.Case("mosaic_refused", 256, 64, 128, 4, 8, 2, "uniform", "bfloat16")
    inp = inputs_for(case, case.name)
    args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])
    got = api.grouped_lora_fused(*args, scaling=inp["scaling"], implementation=["mosaic_gpu", "xla"])
    want = api.grouped_lora_fused(*args, scaling=inp["scaling"], implementation="reference")
    assert rel_err(got, want) <= TOLERANCE["bfloat16"]  # the list fell through to xla


@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (4096, 1024), (14336, 4096)])
def test_lowers_for_cuda_at_llama_shapes(d_in, d_out):
    """Llama-3-8B projections at a 4096-token prefill (E=28, r=8: 224 expert columns padded to 256) lower to
    one Mosaic GPU custom call for CUDA on this CPU-only host."""
    bf16 = jnp.bfloat16
    spec = jax.ShapeDtypeStruct
    args = (
        spec((4096, d_in), bf16),
        spec((d_in, d_out), bf16),
        spec((4096, 256), bf16),
        spec((256, d_out), bf16),
    )
    fn = jax.jit(lambda *a: pallas_mosaic_gpu.fused_matmul(*a, num_programs=132))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [256, 1000])
def test_gpu_matches_reference(num_tokens):
    if str(getattr(jax.devices()[0], "compute_capability", "")) != "9.0":
        pytest.skip("wgmma needs a Hopper GPU")
    x, w, a, b, ids, weights, scaling = llama_projection_inputs(num_tokens, jnp.bfloat16, seed=num_tokens)
    got = api.grouped_lora_fused(x, w, a, b, ids, weights, scaling=scaling, implementation="mosaic_gpu")
    ref = api.grouped_lora_fused(x, w, a, b, ids, weights, scaling=scaling, implementation="reference")
    assert rel_err(got, ref) <= TOLERANCE["bfloat16"]
