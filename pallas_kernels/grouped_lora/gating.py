"""Per-token routing math: gate logits -> (expert ids, weights), in either of MeteoRA's two orders.

``topk_then_softmax``: softmax over the k largest logits / T (MeteoRA's inference path).
``softmax_then_topk``: softmax over all logits / T, keep the top k, renormalise (its training path).

It lives with the kernels because the decode kernel can route inside itself (``pallas_gpu_decode``, from
gate logits): this module is the plain-JAX definition that kernel is checked against, and the path every
other backend takes. The model's gate (``meteora_jax.model.gate``) uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

MODES = ("topk_then_softmax", "softmax_then_topk")


@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """How logits become routing: ``top_k`` experts, logits divided by ``temperature``, ``mode`` in ``MODES``.
    Hashable, so kernels take it as a static parameter."""

    top_k: int = 2
    temperature: float = 1.0
    mode: str = "topk_then_softmax"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown routing mode {self.mode!r}; expected one of {MODES}")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: expected >= 1")


# Up to this k, ``route`` takes the top-k as k argmax passes (each masking the last pick) instead of
# ``lax.top_k``: on GPU a top_k is a sort fusion plus slice fusions, and XLA runs a contiguous slice as a
# device memcpy (~190 a batch-1 Llama-3-8B token, benchmarks/RESULTS.md session 9); argmax passes are
# reductions that fuse with the softmax. 0 = always ``lax.top_k``: on an H100 (session 11) it removed the memcpys
# but not the time (b1 125.3 vs 126.5 tok/s, b64 slower: 5,195 vs 5,444). ``kernel_route`` is the next attempt.
ARGMAX_TOP_K_MAX = 0


# From this many rows on (rows = tokens x projections routed together; knob ``reduce_topk``), a top-k of
# k <= ``REDUCE_TOP_K_MAX`` is ONE variadic reduction (``top_k_by_reduce``) instead of ``lax.top_k``. Why: at
# prefill XLA's TopK is a sort kernel per group, four a layer, ~50 us a layer at a 4096-token Llama-3-8B
# prefill on an H100 (``sort_*``, 2-layer trace, session 20), for [T * P, 28] float32 rows that one pass
# reads in a few us. Measured there: the eight sorts of 2 layers (0.094 ms) became reduction fusions of
# 0.027 ms (profile_prefill_h100_reduce_l2_4096_s20.json); 32-layer wall times moved within that machine's noise
# (+-2 ms). k argmax passes (``ARGMAX_TOP_K_MAX``, tried the same day) made more kernels and were slower at 512
# tokens. 512 rows: prefill from ~171 tokens (3 projections a group); decode batches up to 170 keep the sort,
# unmeasured here.
REDUCE_TOP_K_MIN_ROWS = 512
# The reduction carries k (value, index) pairs and merges two lists in O(k^2) selects.
REDUCE_TOP_K_MAX = 4


def top_k_by_reduce(x_te: Float[Array, "*T E"], k: int) -> tuple[Float[Array, "*T K"], Int[Array, "*T K"]]:
    """``jax.lax.top_k(x, k)``'s values and indices (ties to the lower index) from one variadic reduction over
    the last axis, each element a list of k (value, index) pairs merged by the total order "larger value,
    then lower index" (associative and commutative, so any reduction order gives one answer). A NaN ranks as
    +inf (``lax.top_k`` ranks it above +inf; the indices stay in range either way). The values are gathered
    from ``x`` by the indices, so their gradient and NaNs are ``lax.top_k``'s."""
    e = x_te.shape[-1]
    if k > e:
        raise ValueError(f"top-{k} of {e} values")
    x32 = x_te.astype(jnp.float32)
    none_i = jnp.iinfo(jnp.int32).max
    iota = jax.lax.broadcasted_iota(jnp.int32, x_te.shape, x_te.ndim - 1)
    lists = [jax.lax.stop_gradient(jnp.where(jnp.isnan(x32), jnp.inf, x32)), iota]
    for _ in range(k - 1):
        lists += [jnp.full(x_te.shape, -jnp.inf, jnp.float32), jnp.full(x_te.shape, none_i, jnp.int32)]
    inits = [-jnp.inf, none_i] * k

    def better(v, i, w, j):  # noqa: ANN001, ANN202
        return (v > w) | ((v == w) & (i < j))

    def merge(a, b):  # noqa: ANN001, ANN202
        vals, ids = list(a[0::2]), list(a[1::2])
        for v, i in zip(b[0::2], b[1::2], strict=True):  # insert each of b's pairs into a's sorted list
            wins = [better(v, i, vals[j], ids[j]) for j in range(k)]  # monotone: once true, true below
            new_vals = [jnp.where(wins[0], v, vals[0])]
            new_ids = [jnp.where(wins[0], i, ids[0])]
            for j in range(1, k):
                new_vals.append(jnp.where(wins[j], jnp.where(wins[j - 1], vals[j - 1], v), vals[j]))
                new_ids.append(jnp.where(wins[j], jnp.where(wins[j - 1], ids[j - 1], i), ids[j]))
            vals, ids = new_vals, new_ids
        return tuple(x for pair in zip(vals, ids, strict=True) for x in pair)

    out = jax.lax.reduce(tuple(lists), tuple(jnp.asarray(v) for v in inits), merge, (x_te.ndim - 1,))
    ids_tk = jnp.stack(out[1::2], axis=-1)
    return jnp.take_along_axis(x_te, ids_tk, axis=-1), ids_tk


