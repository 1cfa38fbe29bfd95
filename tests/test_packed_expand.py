"""``pallas_gpu_expand.expand_forward_group_packed``: the packed GEMM and the routed expand in ONE launch (the
pack's tiles by the first programs, the expand's B_flat block after a wait on them). In interpret mode its
packed GEMM against float64 NumPy, its outputs against the routed kernel given that GEMM's output and against
a float64 reference; wired into the model's packed path (``expand_pack`` knob); lowered for CUDA on this CPU
host. Compiled twins are marked ``gpu``."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_lora import pallas_gpu_expand, xla
from pallas_kernels.grouped_lora.gating import RouteSpec, route
from pallas_kernels.grouped_lora.pallas_gpu_expand import ExpandConfig
from tests.grouped_lora_cases import rel_err
from tests.test_fused_expand import qkv_b64_specs
from tests.test_pallas_decode import _triton_kernels, _walk, three_prompt_logits, tiny_decode_model

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# name -> (T, d_in, widths, experts, rank, dtype, gate halves, expand tiles, pack block_n, pack K steps)
CASES = {
    # one pack split, no tails
    "t2_f32_one_split": (2, 64, (40, 24), 6, 4, "float32", False, ExpandConfig(16, 32, split_k=1), 16, 4),
    # pack K tail (100 = 3 x 32 + 4) and four pack splits; expand split-K 2; N tail
    "t5_f32_pack_splits": (5, 100, (40, 33), 6, 4, "float32", False, ExpandConfig(16, 32, split_k=2), 16, 1),
    # bf16 with hi / lo gate halves, three projections, T = 16 rows exactly
    "t16_bf16_halves": (16, 96, (48, 16, 16), 5, 8, "bfloat16", True, ExpandConfig(16, 32), 32, 2),
    "t64_bf16_default_tiles": (64, 256, (128, 64), 28, 8, "bfloat16", True, None, 64, 4),
}


def _inputs(name: str) -> tuple:
    t, d_in, widths, e, r, dtype, halves, *_ = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = len(widths)
    gate_cols = (2 if halves else 1) * n * e
    x = rng.standard_normal((t, d_in))
    pack = rng.standard_normal((d_in, n * e * r + gate_cols)) * d_in**-0.5
    ws = [rng.standard_normal((d_in, o)) * d_in**-0.5 for o in widths]
    bs = [rng.standard_normal((e * r, o)) for o in widths]
    scalings = [rng.random(e) + 0.5 for _ in widths]
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    routed = pallas_gpu_expand.Routed.of_pack(RouteSpec(2), e, r, n, halves=halves)
    return (
        cast(x),
        cast(pack),
        [cast(w) for w in ws],
        [cast(b) for b in bs],
        [cast(s) for s in scalings],
        routed,
    )


def _want(x, pack, ws, bs, scalings, routed) -> list[np.ndarray]:  # noqa: ANN001
    """Float64 ``x @ W + hc @ B``, ``hc`` from the float64 packed GEMM and ``gating.route``."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    wide = f64(x) @ f64(pack)
    e, r = routed.num_experts, routed.rank
    out = []
    for p, (w, b, s) in enumerate(zip(ws, bs, scalings, strict=True)):
        logits = sum(wide[:, c : c + e] for c in routed.logit_col0s[p])
        sp = routed.spec
        ids, weights = route(
            jnp.asarray(logits, jnp.float32), top_k=sp.top_k, temperature=sp.temperature, mode=sp.mode
        )
        h = jnp.asarray(wide[:, routed.h_col0s[p] : routed.h_col0s[p] + e * r].reshape(-1, e, r), jnp.float32)
        hc = xla.masked_coefficients(h, ids, weights, jnp.asarray(s, jnp.float32), jnp.float32)
        out.append(f64(x) @ f64(w) + f64(hc) @ f64(b))
    return out


