"""Teacher-forced evaluation of a model on held-out task data: answer accuracy and per-token routing.

``answer_accuracy``: over the response tokens of each example (EOS included when the data adds it), the
share whose next-token argmax equals the reference, with the reference prefix fed in (teacher forcing).
It needs no generation loop, so the demo can compare base / forced adapter / routed on equal terms in a
few jitted forwards; a token-level score moves smoothly where exact match of whole answers would be 0/1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.model.gate import RoutingOptions
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.data import EncodedSet, eval_batches


def _correct(model, tokens_bl, mask_bl, weight_bl, routing):  # noqa: ANN001, ANN202
    logits = model.forward(tokens_bl, routing=routing, attention_mask=mask_bl).logits
    hit_bl = (jnp.argmax(logits[:, :-1], axis=-1) == tokens_bl[:, 1:]) * weight_bl[:, :-1]
    return jnp.sum(hit_bl, axis=1), jnp.sum(weight_bl[:, :-1], axis=1)


def answer_accuracy(
    model,  # noqa: ANN001 (a MeteoraLlama)
    data: EncodedSet,
    routing: RoutingOptions,
    *,
    pad_id: int,
    batch_size: int = 16,
    cfg: TrainConfig | None = None,
) -> dict[str, float]:
    """Per-task teacher-forced accuracy of response tokens (task name -> fraction), plus ``"mean"``."""
    from flax import nnx

    cfg = (cfg or TrainConfig()).replace(response_only=True, batch_size=batch_size)
    fn = nnx.jit(_correct, static_argnums=(4,))
    hits = np.zeros(len(data.task_names))
    counts = np.zeros(len(data.task_names))
    for start, batch in zip(
        range(0, len(data), batch_size), eval_batches(data, cfg, pad_id=pad_id, batch_size=batch_size)
    ):
        h, c = jax.device_get(fn(model, batch.tokens_bl, batch.mask_bl, batch.lm_weight_bl, routing))
        real = min(batch_size, len(data) - start)
        np.add.at(hits, batch.task_b[:real], h[:real])
        np.add.at(counts, batch.task_b[:real], c[:real])
    out = {n: float(hits[i] / counts[i]) for i, n in enumerate(data.task_names) if counts[i] > 0}
    out["mean"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def routing_trace(
    model,  # noqa: ANN001
    tokens_t: np.ndarray,
    routing: RoutingOptions | None = None,
) -> dict[str, Any]:
    """Top-1 expert of every gate for one sequence: ``expert_ids_gt`` [G, T] and ``layers`` [G]."""
    routing = routing or model.routing_options()
    out = model.forward(jnp.asarray(tokens_t)[None], routing=routing, return_routing=True)
    ids = [
        np.asarray(jnp.argmax(r["gate_logits"], axis=-1)) for r in out.routing if r["gate_logits"] is not None
    ]
    layers = [r["layer"] for r in out.routing if r["gate_logits"] is not None]
    return {"expert_ids_gt": np.stack(ids), "layers": np.asarray(layers)}


def layer_majority(expert_ids_gt: np.ndarray, layers: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, T]: per layer and token, the expert most of that layer's gates pick (ties: lowest id)."""
    out = []
    for layer in sorted(set(layers.tolist())):
        ids_gt = expert_ids_gt[layers == layer]
        votes_et = np.stack([(ids_gt == e).sum(0) for e in range(num_experts)])
        out.append(votes_et.argmax(0))
    return np.stack(out)
