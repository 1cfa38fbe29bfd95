"""The optimizer and the jitted train / eval steps.

What trains is a Variable-type filter: ``GateParam`` (gate-only, the paper) or ``GateParam`` + the LoRA
factors of ``ExpertParam`` (the released code; the per-expert scalings stay fixed). The base (plain
``nnx.Param``) is never in the filter, so it is never differentiated nor updated.

``nnx.Optimizer(model, tx, wrt=...)`` builds the optax state for exactly those variables. The model and the
optimizer are then split once into a graph definition and three pytrees -- ``trainable`` (the filtered
params), ``frozen`` (everything else) and ``opt`` (optimizer state + step) -- and the step is a pure
``jax.jit`` function of them that merges, differentiates w.r.t. ``trainable`` only, updates and splits
again. Pure pytrees are what Orbax saves and what mesh shardings attach to; NNX graph traversal happens
only at trace time. ``trainable`` and ``opt`` are donated: their buffers are reused for the new values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from meteora_jax.model.gate import RoutingOptions
from meteora_jax.params import ExpertParam, GateParam
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.objective import objective

# the LoRA factors gate_and_experts trains (the per-expert scalings stay fixed)
EXPERT_FACTORS = ("lora_a_edr", "lora_b_ero")


def _expert_factor(path: tuple, var: Any) -> bool:
    return isinstance(var, ExpertParam) and str(path[-1]) in EXPERT_FACTORS


def trainable_filter(mode: str) -> Any:
    """The nnx filter of what ``mode`` trains."""
    if mode == "gate":
        return GateParam
    if mode == "gate_and_experts":
        return nnx.Any(GateParam, _expert_factor)
    raise ValueError(f"unknown training mode {mode!r}")


def _schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.min_lr_ratio,
    )


def _param_roles(params: Any) -> Any:
    """``"expert"`` for a LoRA factor's leaf, ``"gate"`` for the rest (labels for ``optax.multi_transform``)."""

    def role(path: tuple, _leaf: Any) -> str:
        name = jax.tree_util.keystr(path)
        return "expert" if any(factor in name for factor in EXPERT_FACTORS) else "gate"

    return jax.tree_util.tree_map_with_path(role, params)


