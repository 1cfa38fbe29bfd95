"""Pallas GPU (Triton) decode kernel: ``x @ W`` and the top-k LoRA experts in one launch, for a few tokens.

    y[t] = x[t] @ W + sum_j c[t, j] * (x[t] @ A[e_tj]) @ B[e_tj],    c[t, j] = weight[t, j] * scaling[e_tj]

At decode a projection is a GEMV bound by reading W, and the expert path as separate kernels (routing sort,
shrink, expand, glue) is bound by launches. Here one ``pallas_call`` takes ``x, W, A, B`` and the routing as
given (ids, weights, scaling: no sort, no XLA op around it) and writes ``y``.

Grid: one program per ``block_n`` output columns and K split (``split_k`` programs share a column block's
``d_in``, so that narrow outputs still fill the SMs; with several splits each writes float32 partials and one
XLA reduction sums them). Each program, in one loop over its part of ``d_in`` in ``block_k`` steps:

* streams its ``[block_k, block_n]`` tile of W (the bandwidth-dominant read) into a tensor-core dot, with
  the token rows padded to 16 (``tl.dot`` needs every dimension >= 16; the padded rows are masked loads);
* computes the shrink ``h[t, j] = x[t] @ A[e_tj]`` for *every* token and slot, redundantly in every program
  (each one needs all of ``h`` for its columns, and programs cannot wait on each other). It gathers the
  chosen rows ``A[e_tj, k0:k0+block_s, :]`` as one ``[T, block_s, r]`` tile per slot and sub-step (issued a
  step ahead, ``DECODE_SHRINK_PREFETCH``) and accumulates the products elementwise; the sum over ``d_in``
  happens once after the loop, because a reduction inside the loop is a cross-warp shuffle plus a barrier per
  step.

Then it adds ``sum_j (c h)[t, j] @ B[e_tj][:, cols]`` with broadcasting multiplies in float32 (r = 8 is
below ``tl.dot``'s 16), and stores ``y`` in x's dtype. The LoRA rows are ``T`` padded to a power of two
(1 at T = 1), not to 16, so the shrink does almost no work for padded rows.

Cost of the redundancy (why this is for small T): every program reads ``T * k * d_in * r`` A elements (from
L2 after the first) and does as many float32 FMAs on CUDA cores. Next to its W tile that is a fraction
``T * k * r / block_n`` more bytes: 0.5 at T = 1, k = 2, block_n = 32. At T = 16 the FMAs alone are ~1M per
program, ~8k cycles at 128 FP32 lanes per SM (~4 us): the size of the whole GEMV.

Measured on the H200 (E=28, r=8, k=2, bf16, T = 1; benchmarks/RESULTS.md), time over XLA's plain base GEMV
in the same run: 1.28x (4096->4096), 0.49x (4096->1024, 64 x 256 tiles: faster than XLA's GEMV alone,
which gets only ~0.5 TB/s there), 1.15x (4096->14336), 1.22x (14336->4096), where XLA's masked path
takes 1.68x, 1.50x, 1.25x and 1.34x. Before split-K (one program per 32 columns) the same kernel took 1.72x,
1.08x, 1.15x and 1.87x. At T = 16 it is 4-19x (the redundant shrink). Hence ``DECODE_MAX_TOKENS = 1``, and
``make_decode_ops`` (``implementation="pallas_gpu_decode"``, the automatic first choice on GPU for few
experts) takes it for single-token calls only.

Base product on CUDA cores (``DecodeConfig(base_dot="fma")``, not the default): at T = 1 the tensor-core
dot spends 15/16 of its work on padded rows, and the W stream reached only ~2.1-2.4 TB/s against ~2.7 TB/s
for XLA's GEMV. The "fma" variant keeps a float32 ``[toks, block_k, block_n]`` accumulator, adds
``x[t, k] * W[k, n]`` into it elementwise every step (no padding to 16 rows), and sums over ``block_k`` once
after the loop, like the shrink. Measured on the H200 (session 9, benchmarks/RESULTS.md): slower than "mma"
at 3 of the 4 shapes with every tile tried (best fma vs mma: 16.6 vs 15.7 us at 4096->4096, 49.6 vs 48.2 at
4096->14336, 47.2 vs 39.2 at 14336->4096) and 4% faster at 4096->1024 (7.4 vs 7.7 us); so "mma" stays.

Routing inside the kernel (``decode_forward_routed``, ``decode_forward_group_routed``; ``api.grouped_lora_fused_routed``
takes them for single-token inference when its knob is on): the kernel takes the gate logits instead of ids
and weights, and every program computes its tokens' top-k and weights (``kernel_routing``, E floats per token
from L2; the same ids as ``gating.route``, ties included, and its weight formulas). At batch-1 decode that
removes the TopK sort fusion, its slice memcpys and the softmax fusion that XLA runs per group between the gate
GEMV and this kernel.

Masks: rows past T and columns past ``d_out`` use out-of-range indices (never clamped ones: interpret mode
writes masked lanes back), ``d_in`` need not divide ``block_k`` (the tail step is masked), any rank works
(padded to a power of two and masked).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora.common import cdiv, dot_precision, pow2
from pallas_kernels.grouped_lora.gating import RouteSpec, group_shape

# ``pallas_gpu`` uses this kernel in inference up to this many tokens per call (above: shrink + fused GEMM).
# Measured: it wins at T = 1 on all four Llama-3-8B shapes and loses 4-19x at T = 16 (module doc); T in
# 2..15 is untimed.
DECODE_MAX_TOKENS = 1
Ref = Any  # a Pallas ref: indexed with ``.at[...]`` and read with ``plgpu.load``
# Rows of the base dot: Triton's dot needs M >= 16.
MIN_DOT_ROWS = 16
# ``DecodeConfig.base_dot``: "mma" = tensor-core ``tl.dot`` on rows padded to 16; "fma" = CUDA-core
# broadcast multiply-accumulate on the token rows only.
BASE_DOTS = ("mma", "fma")
# Programs that keep an H200's 132 SMs streaming W (about two each), for ``DecodeConfig.split_for``.
_TARGET_PROGRAMS = 256
# Triton pipelines only the loads that feed a dot, so the shrink's x and A-row gathers are synchronous, and
# ptxas places them after the step's MMAs: every K step then waits an L2 round trip before it issues the next
# W tile's copy (the SASS of the default tiles, session 22). 1: each step issues the NEXT step's shrink loads
# first and carries them in the loop; ptxas still copies them into the loop's phi registers at the back edge,
# which waits on them, but only after the MMAs. Measured on an H100 (session 22, T = 1, default tiles):
# 4096->14336 52.2 -> 48.1 us, 4096->1024 8.7 -> 8.2, 14336->4096 43.4 -> 43.8, 4096->4096 16.8 -> 17.2; the
# batch-1 decode kernels of an 8-layer model 1.7% less time. Two K steps per loop iteration (no phi copy) lost
# everywhere (18.3 us at 4096->4096): Triton's stages then count pairs of steps. Knob ``decode_prefetch``;
# ``DecodeConfig.prefetch`` (None) defers to it.
DECODE_SHRINK_PREFETCH = 1


def _floor_pow2(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes; ``for_shape`` picks them, ``DECODE_CONFIG_OVERRIDE`` replaces them (benchmark sweeps).

    ``base_dot="fma"`` (see the module doc) holds ``toks * block_k * block_n`` float32 accumulators per
    program, ``toks * block_k * block_n / (32 * num_warps)`` registers per thread (64 at T = 1, 64 x 128
    tiles, 4 warps) next to the shrink's; sensible tiles are block_k 64-128 with block_n 64-256 (more warps
    for the larger ones). Measured slower than "mma" (module doc); ``for_shape`` never picks it.
    """

    block_n: int  # output columns per program
    block_k: int  # d_in per loop step: the W tile is [block_k, block_n]
    lora_elems: int = 4096  # float32 shrink accumulator elements per slot ([T, block_s, r]); sets block_s
    num_warps: int = 4
    num_stages: int = 4
    # Programs per column block, each over 1/split_k of d_in; >1 writes float32 partials [split_k, T, d_out]
    # that one XLA reduction sums (deterministic: no atomics). 0 = pick from the shape (``split_for``).
    split_k: int = 1
    base_dot: str = "mma"  # the base product x @ W: one of BASE_DOTS
    prefetch: bool | None = None  # shrink loads one K step ahead; None = ``DECODE_SHRINK_PREFETCH``

    def __post_init__(self) -> None:
        if self.base_dot not in BASE_DOTS:
            raise ValueError(f"base_dot={self.base_dot!r}: expected one of {BASE_DOTS}")

    @classmethod
    def for_shape(cls, num_tokens: int, d_in: int, d_out: int) -> DecodeConfig:
        # Measured on an H100 at T=1 (session 11, benchmarks/results/moe_lora_h100_t1_s11.json): 64 columns x
        # 256 rows, 4 warps, 3 stages, split-K from the shape was the fastest of six tile sets at all four
        # Llama-3-8B shapes: 17.6 / 8.4 / 49.2 / 43.5 us against 18.8 / 8.5 / 56.9 / 48.2 for the session-4
        # choice (32 x 512 x 3 stages; 64 x 256 x 4 stages at d_out <= 1024). Its 80 KiB of shared memory keeps
        # two blocks per SM where the old k/v tiles (120 KiB) fit one (scripts/kernel_report.py). Without
        # split-K a column block gives too few programs for 132 SMs (1.1-1.8x the time, session 4).
        del num_tokens, d_in
        return cls(block_n=64, block_k=256, num_stages=3, split_k=0)

    def split_for(self, blocks: int, steps: int) -> int:
        """``split_k``, or for 0: enough K splits of ``steps`` K steps for ~2 programs per SM over ``blocks``
        column blocks, each split >= 2 steps."""
        return self.split_k if self.split_k > 0 else split_k_for(blocks, steps, _TARGET_PROGRAMS)


