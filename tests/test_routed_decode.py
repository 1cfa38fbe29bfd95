"""The decode kernel routing from gate logits itself (``pallas_gpu_decode.decode_forward_routed`` and its group
twin, ``api.grouped_lora_fused_routed``): interpret mode against ``gating.route`` + the plain-JAX reference,
against the same kernel given XLA's routing, gradients through the XLA path, the tiny model's decode step with
the knob on and off, and lowering for CUDA as one kernel on this CPU-only host.

Routing mistakes show in the output: the cases' LoRA term is about the size of the base term, so a wrong
expert (a tie broken the other way, a padded expert picked, the wrong projection's logits) cannot pass.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_lora import api, gating, pallas_gpu_decode
from pallas_kernels.grouped_lora.gating import RouteSpec
from tests.grouped_lora_cases import rel_err
from tests.test_pallas_decode import (
    SMALL,
    TOLERANCE,
    _case,
    _inputs,
    _norm,
    _triton_kernels,
    _walk,
    _want,
    one_token_step,
    tiny_decode_model,
)

SPLIT2 = dataclasses.replace(SMALL, split_k=2)
# name -> (T, d_in, d_out, E, r, spec, dtype, tiles, tied logits)
CASES = {
    "t1_e28_k2_f32": (1, 64, 48, 28, 8, RouteSpec(2), "float32", SMALL, False),
    "t1_e28_k2_bf16_default_tiles": (1, 64, 48, 28, 8, RouteSpec(2), "bfloat16", None, False),
    "t3_e5_k1_softmax_first_bf16": (3, 72, 40, 5, 8, RouteSpec(1, 0.5, "softmax_then_topk"), "bfloat16", SMALL, False),
    "t3_e6_k3_temp_f32": (3, 72, 40, 6, 3, RouteSpec(3, 0.7), "float32", SMALL, False),
    "t1_e28_k2_ties_f32": (1, 64, 48, 28, 8, RouteSpec(2), "float32", SMALL, True),
    "t2_e8_k2_softmax_first_ties_split2": (
        2, 128, 40, 8, 8, RouteSpec(2, 1.0, "softmax_then_topk"), "float32", SPLIT2, True,
    ),
}  # fmt: skip


def _logits(name: str, t: int, cols: int, tied: bool) -> jax.Array:
    """Fresh gate logits; ``tied``: small integers, so most rows hold ties that ``lax.top_k`` breaks to the
    lower index."""
    rng = np.random.default_rng(zlib.crc32(("logits-" + name).encode()))
    if tied:
        return jnp.asarray(rng.integers(0, 3, (t, cols)), jnp.float32)
    return jnp.asarray(rng.standard_normal((t, cols)) * 2.0, jnp.float32)


def _routed_inputs(name: str) -> tuple[dict, RouteSpec, pallas_gpu_decode.DecodeConfig | None]:
    t, d_in, d_out, e, r, spec, dtype, config, tied = CASES[name]
    inp = _inputs(_case(t, d_in, d_out, e, r, spec.top_k, dtype), name)
    inp["logits"] = _logits(name, t, e, tied)
    ids, weights = gating.route_spec(inp["logits"], spec)
    return {**inp, "expert_ids": ids, "expert_weights": weights}, spec, config


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(CASES))
def test_routed_decode_kernel_matches_reference(name, interpret):
    """Against ``gating.route`` + the float32 reference, and against the same kernel given that routing."""
    inp, spec, config = _routed_inputs(name)
    keys = ("x", "w", "lora_a", "lora_b", "logits", "scaling")
    y_to = jax.jit(
        lambda *a: pallas_gpu_decode.decode_forward_routed(*a, spec=spec, interpret=interpret, config=config)
    )(*(inp[k] for k in keys))
    want_to, lora_to = _want(inp)
    assert y_to.dtype == inp["x"].dtype and y_to.shape == want_to.shape
    assert _norm(lora_to) > 0.3 * _norm(want_to - lora_to)
    assert _norm(y_to.astype(jnp.float32) - want_to) / _norm(lora_to) < TOLERANCE[CASES[name][6]]
    given = pallas_gpu_decode.decode_forward(
        *(inp[k] for k in ("x", "w", "lora_a", "lora_b", "expert_ids", "expert_weights", "scaling")),
        interpret=interpret,
        config=config,
    )
    # Same tiles and sums; the weights may differ by an ulp of exp (Triton's vs XLA's).
    assert rel_err(y_to, given) < (1e-6 if CASES[name][6] == "float32" else 1e-2)


def test_routed_decode_kernel_is_not_the_unrouted_one():
    """The check above can fail: with the logits of another projection the output moves far past tolerance."""
    inp, spec, config = _routed_inputs("t1_e28_k2_f32")
    keys = ("x", "w", "lora_a", "lora_b", "logits", "scaling")
    args = [inp[k] for k in keys]
    args[4] = jnp.flip(args[4], axis=1)
    y_to = pallas_gpu_decode.decode_forward_routed(*args, spec=spec, interpret=True, config=config)
    want_to, lora_to = _want(inp)
    assert _norm(y_to.astype(jnp.float32) - want_to) / _norm(lora_to) > 0.1


def _group(
    name: str, t: int, d_in: int, d_outs: tuple[int, ...], e: int, spec: RouteSpec, tied: bool
) -> tuple:
    parts = [
        _inputs(_case(t, d_in, o, e, 8 if i else 3, spec.top_k, "float32"), f"{name}-{i}")
        for i, o in enumerate(d_outs)
    ]
    x = parts[0]["x"]
    logits_tpe = _logits(name, t, len(d_outs) * e, tied).reshape(t, len(d_outs), e)
    cols = lambda k: [p[k] for p in parts]  # noqa: E731
    return x, cols("w"), cols("lora_a"), cols("lora_b"), logits_tpe, cols("scaling")  # fmt: skip


GROUP_CASES = {
    "qkv_t1_k2": (1, 72, (40, 24, 24), 6, RouteSpec(2), False),
    "qkv_t1_k2_ties": (1, 72, (40, 24, 24), 28, RouteSpec(2), True),
    "gate_up_t3_k1_softmax_first": (3, 64, (48, 48), 5, RouteSpec(1, 2.0, "softmax_then_topk"), False),
}


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_group_routed_decode_kernel_routes_each_projection_from_its_own_logits(name):
    """``decode_forward_group_routed`` equals ``decode_forward_group`` given ``gating.route`` of each
    projection's logits (ranks 3 and 8 in one group); the logits are different per projection, so a
    projection that read its neighbour's columns would fail."""
    t, d_in, d_outs, e, spec, tied = GROUP_CASES[name]
    x, ws, lora_as, lora_bs, logits_tpe, scalings = _group(name, t, d_in, d_outs, e, spec, tied)
    got = pallas_gpu_decode.decode_forward_group_routed(
        x, ws, lora_as, lora_bs, logits_tpe, scalings, spec=spec, interpret=True, config=SMALL
    )
    routes = [gating.route_spec(logits_tpe[:, p], spec) for p in range(len(d_outs))]
    want = pallas_gpu_decode.decode_forward_group(
        x, ws, lora_as, lora_bs, [i for i, _ in routes], [w for _, w in routes], scalings, interpret=True, config=SMALL
    )  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-6
    swapped = pallas_gpu_decode.decode_forward_group_routed(
        x, ws, lora_as, lora_bs, jnp.roll(logits_tpe, 1, axis=1), scalings, spec=spec, interpret=True, config=SMALL
    )  # fmt: skip
    assert max(rel_err(s, w) for s, w in zip(swapped, want, strict=True)) > 1e-3


