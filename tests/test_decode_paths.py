"""The inference-only forwards of grouped MoE-LoRA (``xla_masked``, ``xla_gather``) and the decode they serve.

A backend's ``forward`` replaces shrink + expand only when nothing is differentiated, so the shared kernel
tests (which take gradients) never reach it. Here: the forward alone against the reference and the float64
loop, against the old dense path (``xla_dense``, whose forward is shrink + expand), and greedy decoding of a
28-expert tiny model with each path giving the same tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax import MeteoraLlama, ModelConfig, MoEConfig
from meteora_jax.generate import Sampler
from meteora_jax.model import gate
from pallas_kernels.grouped_lora import api, shapes, xla
from tests.grouped_lora_cases import TOLERANCE, key_for, rel_err
from tests.test_grouped_lora import _numpy_oracle

FAST = ("xla_masked", "xla_gather", "xla", "xla_masked_lowp")
# (T, k): one decode token, a T that is a multiple of nothing, and one above GATHER_MAX_ROWS (hand-over).
SIZES = ((1, 1), (1, 2), (3, 1), (3, 2), (40, 2))


def _inputs(t: int, k: int, dtype: str, name: str, num_experts: int = 28, rank: int = 8) -> dict:
    case = shapes.Case("c", t, 48, 40, num_experts, rank, k, "uniform", dtype)
    return shapes.make_inputs(case, key_for(name))


def _forward(inp: dict, implementation: str, fused: bool) -> jax.Array:
    args = (inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])

    @jax.jit
    def f(inp):
        if fused:
            return api.grouped_lora_fused(
                inp["x"], inp["w"], *args, scaling=inp["scaling"], implementation=implementation
            )
        return api.grouped_lora(inp["x"], *args, scaling=inp["scaling"], implementation=implementation)

    return f(inp)


@functools.cache
def _baselines(t: int, k: int, dtype: str, fused: bool) -> tuple[dict, jax.Array, jax.Array]:
    """Inputs, the reference and the old dense forward: computed once, shared by every fast path."""
    inp = _inputs(t, k, dtype, f"forward[{t},{k},{dtype},{fused}]")
    return inp, _forward(inp, "reference", fused), _forward(inp, "xla_dense", fused)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("t,k", SIZES)
@pytest.mark.parametrize("fused", [False, True])
def test_forward_matches_reference_and_old_dense(implementation, dtype, t, k, fused):
    inp, ref, old = _baselines(t, k, dtype, fused)
    got = _forward(inp, implementation, fused)
    tol = TOLERANCE[dtype]
    assert got.dtype == inp["x"].dtype
    assert rel_err(got, ref) < tol
    if dtype == "float32":  # the same math up to summation order
        assert float(jnp.max(jnp.abs(got - old))) <= 1e-6 * max(1.0, float(jnp.max(jnp.abs(old))))
    else:  # same rounding points (h in f32, h * coef cast to bf16, f32 accumulation): a bf16 ulp at most
        assert rel_err(got, old) < tol
    if not fused:
        assert rel_err(got, _numpy_oracle(inp)) < tol


def test_forward_is_what_inference_traces_and_gradients_do_not():
    """The masked forward has no one-hot contractions (3 dots: shrink, expand, base); under grad the shared
    shrink / expand path (with them) runs, so training is unchanged."""
    inp = _inputs(3, 2, "float32", "trace")
    args = (inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])

    def y(x, implementation):
        return api.grouped_lora_fused(
            x, inp["w"], *args, scaling=inp["scaling"], implementation=implementation
        )

    def dots(fn, *a) -> int:
        return str(jax.make_jaxpr(fn)(*a)).count("dot_general")

    assert dots(lambda x: y(x, "xla_masked"), inp["x"]) == 3
    assert dots(lambda x: y(x, "xla_dense"), inp["x"]) == 5
    grad_masked = jax.grad(lambda x: jnp.sum(y(x, "xla_masked")))(inp["x"])
    grad_dense = jax.grad(lambda x: jnp.sum(y(x, "xla_dense")))(inp["x"])
    np.testing.assert_array_equal(np.asarray(grad_masked), np.asarray(grad_dense))


def test_gather_hands_over_above_its_row_limit():
    t = xla.GATHER_MAX_ROWS // 2 + 1  # k = 2: one row more than the limit
    big = str(jax.make_jaxpr(lambda i: _forward(i, "xla_gather", True))(_inputs(t, 2, "float32", "h1")))
    small = str(jax.make_jaxpr(lambda i: _forward(i, "xla_gather", True))(_inputs(2, 2, "float32", "h2")))
    assert "f32[2,2,48,8]" in small  # the gathered A of each (token, slot)
    assert f"f32[{t},2,48,8]" not in big and "f32[33,28,8]" in big  # every expert's h: the masked path


@pytest.mark.parametrize(
    "gather_rows,rank,gathered", [(64, 8, True), (0, 8, False), (64, 32, False), (8, 8, False)]
)
def test_pallas_gpu_gathers_few_rows_of_many_experts(gather_rows, rank, gathered):
    """``pallas_gpu``'s inference forward takes ``xla.gather_forward`` for up to ``pallas_gather`` rows (T * k) when
    E * r > DENSE_MAX_EXPERT_COLUMNS and r <= ``pallas_gather_rank`` (16) (interpret mode here); else the sorted
    grouped kernels. Either way equal to ``reference``."""
    from meteora_jax.knobs import knobs_set

    t = 8
    inp = _inputs(t, 2, "float32", f"pallas_gather[{gather_rows},{rank}]", num_experts=160, rank=rank)
    with knobs_set({"pallas_gather": gather_rows}):
        jaxpr = str(jax.make_jaxpr(lambda i: _forward(i, "pallas_gpu_interpret", True))(inp))
        out = _forward(inp, "pallas_gpu_interpret", True)
    assert (f"f32[{t},2,48,{rank}]" in jaxpr) == gathered  # each (token, slot)'s A
    assert (" pallas_call" in jaxpr) != gathered
    ref = _forward(inp, "reference", True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_gather_hands_many_experts_to_sorted_rows():
    """Above its row limit with E * r > DENSE_MAX_EXPERT_COLUMNS, ``xla_gather`` leaves the call to the sorted-rows
    shrink + expand (a ragged dot), never the dense path over every expert column; it still equals ``reference``."""
    t, num_experts, rank = xla.GATHER_MAX_ROWS // 2 + 1, 160, 8
    assert num_experts * rank > xla.DENSE_MAX_EXPERT_COLUMNS
    inp = _inputs(t, 2, "float32", "gather_many_experts", num_experts=num_experts, rank=rank)
    jaxpr = str(jax.make_jaxpr(lambda i: _forward(i, "xla_gather", True))(inp))
    assert "ragged_dot" in jaxpr and f"f32[{t},{num_experts * rank}]" not in jaxpr
    got, ref = _forward(inp, "xla_gather", True), _forward(inp, "reference", True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_auto_is_masked_for_few_expert_columns_only():
    assert api._ops("xla", 28, 8).forward is xla.auto_masked_forward
    assert api._ops("xla", 1024, 4).forward is None  # sorted rows, as before
    assert api._ops("xla_dense", 28, 8).forward is None
    assert api._ops("xla_gather", 1024, 4).forward is xla.gather_forward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_shrink_matches(dtype, request):
    inp = _inputs(3, 2, dtype, request.node.name)
    want = _forward(inp, "xla_masked", True)
    got = _forward(inp, "xla_masked_batched", True)
    assert "f32[28,3,8]" in str(jax.make_jaxpr(lambda i: _forward(i, "xla_masked_batched", True))(inp))
    assert rel_err(got, _forward(inp, "reference", True)) < TOLERANCE[dtype]
    if dtype == "float32":
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-6 * float(jnp.max(jnp.abs(want)))


def test_low_precision_sum_writes_no_float32_output():
    """``xla_masked_lowp`` on bf16: the expand and the base GEMM write bf16 [T, O] (no float32 [T, O] at all,
    unlike ``xla_masked``); on float32 it is ``xla_masked`` exactly."""
    for dtype in ("bfloat16", "float32"):
        inp = _inputs(40, 2, dtype, f"lowp-{dtype}")
        jaxprs = {
            impl: str(jax.make_jaxpr(lambda i, impl=impl: _forward(i, impl, True))(inp))
            for impl in ("xla_masked", "xla_masked_lowp")
        }
        if dtype == "bfloat16":
            assert "f32[40,40]" in jaxprs["xla_masked"] and "f32[40,40]" not in jaxprs["xla_masked_lowp"]
            assert "bf16[40,40]" in jaxprs["xla_masked_lowp"]
        else:
            got, want = _forward(inp, "xla_masked_lowp", True), _forward(inp, "xla_masked", True)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_auto_sums_in_bf16_from_the_threshold_on(monkeypatch, dtype):
    """``xla`` (the automatic dense path): bitwise ``xla_masked`` below ``LOW_PRECISION_SUM_MIN_TOKENS`` rows and
    bitwise ``xla_masked_lowp`` from there on, which in bf16 leaves no float32 [T, O] array; float32 is
    ``xla_masked`` at every size. (The batched shrink, which changes float32 bits, is off here: its own test.)"""
    monkeypatch.setattr(xla, "BATCHED_SHRINK_MAX_TOKENS", 0)
    at = xla.LOW_PRECISION_SUM_MIN_TOKENS
    for t in (at - 1, at):
        inp = _inputs(t, 2, dtype, f"auto-sum-{t}-{dtype}")
        got = np.asarray(_forward(inp, "xla", True))
        low = dtype == "bfloat16" and t >= at
        want = _forward(inp, "xla_masked_lowp" if low else "xla_masked", True)
        np.testing.assert_array_equal(got, np.asarray(want))
        jaxpr = str(jax.make_jaxpr(lambda i: _forward(i, "xla", True))(inp))
        assert (f"f32[{t},40]" in jaxpr) == (not low)
        assert rel_err(got, _forward(inp, "reference", True)) < TOLERANCE[dtype]


def test_top2_softmax_is_jax_softmax():
    logits_te = (
        jax.random.normal(key_for("softmax"), (64, 28))
        * jnp.asarray([0.1, 1.0, 30.0, 300.0]).repeat(16)[:, None]
    )
    vals_tk, _ = jax.lax.top_k(logits_te, 2)
    want = jax.nn.softmax(vals_tk, axis=-1)
    got = gate.softmax_sorted(vals_tk)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), np.asarray(want[:, 0]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-7, atol=0)  # an ulp
    tie = jnp.asarray([[1.5, 1.5]])
    np.testing.assert_array_equal(np.asarray(gate.softmax_sorted(tie)), [[0.5, 0.5]])
    g_tie = jax.grad(lambda v: gate.softmax_sorted(v)[0, 0])(tie)
    np.testing.assert_allclose(np.asarray(g_tie), [[0.25, -0.25]], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(gate.softmax_sorted(v) * jnp.arange(2.0)))(vals_tk)
    g_want = jax.grad(lambda v: jnp.sum(jax.nn.softmax(v, axis=-1) * jnp.arange(2.0)))(vals_tk)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(g)))
    vals3, _ = jax.lax.top_k(logits_te, 3)  # other k: jax.nn.softmax itself
    np.testing.assert_array_equal(np.asarray(gate.softmax_sorted(vals3)), np.asarray(jax.nn.softmax(vals3)))


def test_route_keeps_top_k_ids_and_its_weights_sum_to_one():
    logits_te = jax.random.normal(key_for("route"), (37, 28))
    ids_tk, w_tk = gate.route(logits_te, top_k=2, temperature=0.7, mode="topk_then_softmax")
    vals, want_ids = jax.lax.top_k(logits_te / 0.7, 2)
    np.testing.assert_array_equal(np.asarray(ids_tk), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(w_tk), np.asarray(jax.nn.softmax(vals, axis=-1)), rtol=3e-7, atol=0)


# ----------------------------------------------------------------------------- decode
def _model(dtype: str, impl: str) -> MeteoraLlama:
    cfg = ModelConfig.tiny(vocab_size=99, eos_token_ids=(2,), pad_token_id=0, bos_token_id=1)
    names = tuple(f"task{i}" for i in range(28))
    moe = MoEConfig(expert_names=names, top_k=2, implementation=impl)
    return MeteoraLlama(cfg, moe, dtype=dtype, rngs=nnx.Rngs(3))


ROUTINGS = {
    "top2": {},
    "top1": {"top_k": 1},
    "forced": {"force_expert": "task5"},
}


@pytest.mark.parametrize(
    # Each (routing, backend) pair compiles a prefill and a decode program, so the cases are split across
    # dtypes to keep the CPU suite short.
    "dtype,routings",
    [("bfloat16", ("top2", "forced")), ("float32", ("top2", "top1"))],
    ids=["bf16", "f32"],
)
def test_greedy_decode_tokens_equal_the_old_dense_path(dtype, routings):
    """Greedy tokens of the masked and gathered forwards equal the old dense path's. In bf16 the automatic
    ``xla`` sums base and LoRA in bf16 from 2 rows (one more rounding: tokens may differ), so there the
    float32-sum ``xla_masked`` stands for it; in float32 ``xla`` itself is checked."""
    masked = "xla_masked" if dtype == "bfloat16" else "xla"
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51]]
    samplers = {impl: Sampler(_model(dtype, impl)) for impl in ("xla_dense", masked, "xla_gather")}
    for label in routings:
        routing = samplers[masked].model.routing_options(**ROUTINGS[label])
        out = {
            impl: s.generate(prompts, max_new_tokens=8, routing=routing).token_ids
            for impl, s in samplers.items()
        }
        assert out[masked] == out["xla_dense"], label
        assert out["xla_gather"] == out["xla_dense"], label


def test_decode_logits_match_the_reference_backend():
    """Logits of one cached decode step, masked, gathered and Pallas-decode forwards against ``reference``.

    float32; ``pallas_gpu_interpret`` runs the one-launch decode kernel (``pallas_gpu_decode``) in interpret
    mode for both the 8-token prefill and the 2-token step.
    """

    @nnx.jit  # as the sampler runs it; eager, the interpreted kernel and the reference took twice as long
    def forward(model, ids, mask, positions, cache):  # noqa: ANN001, ANN202
        out = model.forward(ids, attention_mask=mask, positions=positions, cache=cache)
        return out.logits, out.cache

    out = {}
    for impl in ("reference", "xla", "xla_gather", "pallas_gpu_interpret"):
        model = _model("float32", impl)
        mask = jnp.zeros((2, 16), jnp.int32).at[:, :4].set(1)
        ids = jnp.asarray([[1, 5, 6, 7], [1, 8, 9, 10]])
        _, cache = forward(model, ids, mask, jnp.arange(4)[None].repeat(2, 0), model.init_cache(2, 16))
        logits, _ = forward(
            model, jnp.asarray([[11], [12]]), mask.at[:, 4].set(1), jnp.full((2, 1), 4), cache
        )
        out[impl] = logits
    assert rel_err(out["xla"], out["reference"]) < 1e-5
    assert rel_err(out["xla_gather"], out["reference"]) < 1e-5
    assert rel_err(out["pallas_gpu_interpret"], out["reference"]) < 1e-5


def test_auto_batched_shrink_knob(monkeypatch):
    """``xla.BATCHED_SHRINK_MAX_TOKENS`` (a profiling A/B knob, off by default): up to that many rows the
    automatic dense path is bitwise ``xla_masked_batched``, above it bitwise ``xla_masked``."""
    monkeypatch.setattr(xla, "BATCHED_SHRINK_MAX_TOKENS", 8)
    for t, want_impl in ((8, "xla_masked_batched"), (9, "xla_masked")):
        inp = _inputs(t, 2, "float32", f"batched-knob-{t}")
        got = np.asarray(_forward(inp, "xla", True))
        np.testing.assert_array_equal(got, np.asarray(_forward(inp, want_impl, True)))


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize(
    "routing_kw",
    [{}, {"top_k": 1}, {"mode": "softmax_then_topk", "temperature": 0.7}, {"top_k": 3, "temperature": 2.0}],
)
def test_shared_gate_logits_are_each_projections_own(monkeypatch, grouped, routing_kw):
    """q/k/v (and gate/up) route from one concatenated GEMV and, grouped, one top-k over [T, P, E]: the same
    logits as each gate alone, and bitwise the same expert ids and weights as each projection's own ``route``;
    None where a projection has no experts or no routing is needed."""
    from meteora_jax.model import moe_lora
    from meteora_jax.model.gate import RoutingOptions, route
    from meteora_jax.model.moe_lora import gate_logits, shared_gate_logits

    monkeypatch.setattr(moe_lora, "GROUP_ROUTE_MIN_TOKENS", 1 if grouped else 10**9)
    cfg = ModelConfig.tiny(vocab_size=99)
    moe = MoEConfig(
        expert_names=("a", "b", "c", "d"),
        top_k=2,
        target_modules=("q_proj", "v_proj", "gate_proj", "up_proj"),
    )
    model = MeteoraLlama(cfg, moe, dtype="float32", rngs=nnx.Rngs(7))
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    x_btd = jax.random.normal(key_for(f"shared_gate-{grouped}-{routing_kw}"), (2, 5, cfg.hidden_size))
    x_td = x_btd.reshape(-1, cfg.hidden_size)
    opts = RoutingOptions(**routing_kw)
    for projs in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        shared = shared_gate_logits(projs, x_btd, opts)
        for got, proj in zip(shared, projs, strict=True):
            if proj.num_experts == 0:
                assert got is None  # k_proj carries no experts here
                continue
            want = gate_logits(x_td, proj.gate_de[...])
            np.testing.assert_allclose(np.asarray(got.logits_te), np.asarray(want), rtol=1e-6, atol=1e-6)
            assert (got.ids_tk is not None) == grouped
            if grouped:
                ids_tk, weights_tk = route(
                    got.logits_te, top_k=opts.top_k, temperature=opts.temperature, mode=opts.mode
                )
                np.testing.assert_array_equal(np.asarray(got.ids_tk), np.asarray(ids_tk))
                np.testing.assert_array_equal(np.asarray(got.weights_tk), np.asarray(weights_tk))
        y_shared = [p(x_btd, opts, None, s) for p, s in zip(projs, shared, strict=True)]
        y_own = [p(x_btd, opts, None) for p in projs]
        for a, b in zip(y_shared, y_own, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert shared_gate_logits(projs, x_btd, RoutingOptions(force_expert=1)) == [None] * 3
    assert shared_gate_logits(projs, x_btd, RoutingOptions(no_experts=True)) == [None] * 3
    moe1 = MoEConfig(expert_names=("a", "b", "c"), top_k=2, target_modules=("q_proj", "up_proj"))
    mlp1 = MeteoraLlama(cfg, moe1, dtype="float32", rngs=nnx.Rngs(8)).layers[0].mlp  # only up_proj routes
    assert shared_gate_logits((mlp1.gate_proj, mlp1.up_proj), x_btd, opts) == [None, None]


def test_set_lora_implementation_reaches_every_moe_projection():
    from meteora_jax.model.moe_lora import MoELoRALinear

    model = _model("float32", None)
    model.set_lora_implementation("reference")
    impls = {m.implementation for _, m in nnx.iter_modules(model) if isinstance(m, MoELoRALinear)}
    assert impls == {"reference"} and model.kernel_implementation == "reference"
    with pytest.raises(ValueError, match="unknown grouped_lora implementation"):
        model.set_lora_implementation("cuda_magic")
    assert {m.implementation for _, m in nnx.iter_modules(model) if isinstance(m, MoELoRALinear)} == {
        "reference"
    }


def _shared_inputs(t: int, dtype: str, name: str) -> list[dict]:
    """Three projections that read the same x (d_out 40, 24, 24: q/k/v-like), 28 rank-8 experts, top-2."""
    projs = [
        shapes.make_inputs(shapes.Case("c", t, 48, o, 28, 8, 2, "uniform", dtype), key_for(f"{name}-{o}-{i}"))
        for i, o in enumerate((40, 24, 24))
    ]
    for p in projs[1:]:
        p["x"] = projs[0]["x"]
    return projs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "implementation", ["xla", "xla_masked", "xla_masked_lowp", "pallas_gpu_decode_interpret"]
)
def test_shared_shrink_forward_matches_each_projection(monkeypatch, dtype, implementation):
    """``grouped_lora_fused_shared`` with the shared shrink on (one GEMM over the concatenated A) gives each
    projection's own ``grouped_lora_fused`` result: float32 to 1e-6, bf16 to the bf16 tolerance (the
    same products, one more rounding order at most); off (below the threshold) it is bitwise the same."""
    projs = _shared_inputs(5, dtype, f"shared-fwd-{dtype}-{implementation}")

    @jax.jit
    def shared(projs):
        return api.grouped_lora_fused_shared(
            projs[0]["x"],
            [p["w"] for p in projs],
            [p["lora_a"] for p in projs],
            [p["lora_b"] for p in projs],
            [p["expert_ids"] for p in projs],
            [p["expert_weights"] for p in projs],
            scalings=[p["scaling"] for p in projs],
            implementation=implementation,
        )

    want = [_forward(p, implementation, True) for p in projs]
    monkeypatch.setattr(api, "SHARED_SHRINK_MIN_TOKENS", 10**9)
    for got, w in zip(shared(projs), want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
    monkeypatch.setattr(api, "SHARED_SHRINK_MIN_TOKENS", 2)
    jax.clear_caches()
    assert "concatenate" in str(jax.make_jaxpr(shared)(projs))  # the shared path did run
    tol = 1e-6 if dtype == "float32" else TOLERANCE["bfloat16"]
    for got, w in zip(shared(projs), want, strict=True):
        assert rel_err(got, w) <= tol


def test_shared_shrink_gradients_are_each_projections_own(monkeypatch):
    """Under differentiation the shared path runs each projection's own VJP: gradients w.r.t. the routing
    weights and A/B equal the unshared ones bitwise, w.r.t. x (summed over the projections) to 1e-6; a
    gate-only gradient traces no dA / dB (``lora_tgmm``) work."""
    projs = _shared_inputs(6, "float32", "shared-grad")
    monkeypatch.setattr(api, "SHARED_SHRINK_MIN_TOKENS", 2)

    def loss(x, wts, a_list, b_list, shared):
        args = ([p["w"] for p in projs], a_list, b_list, [p["expert_ids"] for p in projs], wts)
        scalings = [p["scaling"] for p in projs]
        if shared:
            ys = api.grouped_lora_fused_shared(x, *args, scalings=scalings, implementation="xla")
        else:
            ys = [
                api.grouped_lora_fused(x, *a, scaling=s, implementation="xla")
                for *a, s in zip(*args, scalings)
            ]
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(ys))

    inputs = (
        projs[0]["x"],
        [p["expert_weights"] for p in projs],
        [p["lora_a"] for p in projs],
        [p["lora_b"] for p in projs],
    )
    got = jax.grad(loss, argnums=(0, 1, 2, 3))(*inputs, True)
    want = jax.grad(loss, argnums=(0, 1, 2, 3))(*inputs, False)
    assert rel_err(got[0], want[0]) <= 1e-6  # dx: the same three terms, summed in another order
    for g, w in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:]), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    shared_loss = functools.partial(loss, shared=True)
    assert "lora_tgmm" not in str(jax.make_jaxpr(jax.grad(shared_loss, argnums=(0, 1)))(*inputs))
    assert "lora_tgmm" in str(jax.make_jaxpr(jax.grad(shared_loss, argnums=(2,)))(*inputs))


def test_model_with_shared_shrink_matches(monkeypatch):
    """A tiny 28-expert model's logits and routing with the shared shrink on equal those with it off."""
    cfg = ModelConfig.tiny(vocab_size=99)
    moe = MoEConfig(expert_names=tuple(f"e{i}" for i in range(28)), top_k=2)
    model = MeteoraLlama(cfg, moe, dtype="float32", rngs=nnx.Rngs(3))
    tokens = jax.random.randint(key_for("shared-model"), (2, 7), 0, 99)
    monkeypatch.setattr(api, "SHARED_SHRINK_MIN_TOKENS", 10**9)
    off = model.forward(tokens, return_routing=True)
    monkeypatch.setattr(api, "SHARED_SHRINK_MIN_TOKENS", 2)
    on = model.forward(tokens, return_routing=True)
    assert rel_err(on.logits, off.logits) <= 1e-6
    assert [r["name"] for r in on.routing] == [r["name"] for r in off.routing]
    for a, b in zip(on.routing, off.routing, strict=True):
        np.testing.assert_array_equal(np.asarray(a["expert_ids"]), np.asarray(b["expert_ids"]))