DECODE_CONFIG_OVERRIDE: DecodeConfig | None = None


def split_k_for(blocks: int, steps: int, target_programs: int) -> int:
    """The fewest K splits (a power of two) that give ``blocks`` column blocks ``target_programs`` programs,
    each split keeping >= 2 of the ``steps`` K steps."""
    split = 1
    while blocks * split < target_programs and steps // (2 * split) >= 2:
        split *= 2
    return split


def column_segments(d_outs: Sequence[int], block_n: int) -> tuple[tuple[tuple[int, int, int], ...], int, int]:
    """A group kernel's grid over P projections' outputs side by side: ``(segments, blocks, width)``, where
    ``segments[p]`` = (first column block, end column block, first output column) of projection p."""
    segments, block, col = [], 0, 0
    for o in d_outs:
        segments.append((block, block + cdiv(o, block_n), col))
        block, col = block + cdiv(o, block_n), col + o
    return tuple(segments), block, col


def for_each_segment(segments: tuple[tuple[int, int, int], ...], body: Any) -> None:
    """In a group kernel: ``body(p, col_block, split, out_col0)`` for the one projection p whose segment holds
    this program's column block (``pl.when``: the others' code is skipped)."""
    # Program ids are read here, outside ``pl.when``: interpret mode cannot evaluate them inside a branch.
    block, split = pl.program_id(0), pl.program_id(1)
    for p, (start, end, col0) in enumerate(segments):

        @pl.when((block >= start) & (block < end))
        def _(p: int = p, start: int = start, col0: int = col0) -> None:
            body(p, block - start, split, col0)


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """The static sizes one kernel instance uses, all powers of two."""

    rows: int  # mma base-dot rows: T padded to >= 16 (unused by "fma")
    toks: int  # LoRA rows (and "fma" base rows): T padded to a power of two
    block_n: int
    block_k: int
    block_s: int  # d_in per shrink sub-step; divides block_k
    rank: int  # r padded to a power of two
    split_k: int  # programs per column block along d_in
    split_steps: int  # block_k steps per split
    fma: bool  # base product on CUDA cores over the toks rows (DecodeConfig.base_dot == "fma")
    prefetch: bool = False  # the shrink's loads issued one K step ahead (``DECODE_SHRINK_PREFETCH``)