def make_tx(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay to ``min_lr_ratio``, global-norm clipping.

    In ``gate_and_experts`` mode with ``expert_learning_rate`` set, the LoRA factors get their own peak rate:
    they start from trained adapters, which a gate's (higher) rate would knock off their optimum.
    """

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(
            _schedule(cfg, peak), b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay
        )

    expert_lr = cfg.expert_learning_rate
    if cfg.mode == "gate_and_experts" and expert_lr > 0 and expert_lr != cfg.learning_rate:
        adam = optax.multi_transform(
            {"gate": adamw(cfg.learning_rate), "expert": adamw(expert_lr)}, _param_roles
        )
    else:
        adam = adamw(cfg.learning_rate)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adam)
    return adam


@dataclasses.dataclass
class TrainState:
    """The three pytrees a step reads and writes, plus how to rebuild modules from them."""

    model_def: Any
    opt_def: Any
    trainable: nnx.State
    frozen: nnx.State
    opt: nnx.State

    def model(self) -> nnx.Module:
        return nnx.merge(self.model_def, self.trainable, self.frozen)


def float32_expert_factors(model: nnx.Module) -> None:
    """Keeps the LoRA factors in float32 (master weights) whatever the model's compute dtype.

    Adam's late steps are ~1e-5 to 1e-4; a bfloat16 factor of ~0.02 has a spacing of ~1.2e-4, so most of
    those updates would round away. The layer casts the factors to its compute dtype at use.
    """
    factors = nnx.state(model, _expert_factor)  # exactly what the gate_and_experts filter trains
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32), factors))


def init_state(model: nnx.Module, cfg: TrainConfig) -> TrainState:
    """The train state; in gate_and_experts mode the LoRA factors are first made float32 (in place)."""
    if cfg.mode == "gate_and_experts":
        float32_expert_factors(model)
    wrt = trainable_filter(cfg.mode)
    optimizer = nnx.Optimizer(model, make_tx(cfg), wrt=wrt)
    model_def, trainable, frozen = nnx.split(model, wrt, ...)
    opt_def, opt = nnx.split(optimizer)
    return TrainState(model_def, opt_def, trainable, frozen, opt)


def routing_for(model: nnx.Module, cfg: TrainConfig) -> RoutingOptions:
    routing = model.routing_options(top_k=cfg.top_k or None, mode=cfg.routing or None)
    return dataclasses.replace(routing, detach_gate_input=cfg.detach_gate_input)


def make_train_step(state: TrainState, cfg: TrainConfig, routing: RoutingOptions) -> Callable:
    """``step(trainable, opt, frozen, batch) -> (trainable, opt, metrics)``, jitted, donating the first two."""
    model_def, opt_def = state.model_def, state.opt_def

    def step(trainable, opt, frozen, batch):  # noqa: ANN001, ANN202
        optimizer = nnx.merge(opt_def, opt)

        def loss_fn(trainable):  # noqa: ANN001, ANN202
            model = nnx.merge(model_def, trainable, frozen)
            return objective(
                model,
                batch,
                routing,
                gate_loss_weight=cfg.gate_loss_weight,
                balance_loss_weight=cfg.balance_loss_weight,
            )

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        model = nnx.merge(model_def, trainable, frozen)
        optimizer.update(model, grads)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_trainable = nnx.state(model, trainable_filter(cfg.mode))
        return new_trainable, nnx.state(optimizer), metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(state: TrainState, cfg: TrainConfig, routing: RoutingOptions) -> Callable:
    """``eval_step(trainable, frozen, batch) -> metrics`` (no update)."""
    model_def = state.model_def

    def step(trainable, frozen, batch):  # noqa: ANN001, ANN202
        model = nnx.merge(model_def, trainable, frozen)
        _, metrics = objective(
            model,
            batch,
            routing,
            gate_loss_weight=cfg.gate_loss_weight,
            balance_loss_weight=cfg.balance_loss_weight,
        )
        return metrics

    return jax.jit(step)


def _per_gate_report(correct_g: np.ndarray, count: float, names: list[str], prefix: str) -> dict[str, Any]:
    per_gate = {n: float(c) / max(count, 1.0) for n, c in zip(names, list(correct_g))}
    layers = sorted({int(n.split(".")[0]) for n in names})
    per_layer = {}
    for i in layers:
        vals = [v for n, v in per_gate.items() if int(n.split(".")[0]) == i]
        per_layer[str(i)] = sum(vals) / len(vals)
    # layer 0's q/k/v gates read the current token's embedding alone: no context, so no way to know the task
    contextual = [v for n, v in per_gate.items() if n not in ("0.q_proj", "0.k_proj", "0.v_proj")]
    return {
        f"{prefix}": sum(per_gate.values()) / max(len(per_gate), 1),
        f"{prefix}_contextual": sum(contextual) / max(len(contextual), 1),
        f"{prefix}_per_layer": per_layer,
        f"{prefix}_per_gate": per_gate,
    }


def aggregate(metric_list: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Exact held-out aggregates from per-batch sums.

    ``routing_acc``: over every (gate, non-pad token) pair = the mean over gates of per-gate accuracy.
    ``routing_acc_response``: the same over response tokens. ``*_contextual``: without layer 0's q/k/v gates.
    """
    tok = sum(float(m["tok_count"]) for m in metric_list)
    resp = sum(float(m["resp_count"]) for m in metric_list)
    lm = sum(float(m["lm_sum"]) for m in metric_list) / max(
        sum(float(m["lm_count"]) for m in metric_list), 1.0
    )
    out: dict[str, Any] = {
        "lm_loss": lm,
        "gate_ce": sum(float(m["gate_ce_sum"]) for m in metric_list) / max(tok * max(len(names), 1), 1.0),
        "tokens": int(tok),
        "response_tokens": int(resp),
    }
    if names:
        correct = np.sum([np.asarray(m["correct_g"], np.float64) for m in metric_list], axis=0)
        correct_resp = np.sum([np.asarray(m["correct_resp_g"], np.float64) for m in metric_list], axis=0)
        out.update(_per_gate_report(correct, tok, names, "routing_acc"))
        out.update(_per_gate_report(correct_resp, resp, names, "routing_acc_response"))
    return out
