"""Pallas GPU (Triton) kernel for batched decode's packed GEMM: ``x @ pack`` in float32, for a few dozen tokens.

    wide[t, :] = x[t] @ [A_1 | ... | A_P | gates]        (x [T, D], pack [D, N], wide float32 [T, N])

``moe_lora.packed_forward`` takes every expert's shrink and the gate logits of a group of projections from this
one GEMM. At batch-64 decode its N is narrow (840 columns for Llama-3-8B's q/k/v with 28 rank-8 experts, 280
for o and down, 560 for gate/up), so it is bound by reading the pack (21.8 MB per layer, bf16), yet XLA's
Triton GEMMs read it at ~1.1 TB/s on an H100: 0.69 ms of a 9.5 ms step, where the bytes alone take ~0.24 ms
at the 2.87 TB/s the same run measured (session 13, benchmarks/RESULTS.md). This kernel was built on the guess
that too few column blocks (14 of 64 columns for q/k/v) left SMs idle; the status below says what was found.

Grid: one program per ``block_n`` columns and K split, as ``pallas_gpu_expand``'s W loop (the same tiles and
pipelining, measured there at 7-8% over cuBLAS): ``split_k`` programs share a column block's ``d_in``; each
writes float32 partials and one XLA reduction sums them (``split_k`` x T x N x 4 bytes each way, mostly in L2).
Token rows are padded to a power of two >= 16 (``tl.dot``) with masked loads; tails of ``d_in`` and N are
masked, so any shape works. Float32 operands use an IEEE float32 dot (``common.dot_precision``), bf16 ones the
tensor cores with float32 accumulation: the products XLA's ``precision=HIGHEST`` GEMM computes, summed in
another order.

Status (session 14): checked in interpret mode, lowered for CUDA on a CPU host, and measured on an H200, where it
ties XLA's autotuned GEMMs (661 vs 662 us of pack kernels per batch-64 step; every tile setting within ~1.5% of
the step): those already split K 16-32 ways, and at ~5 us a launch the fixed cost of a kernel is most of the
time (benchmarks/RESULTS.md, "Session 14"). So it stays off (knob ``pack_kernel``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels.grouped_lora.common import cdiv, dot_precision, pow2
from pallas_kernels.grouped_lora.pallas_gpu_decode import MIN_DOT_ROWS, all_masks, masked_load, split_k_for
from pallas_kernels.grouped_lora.pallas_gpu_expand import (
    MAX_SHARED_MEMORY_BYTES,
    ExpandConfig,
    shared_memory_bytes,
)

Ref = Any
# From 2 up to this many tokens, ``moe_lora.packed_forward`` runs its packed GEMM through this kernel where the
# group's backend is the GPU decode one (``api.pack_kernel_plan``). Knob ``pack_kernel`` (0 = off: XLA's GEMM).
PACK_KERNEL_MAX_TOKENS = 0
# The default tiles, as trace-time knobs (``pack_bn``, ``pack_bk``, ``pack_split``, ``pack_programs``,
# ``pack_stages``, ``pack_warps``; meteora_jax/knobs.py) so that one process can sweep them on a GPU. As in
# ``pallas_gpu_expand``: narrow column blocks re-read x from L2, many splits write and re-read partials.
PACK_BLOCK_N = 64
PACK_BLOCK_K = 128
PACK_SPLIT_K = 0  # 0 = the fewest splits (powers of two) that give ``PACK_TARGET_PROGRAMS`` programs
PACK_TARGET_PROGRAMS = 132  # one per SM of an H100 / H200
PACK_STAGES = 3
PACK_WARPS = 4


@dataclasses.dataclass(frozen=True)
class PackConfig(ExpandConfig):
    """``pallas_gpu_expand``'s tile sizes (``block_k`` rows of the pack per loop step, ``split_k`` 0 = from
    the shape); ``PackConfig.default()`` reads this module's knobs."""

    @classmethod
    def default(cls) -> PackConfig:
        return cls(
            block_n=PACK_BLOCK_N,
            block_k=PACK_BLOCK_K,
            num_warps=PACK_WARPS,
            num_stages=PACK_STAGES,
            split_k=PACK_SPLIT_K,
            target_programs=PACK_TARGET_PROGRAMS,
        )


@dataclasses.dataclass(frozen=True)
class _Tiles:
    rows: int  # T padded to a power of two >= 16
    block_n: int
    block_k: int
    split_k: int
    split_steps: int  # K steps per split


