"""``pallas_gpu_expand``: ``x @ W + hc @ B_flat`` in one launch for batched decode, in interpret mode against a
float64 NumPy reference, wired into the model's packed path (``fused_expand`` knob), and lowered for CUDA at
Llama-3-8B shapes on this CPU-only host (one Triton kernel per group). Compiled twins are marked ``gpu``."""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_lora import api, pallas_gpu_expand, xla
from pallas_kernels.grouped_lora.pallas_gpu_expand import ExpandConfig
from tests.grouped_lora_cases import rel_err
from tests.test_pallas_decode import _triton_kernels, _walk, tiny_decode_model, traced_logits

SMALL = ExpandConfig(block_n=16, block_k=32)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# name -> (T, d_in, widths, expert columns per projection, dtype, tiles)
CASES = {
    "t2_f32_split1": (2, 72, (40, 24, 24), (48, 15, 48), "float32", ExpandConfig(16, 32, split_k=1)),
    "t5_bf16_split2": (5, 100, (40, 33), (48, 48), "bfloat16", ExpandConfig(16, 32, split_k=2)),
    "t16_f32_split_auto": (16, 128, (48,), (224,), "float32", SMALL),
    "t64_bf16_default_tiles": (64, 256, (128, 64), (224, 224), "bfloat16", None),
}


def _inputs(name: str) -> tuple:
    t, d_in, widths, ns, dtype, _ = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = rng.standard_normal((t, d_in))
    ws = [rng.standard_normal((d_in, o)) * d_in**-0.5 for o in widths]
    # hc as the dense path makes it: most entries zero (experts a token did not pick)
    hcs = [rng.standard_normal((t, n)) * (rng.random((t, n)) < 0.2) for n in ns]
    bs = [rng.standard_normal((n, o)) for n, o in zip(ns, widths, strict=True)]
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), [cast(w) for w in ws], [cast(h) for h in hcs], [cast(b) for b in bs]


def _want(x, ws, hcs, bs) -> list[np.ndarray]:  # noqa: ANN001
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return [f64(x) @ f64(w) + f64(h) @ f64(b) for w, h, b in zip(ws, hcs, bs, strict=True)]


def _record_expand_calls(monkeypatch: pytest.MonkeyPatch, key: Callable[[str, tuple, dict], Any]) -> list:
    """Spies on ``pallas_gpu_expand.expand_forward_group`` and ``expand_forward_given`` (the same kernel, hc
    built inside): each call appends ``key(function name, its args, its keyword args)`` to the list returned,
    then runs the kernel."""
    calls: list = []
    for name in ("expand_forward_group", "expand_forward_given"):
        kernel = getattr(pallas_gpu_expand, name)
        spy = lambda *a, name=name, kernel=kernel, **kw: calls.append(key(name, a, kw)) or kernel(*a, **kw)  # noqa: E731
        monkeypatch.setattr(pallas_gpu_expand, name, spy)
    return calls


@pytest.mark.parametrize("spread", [0, 1])
@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(CASES))
def test_expand_kernel_matches_float64(monkeypatch, name, interpret, spread):
    """``spread``: the B_flat rows in split 0 only, or shared among the K splits (``EXPAND_SPREAD_LORA``)."""
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_SPREAD_LORA", spread)
    x, ws, hcs, bs = _inputs(name)
    config = CASES[name][-1]
    ys = jax.jit(lambda *a: pallas_gpu_expand.expand_forward_group(*a, interpret=interpret, config=config))(
        x, ws, hcs, bs
    )
    for y, want, h, b in zip(ys, _want(x, ws, hcs, bs), hcs, bs, strict=True):
        assert y.dtype == x.dtype and y.shape == want.shape
        lora = np.asarray(h, np.float64) @ np.asarray(b, np.float64)
        assert np.linalg.norm(lora) > 0.3 * np.linalg.norm(want - lora)  # dropping the LoRA block cannot pass
        err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
        assert err < TOLERANCE[CASES[name][4]]


