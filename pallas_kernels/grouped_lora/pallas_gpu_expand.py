"""Pallas GPU (Triton) kernel for batched decode: ``x @ W + hc @ B_flat`` in one launch, for a few dozen tokens.

    y[t] = x[t] @ W + sum_{e, r} hc[t, e * R + r] * B[e, r, :]

``hc`` is the masked, weighted shrink of the dense path (``xla.masked_coefficients``: every expert's
``x @ A[e]`` times the token's routing weight and scaling, zero for experts it did not pick), computed by XLA
from one GEMM per group (``moe_lora.packed_forward``). At batch-64 decode the dense path otherwise runs the
expand ``hc @ B_flat`` as its own small GEMM beside each base GEMM and adds the two; here the expand is one more
K block of the base product, so a projection is one launch that streams W and then B_flat (E * R rows, 224
for 28 rank-8 experts: ~5% more bytes at d_in = 4096), accumulating both in float32.

Grid: one program per ``block_n`` output columns and K split (``split_k`` programs share a column block's
``d_in``, so that narrow outputs still fill the SMs; with several splits each writes float32 partials and
one XLA reduction sums them). Each split takes its share of the B_flat rows (``EXPAND_SPREAD_LORA``; before
session 19 split 0 took them all). Token rows are padded to a power of two >= 16 (``tl.dot``) with masked
loads; tails of ``d_in``, ``d_out`` and E * R are masked, so any shape works.

A group of projections that read the same x (q/k/v, gate/up) is one launch (``expand_forward_group``): the
grid walks every projection's column blocks in turn, as ``pallas_gpu_decode.decode_forward_group`` does.
``expand_forward_group_routed`` also builds ``hc`` in the kernel, from the packed GEMM's output (every expert's
shrink and the gate logits) and its own top-k (``pallas_gpu_decode.kernel_routing``), so that nothing runs
between that GEMM and this launch. ``expand_forward_given`` does the same for a single projection whose routing
is given (ids and weights, the API's ``grouped_lora_fused``), from every expert's shrink.

Status (session 13): checked in interpret mode, compiled for sm_90 on a CPU host (scripts/kernel_report.py: no
spills, two blocks per SM) and measured on an H100, where it is on by default from 2 to 64 tokens with in-kernel
routing (batch-64 decode 1.35x -> 1.19x the experts-off model; benchmarks/RESULTS.md, "Session 13").
Session 21 also computed the packed GEMM inside this launch (programs taking tickets, the expand programs polling
a counter after their W loop); measured on an H100 and an H200 it lost or tied everywhere, and session 23
removed it (NOTES.md, "Session 21"; the code is in git history before that removal).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels.grouped_lora import xla
from pallas_kernels.grouped_lora.common import cdiv, dot_precision, pow2
from pallas_kernels.grouped_lora.gating import RouteSpec
from pallas_kernels.grouped_lora.pallas_gpu_decode import (
    MIN_DOT_ROWS,
    Routing,
    all_masks,
    column_segments,
    for_each_segment,
    given_routing,
    kernel_routing,
    launch_group,
    masked_load,
    split_k_for,
)

Ref = Any
# From 2 up to this many tokens, the GPU decode backend (``pallas_gpu_decode``) runs its dense inference forward
# through this kernel: a single projection (``forward_if_batched``) and, in the model, each group of the
# packed path (``api.expand_fused_plan``). Knob ``fused_expand`` (0 = off: XLA's base and expand GEMMs). On since
# session 13 with ``EXPAND_ROUTE``: batch-64 decode 1.35x -> 1.19x the experts-off model on the H100.
FUSED_EXPAND_MAX_TOKENS = 64
# Where the fused expand serves the model's packed path, it also routes itself (``expand_forward_group_routed``
# from the packed GEMM's output: no top-k / softmax / coefficient kernels per group) if 1 and the group's
# ``coef_work`` is at most ``EXPAND_ROUTE_MAX_WORK``. Knobs ``expand_route`` and ``expand_route_work``.
EXPAND_ROUTE = 1
EXPAND_ROUTE_MAX_WORK = sys.maxsize
# A single projection's call (``forward_if_batched``: the API with ids and weights given) builds ``hc`` in the
# kernel from every expert's float32 shrink and the given routing (``expand_forward_given``) when its
# ``coef_work`` is at most this (0 = never), so that no coefficient kernels run between the shrink GEMM and
# this launch; with the shrink batched over experts (up to ``xla.BATCHED_SHRINK_MAX_TOKENS`` rows) it reads A as
# stored, with no per-call relayout of A to [d, E * R]. Else XLA's ``masked_coefficients`` and
# ``expand_forward_group``. Knob ``expand_given``. Measured on an H100 (session 19, with ``EXPAND_SPREAD_LORA``,
# benchmarks/RESULTS.md): at work 1,024-4,096 (T = 16 at every Llama-3-8B shape, T = 64 at d_out <= 4096) 3-23%
# faster than session 18's path in the same run; at 14,336 (T = 64, 4096 -> 14336) 24% slower, every one of its
# 224 column blocks building all 64 rows.
EXPAND_GIVEN = 4096
# Above ``EXPAND_GIVEN`` (XLA builds ``hc``): 1 = the shrink batched over experts up to
# ``xla.BATCHED_SHRINK_MAX_TOKENS`` rows, reading A as stored, where the flat shrink makes XLA relayout A to
# [d, E * r] on every call (a transpose kernel of 2.1 us at 4096->14336, T = 64, on the H200, session 21's
# breakdown). Knob ``expand_batched``. H100, session 23 (``moe_lora_h100_batched_ab_s23.json``): 4096->14336,
# T = 64 54.6 -> 50.2 us (1.109 -> 1.018x the base, bound 1.069): no transpose, and XLA folds the batched
# shrink's split-K sum into the coefficient fusion; no other Llama-3-8B row at T = 16 / 64 takes this branch.
EXPAND_BATCHED_SHRINK = 1
# 1: under split-K every split takes its share of the B_flat rows (the partials are summed anyway); 0: split 0
# takes them all, so its programs run longer than the others' (1/split of d_in plus all E * R rows). Knob
# ``expand_spread``. H100, 8 layers (session 19): batch-64 decode 2.635 -> 2.572 ms per step (two repeats each),
# batch 8 2.12 -> 2.10-2.11.
EXPAND_SPREAD_LORA = 1
# 1: each program issues its routing's loads (the gate logits of ``expand_forward_group_routed``, or the given ids
# and weights) before its W loop and does the top-k after it, so their L2 round trip overlaps the loop instead of
# stalling the program between the loop and the B_flat block (``pallas_gpu_decode.Routing.issue``). Knob
# ``expand_early``.
# H100, session 22: within 1% everywhere, never slower: T = 64 single projections 15.6 -> 15.3 us (4096->1024),
# 25.1 -> 24.8 (4096->4096), 57.5 -> 57.0 (14336->4096); 8 layers, batch 64 2.609 -> 2.598 ms per step, batch 8
# 2.144 -> 2.116 (kernel time unchanged).
EXPAND_EARLY_ROUTING = 1
# The default tiles, as trace-time knobs (``expand_bn``, ``expand_bk``, ``expand_split``, ``expand_programs``,
# ``expand_stages``, ``expand_warps``;
# meteora_jax/knobs.py) so that one process can sweep them on a GPU. Trade-off at batch 64: every column block
# re-reads x ([64, 4096] bf16 = 512 KB, from L2), so narrow blocks cost L2 traffic, while split-K writes and
# re-reads float32 partials (split x T x d_out x 4 bytes each way), so many splits cost HBM traffic.
EXPAND_BLOCK_N = 64
EXPAND_BLOCK_K = 128
EXPAND_SPLIT_K = 0  # 0 = the fewest splits (powers of two) that give ``EXPAND_TARGET_PROGRAMS`` programs
EXPAND_TARGET_PROGRAMS = 132  # one per SM of an H100 / H200
EXPAND_STAGES = 3  # Triton's software-pipeline depth: tiles in flight per program (knob ``expand_stages``)
EXPAND_WARPS = 4  # knob ``expand_warps``


@dataclasses.dataclass(frozen=True)
class ExpandConfig:
    """Tile sizes. ``block_k`` rows of W (and of B_flat) per loop step; ``split_k`` 0 = from the shape.
    ``ExpandConfig.default()`` reads the module's knobs."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    target_programs: int = 132

    @classmethod
    def default(cls) -> ExpandConfig:
        return cls(
            block_n=EXPAND_BLOCK_N,
            block_k=EXPAND_BLOCK_K,
            num_warps=EXPAND_WARPS,
            num_stages=EXPAND_STAGES,
            split_k=EXPAND_SPLIT_K,
            target_programs=EXPAND_TARGET_PROGRAMS,
        )