def test_routed_api_matches_xla_routing_with_its_gradients(monkeypatch):
    """``grouped_lora_fused_routed`` takes the kernel only with ``ROUTED_DECODE_MAX_TOKENS`` on; outputs and
    gradients (x, logits, A, B) equal the knob off (routing in XLA), and a gate-only gradient (logits alone)
    traces no dA / dB."""
    x, ws, lora_as, lora_bs, logits_tpe, scalings = _group("api", 1, 72, (40, 24, 24), 6, RouteSpec(2), False)
    spec, impl = RouteSpec(2, 0.8), "pallas_gpu_decode_interpret"
    calls = []
    kernel = pallas_gpu_decode.decode_forward_group_routed
    monkeypatch.setattr(
        pallas_gpu_decode, "decode_forward_group_routed", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )

    def run(x, logits, lora_as, lora_bs):
        return api.grouped_lora_fused_routed(
            x, ws, lora_as, lora_bs, logits, scalings=scalings, route=spec, implementation=impl
        )

    def loss(*args):
        return sum(jnp.sum(y * (i + 1)) for i, y in enumerate(run(*args)))

    args = (x, logits_tpe, lora_as, lora_bs)
    monkeypatch.setattr(api, "ROUTED_DECODE_MAX_TOKENS", 0)
    off, off_grads = run(*args), jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    assert not calls and not api.routes_in_kernel(impl, 1, lora_as, ws)
    monkeypatch.setattr(api, "ROUTED_DECODE_MAX_TOKENS", 1)
    assert api.routes_in_kernel(impl, 1, lora_as, ws)
    on = run(*args)
    assert len(calls) == 1
    for a, b in zip(on, off, strict=True):
        assert rel_err(a, b) < 1e-6
    on_grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(jax.tree.leaves(on_grads), jax.tree.leaves(off_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(on_grads[1]).max()) > 0  # the gate gets a gradient through the top-k weights
    gate_only = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(*args))
    assert "lora_tgmm" not in gate_only
    assert "lora_tgmm" in str(jax.make_jaxpr(jax.grad(loss, argnums=2))(*args))
    # The plan: only the decode backend, only up to the knob and DECODE_MAX_TOKENS, one expert count.
    assert not api.routes_in_kernel("xla", 1, lora_as, ws)
    assert not api.routes_in_kernel(impl, 2, lora_as, ws)
    assert not api.routes_in_kernel(impl, 1, [lora_as[0], lora_as[1][:5]], ws[:2])
    with pytest.raises(ValueError, match="expected"):
        api.grouped_lora_fused_routed(
            x, ws, lora_as, lora_bs, logits_tpe[:, :2], scalings=scalings, route=spec, implementation=impl
        )


