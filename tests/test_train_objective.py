"""The objective against a NumPy float64 oracle; gate-only steps touch nothing but gates; k=1 gates learn."""

import jax
import numpy as np
import pytest
from flax import nnx

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.model.llama import MeteoraLlama
from meteora_jax.params import ExpertParam, GateParam
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.objective import gate_names, objective
from meteora_jax.train.step import init_state, make_train_step, routing_for

NAMES = ("a", "b", "c")


def _model(top_k=2):
    return MeteoraLlama(
        ModelConfig.tiny(), MoEConfig(expert_names=NAMES, rank=4, top_k=top_k), rngs=nnx.Rngs(3)
    )


def _batch(rng, b=4, t=12):
    tokens = rng.integers(3, 256, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 8:] = 0  # a padded row
    weight = np.zeros((b, t), np.float32)
    weight[:, 4:-1] = 1.0
    weight[1, 7:] = 0.0
    return {
        "tokens_bl": tokens,
        "mask_bl": mask,
        "lm_weight_bl": weight,
        "task_b": np.array([0, 2, 1, 2], np.int32),
    }


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_objective_matches_numpy_oracle(rng):
    model, batch = _model(), _batch(rng)
    routing = model.routing_options()
    loss, m = objective(model, batch, routing, gate_loss_weight=50.0, balance_loss_weight=0.0)
    out = model.forward(
        batch["tokens_bl"], routing=routing, attention_mask=batch["mask_bl"], return_routing=True
    )
    b, t = batch["tokens_bl"].shape
    # LM: a loop over rows and positions
    logp = _log_softmax64(out.logits)
    num = den = 0.0
    for i in range(b):
        for j in range(t - 1):
            if batch["lm_weight_bl"][i, j]:
                num -= logp[i, j, batch["tokens_bl"][i, j + 1]]
                den += 1
    lm = num / den
    # gates: every gate, every non-pad token, against the row's task
    ces, accs = [], []
    for r in out.routing:
        lp = _log_softmax64(r["gate_logits"]).reshape(b, t, -1)
        ce = [-lp[i, j, batch["task_b"][i]] for i in range(b) for j in range(t) if batch["mask_bl"][i, j]]
        ok = [
            lp[i, j].argmax() == batch["task_b"][i]
            for i in range(b)
            for j in range(t)
            if batch["mask_bl"][i, j]
        ]
        ces.append(np.mean(ce))
        accs.append(np.mean(ok))
    assert len(out.routing) == len(gate_names(model)) == 14
    np.testing.assert_allclose(float(m["lm_loss"]), lm, rtol=1e-5)
    np.testing.assert_allclose(float(m["gate_ce"]), np.mean(ces), rtol=1e-5)
    np.testing.assert_allclose(float(loss), lm + 50.0 * np.mean(ces), rtol=1e-5)
    np.testing.assert_allclose(float(m["routing_acc"]), np.mean(accs), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["correct_g"]) / float(m["tok_count"]), accs, rtol=1e-6)


def test_balance_loss_is_one_when_uniform(rng):
    model, batch = _model(), _batch(rng)
    for var in jax.tree.leaves(nnx.state(model, GateParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var[...] = np.zeros(var[...].shape, np.float32)
    _, m = objective(model, batch, model.routing_options(), gate_loss_weight=1.0, balance_loss_weight=1.0)
    # argmax of ties is expert 0 for every token: f = (1, 0, 0), p = 1/3 each -> E * 1/3 = 1
    np.testing.assert_allclose(float(m["balance"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["gate_ce"]), np.log(3), rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gate_only_step_changes_gates_only(rng, top_k):
    model, batch = _model(top_k), _batch(rng)
    before = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    cfg = TrainConfig.tiny(learning_rate=1e-2, warmup_steps=0)
    state = init_state(model, cfg)
    step = make_train_step(state, cfg, routing_for(model, cfg))
    for _ in range(3):
        state.trainable, state.opt, m = step(state.trainable, state.opt, state.frozen, batch)
    after = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(state.model(), nnx.Param))}
    kinds = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    gates = {k for k, v in kinds.items() if isinstance(v, GateParam)}
    # with k = 1 the routed output has weight 1, so only the gate CE moves the gates: they still all change
    assert changed == gates
    assert not any(isinstance(kinds[k], ExpertParam) for k in changed)


def test_gate_and_experts_mode_trains_lora_factors_not_base(rng):
    model, batch = _model(), _batch(rng)
    before = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    cfg = TrainConfig.tiny(mode="gate_and_experts", learning_rate=1e-2, warmup_steps=0)
    state = init_state(model, cfg)
    step = make_train_step(state, cfg, routing_for(model, cfg))
    state.trainable, state.opt, _ = step(state.trainable, state.opt, state.frozen, batch)
    after = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(state.model(), nnx.Param))}
    changed = {k[-1] for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"gate_de", "lora_a_edr", "lora_b_ero"}


