"""MeteoRA's training objective: causal-LM cross-entropy + lambda * gate cross-entropy against the task id.

    loss = lm_ce + gate_loss_weight * gate_ce (+ balance_loss_weight * balance)

* ``lm_ce``: mean next-token negative log-likelihood over the positions whose target counts
  (``lm_weight_bl``: every real token, or response tokens only).
* ``gate_ce``: every gate's *raw* logits (before temperature and top-k, as in MeteoRA) scored with softmax
  cross-entropy against the row's task id (in a conversation row, each token's own turn's: ``task_bl``), on
  every real (non-pad) token, prompt and response alike. It is the mean over all (gate, token) pairs, i.e.
  the mean over gates of each gate's mean over tokens (every gate sees the same tokens, so the two are
  equal). Because it supervises the logits directly, the gates learn even with top_k = 1, where the routed
  output has weight 1 and carries no gradient to the gate.
* ``balance`` (optional, off in MeteoRA): Switch-Transformer load balancing, E * sum_e f_e * p_e per gate
  (f_e: share of tokens whose top-1 is e, p_e: mean gate probability of e), averaged over gates.

Routing accuracy is top-1 of the raw gate logits == task id, over the same (gate, token) pairs, and also over
response tokens only (``correct_resp_g``): a causal gate cannot know the task on the shared template prefix
(``<s>[INST] ``) before any task-specific token, so accuracy over all tokens is capped well below 1, while
on the response -- where routing decides what is generated -- the whole prompt has been read. Metrics
come back both as means and as sums with counts, so evaluation over many batches aggregates exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from meteora_jax.model.gate import RoutingOptions


def gate_names(model) -> list[str]:  # noqa: ANN001 (a MeteoraLlama)
    """``"<layer>.<projection>"`` of every gate, in the order ``forward(return_routing=True)`` lists them."""
    moe = model.moe_config
    if moe.num_experts == 0:
        return []
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [
        f"{i}.{p}" for i in range(model.config.num_hidden_layers) for p in order if p in moe.target_modules
    ]


def objective(
    model,  # noqa: ANN001 (a MeteoraLlama)
    batch: dict[str, jax.Array],
    routing: RoutingOptions,
    *,
    gate_loss_weight: float,
    balance_loss_weight: float = 0.0,
) -> tuple[Float[Array, ""], dict[str, jax.Array]]:
    """(loss, metrics) of one batch; see the module docstring. Static shapes; jit it."""
    tokens_bl, mask_bl = batch["tokens_bl"], batch["mask_bl"]
    b, seq = tokens_bl.shape
    out = model.forward(tokens_bl, routing=routing, attention_mask=mask_bl, return_routing=True)

    # -- LM: position t predicts token t + 1
    logits_blv = out.logits.astype(jnp.float32)
    logp_blv = jax.nn.log_softmax(logits_blv[:, :-1], axis=-1)
    nll_bl = -jnp.take_along_axis(logp_blv, tokens_bl[:, 1:, None], axis=-1)[..., 0]
    w_bl = batch["lm_weight_bl"][:, :-1].astype(jnp.float32)
    lm_count = jnp.sum(w_bl)
    lm_sum = jnp.sum(nll_bl * w_bl)
    lm_ce = lm_sum / jnp.maximum(lm_count, 1.0)

    # -- gates: [G, B*T, E]
    gate_logits = [r["gate_logits"] for r in out.routing if r["gate_logits"] is not None]
    valid_t = mask_bl.reshape(b * seq).astype(jnp.float32)
    tok_count = jnp.sum(valid_t)
    resp_t = batch["response_bl"].reshape(b * seq).astype(jnp.float32) if "response_bl" in batch else valid_t
    if gate_logits:
        logits_gte = jnp.stack(gate_logits).astype(jnp.float32)
        num_experts = logits_gte.shape[-1]
        if "task_bl" in batch:  # conversation rows: each token's own turn's task
            task_t = batch["task_bl"].reshape(b * seq).astype(jnp.int32)
        else:
            task_t = jnp.repeat(batch["task_b"].astype(jnp.int32), seq)
        logp_gte = jax.nn.log_softmax(logits_gte, axis=-1)
        ce_gt = -jnp.take_along_axis(logp_gte, task_t[None, :, None], axis=-1)[..., 0]
        gate_ce_sum = jnp.sum(ce_gt * valid_t)
        gate_ce = gate_ce_sum / (len(gate_logits) * jnp.maximum(tok_count, 1.0))
        top1_gt = jnp.argmax(logits_gte, axis=-1)
        hit_gt = top1_gt == task_t[None]
        correct_g = jnp.sum(hit_gt * valid_t, axis=-1)
        correct_resp_g = jnp.sum(hit_gt * resp_t, axis=-1)
        if balance_loss_weight:
            probs_gte = jnp.exp(logp_gte)
            denom = jnp.maximum(tok_count, 1.0)
            frac_ge = jnp.sum(jax.nn.one_hot(top1_gt, num_experts) * valid_t[None, :, None], axis=1) / denom
            prob_ge = jnp.sum(probs_gte * valid_t[None, :, None], axis=1) / denom
            balance = num_experts * jnp.mean(jnp.sum(frac_ge * prob_ge, axis=-1))
        else:
            balance = jnp.zeros((), jnp.float32)
    else:
        gate_ce_sum = gate_ce = balance = jnp.zeros((), jnp.float32)
        correct_g = correct_resp_g = jnp.zeros((0,), jnp.float32)

    loss = lm_ce + gate_loss_weight * gate_ce
    if balance_loss_weight:
        loss = loss + balance_loss_weight * balance
    metrics = {
        "loss": loss,
        "lm_loss": lm_ce,
        "gate_ce": gate_ce,
        "balance": balance,
        "routing_acc": jnp.sum(correct_g) / jnp.maximum(tok_count * max(len(gate_logits), 1), 1.0),
        # sums and counts for exact aggregation over batches
        "lm_sum": lm_sum,
        "lm_count": lm_count,
        "gate_ce_sum": gate_ce_sum,
        "tok_count": tok_count,
        "correct_g": correct_g,
        "resp_count": jnp.sum(resp_t),
        "correct_resp_g": correct_resp_g,
    }
    return loss, metrics