def test_model_decode_step_routes_in_the_kernel_with_the_same_logits(monkeypatch):
    """A tiny model's one-token decode step with its inference packs (the sampler's path; the decode kernel in
    interpret mode): with ``kernel_route`` on, q/k/v, o, gate/up and down route inside the kernel, and the
    logits equal routing in XLA. ``return_routing`` (aux) keeps XLA's routing, so the ids it reports exist."""
    assert api.ROUTED_DECODE_MAX_TOKENS == 1  # the default since session 13 (H100 A/B, benchmarks/RESULTS.md)
    model = tiny_decode_model(5, packed=True)
    cfg = model.config
    calls = []
    for fn in ("decode_forward_routed", "decode_forward_group_routed"):
        kernel = getattr(pallas_gpu_decode, fn)
        monkeypatch.setattr(
            pallas_gpu_decode, fn, lambda *a, kernel=kernel, fn=fn, **kw: calls.append(fn) or kernel(*a, **kw)
        )

    monkeypatch.setattr(api, "ROUTED_DECODE_MAX_TOKENS", 0)
    off = one_token_step(model)
    assert not calls
    monkeypatch.setattr(api, "ROUTED_DECODE_MAX_TOKENS", 1)
    on = one_token_step(model)
    layers = cfg.num_hidden_layers
    assert calls.count("decode_forward_group_routed") == 2 * layers  # q/k/v and gate/up
    assert calls.count("decode_forward_routed") == 2 * layers  # o and down
    assert rel_err(on, off) < 1e-5
    calls.clear()
    with_aux = one_token_step(model, return_routing=True)
    assert not calls
    assert rel_err(with_aux, off) < 1e-6


@pytest.mark.parametrize("d_outs", [(4096, 1024, 1024), (14336, 14336), (4096,)], ids=["qkv", "gate_up", "o"])
def test_routed_decode_kernel_lowers_for_cuda_as_one_kernel(d_outs):
    """Llama-3-8B's q/k/v, gate/up and o (E=28, r=8, top-2, bf16, T=1), routed from the logits, lower to ONE
    Triton kernel for CUDA on this CPU-only host (and the split-K sum): no XLA top-k or softmax beside it."""
    spec = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    args = (
        spec((1, 4096), bf16),
        [spec((4096, o), bf16) for o in d_outs],
        [spec((28, 4096, 8), bf16) for _ in d_outs],
        [spec((28, 8, o), bf16) for o in d_outs],
        spec((1, len(d_outs), 28), jnp.float32),
        [spec((28,), jnp.float32) for _ in d_outs],
    )

    def fn(*a):
        return pallas_gpu_decode.decode_forward_group_routed(*a, spec=RouteSpec(2))

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    assert "top_k" not in text.lower() and "sort" not in text
    (kernel,) = _triton_kernels(lowered)
    assert sum(op.name == "scf.for" for op in _walk(kernel)) == len(d_outs)


@pytest.mark.gpu
@pytest.mark.parametrize("d_outs", [(4096, 1024, 1024), (14336, 14336), (4096,)], ids=["qkv", "gate_up", "o"])
def test_routed_decode_compiled_at_llama_shapes(d_outs, request):
    """Triton-compiled with the default tiles at Llama-3-8B shapes (E=28, r=8, top-2, bf16, T=1): each
    projection against ``gating.route`` + its reference."""
    name = request.node.name
    parts = [_inputs(_case(1, 4096, o, 28, 8, 2, "bfloat16"), f"{name}-{i}") for i, o in enumerate(d_outs)]
    x = parts[0]["x"]
    logits_tpe = _logits(name, 1, 28 * len(d_outs), False).reshape(1, len(d_outs), 28)
    cols = lambda k: [p[k] for p in parts]  # noqa: E731
    ys = jax.jit(lambda *a: pallas_gpu_decode.decode_forward_group_routed(*a, spec=RouteSpec(2)))(
        x, cols("w"), cols("lora_a"), cols("lora_b"), logits_tpe, cols("scaling")
    )
    for i, (y_to, inp) in enumerate(zip(ys, parts, strict=True)):
        ids, weights = gating.route_spec(logits_tpe[:, i], RouteSpec(2))
        want_to, _ = _want({**inp, "x": x, "expert_ids": ids, "expert_weights": weights})
        assert _norm(y_to.astype(jnp.float32) - want_to) / _norm(want_to) < TOLERANCE["bfloat16"]