@pytest.mark.parametrize(
    "interpret,separate",
    [(True, 1), pytest.param(False, 1, marks=pytest.mark.gpu), pytest.param(False, 0, marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("name", list(CASES))
def test_packed_expand_matches_its_parts_and_float64(monkeypatch, name, interpret, separate):
    """``separate``: the pack's tiles as programs of their own, or computed first by the expand programs
    (``PACK_SEPARATE``; on the GPU only: interpret mode runs them apart)."""
    *_, dtype, _, config, pack_bn, pack_steps = CASES[name]
    monkeypatch.setattr(pallas_gpu_expand, "PACK_SEPARATE", separate)
    monkeypatch.setattr(pallas_gpu_expand, "PACK_BLOCK_N", pack_bn)
    monkeypatch.setattr(pallas_gpu_expand, "PACK_STEPS", pack_steps)
    x, pack, ws, bs, scalings, routed = _inputs(name)

    @jax.jit
    def run(x, pack, ws, bs, scalings):  # noqa: ANN001, ANN202
        return pallas_gpu_expand.expand_forward_group_packed(
            x, pack, ws, bs, scalings, routed=routed, interpret=interpret, config=config, return_wide=True
        )

    ys, wide = run(x, pack, ws, bs, scalings)
    want_wide = np.asarray(x, np.float64) @ np.asarray(pack, np.float64)
    assert wide.dtype == jnp.float32 and rel_err(wide, want_wide) < 1e-5
    # the expand half: the routed kernel given this launch's own packed GEMM
    given = jax.jit(
        lambda *a: pallas_gpu_expand.expand_forward_group_routed(
            *a, routed=routed, interpret=interpret, config=config
        )
    )(x, ws, wide, bs, scalings)
    for y, g, want in zip(ys, given, _want(x, pack, ws, bs, scalings, routed), strict=True):
        assert y.dtype == x.dtype and y.shape == want.shape
        assert rel_err(y, g) < 1e-6
        assert rel_err(y, want) < TOLERANCE[dtype]


def test_packed_expand_refuses_mismatched_inputs():
    x, pack, ws, bs, scalings, routed = _inputs("t2_f32_one_split")
    with pytest.raises(ValueError, match="expand_forward_group_packed"):
        pallas_gpu_expand.expand_forward_group_packed(x, pack[:-1], ws, bs, scalings, routed=routed)
    with pytest.raises(ValueError, match="expand_forward_group_packed"):
        pallas_gpu_expand.expand_forward_group_packed(x, pack[:, :-3], ws, bs, scalings, routed=routed)
    with pytest.raises(ValueError, match="expand_forward_group_packed"):
        pallas_gpu_expand.expand_forward_group_packed(
            x, pack.astype(jnp.bfloat16), ws, bs, scalings, routed=routed
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_packed_step_with_pack_in_expand_matches(monkeypatch, dtype):
    """The tiny model's packed path with ``expand_pack`` on: every group through the packed kernel (no XLA
    GEMM for the pack), the logits of the routed kernel after XLA's GEMM (knob off)."""
    model = tiny_decode_model(9, dtype, packed=True)
    cfg = model.config
    calls: list[int] = []
    kernel = pallas_gpu_expand.expand_forward_group_packed
    monkeypatch.setattr(
        pallas_gpu_expand,
        "expand_forward_group_packed",
        lambda x, p, *a, **kw: calls.append(p.shape[1]) or kernel(x, p, *a, **kw),
    )

    assert pallas_gpu_expand.FUSED_EXPAND_MAX_TOKENS >= 12 and pallas_gpu_expand.EXPAND_ROUTE == 1
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_PACK", 0)
    off = three_prompt_logits(model)
    assert not calls
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_PACK", 1)
    on = three_prompt_logits(model)
    assert len(calls) == 4 * cfg.num_hidden_layers
    assert rel_err(on, off) < (1e-5 if dtype == "float32" else 2e-2)


def test_packed_expand_lowers_for_cuda_as_one_kernel():
    """Llama-3-8B's q/k/v at batch 64 (28 rank-8 experts, bf16 gate halves): ONE Triton kernel, with its
    tickets and counters as atomics and the wait as a while loop, and no XLA GEMM, sort or top-k beside it."""
    routed, x, ws, bs, scalings, pack_cols = qkv_b64_specs()
    args = (x, jax.ShapeDtypeStruct((4096, pack_cols), jnp.bfloat16), ws, bs, scalings)

    def fn(*a):
        return pallas_gpu_expand.expand_forward_group_packed(*a, routed=routed)

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    assert "stablehlo.dot_general" not in text and "sort" not in text and "top_k" not in text.lower()
    (kernel,) = _triton_kernels(lowered)
    names = [op.name for op in _walk(kernel)]
    assert names.count("tt.atomic_rmw") >= 3 and "scf.while" in names
