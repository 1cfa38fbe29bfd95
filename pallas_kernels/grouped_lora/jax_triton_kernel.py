"""The decode kernel in plain Triton (``@triton.jit``), for ``jax_triton_decode.py``. Imports ``triton``.

``y[t] = x[t] @ W + sum_j c[t, j] * (x[t] @ A[e_tj]) @ B[e_tj]`` for a few tokens, with ``c = weight * scaling``.
The design of ``pallas_gpu_decode.py`` (measured there), written against Triton directly:
- grid (column blocks, K splits); each program streams its [K_PER_SPLIT, BLOCK_N] slice of W once;
- the shrink of each (token, slot) row is accumulated over the program's own K range only. The expand is
  linear, so that partial shrink times B[e][:, cols] is this split's share of the LoRA term; the float32
  partials ([splits, T, D_OUT]) are summed by the caller, in a fixed order (deterministic, unlike atomics);
- the base product: ``tl.dot`` with the token rows padded to ``BLOCK_T`` >= 16 (Triton pipelines the loads
  that feed a dot through shared memory; the Pallas kernel measured this fastest at T = 1 too), or, for one
  token with ``USE_DOT`` off, CUDA-core products into a [BLOCK_K, BLOCK_N] float32 accumulator reduced once
  after the loop, not every step (a cross-warp reduction each time) (``DOT_IN_F32``: operands cast to
  float32 first, for Triton's interpreter, whose dot reads bf16 as raw uint16; bf16 products are exact in
  float32 and both accumulate in float32, so the result is the same);
- ``DEFER_SHRINK``: the shrink's products likewise accumulate in [rows, BLOCK_K, BLOCK_R] and are reduced
  once, where that accumulator is small (one or two rows); otherwise they are reduced every step.
Rows m = t * BLOCK_KS + j pair token t with its slot j, for BLOCK_TL token rows: 1 for one token (its LoRA
term then broadcasts over the dot's padded rows), else BLOCK_T; rows past T or past K (the top-k) are masked.
"""

# A Triton kernel: its arguments are pointers and constexprs that Triton's own front end types.
# ruff: noqa: ANN001, ANN201

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_decode_kernel(
    x_ptr,  # [T, D_IN]
    w_ptr,  # [D_IN, D_OUT]
    a_ptr,  # [E, D_IN, R]
    b_ptr,  # [E, R, D_OUT]
    ids_ptr,  # [T * K] int32
    coef_ptr,  # [T * K] float32: routing weight * scaling
    out_ptr,  # [splits, T, D_OUT] float32
    T: tl.constexpr,
    D_IN: tl.constexpr,
    D_OUT: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_TL: tl.constexpr,
    BLOCK_KS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DEFER_SHRINK: tl.constexpr,
    DOT_IN_F32: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D_OUT
    toks = tl.arange(0, BLOCK_T)
    tmask = toks < T
    rows = tl.arange(0, BLOCK_TL * BLOCK_KS)
    row_t = rows // BLOCK_KS
    row_j = rows % BLOCK_KS
    row_ok = (row_t < T) & (row_j < K)
    expert = tl.load(ids_ptr + row_t * K + row_j, mask=row_ok, other=0)
    coef = tl.load(coef_ptr + row_t * K + row_j, mask=row_ok, other=0.0)
    ranks = tl.arange(0, BLOCK_R)
    rmask = ranks < R
    a_rows = a_ptr + expert.to(tl.int64)[:, None, None] * (D_IN * R) + ranks[None, None, :]
    a_mask = row_ok[:, None, None] & rmask[None, None, :]

    if USE_DOT:
        acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    if DEFER_SHRINK:
        h_acc = tl.zeros((BLOCK_TL * BLOCK_KS, BLOCK_K, BLOCK_R), tl.float32)
    else:
        h = tl.zeros((BLOCK_TL * BLOCK_KS, BLOCK_R), tl.float32)

    k_begin = pid_s * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        d = k_begin + kk + tl.arange(0, BLOCK_K)
        dmask = d < D_IN
        w = tl.load(
            w_ptr + d[:, None] * D_OUT + cols[None, :], mask=dmask[:, None] & cmask[None, :], other=0.0
        )
        if USE_DOT:
            xt = tl.load(
                x_ptr + toks[:, None] * D_IN + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0
            )
            if (
                DOT_IN_F32
            ):  # Triton's interpreter multiplies bf16 as its uint16 storage; the products are exact
                acc += tl.dot(xt.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xt, w, input_precision="ieee")
            xr = tl.load(
                x_ptr + row_t[:, None] * D_IN + d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0
            ).to(tl.float32)
        else:
            x1 = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            acc += x1[:, None] * w.to(tl.float32)
            xr = x1[None, :]
        a = tl.load(a_rows + d[None, :, None] * R, mask=a_mask & dmask[None, :, None], other=0.0)
        prod = xr[:, :, None] * a.to(tl.float32)
        if DEFER_SHRINK:
            h_acc += prod
        else:
            h += tl.sum(prod, axis=1)

    if DEFER_SHRINK:
        h = tl.sum(h_acc, axis=1)
    if USE_DOT:
        base = acc
    else:
        base = tl.sum(acc, axis=0)[None, :]
    hc = h * coef[:, None]
    b = tl.load(
        b_ptr
        + expert.to(tl.int64)[:, None, None] * (R * D_OUT)
        + ranks[None, :, None] * D_OUT
        + cols[None, None, :],
        mask=row_ok[:, None, None] & rmask[None, :, None] & cmask[None, None, :],
        other=0.0,
    )
    lora_rows = tl.sum(hc[:, :, None] * b.to(tl.float32), axis=1)
    lora = tl.sum(tl.reshape(lora_rows, (BLOCK_TL, BLOCK_KS, BLOCK_N)), axis=1)  # [1 or BLOCK_T, BLOCK_N]
    out = out_ptr + pid_s * (T * D_OUT) + toks[:, None] * D_OUT + cols[None, :]
    tl.store(out, base + lora, mask=tmask[:, None] & cmask[None, :])
