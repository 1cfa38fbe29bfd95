"""Routing metadata, computed once per call and shared by every backend and by the backward pass.

Each token ``t`` sends ``k`` *assignments* (slots) ``a = t * k + j`` to experts ``expert_ids[t, j]``.
Sorting the ``M = T * k`` assignments by expert gives *rows*: the rows of expert ``e`` are the contiguous
range ``[group_offsets[e], group_offsets[e + 1])``, like row offsets in CSR. Kernels walk rows, while
inputs and outputs stay token-major ([T, ...] or slot-major [T, k, ...]): ``token_of_row`` and
``slot_of_row`` say where a row reads from, ``row_of_slot`` (the inverse permutation) where a slot's
result lives.

``work_items`` cuts the rows into tiles of ``block_rows`` and lists every (tile, expert) pair that
shares rows. Its length is a static worst case (``cdiv(M, bm) + min(E, M) - 1``: each non-empty expert
adds at most one tile boundary), so a kernel grid over it is static; unused items have ``lo == hi``
and kernels skip them with ``pl.when``. That is what lets every Pallas kernel run in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "expert_ids_tk",
        "expert_of_row",
        "token_of_row",
        "slot_of_row",
        "row_of_slot",
        "group_sizes",
        "group_offsets",
    ],
    meta_fields=["num_tokens", "top_k", "num_experts"],
)
@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    expert_ids_tk: Int[Array, "T K"]  # the routing as given: token-major kernels read it, no sort needed
    expert_of_row: Int[Array, " M"]
    token_of_row: Int[Array, " M"]
    slot_of_row: Int[Array, " M"]
    row_of_slot: Int[Array, " M"]
    group_sizes: Int[Array, " E"]
    group_offsets: Int[Array, " E1"]
    num_tokens: int
    top_k: int
    num_experts: int

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k


def make_plan(expert_ids_tk: Int[Array, "T K"], num_experts: int) -> RoutingPlan:
    """Sorts the assignments by expert (stable, so rows of one expert keep token order)."""
    num_tokens, top_k = expert_ids_tk.shape
    ids_m = expert_ids_tk.reshape(-1).astype(jnp.int32)
    # [M]: slot index of each sorted row.
    slot_of_row = jnp.argsort(ids_m, stable=True).astype(jnp.int32)
    row_of_slot = jnp.zeros_like(slot_of_row).at[slot_of_row].set(jnp.arange(ids_m.shape[0], dtype=jnp.int32))
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[ids_m].add(1)
    group_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)])
    return RoutingPlan(
        expert_ids_tk=expert_ids_tk.astype(jnp.int32),
        expert_of_row=ids_m[slot_of_row],
        token_of_row=slot_of_row // top_k,
        slot_of_row=slot_of_row,
        row_of_slot=row_of_slot,
        group_sizes=group_sizes,
        group_offsets=group_offsets,
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
    )


def num_work_items(num_rows: int, num_experts: int, block_rows: int) -> int:
    """Static worst-case count of (row tile, expert) pairs."""
    return max(1, -(-num_rows // block_rows) + min(num_experts, num_rows) - 1)


def work_items(plan: RoutingPlan, block_rows: int) -> Int[Array, "4 W"]:
    """Rows [lo, hi) of expert ``group`` inside the tile that starts at row ``start``.

    Returns an int32 array stacked as (group, start, lo, hi), one column per work item, items of one
    expert consecutive and in row order.
    """
    bm = block_rows
    n_items = num_work_items(plan.num_rows, plan.num_experts, bm)
    lo_e, hi_e = plan.group_offsets[:-1], plan.group_offsets[1:]
    first_tile_e = lo_e // bm
    tiles_e = jnp.where(plan.group_sizes > 0, (hi_e - 1) // bm - first_tile_e + 1, 0)
    ends_e = jnp.cumsum(tiles_e)
    item = jnp.arange(n_items, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends_e, item, side="right"), plan.num_experts - 1).astype(jnp.int32)
    start = (first_tile_e[group] + item - (ends_e[group] - tiles_e[group])) * bm
    valid = item < ends_e[-1]
    lo = jnp.where(valid, jnp.maximum(start, lo_e[group]), 0)
    hi = jnp.where(valid, jnp.minimum(start + bm, hi_e[group]), 0)
    start = jnp.where(valid, start, 0)
    return jnp.stack([group, start, lo, hi]).astype(jnp.int32)