def _tiles(
    cfg: DecodeConfig,
    num_tokens: int,
    d_in: int,
    d_out: int,
    rank: int,
    d_outs: tuple[int, ...] | None = None,
) -> _Tiles:
    """``d_outs``: the widths of a group's projections (``decode_forward_group``), whose column blocks all
    count when split-K is chosen; ``d_out`` is then the widest."""
    toks, rank_p = pow2(num_tokens), pow2(rank)
    block_k = max(16, min(cfg.block_k, pow2(d_in)))
    block_s = max(1, min(block_k, _floor_pow2(max(1, cfg.lora_elems // (toks * rank_p)))))
    block_n = max(16, min(cfg.block_n, pow2(d_out)))
    steps = cdiv(d_in, block_k)
    blocks = sum(cdiv(o, block_n) for o in (d_outs or (d_out,)))
    split_k = max(1, min(steps, cfg.split_for(blocks, steps)))
    return _Tiles(
        rows=max(MIN_DOT_ROWS, toks),
        toks=toks,
        block_n=block_n,
        block_k=block_k,
        block_s=block_s,
        rank=rank_p,
        split_k=split_k,
        split_steps=cdiv(steps, split_k),
        fma=cfg.base_dot == "fma",
        prefetch=bool(DECODE_SHRINK_PREFETCH if cfg.prefetch is None else cfg.prefetch),
    )


def all_masks(*masks: Array | None) -> Array | None:
    """The conjunction of the masks that exist (``None`` = statically all true), broadcast together."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


def masked_load(ref: Ref, mask: Array | None) -> Array:
    """A load with zeros where ``mask`` is false; Triton refuses ``other`` without a mask. Shared
    with ``pallas_gpu_expand``, as are ``all_masks``, ``given_routing``, ``kernel_routing``, ``split_k_for``,
    ``column_segments``, ``for_each_segment``, ``sum_partials`` and ``launch_group``."""
    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=mask, other=0)


def _embed_rows(y_ln: Float[Array, "L N"], rows: int) -> Float[Array, "M N"]:
    """``y`` as the first L of ``rows`` rows (the rest zero): register tensors cannot be sliced or padded."""
    toks = y_ln.shape[0]
    if toks == rows:
        return y_ln
    if toks == 1:  # a broadcast: no reduction (a cross-warp one costs barriers in the kernel's tail)
        return jnp.where((jnp.arange(rows, dtype=jnp.int32) == 0)[:, None], y_ln, 0.0)
    hit_ml = jnp.arange(rows, dtype=jnp.int32)[:, None] == jnp.arange(toks, dtype=jnp.int32)[None, :]
    return jnp.sum(jnp.where(hit_ml[:, :, None], y_ln[None, :, :], 0.0), axis=1)


@dataclasses.dataclass(frozen=True)
class Routing:
    """A program's routing: ``self(toks, tmask)`` -> (ids, weights), one [toks] array per slot. ``issue`` splits
    it in two: it issues the loads now and returns a thunk that does the arithmetic when called, so that a
    kernel can put the loads before its W loop and the work after it (the loads' L2 round trip then overlaps
    the loop instead of stalling the program after it: ``pallas_gpu_expand.EXPAND_EARLY_ROUTING``)."""

    load: Callable[[Array, Array | None], Any]  # (toks, tmask) -> what ``decide`` needs, loads only
    decide: Callable[[Any], tuple[list[Array], list[Array]]]

    def issue(self, toks: Array, tmask: Array | None) -> Callable[[], tuple[list[Array], list[Array]]]:
        loaded = self.load(toks, tmask)
        return lambda: self.decide(loaded)

    def __call__(self, toks: Array, tmask: Array | None) -> tuple[list[Array], list[Array]]:
        return self.issue(toks, tmask)()


def given_routing(ids_ref: Ref, weights_ref: Ref, slot0: int, top_k: int) -> Routing:
    """Routing read as given: slots ``slot0 .. slot0 + k`` of ``ids`` / ``weights`` ([T, slots])."""

    def load(toks: Array, tmask: Array | None) -> tuple[list[Array], list[Array]]:
        ids = [masked_load(ids_ref.at[toks, slot0 + j], tmask) for j in range(top_k)]
        weights = [masked_load(weights_ref.at[toks, slot0 + j], tmask) for j in range(top_k)]
        return ids, weights

    def decide(loaded: tuple[list[Array], list[Array]]) -> tuple[list[Array], list[Array]]:
        ids, weights = loaded
        return ids, [w.astype(jnp.float32) for w in weights]

    return Routing(load, decide)


def kernel_routing(
    logits_ref: Ref,
    col0s: int | tuple[int, ...],
    num_experts: int,
    spec: RouteSpec,
) -> Routing:
    """Routing computed in the kernel from gate logits (columns ``col0 .. col0 + E`` of ``logits``, [T, cols];
    with several ``col0s`` the logits are the sum of those column ranges, in order: the bf16 hi / lo halves of
    a packed gate product): ``gating.route`` for the program's token rows, so no top-k / softmax kernels run
    before it. Every program repeats it (E floats per token, from L2). Ties go to the lower expert, as
    ``lax.top_k``'s; the weights are ``gating.route``'s formulas (top-2: ``softmax_sorted``'s), equal to an ulp
    of ``exp``. Also used by ``pallas_gpu_expand``'s routed kernel."""
    col0s = (col0s,) if isinstance(col0s, int) else tuple(col0s)

    # Built where this is called: inside the kernel body, as ``load`` and ``decide`` are.
    e_pad = pow2(num_experts)
    ei = jnp.arange(e_pad, dtype=jnp.int32)
    emask = None if e_pad == num_experts else ei < num_experts

    def load(toks: Array, tmask: Array | None) -> list[Array]:
        mask = all_masks(None if tmask is None else tmask[:, None], None if emask is None else emask[None, :])
        # Rows past T read zeros (finite routing, never stored); padded experts are -inf (never picked).
        return [masked_load(logits_ref.at[toks[:, None], c + ei[None, :]], mask) for c in col0s]

    def decide(parts: list[Array]) -> tuple[list[Array], list[Array]]:
        l_te = functools.reduce(lambda a, b: a + b, [p.astype(jnp.float32) for p in parts]) / spec.temperature
        if emask is not None:
            l_te = jnp.where(emask[None, :], l_te, -jnp.inf)
        if spec.mode == "softmax_then_topk":
            ex_te = jnp.exp(l_te - jnp.max(l_te, axis=1)[:, None])
            l_te = ex_te / jnp.sum(ex_te, axis=1)[:, None]
        vals, ids = [], []
        for _ in range(spec.top_k):
            v_t = jnp.max(l_te, axis=1)
            i_t = jnp.min(jnp.where(l_te == v_t[:, None], ei[None, :], e_pad), axis=1)
            vals.append(v_t)
            ids.append(i_t)
            l_te = jnp.where(ei[None, :] == i_t[:, None], -jnp.inf, l_te)
        if spec.mode == "softmax_then_topk":
            total = functools.reduce(lambda a, b: a + b, vals)
            return ids, [v / total for v in vals]
        if spec.top_k == 2:  # ``gating.softmax_sorted``: the sigmoid of the difference, never overflowing
            weights = []
            for j in range(2):
                diff = vals[j] - vals[1 - j]
                pos = diff >= 0
                e_t = jnp.exp(jnp.where(pos, -diff, diff))
                weights.append(jnp.where(pos, 1.0, e_t) / (1.0 + e_t))
            return ids, weights
        exps = [jnp.exp(v - vals[0]) for v in vals]  # ``jax.nn.softmax`` over the sorted top k
        total = functools.reduce(lambda a, b: a + b, exps)
        return ids, [e / total for e in exps]

    return Routing(load, decide)


def _decode_kernel(*refs: Ref, tiles: _Tiles, top_k: int, spec: RouteSpec | None) -> None:
    """One projection: refs are x, W, A, B, ids, weights, scaling, out; or with ``spec`` (routing in the
    kernel) x, W, A, B, logits, scaling, out. ``_decode_body`` on every program."""
    x_ref, w_ref, a_ref, b_ref = refs[:4]
    if spec is None:
        routing, (scaling_ref, o_ref) = given_routing(refs[4], refs[5], 0, top_k), refs[6:]
    else:
        routing, (scaling_ref, o_ref) = kernel_routing(refs[4], 0, a_ref.shape[0], spec), refs[5:]
    _decode_body(
        x_ref,
        w_ref,
        a_ref,
        b_ref,
        routing,
        scaling_ref,
        o_ref,
        tiles=tiles,
        top_k=top_k,
        col_block=pl.program_id(0),
        split=pl.program_id(1),
        out_col0=0,
    )


def _group_decode_kernel(
    *refs: Ref,
    tiles: _Tiles,
    top_k: int,
    segments: tuple[tuple[int, int, int], ...],
    spec: RouteSpec | None,
) -> None:
    """``_decode_kernel`` for P projections that read the same x in ONE launch: refs are x, W_1..W_P,
    A_1..A_P, B_1..B_P, then the routing: ids, weights (the P projections' slots side by side, [T, P * k]),
    or with ``spec`` the gate logits [T, P * E]; then scaling_1..P, out. ``segments``: ``column_segments``; a
    program runs the one projection its column block belongs to (``for_each_segment``)."""
    n = len(segments)
    x_ref, ws, as_, bs = refs[0], refs[1 : 1 + n], refs[1 + n : 1 + 2 * n], refs[1 + 2 * n : 1 + 3 * n]
    rest = refs[1 + 3 * n :]
    if spec is None:
        routings = [given_routing(rest[0], rest[1], p * top_k, top_k) for p in range(n)]
        rest = rest[2:]
    else:
        routings = [kernel_routing(rest[0], p * as_[p].shape[0], as_[p].shape[0], spec) for p in range(n)]
        rest = rest[1:]
    scalings, o_ref = rest[:n], rest[n]

    def body(p: int, col_block: Array, split: Array, col0: int) -> None:
        _decode_body(
            x_ref,
            ws[p],
            as_[p],
            bs[p],
            routings[p],
            scalings[p],
            o_ref,
            tiles=tiles,
            top_k=top_k,
            col_block=col_block,
            split=split,
            out_col0=col0,
        )

    for_each_segment(segments, body)


def _decode_body(
    x_ref: Ref,
    w_ref: Ref,
    a_ref: Ref,
    b_ref: Ref,
    routing: Any,
    scaling_ref: Ref,
    o_ref: Ref,
    *,
    tiles: _Tiles,
    top_k: int,
    col_block: Array,
    split: Array,
    out_col0: int,
) -> None:
    """One program's columns ``col_block`` of ``x @ W + LoRA`` over its K split ``split`` (steps
    ``[split * split_steps, ...)`` of d_in); ``routing(toks, tmask)`` gives its tokens' expert ids and
    weights (``given_routing`` / ``kernel_routing``); written at output column ``out_col0`` on (a group's
    slice of ``o_ref``)."""
    n_tok, d_in = x_ref.shape
    d_out = w_ref.shape[1]
    rank = a_ref.shape[2]
    bn, bk, bs = tiles.block_n, tiles.block_k, tiles.block_s
    cols = col_block * bn + jnp.arange(bn, dtype=jnp.int32)
    cmask = None if d_out % bn == 0 else cols < d_out
    toks = jnp.arange(tiles.toks, dtype=jnp.int32)  # LoRA rows, and all rows of "fma"
    tmask = None if tiles.toks == n_tok else toks < n_tok
    # Rows of the base product and the store: T padded to 16 for tl.dot ("mma"), the LoRA rows for "fma".
    # Rows >= T are out of range and masked.
    rows = toks if tiles.fma else jnp.arange(tiles.rows, dtype=jnp.int32)
    row_mask = tmask if tiles.fma else rows < n_tok
    ri = jnp.arange(tiles.rank, dtype=jnp.int32)
    rmask = None if tiles.rank == rank else ri < rank
    # A split's last steps may lie past d_in when the steps do not divide evenly: those loads are masked too.
    k_tail = d_in % bk != 0 or tiles.split_k * tiles.split_steps * bk > d_in

    # [toks] per slot: expert ids and weights (rows past T gather nothing and are never stored).
    ids, weights = routing(toks, tmask)

    def kmask_of(kk):  # noqa: ANN001, ANN202
        return kk < d_in if k_tail else None

    def x_tile(row_idx, row_m, kk, kmask):  # noqa: ANN001, ANN202
        """x[row_idx][:, kk], zero where a row is past T or a column past d_in."""
        return masked_load(
            x_ref.at[row_idx[:, None], kk[None, :]],
            all_masks(None if row_m is None else row_m[:, None], None if kmask is None else kmask[None, :]),
        )

    def shrink_loads(kb):  # noqa: ANN001, ANN202
        """Step ``kb``'s shrink operands, per sub-step: x[:, ks] and each slot's A rows, as stored."""
        k0 = (split * tiles.split_steps + kb) * bk
        loads = []
        for s in range(bk // bs):  # shrink sub-steps: bounded [toks, bs, r] tiles
            ks = k0 + s * bs + jnp.arange(bs, dtype=jnp.int32)
            ksmask = kmask_of(ks)
            a_mask = all_masks(
                None if tmask is None else tmask[:, None, None],
                None if ksmask is None else ksmask[None, :, None],
                None if rmask is None else rmask[None, None, :],
            )
            a_lsr = tuple(
                masked_load(a_ref.at[ids[j][:, None, None], ks[None, :, None], ri[None, None, :]], a_mask)
                for j in range(top_k)
            )
            loads.append((x_tile(toks, tmask, ks, ksmask), a_lsr))
        return tuple(loads)

    def shrink_add(hk, loads):  # noqa: ANN001, ANN202
        hk = list(hk)
        for x_ls, a_lsr in loads:
            x_ls = x_ls.astype(jnp.float32)
            for j in range(top_k):
                hk[j] = hk[j] + x_ls[:, :, None] * a_lsr[j].astype(jnp.float32)
        return tuple(hk)

    def step(kb, carry):  # noqa: ANN001, ANN202
        acc, hk, *ahead = carry  # acc: float32 [rows, bn] ("mma") or [toks, bk, bn] ("fma")
        if tiles.prefetch:
            # Issued first, used next step. The last step reloads its own operands (in range, never used).
            ahead = [shrink_loads(jnp.minimum(kb + 1, tiles.split_steps - 1)), ahead[0]]
        k0 = (split * tiles.split_steps + kb) * bk
        kk = k0 + jnp.arange(bk, dtype=jnp.int32)
        kmask = kmask_of(kk)
        x_mk = x_tile(rows, row_mask, kk, kmask)  # m: 16 padded rows ("mma") or toks ("fma")
        w_kn = masked_load(
            w_ref.at[kk[:, None], cols[None, :]],
            all_masks(None if kmask is None else kmask[:, None], None if cmask is None else cmask[None, :]),
        )
        if tiles.fma:
            # Elementwise multiply-add on CUDA cores over the token rows only; no reduction in the loop.
            acc = acc + x_mk.astype(jnp.float32)[:, :, None] * w_kn.astype(jnp.float32)[None, :, :]
        else:
            acc = acc + jnp.dot(
                x_mk.astype(w_kn.dtype),
                w_kn,
                preferred_element_type=jnp.float32,
                precision=dot_precision(w_kn.dtype),
            )
        if tiles.prefetch:
            nxt, cur = ahead
            return acc, shrink_add(hk, cur), nxt
        return acc, shrink_add(hk, shrink_loads(kb))

    acc = jnp.zeros((tiles.toks, bk, bn) if tiles.fma else (tiles.rows, bn), jnp.float32)
    hk = tuple(jnp.zeros((tiles.toks, bs, tiles.rank), jnp.float32) for _ in range(top_k))
    carry = (acc, hk, shrink_loads(0)) if tiles.prefetch else (acc, hk)
    acc, hk, *_ = lax.fori_loop(0, tiles.split_steps, step, carry)
    base_mn = jnp.sum(acc, axis=1) if tiles.fma else acc  # "fma": the one reduction over bk ([toks, bn])

    # Expand: y[t] += c[t, j] * h[t, j] @ B[e_tj][:, cols], in float32. Linear in h, so under split-K each
    # split expands its partial shrink and the partials' sum is the whole term.
    b_mask = all_masks(
        None if tmask is None else tmask[:, None, None],
        None if rmask is None else rmask[None, :, None],
        None if cmask is None else cmask[None, None, :],
    )
    # The slots' products are added before the one sum over r (one cross-warp reduction, not top_k).
    y_lrn = None
    for j in range(top_k):
        scale_l = masked_load(scaling_ref.at[ids[j]], tmask).astype(jnp.float32)
        hc_lr = jnp.sum(hk[j], axis=1) * (weights[j] * scale_l)[:, None]
        b_lrn = masked_load(b_ref.at[ids[j][:, None, None], ri[None, :, None], cols[None, None, :]], b_mask)
        term = hc_lr[:, :, None] * b_lrn.astype(jnp.float32)
        y_lrn = term if y_lrn is None else y_lrn + term
    y_ln = jnp.sum(y_lrn, axis=1)

    y_mn = base_mn + (y_ln if tiles.fma else _embed_rows(y_ln, tiles.rows))
    # With split-K, o_ref holds float32 partials [split_k * T, d_out]: this split's rows start at split * T.
    out_rows = rows if tiles.split_k == 1 else split * n_tok + rows
    plgpu.store(
        o_ref.at[out_rows[:, None], out_col0 + cols[None, :]],
        y_mn.astype(o_ref.dtype),
        mask=all_masks(
            None if row_mask is None else row_mask[:, None], None if cmask is None else cmask[None, :]
        ),
    )


def decode_forward(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"],
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    expert_ids_tk: Int[Array, "T K"],
    expert_weights_tk: Float[Array, "T K"],
    scaling_e: Float[Array, " E"],
    *,
    interpret: bool = False,
    config: DecodeConfig | None = None,
) -> Float[Array, "T O"]:
    """``x @ w`` plus the top-k LoRA term in one kernel launch; output in x's dtype (see the module doc).

    Valid for any T; efficient only for a few tokens (``DECODE_MAX_TOKENS``), which the caller decides.
    """
    routing = (expert_ids_tk.astype(jnp.int32), expert_weights_tk)
    return _decode_one(
        x_td,
        w_do,
        lora_a_edr,
        lora_b_ero,
        routing,
        scaling_e,
        expert_ids_tk.shape[1],
        None,
        interpret,
        config,
    )


def decode_forward_routed(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"],
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    logits_te: Float[Array, "T E"],
    scaling_e: Float[Array, " E"],
    *,
    spec: RouteSpec,
    interpret: bool = False,
    config: DecodeConfig | None = None,
) -> Float[Array, "T O"]:
    """``decode_forward`` routed inside the kernel: ``gating.route_spec(logits_te, spec)`` is computed by every
    program for its tokens, so no top-k, softmax or slice kernels run between the gate and this launch."""
    return _decode_one(
        x_td, w_do, lora_a_edr, lora_b_ero, (logits_te,), scaling_e, spec.top_k, spec, interpret, config
    )


def _decode_one(
    x_td: Array,
    w_do: Array,
    lora_a_edr: Array,
    lora_b_ero: Array,
    routing: tuple[Array, ...],
    scaling_e: Array,
    top_k: int,
    spec: RouteSpec | None,
    interpret: bool,
    config: DecodeConfig | None,
) -> Array:
    num_tokens, d_in = x_td.shape
    d_out = w_do.shape[1]
    cfg = config or DECODE_CONFIG_OVERRIDE or DecodeConfig.for_shape(num_tokens, d_in, d_out)
    tiles = _tiles(cfg, num_tokens, d_in, d_out, lora_a_edr.shape[2])
    kernel = functools.partial(_decode_kernel, tiles=tiles, top_k=top_k, spec=spec)
    args = (x_td, w_do, lora_a_edr, lora_b_ero, *routing, scaling_e.astype(jnp.float32))
    return _launch(
        kernel, "lora_decode_fused", args, x_td, d_out, cdiv(d_out, tiles.block_n), cfg, tiles, interpret
    )


def _launch(
    kernel: Any,
    name: str,
    args: tuple,
    x_td: Array,
    d_out: int,
    blocks: int,
    cfg: Any,
    tiles: Any,
    interpret: bool,
    out_dtype: jnp.dtype | None = None,
) -> Float[Array, "T O"]:
    """One ``pallas_call`` of a decode kernel over ``blocks`` column blocks x ``split_k``, and (split-K) the sum
    of its float32 partials [split_k * T, d_out]; ``y`` in ``out_dtype`` (default x's dtype)."""
    num_tokens = x_td.shape[0]
    out_dtype = out_dtype or x_td.dtype
    if tiles.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((num_tokens, d_out), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((tiles.split_k * num_tokens, d_out), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(blocks, tiles.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return sum_partials(out, tiles.split_k, out_dtype)


def sum_partials(out: Array, split_k: int, out_dtype: jnp.dtype) -> Array:
    """A kernel's output: as written for one K split, else the sum of its float32 partials [split_k * T, N]."""
    if split_k == 1:
        return out
    num_tokens = out.shape[0] // split_k
    return jnp.sum(out.reshape(split_k, num_tokens, out.shape[1]), axis=0).astype(out_dtype)


def decode_forward_group(
    x_td: Float[Array, "T D"],
    ws_do: Sequence[Float[Array, "D O"]],
    lora_as_edr: Sequence[Float[Array, "E D R"]],
    lora_bs_ero: Sequence[Float[Array, "E R O"]],
    expert_ids_tk: Sequence[Int[Array, "T K"]],
    expert_weights_tk: Sequence[Float[Array, "T K"]],
    scalings_e: Sequence[Float[Array, " E"]],
    *,
    interpret: bool = False,
    config: DecodeConfig | None = None,
) -> list[Float[Array, "T O"]]:
    """``decode_forward`` of P projections that read the same ``x`` (q/k/v, gate/up) in ONE launch.

    The grid runs over every projection's column blocks in turn (one tile config, the widest projection's;
    split-K chosen over all the blocks). What it saves over P launches: at batch-1 decode the narrow k/v
    kernels move 8 MB each at about half the rate of q's 32 MB (benchmarks/RESULTS.md, session 4); one
    launch streams all three Ws, and writes one output (one split-K sum, not P)."""
    routing = (
        jnp.concatenate([i.astype(jnp.int32) for i in expert_ids_tk], axis=1),
        jnp.concatenate(list(expert_weights_tk), axis=1),
    )
    top_k = expert_ids_tk[0].shape[1]
    return _decode_group(
        x_td, ws_do, lora_as_edr, lora_bs_ero, routing, scalings_e, top_k, None, interpret, config
    )


def decode_forward_group_routed(
    x_td: Float[Array, "T D"],
    ws_do: Sequence[Float[Array, "D O"]],
    lora_as_edr: Sequence[Float[Array, "E D R"]],
    lora_bs_ero: Sequence[Float[Array, "E R O"]],
    logits_tpe: Float[Array, "T P E"],
    scalings_e: Sequence[Float[Array, " E"]],
    *,
    spec: RouteSpec,
    interpret: bool = False,
    config: DecodeConfig | None = None,
) -> list[Float[Array, "T O"]]:
    """``decode_forward_group`` routed inside the kernel (``decode_forward_routed``): projection p's routing is
    ``gating.route_spec(logits_tpe[:, p], spec)``; the P projections have the same expert count E."""
    t, p, e = group_shape(logits_tpe, lora_as_edr)
    routing = (logits_tpe.reshape(t, p * e),)
    return _decode_group(
        x_td, ws_do, lora_as_edr, lora_bs_ero, routing, scalings_e, spec.top_k, spec, interpret, config
    )


def _decode_group(
    x_td: Array,
    ws_do: Sequence[Array],
    lora_as_edr: Sequence[Array],
    lora_bs_ero: Sequence[Array],
    routing: tuple[Array, ...],
    scalings_e: Sequence[Array],
    top_k: int,
    spec: RouteSpec | None,
    interpret: bool,
    config: DecodeConfig | None,
) -> list[Array]:
    num_tokens, d_in = x_td.shape
    d_outs = tuple(w.shape[1] for w in ws_do)
    rank = max(a.shape[2] for a in lora_as_edr)
    cfg = config or DECODE_CONFIG_OVERRIDE or DecodeConfig.for_shape(num_tokens, d_in, max(d_outs))
    tiles = _tiles(cfg, num_tokens, d_in, max(d_outs), rank, d_outs)
    segments, blocks, width = column_segments(d_outs, tiles.block_n)
    kernel = functools.partial(_group_decode_kernel, tiles=tiles, top_k=top_k, segments=segments, spec=spec)
    args = (
        x_td,
        *ws_do,
        *lora_as_edr,
        *lora_bs_ero,
        *routing,
        *(s.astype(jnp.float32) for s in scalings_e),
    )
    return launch_group(
        kernel, "lora_decode_fused_group", args, x_td, segments, blocks, width, cfg, tiles, interpret
    )


def launch_group(
    kernel: Any,
    name: str,
    args: tuple,
    x_td: Array,
    segments: tuple[tuple[int, int, int], ...],
    blocks: int,
    width: int,
    cfg: Any,
    tiles: Any,
    interpret: bool,
    out_dtype: jnp.dtype | None = None,
) -> list[Array]:
    """``_launch`` of a group kernel (``column_segments``), its output split back into one per projection.
    ``cfg`` / ``tiles``: anything with ``num_warps``, ``num_stages`` / ``split_k`` (``pallas_gpu_expand``'s)."""
    out = _launch(kernel, name, args, x_td, width, blocks, cfg, tiles, interpret, out_dtype)
    return jnp.split(out, [c for _, _, c in segments[1:]], axis=1)


def forward_if_few_tokens(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"] | None,
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    expert_ids_tk: Int[Array, "T K"],
    expert_weights_tk: Float[Array, "T K"],
    scaling_e: Float[Array, " E"],
    *,
    interpret: bool = False,
) -> Float[Array, "T O"] | None:
    """An ops ``forward``: this kernel for a call it serves (``w`` given, ``0 < T <= DECODE_MAX_TOKENS``),
    else None (the caller's other path). Shared by ``pallas_gpu`` and ``pallas_gpu_decode``."""
    if w_do is None or not 0 < x_td.shape[0] <= DECODE_MAX_TOKENS:
        return None
    return decode_forward(
        x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e, interpret=interpret
    )


def make_decode_ops(fallback: Any, *, interpret: bool = False) -> Any:
    """``fallback`` (an XLA ops object) whose inference forward is this kernel where it measured faster.

    The kernel serves what ``forward_if_few_tokens`` serves, ``pallas_gpu_expand`` what its
    ``forward_if_batched`` serves (off unless its knob is set); every other call, and all of training (shrink,
    expand, backward), is ``fallback``'s.
    """
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError("pallas_gpu_decode needs a GPU (or the _interpret variant)")

    from pallas_kernels.grouped_lora import pallas_gpu_expand

    def forward(*args):  # noqa: ANN002, ANN202
        y_to = forward_if_few_tokens(*args, interpret=interpret)
        if y_to is None:
            y_to = pallas_gpu_expand.forward_if_batched(*args, interpret=interpret)
        if y_to is None and fallback.forward is not None:
            y_to = fallback.forward(*args)
        return y_to

    return dataclasses.replace(fallback, name="pallas_gpu_decode", forward=forward)