def test_expert_learning_rate_sets_the_lora_factors_step_size(rng):
    # Adam's first step moves every parameter with a nonzero gradient by about its peak rate (g / |g|), so
    # the largest change per role reads the rate that role was given
    model, batch = _model(), _batch(rng)
    before = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    cfg = TrainConfig.tiny(
        mode="gate_and_experts", learning_rate=1e-2, expert_learning_rate=1e-4, warmup_steps=0
    )
    state = init_state(model, cfg)
    step = make_train_step(state, cfg, routing_for(model, cfg))
    state.trainable, state.opt, _ = step(state.trainable, state.opt, state.frozen, batch)
    after = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(state.model(), nnx.Param))}
    moved: dict[str, float] = {}
    for k in before:
        delta = float(np.max(np.abs(after[k].astype(np.float64) - before[k])))
        moved[k[-1]] = max(moved.get(k[-1], 0.0), delta)
    assert moved["gate_de"] == pytest.approx(1e-2, rel=0.05)
    assert moved["lora_a_edr"] == pytest.approx(1e-4, rel=0.05)
    assert moved["lora_b_ero"] == pytest.approx(1e-4, rel=0.05)


def test_bfloat16_model_trains_float32_lora_factors(rng):
    # a 1e-5 step on a bfloat16 factor of ~0.02 (spacing ~1.2e-4) would round away; the float32 master
    # copies keep it, and the forward still computes in bfloat16
    model = MeteoraLlama(
        ModelConfig.tiny(), MoEConfig(expert_names=NAMES, rank=4, top_k=2), dtype="bfloat16", rngs=nnx.Rngs(3)
    )
    before = {k: np.array(v, np.float32) for k, v in nnx.to_flat_state(nnx.state(model, ExpertParam))}
    cfg = TrainConfig.tiny(
        mode="gate_and_experts", learning_rate=1e-2, expert_learning_rate=1e-5, warmup_steps=0
    )
    state = init_state(model, cfg)
    step = make_train_step(state, cfg, routing_for(model, cfg))
    state.trainable, state.opt, _ = step(state.trainable, state.opt, state.frozen, _batch(rng))
    trained = state.model()
    after = dict(nnx.to_flat_state(nnx.state(trained, ExpertParam)))
    for k, v in after.items():
        if k[-1] in ("lora_a_edr", "lora_b_ero"):
            assert v.value.dtype == np.float32, k
            assert float(np.max(np.abs(np.asarray(v.value) - before[k]))) == pytest.approx(1e-5, rel=0.05)
    assert trained.layers[0].attn.q_proj.kernel_io.value.dtype == jax.numpy.bfloat16


def test_bfloat16_gates_train_through_the_split_gate_product(rng, monkeypatch):
    # 4 x 64 = 256 tokens: a bf16 model's gates take the split bf16 GEMM (moe_lora.split_gate_logits), whose
    # custom VJP is the float32 one; the gate gradients match the float32 gate product's run
    from meteora_jax.model import moe_lora

    model = MeteoraLlama(
        ModelConfig.tiny(), MoEConfig(expert_names=NAMES, rank=4, top_k=2), dtype="bfloat16", rngs=nnx.Rngs(3)
    )
    batch = _batch(rng, b=4, t=64)
    graphdef, gates, rest = nnx.split(model, GateParam, ...)

    def loss(g):
        m = nnx.merge(graphdef, g, rest)
        return objective(m, batch, m.routing_options(), gate_loss_weight=50.0, balance_loss_weight=0.0)[0]

    assert "custom_vjp_call" in str(jax.make_jaxpr(jax.grad(loss))(gates))
    split = nnx.to_flat_state(jax.jit(jax.grad(loss))(gates))
    monkeypatch.setattr(moe_lora, "SPLIT_GATE_MIN_TOKENS", 10**9)
    plain = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(gates)))
    assert len(split) == len(plain) > 0
    for k, v in split:
        want = np.asarray(plain[k].value, np.float32)
        np.testing.assert_allclose(
            np.asarray(v.value, np.float32), want, rtol=1e-2, atol=1e-3 * np.abs(want).max()
        )


@pytest.mark.parametrize("detach", [False, True])
def test_detach_gate_input_keeps_the_gate_loss_off_the_lora_factors(rng, detach):
    # gate_and_experts with no LM loss: the gate CE alone reaches the LoRA factors only through the hidden
    # states the later gates read; detach_gate_input cuts exactly that (same loss value either way)
    model = _model()
    batch = dict(_batch(rng), lm_weight_bl=np.zeros((4, 12), np.float32))
    cfg = TrainConfig.tiny(mode="gate_and_experts", detach_gate_input=detach)
    routing = routing_for(model, cfg)
    assert routing.detach_gate_input == detach
    graphdef, experts, rest = nnx.split(model, ExpertParam, ...)

    def loss(e):
        m = nnx.merge(graphdef, e, rest)
        return objective(m, batch, routing, gate_loss_weight=50.0, balance_loss_weight=0.0)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(experts)
    plain = objective(model, batch, model.routing_options(), gate_loss_weight=50.0, balance_loss_weight=0.0)
    assert float(value) == pytest.approx(float(plain[0]), rel=1e-6)
    moved = {k[-1]: 0.0 for k, _ in nnx.to_flat_state(grads)}
    for k, v in nnx.to_flat_state(grads):
        moved[k[-1]] = max(moved[k[-1]], float(np.max(np.abs(np.asarray(v.value)))))
    for name in ("lora_a_edr", "lora_b_ero"):
        assert (moved[name] == 0.0) == detach, moved