def test_expand_kernel_refuses_mismatched_shapes():
    x, ws, hcs, bs = _inputs("t2_f32_split1")
    with pytest.raises(ValueError, match="do not match"):
        pallas_gpu_expand.expand_forward_group(x, ws, hcs[:1] + hcs[:2], bs, interpret=True)


def test_model_packed_step_with_fused_expand_matches(monkeypatch):
    """A tiny model with inference packs (the sampler's path), pallas_gpu_decode in interpret mode: a 4-token
    prefill and a batch-3 decode step take the fused expand for every group with ``fused_expand`` on, and give
    the logits of XLA's GEMMs (knob off)."""
    model = tiny_decode_model(6, "float32", packed=True)
    cfg = model.config
    calls = _record_expand_calls(monkeypatch, lambda _, a, __: len(a[1]))  # a[1]: the group's Ws

    def run():
        ids = jnp.asarray([[1, 5, 6, 7], [1, 8, 9, 3], [4, 4, 2, 1]])
        return model.forward(
            ids, attention_mask=jnp.ones((3, 4), jnp.int32), positions=jnp.arange(4)[None]
        ).logits

    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_ROUTE", 0)  # the routed variant has its own test below
    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 0)
    off = run()
    assert not calls
    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 64)
    on = run()
    assert sorted(set(calls)) == [1, 2, 3] and len(calls) == 4 * cfg.num_hidden_layers
    assert rel_err(on, off) < 1e-5
    assert api.expand_fused_plan("xla", 12, 48) is None
    assert api.expand_fused_plan("pallas_gpu_decode_interpret", 1, 48) is None  # one token: the decode kernel
    assert api.expand_fused_plan("pallas_gpu_decode_interpret", 65, 48) is None  # above the knob


@pytest.mark.parametrize("widths", [(4096, 1024, 1024), (14336, 14336), (4096,)], ids=["qkv", "gate_up", "o"])
def test_expand_kernel_lowers_for_cuda_as_one_kernel(widths):
    """Llama-3-8B's groups at batch 64 (bf16, 28 rank-8 experts: 224 expert rows) lower to ONE Triton kernel
    for CUDA, with one W loop and one B_flat loop per projection branch."""
    spec = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    args = (
        spec((64, 4096), bf16),
        [spec((4096, o), bf16) for o in widths],
        [spec((64, 224), bf16) for _ in widths],
        [spec((224, o), bf16) for o in widths],
    )
    lowered = jax.jit(pallas_gpu_expand.expand_forward_group).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    (kernel,) = _triton_kernels(lowered)
    assert sum(op.name == "scf.for" for op in _walk(kernel)) == 2 * len(widths)


@pytest.mark.gpu
@pytest.mark.parametrize("widths", [(4096, 1024, 1024), (14336, 14336), (4096,)], ids=["qkv", "gate_up", "o"])
@pytest.mark.parametrize("num_tokens", [8, 64])
def test_expand_kernel_compiled_at_llama_shapes(widths, num_tokens):
    rng = np.random.default_rng(num_tokens + len(widths))
    bf16 = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((num_tokens, 4096)), bf16)
    ws = [jnp.asarray(rng.standard_normal((4096, o)) / 64, bf16) for o in widths]
    hcs = [
        jnp.asarray(rng.standard_normal((num_tokens, 224)) * (rng.random((num_tokens, 224)) < 0.1), bf16)
        for _ in widths
    ]
    bs = [jnp.asarray(rng.standard_normal((224, o)), bf16) for o in widths]
    ys = jax.jit(pallas_gpu_expand.expand_forward_group)(x, ws, hcs, bs)
    for y, want in zip(ys, _want(x, ws, hcs, bs), strict=True):
        assert np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want) < TOLERANCE["bfloat16"]