def top_k_values(x_te: Float[Array, "*T E"], k: int) -> tuple[Float[Array, "*T K"], Int[Array, "*T K"]]:
    """``jax.lax.top_k(x, k)``: values in descending order and their indices, ties to the lower index; for
    k <= ``ARGMAX_TOP_K_MAX`` computed as k argmax passes, from ``REDUCE_TOP_K_MIN_ROWS`` rows on (k <=
    ``REDUCE_TOP_K_MAX``) as one reduction (the same values and indices, ties included)."""
    if k <= REDUCE_TOP_K_MAX and math.prod(x_te.shape[:-1]) >= REDUCE_TOP_K_MIN_ROWS:
        return top_k_by_reduce(x_te, k)
    if k > ARGMAX_TOP_K_MAX:
        return jax.lax.top_k(x_te, k)
    iota_te = jax.lax.broadcasted_iota(jnp.int32, x_te.shape, x_te.ndim - 1)
    vals, ids = [], []
    for _ in range(k):
        i_t = jnp.argmax(x_te, axis=-1).astype(jnp.int32)  # the first maximum: lax.top_k's tie order
        hit_te = iota_te == i_t[..., None]
        vals.append(jnp.max(jnp.where(hit_te, x_te, -jnp.inf), axis=-1))
        ids.append(i_t)
        x_te = jnp.where(hit_te, -jnp.inf, x_te)
    return jnp.stack(vals, axis=-1), jnp.stack(ids, axis=-1)


def route(
    logits_te: Float[Array, "*T E"], *, top_k: int, temperature: float, mode: str
) -> tuple[Int[Array, "*T K"], Float[Array, "*T K"]]:
    """Each row's (over the last axis) top-k experts and weights; leading axes are rows alike ([T, P, E]: the
    projections of one group routed in one top-k, ``moe_lora.shared_gate_logits``)."""
    logits_te = logits_te.astype(jnp.float32) / temperature
    if mode == "topk_then_softmax":
        vals_tk, ids_tk = top_k_values(logits_te, top_k)
        weights_tk = softmax_sorted(vals_tk)
    elif mode == "softmax_then_topk":
        probs_te = jax.nn.softmax(logits_te, axis=-1)
        vals_tk, ids_tk = top_k_values(probs_te, top_k)
        weights_tk = vals_tk / jnp.sum(vals_tk, axis=-1, keepdims=True)
    else:
        raise ValueError(f"unknown routing mode {mode!r}")
    return ids_tk.astype(jnp.int32), weights_tk


def softmax_sorted(vals_tk: Float[Array, "T K"]) -> Float[Array, "T K"]:
    """``jax.nn.softmax(vals_tk, axis=-1)`` for values sorted in descending order (``top_k``'s output).

    For k = 2 it is elementwise: with ``diff = v - v_other``, ``w = sigmoid(diff)`` written as
    ``where(diff >= 0, 1, e) / (1 + e)``, ``e = exp(-|diff|)`` (never overflows; both branches have the right
    gradient, a tie included). XLA fuses it with the routing math that consumes it instead of launching two
    reduction kernels (max, sum) for a [T, 2] array at every projection of every decode step. ``flip`` (not
    slices) pairs the columns, so XLA still sees ``top_k``'s sort-then-slice and keeps its TopK kernel.
    Column 0 equals ``jax.nn.softmax``'s bit for bit, column 1 to an ulp (XLA may divide differently). Other k:
    ``jax.nn.softmax``. On the H200 these fusions cost 0.19 ms per batch-1 token at Llama-3-8B shapes
    (benchmarks/RESULTS.md).
    """
    if vals_tk.shape[-1] != 2:
        return jax.nn.softmax(vals_tk, axis=-1)
    diff_tk = vals_tk - jnp.flip(vals_tk, axis=-1)
    pos_tk = diff_tk >= 0
    e_tk = jnp.exp(jnp.where(pos_tk, -diff_tk, diff_tk))
    return jnp.where(pos_tk, 1.0, e_tk) / (1.0 + e_tk)


def route_spec(
    logits_te: Float[Array, "*T E"], spec: RouteSpec
) -> tuple[Int[Array, "*T K"], Float[Array, "*T K"]]:
    """``route`` with its options in a ``RouteSpec``."""
    return route(logits_te, top_k=spec.top_k, temperature=spec.temperature, mode=spec.mode)


def group_shape(logits_tpe: Float[Array, "T P E"], lora_as: Sequence[Array]) -> tuple[int, int, int]:
    """``(T, P, E)`` of a group's gate logits, checked against its P projections' stacked A ([E, d, r] each):
    a ValueError when the counts do not match."""
    t, p, e = logits_tpe.shape
    if p != len(lora_as) or any(a.shape[0] != e for a in lora_as):
        raise ValueError(
            f"logits {logits_tpe.shape}: expected [T, {len(lora_as)}, E] with every projection's expert count "
            f"E (theirs: {[a.shape[0] for a in lora_as]})"
        )
    return t, p, e
