"""Routing against a NumPy float64 version of both MeteoRA orderings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax.model.gate import route


def _np_route(logits, k, t, mode):
    z = logits.astype(np.float64) / t
    ids = np.argsort(-z, axis=-1, kind="stable")[:, :k]
    if mode == "topk_then_softmax":
        v = np.take_along_axis(z, ids, -1)
        w = np.exp(v - v.max(-1, keepdims=True))
    else:
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        w = np.take_along_axis(p, ids, -1)
    return ids, w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("mode", ["topk_then_softmax", "softmax_then_topk"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_route_matches_numpy(rng, mode, k, temperature):
    logits = rng.normal(size=(37, 6)).astype(np.float32)
    ids, w = route(logits, top_k=k, temperature=temperature, mode=mode)
    ref_ids, ref_w = _np_route(logits, k, temperature, mode)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-5, atol=1e-6)
    if k == 1:
        np.testing.assert_array_equal(np.asarray(w), 1.0)


def test_modes_differ_for_k2(rng):
    logits = rng.normal(size=(8, 5)).astype(np.float32) * 3
    _, a = route(logits, top_k=2, temperature=1.0, mode="topk_then_softmax")
    _, b = route(logits, top_k=2, temperature=1.0, mode="softmax_then_topk")
    # Renormalised top-2 probabilities equal the top-2 softmax: the orderings agree on weights
    # and differ only in what gradients reach the non-selected logits.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def _gate_inputs(rng, tokens, d_in=1024, experts=28):
    import jax.numpy as jnp

    x_td = jnp.asarray(rng.normal(size=(tokens, d_in)), jnp.bfloat16)
    gate_de = jnp.asarray(rng.normal(size=(d_in, experts)) * 0.02, jnp.float32)
    return x_td, gate_de


def test_split_gate_logits_keep_float32_accuracy(rng):
    """bf16 activations at prefill length: one bf16 GEMM against [W_hi | W_lo] vs a float64 NumPy product.
    The bar is per logit, relative to sum |x| |W|; a single bf16 pass (W rounded once) misses it."""
    import jax.numpy as jnp

    from meteora_jax.model.moe_lora import SPLIT_GATE_MIN_TOKENS, gate_logits

    x_td, gate_de = _gate_inputs(rng, SPLIT_GATE_MIN_TOKENS)
    x64, w64 = np.asarray(x_td, np.float64), np.asarray(gate_de, np.float64)
    want, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)

    def err(got):
        return float(np.max(np.abs(np.asarray(got, np.float64) - want) / scale))

    split = err(gate_logits(x_td, gate_de))
    one_pass = err(jnp.dot(x_td, gate_de.astype(jnp.bfloat16), preferred_element_type=jnp.float32))
    assert split <= 2.0**-17, split
    assert one_pass > 20 * split, (one_pass, split)


def test_split_gate_logits_only_for_bf16_prefill(rng):
    """Below the threshold (decode) or for float32 activations the gate is the plain float32 product, bit
    for bit; the split runs (as a custom VJP) only for bf16 at SPLIT_GATE_MIN_TOKENS tokens or more."""
    import jax
    import jax.numpy as jnp

    from meteora_jax.model.moe_lora import SPLIT_GATE_MIN_TOKENS, float32_gate_logits, gate_logits

    for tokens, dtype, split in (
        (SPLIT_GATE_MIN_TOKENS - 1, jnp.bfloat16, False),
        (SPLIT_GATE_MIN_TOKENS, jnp.float32, False),
        (SPLIT_GATE_MIN_TOKENS, jnp.bfloat16, True),
    ):
        x_td, gate_de = _gate_inputs(rng, tokens)
        x_td = x_td.astype(dtype)
        assert ("custom_vjp_call" in str(jax.make_jaxpr(gate_logits)(x_td, gate_de))) == split
        if not split:
            np.testing.assert_array_equal(
                np.asarray(gate_logits(x_td, gate_de)), np.asarray(float32_gate_logits(x_td, gate_de))
            )


def test_split_gate_logits_backward_is_the_float32_one(rng):
    """Gate training: the gradients w.r.t. the activations and the gate equal the float32 path's exactly."""
    import jax
    import jax.numpy as jnp

    from meteora_jax.model.moe_lora import SPLIT_GATE_MIN_TOKENS, float32_gate_logits, gate_logits

    x_td, gate_de = _gate_inputs(rng, SPLIT_GATE_MIN_TOKENS + 3)
    cot_te = jnp.asarray(rng.normal(size=(x_td.shape[0], gate_de.shape[1])), jnp.float32)

    def grads(fn):
        return jax.grad(lambda x, w: jnp.sum(fn(x, w) * cot_te), argnums=(0, 1))(x_td, gate_de)

    got, want = jax.jit(lambda: grads(gate_logits))(), jax.jit(lambda: grads(float32_gate_logits))()
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _assert_is_lax_top_k(top_k_fn, x: np.ndarray, k: int, w: jax.Array | None = None) -> None:
    """``top_k_fn(x, k)`` gives ``lax.top_k``'s indices and values (a NaN equal to a NaN) and, given weights
    ``w`` for its values, the same gradient of ``sum(values * w)``."""
    x = jnp.asarray(x)
    got_v, got_i = top_k_fn(x, k)
    want_v, want_i = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    if w is not None:
        g_got = jax.grad(lambda v: jnp.sum(top_k_fn(v, k)[0] * w))(x)
        g_want = jax.grad(lambda v: jnp.sum(jax.lax.top_k(v, k)[0] * w))(x)
        np.testing.assert_array_equal(np.asarray(g_got), np.asarray(g_want))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_argmax_top_k_equals_lax_top_k(monkeypatch, k):
    """``top_k_values`` by argmax passes (``ARGMAX_TOP_K_MAX``) gives ``lax.top_k``'s values and indices, ties
    to the lower index included, over [T, E] and [T, P, E] rows, and the same gradient."""
    from meteora_jax.model import gate
    from pallas_kernels.grouped_lora import gating

    monkeypatch.setattr(gating, "ARGMAX_TOP_K_MAX", 3)
    rng = np.random.default_rng(k)
    cases = [
        rng.standard_normal((7, 28)).astype(np.float32),
        rng.standard_normal((5, 3, 28)).astype(np.float32),
        rng.integers(0, 3, (9, 6)).astype(np.float32),  # many ties
    ]
    for x in cases:
        w = jnp.asarray(rng.standard_normal((*x.shape[:-1], k)).astype(np.float32))
        _assert_is_lax_top_k(gate.top_k_values, x, k, w)
    monkeypatch.setattr(gating, "ARGMAX_TOP_K_MAX", 0)
    assert "top_k" in str(jax.make_jaxpr(lambda v: gate.top_k_values(v, 2))(jnp.asarray(cases[0])))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_by_reduce_equals_lax_top_k(monkeypatch, k):
    """``top_k_by_reduce`` (one variadic reduction) gives ``lax.top_k``'s values and indices, ties to the lower
    index included, over [T, E] and [T, P, E] rows, and the same gradient; ``top_k_values`` takes it from
    ``REDUCE_TOP_K_MIN_ROWS`` rows on and keeps the sort below (and above ``REDUCE_TOP_K_MAX``)."""
    from pallas_kernels.grouped_lora import gating

    rng = np.random.default_rng(10 + k)
    cases = [
        rng.standard_normal((37, 28)).astype(np.float32),
        rng.standard_normal((5, 3, 28)).astype(np.float32),
        rng.integers(0, 3, (40, 6)).astype(np.float32),  # many ties
        np.full((3, 9), -np.inf, np.float32),  # all equal: indices 0..k-1
        np.array([[0.5, np.nan, -1.0, 2.0, np.nan]], np.float32),  # NaN first, as lax.top_k
    ]
    by_reduce = jax.jit(gating.top_k_by_reduce, static_argnums=1)
    for x in cases:
        _assert_is_lax_top_k(by_reduce, x, k)
    _assert_is_lax_top_k(by_reduce, cases[0], k, jnp.asarray(rng.standard_normal((37, k)).astype(np.float32)))
    monkeypatch.setattr(gating, "ARGMAX_TOP_K_MAX", 0)
    monkeypatch.setattr(gating, "REDUCE_TOP_K_MIN_ROWS", 15)
    for shape, kk, sort in [((14, 28), k, True), ((5, 3, 28), k, False), ((5, 3, 28), 5, True)]:
        jaxpr = str(jax.make_jaxpr(lambda v, kk=kk: gating.top_k_values(v, kk))(jnp.zeros(shape)))
        assert ("top_k[" in jaxpr) == sort and ("reduce[" in jaxpr) != sort, (shape, kk)


def test_route_spec_refuses_unknown_modes_and_k_below_one():
    from pallas_kernels.grouped_lora.gating import RouteSpec

    with pytest.raises(ValueError, match="unknown routing mode"):
        RouteSpec(2, 1.0, "top_p")
    with pytest.raises(ValueError, match="top_k=0"):
        RouteSpec(0)
    assert RouteSpec() == RouteSpec(2, 1.0, "topk_then_softmax")