def test_grouped_lora_fused_takes_the_expand_kernel_for_a_few_tokens(monkeypatch):
    """``grouped_lora_fused(implementation="pallas_gpu_decode")`` in inference runs ``forward_if_batched`` from 2
    tokens up to the knob (matching the reference), the decode kernel at 1, XLA above; gradients are XLA's."""
    from tests.test_pallas_decode import _args, _case, _want
    from tests.test_pallas_decode import _inputs as decode_inputs

    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 8)
    calls = _record_expand_calls(monkeypatch, lambda _, a, __: a[0].shape[0])  # a[0]: x
    impl = "pallas_gpu_decode_interpret"
    for t in (1, 2, 8, 9):
        inp = decode_inputs(_case(t, 72, 40, 6, 8, 2, "float32"), f"expand-api-{t}")
        y = api.grouped_lora_fused(*_args(inp)[:-1], scaling=inp["scaling"], implementation=impl)
        want, lora = _want(inp)
        assert np.linalg.norm(np.asarray(y - want)) / np.linalg.norm(np.asarray(lora)) < 1e-5
    assert calls == [2, 8]

    def loss(x):
        return jnp.sum(
            api.grouped_lora_fused(x, *_args(inp)[1:-1], scaling=inp["scaling"], implementation=impl)
        )

    inp = decode_inputs(_case(4, 72, 40, 6, 8, 2, "float32"), "expand-api-grad")
    calls.clear()
    g = jax.grad(loss)(inp["x"])
    assert not calls
    g_ref = jax.grad(
        lambda x: jnp.sum(
            api.grouped_lora_fused(x, *_args(inp)[1:-1], scaling=inp["scaling"], implementation="reference")
        )
    )(inp["x"])
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("early", [0, 1])
@pytest.mark.parametrize(
    "t,halves,spec",
    [
        (5, True, (2, 1.0, "topk_then_softmax")),
        (16, False, (1, 0.5, "softmax_then_topk")),
        (3, True, (3, 0.7, "topk_then_softmax")),
    ],
)  # fmt: skip
def test_routed_expand_kernel_equals_xla_routing(monkeypatch, t, halves, spec, early):
    """``expand_forward_group_routed`` (hc built in the kernel from the packed GEMM's output: shrinks, gate
    logits as one range or bf16-style hi / lo halves) equals ``expand_forward_group`` given ``gating.route`` +
    ``xla.masked_coefficients`` of the same columns; with the projections' logits swapped it does not. Also
    with the logits loaded before the W loop (``EXPAND_EARLY_ROUTING``)."""
    from pallas_kernels.grouped_lora import gating, xla
    from pallas_kernels.grouped_lora.gating import RouteSpec

    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_EARLY_ROUTING", early)

    rng = np.random.default_rng(t)
    n, e, r, d_in, widths = 3, 6, 4, 40, (24, 16, 16)
    spec = RouteSpec(*spec)
    a_cols = n * e * r
    gate_cols = (2 if halves else 1) * n * e
    wide = jnp.asarray(rng.standard_normal((t, a_cols + gate_cols)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((t, d_in)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((d_in, o)) / 6, jnp.float32) for o in widths]
    bs = [jnp.asarray(rng.standard_normal((e * r, o)), jnp.float32) for o in widths]
    scalings = [jnp.asarray(rng.uniform(0.5, 2.0, e), jnp.float32) for _ in widths]
    col0s = tuple((a_cols + i * e, a_cols + (n + i) * e) if halves else (a_cols + i * e,) for i in range(n))
    routed = pallas_gpu_expand.Routed(spec, e, r, tuple(i * e * r for i in range(n)), col0s)
    got = pallas_gpu_expand.expand_forward_group_routed(
        x, ws, wide, bs, scalings, routed=routed, interpret=True, config=SMALL
    )
    hcs = []
    for i in range(n):
        logits = sum(wide[:, c : c + e] for c in col0s[i])
        ids, weights = gating.route_spec(logits, spec)
        h_ter = wide[:, i * e * r : (i + 1) * e * r].reshape(t, e, r)
        hcs.append(xla.masked_coefficients(h_ter, ids, weights, scalings[i], jnp.float32))
    want = pallas_gpu_expand.expand_forward_group(x, ws, hcs, bs, interpret=True, config=SMALL)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-6
    swapped = dataclasses.replace(routed, logit_col0s=col0s[1:] + col0s[:1])
    moved = pallas_gpu_expand.expand_forward_group_routed(
        x, ws, wide, bs, scalings, routed=swapped, interpret=True, config=SMALL
    )
    assert max(rel_err(m, w) for m, w in zip(moved, want, strict=True)) > 1e-3
    with pytest.raises(ValueError, match="do not match"):
        pallas_gpu_expand.expand_forward_group_routed(
            x, ws, wide, bs[:2], scalings, routed=routed, interpret=True
        )


@pytest.mark.parametrize("spread,early", [(0, 0), (1, 0), (1, 1)])
@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize(
    "t,d_in,e,r,k,dtype,batched",
    [
        (2, 72, 6, 4, 2, "float32", True),
        (5, 72, 28, 8, 2, "float32", False),  # 224 expert rows: not a multiple of the B_flat step
        (7, 72, 5, 3, 3, "bfloat16", True),  # rank 3, three slots
        (16, 72, 9, 8, 1, "bfloat16", False),
        (6, 520, 28, 8, 2, "float32", True),  # 5 W steps in 2 K splits, 224 B_flat rows shared between them
    ],
)  # fmt: skip
def test_given_routing_expand_equals_reference(
    monkeypatch, t, d_in, e, r, k, dtype, batched, interpret, spread, early
):
    """A single projection's call (``grouped_lora_fused`` with ids and weights) of few rows x column blocks
    (``EXPAND_GIVEN``) builds hc in the kernel from the shrink ([E, T, R] batched, or [T, E, R] flat) and the
    given routing (read before the W loop with ``early``), and equals the plain-JAX reference, including a
    token with every slot on one expert and a zero weight; without the scaling's gather (all ones) it does not."""
    from tests.test_pallas_decode import _args, _case, _want
    from tests.test_pallas_decode import _inputs as decode_inputs

    assert pallas_gpu_expand.coef_work(t, (40,)) <= pallas_gpu_expand.EXPAND_GIVEN  # the default takes it
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_SPREAD_LORA", spread)
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_EARLY_ROUTING", early)
    monkeypatch.setattr(xla, "BATCHED_SHRINK_MAX_TOKENS", 64 if batched else 0)
    calls = _record_expand_calls(monkeypatch, lambda _, __, kw: kw.get("expert_major"))
    inp = decode_inputs(_case(t, d_in, 40, e, r, k, dtype), f"expand-given-{t}-{d_in}-{e}-{r}-{k}")
    impl = "pallas_gpu_decode" if not interpret else "pallas_gpu_decode_interpret"
    fused = jax.jit(lambda *a: api.grouped_lora_fused(*a[:-1], scaling=a[-1], implementation=impl))
    y = fused(*_args(inp))
    assert calls == [batched]
    want, lora = _want(inp)
    base = want - lora
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: the LoRA term read back from a rounded sum
    assert y.dtype == inp["x"].dtype
    assert rel_err(y.astype(jnp.float32) - base, lora) < tol
    unscaled = fused(*_args(inp)[:-1], jnp.ones_like(inp["scaling"]))
    assert rel_err(unscaled.astype(jnp.float32) - base, lora) > 0.05


def test_given_routing_expand_only_up_to_its_work_limit(monkeypatch):
    """``coef_work`` = padded rows x column blocks; above ``EXPAND_GIVEN`` (and with the knob at 0) the call
    takes XLA's coefficients and ``expand_forward_group`` instead."""
    from tests.test_pallas_decode import _args, _case
    from tests.test_pallas_decode import _inputs as decode_inputs

    assert pallas_gpu_expand.coef_work(64, (4096,)) == 4096 == pallas_gpu_expand.EXPAND_GIVEN
    assert pallas_gpu_expand.coef_work(64, (14336,)) == 14336
    assert pallas_gpu_expand.coef_work(3, (4096, 1024, 1024)) == 16 * 96
    inp = decode_inputs(_case(4, 72, 40, 6, 8, 2, "float32"), "expand-given-limit")
    ran = _record_expand_calls(monkeypatch, lambda name, _, __: name)
    for limit in (16, 15, 0):
        monkeypatch.setattr(pallas_gpu_expand, "EXPAND_GIVEN", limit)
        pallas_gpu_expand.forward_if_batched(*_args(inp), interpret=True)
    assert ran == ["expand_forward_given", "expand_forward_group", "expand_forward_group"]


@pytest.mark.parametrize("batched", [0, 1])
def test_expand_above_the_given_limit_equals_reference_with_either_shrink(monkeypatch, batched):
    """Above ``EXPAND_GIVEN`` (XLA builds hc) the shrink is batched over experts (``EXPAND_BATCHED_SHRINK``: A as
    stored, a dot with a batch dimension) or flat; either way the call equals the plain-JAX reference."""
    from tests.test_pallas_decode import _args, _case, _want
    from tests.test_pallas_decode import _inputs as decode_inputs

    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_GIVEN", 0)
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_BATCHED_SHRINK", batched)
    inp = decode_inputs(_case(5, 72, 40, 6, 8, 2, "float32"), f"expand-batched-{batched}")
    fn = functools.partial(pallas_gpu_expand.forward_if_batched, interpret=True)
    y = fn(*_args(inp))
    want, lora = _want(inp)
    assert rel_err(y - (want - lora), lora) < 1e-5
    dots = [e for e in jax.make_jaxpr(fn)(*_args(inp)).jaxpr.eqns if e.primitive.name == "dot_general"]
    (batch_lhs, _), *_ = (e.params["dimension_numbers"][1] for e in dots)  # the first dot is the shrink
    assert bool(batch_lhs) == bool(batched)


def test_given_routing_expand_refuses_mismatched_shapes():
    x = jnp.zeros((4, 16))
    w, b, scaling = jnp.zeros((16, 8)), jnp.zeros((12, 8)), jnp.ones(3)
    ids, weights = jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="do not match"):  # [T, E, R] given as expert-major
        pallas_gpu_expand.expand_forward_given(
            x, w, jnp.zeros((4, 3, 4)), ids, weights, b, scaling, expert_major=True, interpret=True
        )