def _tiles(cfg: PackConfig, num_tokens: int, d_in: int, n_cols: int) -> _Tiles:
    block_k = max(16, min(cfg.block_k, pow2(d_in)))
    block_n = max(16, min(cfg.block_n, pow2(n_cols)))
    steps = cdiv(d_in, block_k)
    split = cfg.split_k if cfg.split_k > 0 else split_k_for(cdiv(n_cols, block_n), steps, cfg.target_programs)
    split = max(1, min(steps, split))
    return _Tiles(
        rows=max(MIN_DOT_ROWS, pow2(num_tokens)),
        block_n=block_n,
        block_k=block_k,
        split_k=split,
        split_steps=cdiv(steps, split),
    )


def fits(num_tokens: int, itemsize: int, config: PackConfig | None = None) -> bool:
    """Whether a call of ``num_tokens`` rows of ``itemsize`` bytes may run through this kernel: its loop's
    pipelined tiles are those of ``pallas_gpu_expand``'s W loop (``shared_memory_bytes``), under the same limit."""
    cfg = config or PackConfig.default()
    return 2 <= num_tokens <= PACK_KERNEL_MAX_TOKENS and (
        shared_memory_bytes(num_tokens, itemsize, cfg) <= MAX_SHARED_MEMORY_BYTES
    )


def _kernel(x_ref: Ref, p_ref: Ref, o_ref: Ref, *, tiles: _Tiles) -> None:
    """Columns ``program_id(0)`` of the pack over K split ``program_id(1)``; float32 partial rows
    ``split * T ..`` under split-K."""
    n_tok, d_in = x_ref.shape
    n_cols = p_ref.shape[1]
    bn, bk = tiles.block_n, tiles.block_k
    col_block, split = pl.program_id(0), pl.program_id(1)
    rows = jnp.arange(tiles.rows, dtype=jnp.int32)
    row_mask = None if tiles.rows == n_tok else rows < n_tok
    cols = col_block * bn + jnp.arange(bn, dtype=jnp.int32)
    cmask = None if n_cols % bn == 0 else cols < n_cols
    tail = d_in % bk != 0 or tiles.split_k * tiles.split_steps * bk > d_in

    def step(kb, acc):  # noqa: ANN001, ANN202
        kk = (split * tiles.split_steps + kb) * bk + jnp.arange(bk, dtype=jnp.int32)
        kmask = kk < d_in if tail else None
        lhs = masked_load(
            x_ref.at[rows[:, None], kk[None, :]],
            all_masks(
                None if row_mask is None else row_mask[:, None], None if kmask is None else kmask[None, :]
            ),
        )
        rhs = masked_load(
            p_ref.at[kk[:, None], cols[None, :]],
            all_masks(None if kmask is None else kmask[:, None], None if cmask is None else cmask[None, :]),
        )
        return acc + jnp.dot(lhs, rhs, preferred_element_type=jnp.float32, precision=dot_precision(rhs.dtype))

    acc = lax.fori_loop(0, tiles.split_steps, step, jnp.zeros((tiles.rows, bn), jnp.float32))
    out_rows = rows if tiles.split_k == 1 else split * n_tok + rows
    plgpu.store(
        o_ref.at[out_rows[:, None], cols[None, :]],
        acc,
        mask=all_masks(
            None if row_mask is None else row_mask[:, None], None if cmask is None else cmask[None, :]
        ),
    )


def pack_matmul(
    x_td: Float[Array, "T D"],
    pack_dn: Float[Array, "D N"],
    *,
    interpret: bool = False,
    config: PackConfig | None = None,
) -> Float[Array, "T N"]:
    """``x @ pack`` in float32 (one launch, plus the sum of the split-K partials); x and pack share a dtype."""
    num_tokens, d_in = x_td.shape
    if pack_dn.ndim != 2 or pack_dn.shape[0] != d_in or pack_dn.dtype != x_td.dtype:
        raise ValueError(
            f"pack_matmul: x {x_td.shape} {x_td.dtype} and pack {pack_dn.shape} {pack_dn.dtype} do not match "
            "(the pack needs x's d_in rows and dtype)"
        )
    n_cols = pack_dn.shape[1]
    cfg = config or PackConfig.default()
    tiles = _tiles(cfg, num_tokens, d_in, n_cols)
    out = pl.pallas_call(
        functools.partial(_kernel, tiles=tiles),
        out_shape=jax.ShapeDtypeStruct((tiles.split_k * num_tokens, n_cols), jnp.float32),
        grid=(cdiv(n_cols, tiles.block_n), tiles.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="lora_pack_matmul",
    )(x_td, pack_dn)
    if tiles.split_k == 1:
        return out
    return jnp.sum(out.reshape(tiles.split_k, num_tokens, n_cols), axis=0)
