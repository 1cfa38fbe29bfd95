"""Inference packs (``moe_lora.PACKED_MIN_TOKENS``, on from 2 tokens): one GEMM for a group's shrinks and gates.

``x @ [A_1 | ... | A_P | gates]`` must give each projection's own shrink and gate logits (float32: the same
dot products; bf16: the gate through the hi / lo split, within its rounding), the same routing and outputs as
the unpacked forward, greedy tokens equal to the unpacked sampler's, and it must never leave a pack on the
caller's model or serve a call it cannot (one token, a forced expert, a non-dense backend, a device mesh).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax import MeteoraLlama, ModelConfig, MoEConfig
from meteora_jax.generate import Sampler
from meteora_jax.model import llama, moe_lora
from meteora_jax.model.gate import RoutingOptions
from meteora_jax.params import InferencePack
from pallas_kernels.grouped_lora import api, xla
from tests.grouped_lora_cases import key_for, rel_err

ON = 2
OFF = sys.maxsize  # = the knob's inf: no packs are made at all
# The shipped defaults (read before any test changes them): packs from 2 tokens at any size, gate packs on,
# gate rows at one token (H100 A/B, benchmarks/RESULTS.md, session 11).
SHIPPED = (
    moe_lora.PACKED_MIN_TOKENS,
    moe_lora.PACKED_MAX_TOKENS,
    moe_lora.PACK_GATES,
    moe_lora.GATE_PACK_ROWS,
)


@pytest.fixture(autouse=True)
def _packs_off(monkeypatch):
    """Each test starts from the unpacked path and turns on what it checks: "off" is then the reference."""
    monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", OFF)
    monkeypatch.setattr(moe_lora, "GATE_PACK_ROWS", 0)


def test_shipped_defaults():
    assert SHIPPED == (2, sys.maxsize, 1, 1)


def _model(dtype: str, *, impl: str | None = None, bias: bool = False, **moe_kw) -> MeteoraLlama:
    cfg = ModelConfig.tiny(
        vocab_size=99, eos_token_ids=(2,), pad_token_id=0, bos_token_id=1, attention_bias=bias
    )
    moe_kw.setdefault("expert_names", tuple(f"task{i}" for i in range(28)))
    moe = MoEConfig(top_k=2, implementation=impl, **moe_kw)
    return MeteoraLlama(cfg, moe, dtype=dtype, rngs=nnx.Rngs(5))


def _packed_copy(model: MeteoraLlama) -> MeteoraLlama:
    """A merged copy with packs attached, as the sampler's jitted functions make one."""
    copy = nnx.merge(*nnx.split(model))
    copy.pack_for_inference()
    return copy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pack_columns_are_each_projections_shrink_and_gate(dtype):
    """Float64 NumPy check of the layout: the pack's columns are every expert's ``x @ A[e]`` (expert-major, as
    ``xla.shrink_all``) and each projection's gate logits (bf16: hi + lo within 2^-16 of float32)."""
    model = _model(dtype)
    attn = model.layers[0].attn
    group = (attn.q_proj, attn.k_proj, attn.v_proj)
    pack = moe_lora.pack_group(group)
    e, r, d = 28, group[0].lora_a_edr.shape[2], group[0].d_in
    assert pack.dtype == jnp.dtype(dtype)
    assert pack.shape == (d, 3 * e * r + (2 if dtype == "bfloat16" else 1) * 3 * e)
    x = np.asarray(jax.random.normal(key_for(f"pack-{dtype}"), (5, d)).astype(dtype), np.float64)
    wide = x @ np.asarray(pack, np.float64)
    for i, p in enumerate(group):
        a = np.asarray(p.lora_a_edr[...], np.float64)
        np.testing.assert_allclose(
            wide[:, i * e * r : (i + 1) * e * r].reshape(5, e, r), np.einsum("td,edr->ter", x, a), rtol=1e-12
        )
    gates = wide[:, 3 * e * r :]
    if dtype == "bfloat16":
        gates = gates[:, : 3 * e] + gates[:, 3 * e :]
    want = x @ np.concatenate([np.asarray(p.gate_de[...], np.float64) for p in group], axis=1)
    scale = np.abs(x) @ np.abs(
        np.concatenate([np.asarray(p.gate_de[...], np.float64) for p in group], axis=1)
    )
    assert np.max(np.abs(gates - want) / scale) < (2.0**-16 if dtype == "bfloat16" else 1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", [(2, 7), (1, 40)])
def test_packed_forward_matches_unpacked(monkeypatch, dtype, tokens):
    """Logits and every projection's expert ids with packs equal the unpacked forward's (the automatic
    backend: ``xla`` on CPU), with fewer GEMMs: one per group instead of a gate GEMV plus P shrinks."""
    # The residual added after each projection on both paths: the folded sum (checked on its own below)
    # rounds in another order, which would hide a pack's error in the bf16 tolerance of the gate logits.
    monkeypatch.setattr(llama, "RESIDUAL_IN_PROJECTION", 0)
    model = _model(dtype)
    ids = jax.random.randint(key_for(f"packed-fwd-{dtype}-{tokens}"), tokens, 3, 99)
    off = model.forward(ids, return_routing=True)
    monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", ON)
    on = _packed_copy(model).forward(ids, return_routing=True)
    assert [r["name"] for r in on.routing] == [r["name"] for r in off.routing]
    for a, b in zip(on.routing, off.routing, strict=True):
        np.testing.assert_array_equal(np.asarray(a["expert_ids"]), np.asarray(b["expert_ids"]))
        assert rel_err(a["gate_logits"], b["gate_logits"]) < (1e-6 if dtype == "float32" else 1e-4)
    assert rel_err(on.logits, off.logits) < (1e-6 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_residual_folded_into_the_projection(monkeypatch, dtype):
    """``RESIDUAL_IN_PROJECTION``: the o / down projections take the layer's residual (inside their GEMMs on
    the packed dense path); the model's logits and routing equal those of adding it after each projection
    (float32 to 1e-6; bf16 to its rounding), through the packed and the unpacked path."""
    model = _model(dtype)
    ids = jax.random.randint(key_for(f"residual-{dtype}"), (2, 9), 3, 99)
    for packed in (False, True):
        monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", ON if packed else OFF)
        runs = []
        for fold in (0, 1):
            monkeypatch.setattr(llama, "RESIDUAL_IN_PROJECTION", fold)
            runs.append((_packed_copy(model) if packed else model).forward(ids, return_routing=True))
        after, folded = runs
        assert rel_err(folded.logits, after.logits) < (1e-6 if dtype == "float32" else 2e-2), packed
        if dtype == "float32":
            for a, b in zip(folded.routing, after.routing, strict=True):
                np.testing.assert_array_equal(np.asarray(a["expert_ids"]), np.asarray(b["expert_ids"]))


def test_residual_is_the_expand_gemms_c():
    """With the bf16 sum, ``masked_forward_from_shrink``'s residual is added to the expand before the base
    GEMM's sum (so that XLA folds both adds into the GEMMs' epilogues), and the result is base + LoRA +
    residual (float64 NumPy, to bf16 rounding)."""
    t, d, o, e, r = 6, 32, 24, 5, 4
    keys = iter(jax.random.split(key_for("residual-c"), 6))
    x = jax.random.normal(next(keys), (t, d), jnp.bfloat16)
    w = (jax.random.normal(next(keys), (d, o)) / 6).astype(jnp.bfloat16)
    h = jax.random.normal(next(keys), (t, e, r), jnp.float32)
    b = jax.random.normal(next(keys), (e, r, o), jnp.bfloat16)
    res = (4 * jax.random.normal(next(keys), (t, o))).astype(jnp.bfloat16)
    ids = jnp.stack([jnp.arange(t) % e, (jnp.arange(t) + 2) % e], axis=1).astype(jnp.int32)
    wts = jnp.full((t, 2), 0.5, jnp.float32)
    scaling = jnp.linspace(0.5, 2.0, e)

    def fn(x, w, h, b, ids, wts, scaling, res):
        return xla.masked_forward_from_shrink(
            x, w, h, b, ids, wts, scaling, low_precision_sum=True, residual_to=res
        )

    jaxpr = jax.make_jaxpr(fn)(x, w, h, b, ids, wts, scaling, res).jaxpr
    made_by = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    last = jaxpr.eqns[-1]
    assert last.primitive.name == "add"
    kinds = sorted(made_by[v].primitive.name for v in last.invars)
    assert kinds == ["add", "dot_general"], kinds
    (inner,) = (made_by[v] for v in last.invars if made_by[v].primitive.name == "add")
    assert jaxpr.invars[-1] in inner.invars  # the residual, into the expand's sum
    got = np.asarray(fn(x, w, h, b, ids, wts, scaling, res), np.float64)
    f64 = [np.asarray(a, np.float64) for a in (x, w, h, b, res)]
    coef = np.zeros((t, e))
    for i in range(t):
        coef[i, np.asarray(ids[i])] = 0.5 * np.asarray(scaling, np.float64)[np.asarray(ids[i])]
    lora = np.einsum("ter,ero->to", f64[2] * coef[:, :, None], f64[3])
    want = f64[0] @ f64[1] + lora + f64[4]
    assert np.max(np.abs(got - want)) < 2e-2 * np.max(np.abs(want))


def _dots(model: MeteoraLlama, ids: jax.Array) -> int:
    graphdef, state = nnx.split(model)

    def f(state):
        m = nnx.merge(graphdef, state)
        m.pack_for_inference()
        return m.forward(ids).logits

    return str(jax.make_jaxpr(f)(state)).count("dot_general")


def test_packed_forward_is_one_gemm_per_group(monkeypatch):
    cfg_layers = _model("bfloat16").config.num_hidden_layers
    model = _model("bfloat16")
    ids = jnp.ones((2, 5), jnp.int32)
    off = _dots(model, ids)
    monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", ON)
    on = _dots(model, ids)
    # per layer: 4 gate GEMVs + 7 shrinks (off) -> 4 packed GEMMs (on)
    assert off - on == 7 * cfg_layers


def test_partial_targets_and_bias(monkeypatch):
    """A group where some projections carry no experts (k_proj here) packs the others; a Qwen2-style q/k/v
    bias is added as in the unpacked forward."""
    model = _model("float32", bias=True, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))
    attn = model.layers[0].attn
    attn.q_proj.bias_o[...] = jax.random.normal(key_for("bias"), (attn.q_proj.d_out,))
    attn.k_proj.bias_o[...] = jax.random.normal(key_for("bias-k"), (attn.k_proj.d_out,))
    ids = jax.random.randint(key_for("partial"), (2, 6), 3, 99)
    off = model.forward(ids, return_routing=True)
    monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", ON)
    packed = _packed_copy(model)
    assert packed.layers[0].attn.qkv_pack[...].shape[1] == 2 * 28 * 8 + 2 * 28
    on = packed.forward(ids, return_routing=True)
    assert [r["name"] for r in on.routing] == [r["name"] for r in off.routing]
    assert rel_err(on.logits, off.logits) < 1e-6


def test_greedy_tokens_equal_and_no_pack_left_on_the_model(monkeypatch):
    """The sampler (packs built inside its jitted prefill and decode) gives the unpacked greedy tokens, top-2
    and top-1, and the caller's model never holds a pack."""
    model = _model("float32")
    for _, m in nnx.iter_modules(model):  # experts strong enough to decide tokens
        if isinstance(m, moe_lora.MoELoRALinear) and m.num_experts:
            m.lora_b_ero[...] = m.lora_b_ero[...] * 100.0
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51]]
    base = Sampler(model).generate(prompts, max_new_tokens=8, routing=RoutingOptions(no_experts=True))
    want = {
        k: Sampler(model).generate(prompts, max_new_tokens=8, routing=RoutingOptions(top_k=k)) for k in (1, 2)
    }
    assert want[2].token_ids != base.token_ids  # the experts matter here
    served = []
    packed_forward = moe_lora.packed_forward

    def counting(*args):
        out = packed_forward(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(moe_lora, "packed_forward", counting)
    monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", ON)
    jax.clear_caches()  # the knob is read at trace time
    sampler = Sampler(model)
    for k, w in want.items():
        got = sampler.generate(prompts, max_new_tokens=8, routing=RoutingOptions(top_k=k))
        assert got.token_ids == w.token_ids, k
    assert any(served)  # the prefill and decode (batch 2) went through the packs
    packs = sampler.packs()  # made once per model state and passed into the jitted prefill / decode
    assert sampler.packs() is packs and "0.attn.qkv_pack" in packs and "1.mlp.down_pack" in packs
    sampler.refresh()
    assert sampler.packs() is not packs
    assert not jax.tree.leaves(nnx.state(model, InferencePack))
    assert not hasattr(model.layers[0].attn, "qkv_pack")


def test_pack_serves_only_the_dense_masked_inference_path(monkeypatch):
    """None (the unpacked path runs) for: the knob off, one token, a forced expert, no experts, a backend whose
    forward is not the dense masked one, or another dtype; and no packs at all under a device mesh."""
    model = _model("float32")
    mlp = model.layers[0].mlp
    group = (mlp.gate_proj, mlp.up_proj)
    pack = moe_lora.pack_group(group)
    x = jax.random.normal(key_for("serve"), (1, 4, model.config.hidden_size))
    top2 = RoutingOptions()
    assert moe_lora.packed_forward(group, pack, x, top2, None) is None  # knob off
    monkeypatch.setattr(moe_lora, "PACKED_MIN_TOKENS", ON)
    assert moe_lora.packed_forward(group, pack, x, top2, None) is not None
    assert moe_lora.packed_forward(group, pack, x[:, :1], top2, None) is None
    monkeypatch.setattr(moe_lora, "PACKED_MAX_TOKENS", 3)
    assert moe_lora.packed_forward(group, pack, x, top2, None) is None  # 4 tokens, above the cap
    assert moe_lora.packed_forward(group, pack, x[:, :3], top2, None) is not None
    monkeypatch.setattr(moe_lora, "PACKED_MAX_TOKENS", sys.maxsize)
    assert moe_lora.packed_forward(group, pack, x, RoutingOptions(force_expert=3), None) is None
    assert moe_lora.packed_forward(group, pack, x, RoutingOptions(no_experts=True), None) is None
    assert moe_lora.packed_forward(group, pack, x.astype(jnp.bfloat16), top2, None) is None
    assert moe_lora.packed_forward(group, None, x, top2, None) is None
    for impl in ("reference", "xla_ragged", "pallas_gpu_interpret"):
        other = _model("float32", impl=impl).layers[0].mlp
        g2 = (other.gate_proj, other.up_proj)
        assert moe_lora.packed_forward(g2, moe_lora.pack_group(g2), x, top2, None) is None, impl
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        copy = _packed_copy(model)
    assert not hasattr(copy.layers[0].attn, "qkv_pack")


def test_masked_forward_plan():
    """The backends and sizes whose inference forward is ``xla.masked_forward``, with its bf16-sum rule."""
    low_from = xla.LOW_PRECISION_SUM_MIN_TOKENS
    assert api.masked_forward_plan("xla", 64, 224) == ("xla", 64 >= low_from)
    assert api.masked_forward_plan("xla_masked", 64, 224) == ("xla_masked", False)
    assert api.masked_forward_plan("xla_masked_lowp", 64, 224) == ("xla_masked_lowp", True)
    assert api.masked_forward_plan("xla", 1, 224) is None
    assert api.masked_forward_plan("xla", 64, xla.DENSE_MAX_EXPERT_COLUMNS + 1) is None
    assert api.masked_forward_plan("reference", 64, 224) is None
    assert api.masked_forward_plan("pallas_gpu_decode", 64, 224) == ("pallas_gpu_decode", 64 >= low_from)


def test_gate_packs_change_nothing():
    """``PACK_GATES`` (on by default): groups of two or more routed projections get their gates concatenated once, the
    forward reads them instead of concatenating per call (no gate concatenation left in its program), and
    logits and expert ids are bitwise those without packs."""
    assert moe_lora.PACK_GATES and moe_lora.PACKED_MIN_TOKENS > 10**9  # gate packs alone (fixture)
    model = _model("float32")
    copy = _packed_copy(model)
    attn, mlp = copy.layers[0].attn, copy.layers[0].mlp
    np.testing.assert_array_equal(
        np.asarray(attn.qkv_gates[...]),
        np.asarray(moe_lora.concat_gates((attn.q_proj, attn.k_proj, attn.v_proj))),
    )
    assert mlp.gate_up_gates[...].shape == (model.config.hidden_size, 2 * 28)
    assert not hasattr(attn, "o_gates") and not hasattr(attn, "qkv_pack")
    ids = jax.random.randint(key_for("gate-packs"), (2, 5), 3, 99)
    off, on = model.forward(ids, return_routing=True), copy.forward(ids, return_routing=True)
    np.testing.assert_array_equal(np.asarray(on.logits), np.asarray(off.logits))
    for a, b in zip(on.routing, off.routing, strict=True):
        np.testing.assert_array_equal(np.asarray(a["expert_ids"]), np.asarray(b["expert_ids"]))

    def gate_concats(m: MeteoraLlama) -> int:
        jaxpr = str(jax.make_jaxpr(lambda i: m.forward(i).logits)(ids))
        width = f"{model.config.hidden_size},{3 * 28}]"
        return sum("concatenate" in line and width in line for line in jaxpr.splitlines())

    assert gate_concats(model) == model.config.num_hidden_layers
    assert gate_concats(copy) == 0


@pytest.mark.parametrize("dtype,split_from", [("float32", 256), ("bfloat16", 256), ("bfloat16", 2)])
def test_gate_rows_pack_matches(monkeypatch, dtype, split_from):
    """``GATE_PACK_ROWS``: every group's gates stored [N, D] (o and down too) give, for calls up to that many
    tokens, the unpacked logits (to
    summation order) and the same expert ids, through the float32 row GEMM and, for bf16 prompts from
    ``SPLIT_GATE_MIN_TOKENS`` on, through the split gate of the transpose."""
    monkeypatch.setattr(moe_lora, "GATE_PACK_ROWS", 16)  # up to 16 tokens: the 10 of this call
    monkeypatch.setattr(moe_lora, "SPLIT_GATE_MIN_TOKENS", split_from)
    model = _model(dtype)
    copy = _packed_copy(model)
    attn, mlp = copy.layers[0].attn, copy.layers[0].mlp
    assert attn.o_gates_nd[...].shape == (28, attn.o_proj.d_in)
    assert mlp.gate_up_gates_nd[...].shape == (2 * 28, model.config.hidden_size)
    assert hasattr(attn, "qkv_gates")  # the [D, N] pack too, for calls above the threshold
    ids = jax.random.randint(key_for(f"gate-rows-{dtype}-{split_from}"), (2, 5), 3, 99)
    off, on = model.forward(ids, return_routing=True), copy.forward(ids, return_routing=True)
    for a, b in zip(on.routing, off.routing, strict=True):
        np.testing.assert_array_equal(np.asarray(a["expert_ids"]), np.asarray(b["expert_ids"]))
        assert rel_err(a["gate_logits"], b["gate_logits"]) < 1e-6
    assert rel_err(on.logits, off.logits) < 1e-6