def test_given_routing_expand_lowers_for_cuda_as_one_kernel():
    """At Llama-3-8B's 4096 -> 4096 with 64 tokens (28 rank-8 experts) the given-routing expand is ONE Triton
    kernel with its W and B_flat loops, and no sort or top-k around it."""
    spec = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    args = (
        spec((64, 4096), bf16),
        spec((4096, 4096), bf16),
        spec((28, 64, 8), jnp.float32),
        spec((64, 2), jnp.int32),
        spec((64, 2), bf16),
        spec((224, 4096), bf16),
        spec((28,), jnp.float32),
    )
    fn = functools.partial(pallas_gpu_expand.expand_forward_given, expert_major=True)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    (kernel,) = _triton_kernels(lowered)
    assert sum(op.name == "scf.for" for op in _walk(kernel)) == 2
    assert "sort" not in text and "top_k" not in text.lower()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_packed_step_with_routed_expand_matches(monkeypatch, dtype):
    """The tiny model's packed path with ``fused_expand`` and ``expand_route`` on: every group through the
    routed kernel (its bf16 gates as hi / lo halves; with the default ``EXPAND_EARLY_ROUTING``, whose other
    setting the kernel tests above cover), the logits of the unfused path; ``return_routing`` falls back to XLA's
    routing."""
    # the defaults since session 13 (H100 A/B, benchmarks/RESULTS.md)
    assert pallas_gpu_expand.FUSED_EXPAND_MAX_TOKENS == 64 and pallas_gpu_expand.EXPAND_ROUTE == 1
    model = tiny_decode_model(7, dtype, packed=True)
    cfg = model.config
    calls = []
    kernel = pallas_gpu_expand.expand_forward_group_routed
    monkeypatch.setattr(
        pallas_gpu_expand, "expand_forward_group_routed", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )

    def run(**kw):
        ids = jnp.asarray([[1, 5, 6, 7], [1, 8, 9, 3]])
        mask = jnp.ones((2, 4), jnp.int32)
        return traced_logits(model, ids, mask, jnp.arange(4)[None], **kw)

    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 0)
    off = run()
    assert not calls
    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 64)
    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_ROUTE", 1)
    on = run()
    assert len(calls) == 4 * cfg.num_hidden_layers
    assert rel_err(on, off) < (1e-5 if dtype == "float32" else 2e-2)
    calls.clear()
    run(return_routing=True)
    assert not calls


