"""Routing diagnostics: does each token go to its task's expert, and where does a composite prompt switch?

Routing accuracy is measured teacher-forced: the prompt and the reference response go through one forward
with ``return_routing``, and for every response token we ask whether the top-1 expert of each MoE projection is
the task's own expert. That isolates routing from generation quality (a wrong early token would otherwise move
every later routing decision) and needs one batched forward per batch, jitted once per padded shape.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.generate.sampler import bucket, moe_projections
from meteora_jax.generate.static_graph import StaticGraph, merge
from meteora_jax.generate.static_graph import split as split_static
from meteora_jax.model.llama import MeteoraLlama


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _top1_routing(
    graphdef: nnx.GraphDef | StaticGraph, state: nnx.State, ids_bt: jax.Array, valid_bt: jax.Array
) -> jax.Array:
    """[B, T, L*P] top-1 expert of every token at every MoE projection (right-padded batch)."""
    model = merge(graphdef, state)
    out = model.forward(ids_bt, attention_mask=valid_bt, return_routing=True)
    b, t = ids_bt.shape
    top1_nbt = jnp.stack([e["expert_ids"][:, 0].reshape(b, t) for e in out.routing])
    return jnp.transpose(top1_nbt, (1, 2, 0))


def teacher_forced_top1(
    model: MeteoraLlama,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    *,
    include_prompt: bool = False,
) -> list[np.ndarray]:
    """For each (prompt ids, response ids): the top-1 experts of the response tokens, [T_resp, L, P];
    with ``include_prompt``, of the prompt's tokens too, [T_prompt + T_resp, L, P] (same forward)."""
    graphdef, state = split_static(model)
    num_layers = model.config.num_hidden_layers
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        lengths = [len(p) + len(r) for p, r in chunk]
        b, t = bucket(len(chunk), 1), bucket(max(lengths), 16)
        ids = np.zeros((b, t), np.int32)
        valid = np.zeros((b, t), np.int32)
        valid[:, 0] = 1
        for i, (p, r) in enumerate(chunk):
            ids[i, : lengths[i]] = p + r
            valid[i, : lengths[i]] = 1
        top1_btn = np.asarray(_top1_routing(graphdef, state, jnp.asarray(ids), jnp.asarray(valid)))
        for i, (p, r) in enumerate(chunk):
            first = 0 if include_prompt else len(p)
            rows = top1_btn[i, first : len(p) + len(r)]
            out.append(rows.reshape(len(rows), num_layers, -1))
    return out


def routing_accuracy(
    model: MeteoraLlama, top1_per_example: Sequence[np.ndarray], expert_index: int
) -> dict[str, object]:
    """Share of response tokens whose top-1 expert is ``expert_index``: overall, per layer, per projection."""
    if not top1_per_example or sum(x.shape[0] for x in top1_per_example) == 0:
        return {"overall": None, "per_layer": [], "per_projection": {}, "num_tokens": 0}
    hits_tlp = np.concatenate(list(top1_per_example), axis=0) == expert_index
    return {
        "overall": float(hits_tlp.mean()),
        "per_layer": [float(x) for x in hits_tlp.mean(axis=(0, 2))],
        "per_projection": {
            name: float(hits_tlp[:, :, j].mean()) for j, name in enumerate(moe_projections(model))
        },
        "num_tokens": int(hits_tlp.shape[0]),
    }


def token_experts(top1_tlp: np.ndarray) -> np.ndarray:
    """[T] the expert most often top-1 over all layers and projections of each token (-1 if none)."""
    out = np.full(top1_tlp.shape[0], -1, np.int64)
    for t in range(top1_tlp.shape[0]):
        vals = top1_tlp[t][top1_tlp[t] >= 0]
        if vals.size:
            out[t] = np.bincount(vals.ravel()).argmax()
    return out


def switch_points(experts_t: np.ndarray, min_run: int = 3) -> list[tuple[int, int]]:
    """(token index, new expert) where the per-token expert changes and then holds for ``min_run`` tokens.

    Short flickers are ignored so that a composite prompt's switch points line up with its sub-questions.
    """
    experts_t = np.asarray(experts_t)
    points: list[tuple[int, int]] = []
    current = None
    t = 0
    while t < len(experts_t):
        e = int(experts_t[t])
        run = 1
        while t + run < len(experts_t) and experts_t[t + run] == e:
            run += 1
        if e >= 0 and e != current and (run >= min_run or current is None):
            points.append((t, e))
            current = e
        t += run
    return points