EXPAND_CONFIG_OVERRIDE: ExpandConfig | None = None

# Shared memory per block on sm_90 (227 KiB). The W loop's pipelined x tile holds every token's row, so it grows
# with T; a call whose tiles would not fit goes to the caller's XLA path rather than failing at launch (the H100
# refused 240 KiB at 256 bf16 tokens: ``RESOURCE_EXHAUSTED: Shared memory size limit exceeded``).
MAX_SHARED_MEMORY_BYTES = 227 * 1024


def shared_memory_bytes(num_tokens: int, itemsize: int, config: ExpandConfig | None = None) -> int:
    """The W loop's pipelined tiles: ``num_stages`` x (x tile [rows, block_k] + W tile [block_k, block_n]) at
    ``itemsize`` bytes. The B_flat loop's tiles are no larger (the routed loop steps half the rows of float32
    ``h``). Matches Triton's figure for sm_90: 96 KiB at 64 bf16 tokens (scripts/kernel_report.py), 240 KiB at
    256."""
    cfg = config or EXPAND_CONFIG_OVERRIDE or ExpandConfig.default()
    rows = _rows(num_tokens)
    return cfg.num_stages * (rows * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize


def fits(num_tokens: int, itemsize: int, config: ExpandConfig | None = None) -> bool:
    """Whether a call of ``num_tokens`` rows of ``itemsize`` bytes may run through this kernel."""
    return 2 <= num_tokens <= FUSED_EXPAND_MAX_TOKENS and (
        shared_memory_bytes(num_tokens, itemsize, config) <= MAX_SHARED_MEMORY_BYTES
    )


def _rows(num_tokens: int) -> int:
    """The token rows of every tile: T padded to a power of two >= 16 (``tl.dot``)."""
    return max(MIN_DOT_ROWS, pow2(num_tokens))


def _block_n(cfg: ExpandConfig, d_outs: Sequence[int]) -> int:
    """Output columns per program: the config's, at most the widest projection padded to a power of two."""
    return max(16, min(cfg.block_n, pow2(max(d_outs))))


@dataclasses.dataclass(frozen=True)
class _Tiles:
    rows: int  # T padded to a power of two >= 16
    block_n: int
    block_k: int
    split_k: int
    split_steps: int  # W steps per split
    lora_block_k: int  # B_flat rows per step
    lora_steps: int  # B_flat steps per split: all in split 0, or 1/split_k each (``lora_spread``)
    lora_spread: bool  # whether every split takes its share of the B_flat steps


def _tiles(
    cfg: ExpandConfig, num_tokens: int, d_in: int, d_outs: Sequence[int], lora_rows: int, routed: bool = False
) -> _Tiles:
    """``routed``: the B_flat loop's left operand is the float32 ``h`` (twice the bytes of bf16 ``hc``), so it
    steps half as many rows, which keeps its pipelined tiles near the W loop's shared memory (sm_90, 64 x 128
    tiles: 129 KiB and one block per SM at full steps; scripts/kernel_report.py)."""
    block_k = max(16, min(cfg.block_k, pow2(d_in)))
    lora_block_k = max(16, block_k // 2) if routed else block_k
    block_n = _block_n(cfg, d_outs)
    steps = cdiv(d_in, block_k)
    blocks = sum(cdiv(o, block_n) for o in d_outs)
    split = cfg.split_k if cfg.split_k > 0 else split_k_for(blocks, steps, cfg.target_programs)
    split = max(1, min(steps, split))
    lora_steps = cdiv(lora_rows, lora_block_k)
    spread = bool(EXPAND_SPREAD_LORA) and split > 1
    return _Tiles(
        rows=_rows(num_tokens),
        block_n=block_n,
        block_k=block_k,
        split_k=split,
        split_steps=cdiv(steps, split),
        lora_block_k=lora_block_k,
        lora_steps=cdiv(lora_steps, split) if spread else lora_steps,
        lora_spread=spread,
    )


def coef_work(num_tokens: int, d_outs: Sequence[int], config: ExpandConfig | None = None) -> int:
    """Rows x column blocks of a launch over projections ``d_outs``: how much building ``hc`` in the kernel costs,
    since every column block's program builds it for every row (``EXPAND_GIVEN``, ``EXPAND_ROUTE_MAX_WORK``)."""
    block_n = _block_n(config or EXPAND_CONFIG_OVERRIDE or ExpandConfig.default(), d_outs)
    return _rows(num_tokens) * sum(cdiv(o, block_n) for o in d_outs)


def _given_hc(hc_ref: Ref) -> Any:
    """A left operand read as given (x, or ``hc`` [T, E * R]): ``prepare(rows, row_mask)()`` returns the tile
    loader ``(kk, mask, dtype) -> [rows, len(kk)]`` (``prepare`` issues what can be issued early: here nothing)."""

    def prepare(rows: Array, row_mask: Array | None) -> Any:
        del row_mask

        def lhs(kk: Array, mask: Array | None, dtype: jnp.dtype) -> Array:
            del dtype
            return masked_load(hc_ref.at[rows[:, None], kk[None, :]], mask)

        return lambda: lhs

    return prepare


@dataclasses.dataclass(frozen=True)
class Routed:
    """Where a group's routed expand finds its inputs in the packed GEMM's output ``wide`` ([T, cols] float32,
    ``moe_lora.packed_forward``): projection p's shrink ``h`` at columns ``h_col0s[p] ..`` (E * R, expert-major)
    and its gate logits as the sum of the E-column ranges at ``logit_col0s[p]`` (one range, or the bf16 hi / lo
    halves). ``spec``: the routing."""

    spec: RouteSpec
    num_experts: int
    rank: int
    h_col0s: tuple[int, ...]
    logit_col0s: tuple[tuple[int, ...], ...]

    @classmethod
    def of_pack(
        cls, spec: RouteSpec, num_experts: int, rank: int, projections: int, *, halves: bool
    ) -> Routed:
        """The layout of ``moe_lora``'s packs: every projection's shrink (E * R columns), then every
        projection's gate (E columns), once or as the bf16 hi halves followed by the lo halves."""
        a_cols = projections * num_experts * rank
        return cls(
            spec,
            num_experts,
            rank,
            tuple(i * num_experts * rank for i in range(projections)),
            tuple(
                (a_cols + i * num_experts, a_cols + (projections + i) * num_experts)
                if halves
                else (a_cols + i * num_experts,)
                for i in range(projections)
            ),
        )


def _weighted_hc(route: Routing, load_h: Any, scaling_ref: Ref, num_experts: int, rank: int) -> Any:
    """The B_flat block's left operand computed in the kernel: ``h * coef`` in B's dtype, ``coef`` = each
    column's expert's routing weight (``route``: ids, weights per slot, loads issued by ``prepare``, decided once
    when its thunk is called, before the B_flat loop) times its scaling, zero for experts a row did not pick: the
    same products as ``xla.masked_coefficients``, so the same values. ``load_h(rows, kk, mask)``: float32 shrink
    columns ``kk`` (expert-major, ``kk // rank`` = the expert)."""
    n_cols = num_experts * rank

    def prepare(rows: Array, row_mask: Array | None) -> Any:
        pending = route.issue(rows, row_mask)

        def decided() -> Any:
            ids, weights = pending()

            def lhs(kk: Array, mask: Array | None, dtype: jnp.dtype) -> Array:
                e_of = kk // rank
                hits = [
                    jnp.where(i[:, None] == e_of[None, :], w[:, None], 0.0)
                    for i, w in zip(ids, weights, strict=True)
                ]
                weight = functools.reduce(lambda a, b: a + b, hits)
                scale = masked_load(scaling_ref.at[e_of], kk < n_cols).astype(jnp.float32)
                h = load_h(rows, kk, mask).astype(jnp.float32)
                return (h * (weight * scale[None, :])).astype(dtype)

            return lhs

        return decided

    return prepare


def _routed_hc(wide_ref: Ref, scaling_ref: Ref, routed: Routed, p: int) -> Any:
    """``_weighted_hc`` for projection p of a packed group: its shrink and gate logits in the packed GEMM's
    output, routed by the program's own top-k (``pallas_gpu_decode.kernel_routing``)."""
    route = kernel_routing(wide_ref, routed.logit_col0s[p], routed.num_experts, routed.spec)
    h_col0 = routed.h_col0s[p]

    def load_h(rows: Array, kk: Array, mask: Array | None) -> Array:
        return masked_load(wide_ref.at[rows[:, None], h_col0 + kk[None, :]], mask)

    return _weighted_hc(route, load_h, scaling_ref, routed.num_experts, routed.rank)


@dataclasses.dataclass(frozen=True)
class Given:
    """A single projection's expand with the routing given (``expand_forward_given``): ids and weights [T, k],
    and every expert's float32 shrink ``h`` as [E, T, R] (``expert_major``: the batched shrink's layout) or
    [T, E, R]."""

    top_k: int
    num_experts: int
    rank: int
    expert_major: bool


def _given_routing_hc(h_ref: Ref, ids_ref: Ref, weights_ref: Ref, scaling_ref: Ref, given: Given) -> Any:
    """``_weighted_hc`` from given ids / weights (``pallas_gpu_decode.given_routing``) and a shrink in
    ``given``'s layout."""
    route = given_routing(ids_ref, weights_ref, 0, given.top_k)

    def load_h(rows: Array, kk: Array, mask: Array | None) -> Array:
        e_of, r_of = (kk // given.rank)[None, :], (kk % given.rank)[None, :]
        at = (e_of, rows[:, None], r_of) if given.expert_major else (rows[:, None], e_of, r_of)
        return masked_load(h_ref.at[at], mask)

    return _weighted_hc(route, load_h, scaling_ref, given.num_experts, given.rank)


def _body(
    x_ref: Ref,
    w_ref: Ref,
    lora_lhs: Any | None,
    b_ref: Ref | None,
    o_ref: Ref,
    *,
    tiles: _Tiles,
    col_block: Array,
    split: Array,
    out_col0: int,
) -> None:
    """One program's columns ``col_block`` over its K split of d_in, plus (split 0) the B_flat block, whose
    left operand ``lora_lhs`` gives (``_given_hc`` / ``_routed_hc``: ``prepare(rows, row_mask)()``; no B_flat
    block where ``b_ref`` is None: ``matmul``); written at output column ``out_col0`` on (float32 partial rows
    ``split * T ..`` under split-K)."""
    n_tok, d_in = x_ref.shape
    d_out = w_ref.shape[1]
    bn, bk = tiles.block_n, tiles.block_k
    rows = jnp.arange(tiles.rows, dtype=jnp.int32)
    row_mask = None if tiles.rows == n_tok else rows < n_tok
    cols = col_block * bn + jnp.arange(bn, dtype=jnp.int32)
    cmask = None if d_out % bn == 0 else cols < d_out
    w_tail = d_in % bk != 0 or tiles.split_k * tiles.split_steps * bk > d_in
    x_lhs = _given_hc(x_ref)(rows, row_mask)()
    # The routing's loads go out before the W loop (``EXPAND_EARLY_ROUTING``).
    early = b_ref is not None and bool(EXPAND_EARLY_ROUTING)
    pending_lhs = lora_lhs(rows, row_mask) if early else None

    def dot_step(lhs_fn, rhs_ref, k0, extent, tail, gate, bk=bk):  # noqa: ANN001, ANN202
        kk = k0 + jnp.arange(bk, dtype=jnp.int32)
        kmask = all_masks(kk < extent if tail else None, gate)
        lhs = lhs_fn(
            kk,
            all_masks(
                None if row_mask is None else row_mask[:, None], None if kmask is None else kmask[None, :]
            ),
            rhs_ref.dtype,
        )
        rhs = masked_load(
            rhs_ref.at[kk[:, None], cols[None, :]],
            all_masks(None if kmask is None else kmask[:, None], None if cmask is None else cmask[None, :]),
        )
        return jnp.dot(
            lhs.astype(rhs.dtype), rhs, preferred_element_type=jnp.float32, precision=dot_precision(rhs.dtype)
        )

    def w_step(kb, acc):  # noqa: ANN001, ANN202
        k0 = (split * tiles.split_steps + kb) * bk
        return acc + dot_step(x_lhs, w_ref, k0, d_in, w_tail, None)

    acc = lax.fori_loop(0, tiles.split_steps, w_step, jnp.zeros((tiles.rows, bn), jnp.float32))
    if b_ref is not None:
        # The B_flat block: each split reads its share of its rows (``lora_spread``), or split 0 reads them all
        # and the other splits' loads are masked off (no traffic). Rows past E * R are masked either way.
        first = None if tiles.lora_spread else split == 0
        step0 = split * tiles.lora_steps if tiles.lora_spread else 0
        b_lhs = (pending_lhs or lora_lhs(rows, row_mask))()

        def b_step(kb, acc):  # noqa: ANN001, ANN202
            lbk = tiles.lora_block_k
            return acc + dot_step(b_lhs, b_ref, (step0 + kb) * lbk, b_ref.shape[0], True, first, bk=lbk)

        acc = lax.fori_loop(0, tiles.lora_steps, b_step, acc)
    out_rows = rows if tiles.split_k == 1 else split * n_tok + rows
    plgpu.store(
        o_ref.at[out_rows[:, None], out_col0 + cols[None, :]],
        acc.astype(o_ref.dtype),
        mask=all_masks(
            None if row_mask is None else row_mask[:, None], None if cmask is None else cmask[None, :]
        ),
    )


def _group_kernel(
    *refs: Ref, tiles: _Tiles, segments: tuple[tuple[int, int, int], ...], routed: Routed | Given | None
) -> None:
    """refs: x, W_1..W_P, hc_1..hc_P, B_1..B_P (flat [E * R, O_p]), out; or with ``routed``: x, W_1..W_P, wide,
    B_1..B_P, scaling_1..P, out; or with ``Given`` (P = 1): x, W, h, ids, weights, B, scaling, out; or
    (``matmul``) x, W_1..W_P, out. ``segments``: ``pallas_gpu_decode.column_segments``."""
    n = len(segments)
    x_ref, ws = refs[0], refs[1 : 1 + n]
    if len(refs) == n + 2:  # no B_flat blocks
        lhs_fns, bs = [None] * n, [None] * n
    elif isinstance(routed, Given):
        h_ref, ids_ref, weights_ref, b_ref, scaling_ref = refs[2:7]
        lhs_fns, bs = [_given_routing_hc(h_ref, ids_ref, weights_ref, scaling_ref, routed)], [b_ref]
    elif routed is None:
        lhs_fns = [_given_hc(h) for h in refs[1 + n : 1 + 2 * n]]
        bs = refs[1 + 2 * n : 1 + 3 * n]
    else:
        wide_ref, bs, scalings = refs[1 + n], refs[2 + n : 2 + 2 * n], refs[2 + 2 * n : 2 + 3 * n]
        lhs_fns = [_routed_hc(wide_ref, scalings[p], routed, p) for p in range(n)]
    for_each_segment(segments, _projection_body(x_ref, ws, lhs_fns, bs, refs[-1], tiles))


def _projection_body(
    x_ref: Ref,
    ws: Sequence[Ref],
    lhs_fns: Sequence[Any],
    bs: Sequence[Ref | None],
    o_ref: Ref,
    tiles: _Tiles,
) -> Callable[[int, Array, Array, int], None]:
    """A group kernel's ``for_each_segment`` body: projection p's column block through ``_body`` with its W,
    B_flat block operand ``lhs_fns[p]`` and ``bs[p]``."""

    def body(p: int, col_block: Array, split: Array, col0: int) -> None:
        _body(
            x_ref,
            ws[p],
            lhs_fns[p],
            bs[p],
            o_ref,
            tiles=tiles,
            col_block=col_block,
            split=split,
            out_col0=col0,
        )

    return body


def _launch(
    x_td: Array,
    ws_do: Sequence[Array],
    lora_args: tuple[Array, ...],
    lora_rows: int,
    routed: Routed | Given | None,
    interpret: bool,
    config: ExpandConfig | None,
    name: str | None = None,
    out_dtype: jnp.dtype | None = None,
) -> list[Array]:
    num_tokens, d_in = x_td.shape
    d_outs = tuple(w.shape[1] for w in ws_do)
    cfg = config or EXPAND_CONFIG_OVERRIDE or ExpandConfig.default()
    tiles = _tiles(cfg, num_tokens, d_in, d_outs, lora_rows, routed is not None)
    segments, blocks, width = column_segments(d_outs, tiles.block_n)
    kernel = functools.partial(_group_kernel, tiles=tiles, segments=segments, routed=routed)
    kinds = {Routed: "lora_expand_fused_routed", Given: "lora_expand_fused_given"}
    name = name or kinds.get(type(routed), "lora_expand_fused")
    args = (x_td, *ws_do, *lora_args)
    return launch_group(kernel, name, args, x_td, segments, blocks, width, cfg, tiles, interpret, out_dtype)


def matmul(
    x_td: Float[Array, "T D"],
    w_dn: Float[Array, "D N"],
    *,
    out_dtype: jnp.dtype,
    name: str,
    interpret: bool = False,
    config: ExpandConfig | None = None,
) -> Float[Array, "T N"]:
    """``x @ w`` in ``out_dtype`` through this kernel's W loop alone (no B_flat block): the same tiles, split-K
    and launch. ``pallas_gpu_pack``'s packed GEMM."""
    return _launch(x_td, [w_dn], (), 0, None, interpret, config, name=name, out_dtype=out_dtype)[0]


def expand_forward_group_routed(
    x_td: Float[Array, "T D"],
    ws_do: Sequence[Float[Array, "D O"]],
    wide_tn: Float[Array, "T C"],
    bs_no: Sequence[Float[Array, "N O"]],
    scalings_e: Sequence[Float[Array, " E"]],
    *,
    routed: Routed,
    interpret: bool = False,
    config: ExpandConfig | None = None,
) -> list[Float[Array, "T O"]]:
    """``expand_forward_group`` where each program builds ``hc`` itself from the packed GEMM's output ``wide``
    (every expert's shrink and the gate logits, see ``Routed``): no top-k, softmax, slice or coefficient kernels
    run between that GEMM and this launch. Every projection has ``routed.num_experts`` experts of rank
    ``routed.rank`` (B_p flat [E * R, O_p])."""
    n_cols = routed.num_experts * routed.rank
    n = len(ws_do)
    if not (len(bs_no) == len(scalings_e) == len(routed.h_col0s) == len(routed.logit_col0s) == n) or any(
        b.shape != (n_cols, w.shape[1]) for b, w in zip(bs_no, ws_do, strict=True)
    ):
        raise ValueError(
            f"expand_forward_group_routed: B {[b.shape for b in bs_no]} / {len(routed.h_col0s)} column offsets "
            f"do not match {n} projections of {routed.num_experts} rank-{routed.rank} experts"
        )
    scalings = tuple(s.astype(jnp.float32) for s in scalings_e)
    return _launch(x_td, ws_do, (wide_tn, *bs_no, *scalings), n_cols, routed, interpret, config)


def expand_forward_given(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"],
    h: Float[Array, "E T R"] | Float[Array, "T E R"],
    expert_ids_tk: Array,
    expert_weights_tk: Array,
    b_no: Float[Array, "N O"],
    scaling_e: Float[Array, " E"],
    *,
    expert_major: bool,
    interpret: bool = False,
    config: ExpandConfig | None = None,
) -> Float[Array, "T O"]:
    """``x @ W + hc @ B_flat`` for one projection, ``hc`` built in the kernel from every expert's float32 shrink
    ``h`` ([E, T, R] if ``expert_major``, else [T, E, R]) and the routing as given (ids / weights [T, k]):
    ``expand_forward_group`` of ``xla.masked_coefficients`` without those coefficient kernels."""
    num_tokens = x_td.shape[0]
    num_experts, rank = scaling_e.shape[0], b_no.shape[0] // scaling_e.shape[0]
    want_h = (num_experts, num_tokens, rank) if expert_major else (num_tokens, num_experts, rank)
    if (
        h.shape != want_h
        or b_no.shape != (num_experts * rank, w_do.shape[1])
        or expert_ids_tk.shape[0] != num_tokens
    ):
        raise ValueError(
            f"expand_forward_given: h {h.shape} (want {want_h}), B {b_no.shape}, ids {expert_ids_tk.shape} do not "
            f"match T={num_tokens}, {num_experts} experts of rank {rank}, W {w_do.shape}"
        )
    given = Given(expert_ids_tk.shape[1], num_experts, rank, expert_major)
    args = (
        h.astype(jnp.float32),
        expert_ids_tk.astype(jnp.int32),
        expert_weights_tk,
        b_no,
        scaling_e.astype(jnp.float32),
    )
    return _launch(x_td, [w_do], args, num_experts * rank, given, interpret, config)[0]


def expand_forward_group(
    x_td: Float[Array, "T D"],
    ws_do: Sequence[Float[Array, "D O"]],
    hcs_tn: Sequence[Float[Array, "T N"]],
    bs_no: Sequence[Float[Array, "N O"]],
    *,
    interpret: bool = False,
    config: ExpandConfig | None = None,
) -> list[Float[Array, "T O"]]:
    """``x @ W_p + hc_p @ B_p`` for P projections that read ``x``, in ONE launch; outputs in x's dtype.

    ``hc_p``: the masked weighted shrink [T, N] (N = E * R, ``xla.masked_coefficients``), ``B_p``: the
    experts' B flattened to [N, O_p] (a free reshape of [E, R, O_p]). Every projection has its own N."""
    num_tokens, d_in = x_td.shape
    d_outs = tuple(w.shape[1] for w in ws_do)
    if len({len(ws_do), len(hcs_tn), len(bs_no)}) != 1 or any(
        h.shape != (num_tokens, b.shape[0]) or b.shape[1] != o
        for h, b, o in zip(hcs_tn, bs_no, d_outs, strict=True)
    ):
        raise ValueError(
            f"expand_forward_group: hc {[h.shape for h in hcs_tn]} / B {[b.shape for b in bs_no]} do not "
            f"match T={num_tokens} and widths {d_outs}"
        )
    return _launch(x_td, ws_do, (*hcs_tn, *bs_no), max(b.shape[0] for b in bs_no), None, interpret, config)


def forward_if_batched(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"] | None,
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    expert_ids_tk: Array,
    expert_weights_tk: Array,
    scaling_e: Array,
    *,
    interpret: bool = False,
) -> Float[Array, "T O"] | None:
    """An ops ``forward``: XLA's dense shrink, then this kernel, for a call of 2 .. ``FUSED_EXPAND_MAX_TOKENS``
    tokens (whose tiles ``fits`` shared memory) with ``w`` and few expert columns; else None (the caller's
    path). The coefficients: in the kernel (up to ``EXPAND_GIVEN``) or XLA's ``masked_coefficients``."""
    num_experts, _, rank = lora_a_edr.shape
    if w_do is None or not fits(x_td.shape[0], x_td.dtype.itemsize):
        return None
    if not xla.dense_fits(num_experts * rank):
        return None
    b_no = lora_b_ero.reshape(num_experts * rank, lora_b_ero.shape[2])
    batched = x_td.shape[0] <= xla.BATCHED_SHRINK_MAX_TOKENS
    if coef_work(x_td.shape[0], (w_do.shape[1],)) <= EXPAND_GIVEN:
        h = xla.shrink_batched(x_td, lora_a_edr) if batched else xla.shrink_all(x_td, lora_a_edr)
        args = (x_td, w_do, h, expert_ids_tk, expert_weights_tk, b_no, scaling_e)
        return expand_forward_given(*args, expert_major=batched, interpret=interpret)
    if batched and EXPAND_BATCHED_SHRINK:
        h_ter = jnp.swapaxes(xla.shrink_batched(x_td, lora_a_edr), 0, 1)  # A as stored: no relayout kernel
    else:
        h_ter = xla.shrink_all(x_td, lora_a_edr)
    hc_tn = xla.masked_coefficients(h_ter, expert_ids_tk, expert_weights_tk, scaling_e, lora_b_ero.dtype)
    return expand_forward_group(x_td, [w_do], [hc_tn], [b_no], interpret=interpret)[0]