@pytest.mark.parametrize("early", [0, 1])
def test_routed_expand_kernel_lowers_for_cuda_as_one_kernel(monkeypatch, early):
    """The routed kernel at Llama-3-8B's q/k/v, batch 64 (the packed GEMM's output with bf16 gate halves):
    ONE Triton kernel for CUDA, and no XLA sort / top-k beside it. With ``EXPAND_EARLY_ROUTING`` each
    projection's branch loads its logits (the hi and lo halves) before its W loop, else nothing."""
    from pallas_kernels.grouped_lora.gating import RouteSpec

    monkeypatch.setattr(pallas_gpu_expand, "EXPAND_EARLY_ROUTING", early)
    spec, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    widths, e, r = (4096, 1024, 1024), 28, 8
    routed = pallas_gpu_expand.Routed.of_pack(RouteSpec(2), e, r, len(widths), halves=True)
    ws = [spec((4096, o), bf16) for o in widths]
    bs = [spec((e * r, o), bf16) for o in widths]
    scalings = [spec((e,), jnp.float32) for _ in widths]
    wide = spec(
        (64, len(widths) * (e * r + 2 * e)), jnp.float32
    )  # every shrink, then the gates' hi / lo halves
    args = (spec((64, 4096), bf16), ws, wide, bs, scalings)

    def fn(*a):
        return pallas_gpu_expand.expand_forward_group_routed(*a, routed=routed)

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    assert "sort" not in text and "top_k" not in text.lower()
    (kernel,) = _triton_kernels(lowered)
    loads_before_loop = []
    for op in _walk(kernel):
        for block in (b for region in op.regions for b in region.blocks):
            names = [child.operation.name for child in block.operations]
            if "scf.for" in names:  # a projection's branch, its W loop first
                loads_before_loop.append(names[: names.index("scf.for")].count("tt.load"))
    assert loads_before_loop == [2 * early] * len(ws)


def test_expand_kernel_is_skipped_where_its_tiles_would_not_fit_in_shared_memory(monkeypatch):
    """The W loop's x tile holds every token's row: at 256 bf16 tokens its three stages ask 240 KiB, which the
    H100 refused at launch (227 KiB per block). ``fits`` sends such calls to XLA's path instead, in the model's
    plan and in ``forward_if_batched``; the estimate matches Triton's 96 KiB at 64 tokens (kernel_report)."""
    from tests.test_pallas_decode import _args, _case
    from tests.test_pallas_decode import _inputs as decode_inputs

    assert pallas_gpu_expand.shared_memory_bytes(64, 2, pallas_gpu_expand.ExpandConfig()) == 96 * 1024
    assert pallas_gpu_expand.shared_memory_bytes(256, 2, pallas_gpu_expand.ExpandConfig()) == 245760
    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 256)
    assert pallas_gpu_expand.fits(128, 2) and not pallas_gpu_expand.fits(256, 2)
    assert not pallas_gpu_expand.fits(128, 4)  # float32 rows: twice the bytes
    assert not pallas_gpu_expand.fits(1, 2)  # one token: the decode kernel's
    impl = "pallas_gpu_decode_interpret"
    assert api.expand_fused_plan(impl, 128, 48) is True
    assert api.expand_fused_plan(impl, 128, 48, itemsize=4) is None
    assert api.expand_fused_plan(impl, 256, 48) is None
    calls = _record_expand_calls(monkeypatch, lambda _, a, __: a[0].shape[0])  # a[0]: x
    outs = {}
    for t in (128, 256):
        inp = decode_inputs(_case(t, 72, 40, 6, 8, 2, "bfloat16"), f"expand-smem-{t}")
        outs[t] = pallas_gpu_expand.forward_if_batched(*_args(inp), interpret=True)
    assert calls == [128] and outs[128] is not None and outs[256] is None
