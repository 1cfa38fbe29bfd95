"""Pallas GPU (Triton) kernel for batched decode's packed GEMM: ``x @ pack`` in float32, for a few dozen tokens.

    wide[t, :] = x[t] @ [A_1 | ... | A_P | gates]        (x [T, D], pack [D, N], wide float32 [T, N])

``moe_lora.packed_forward`` takes every expert's shrink and the gate logits of a group of projections from this
one GEMM. At batch-64 decode its N is narrow (840 columns for Llama-3-8B's q/k/v with 28 rank-8 experts, 280
for o and down, 560 for gate/up), so it is bound by reading the pack (21.8 MB per layer, bf16), yet XLA's
Triton GEMMs read it at ~1.1 TB/s on an H100: 0.69 ms of a 9.5 ms step, where the bytes alone take ~0.24 ms
at the 2.87 TB/s the same run measured (session 13, benchmarks/RESULTS.md). This kernel was built on the guess
that too few column blocks (14 of 64 columns for q/k/v) left SMs idle; the status below says what was found.

The kernel is ``pallas_gpu_expand``'s W loop alone (``pallas_gpu_expand.matmul``: the same tiles, pipelining and
launch, measured there at 7-8% over cuBLAS), with its own tile knobs and a float32 output: one program per
``block_n`` columns and K split; ``split_k`` programs share a column block's ``d_in``, each writes float32
partials and one XLA reduction sums them (``split_k`` x T x N x 4 bytes each way, mostly in L2). Token rows are
padded to a power of two >= 16 (``tl.dot``) with masked loads; tails of ``d_in`` and N are masked, so any shape
works. Float32 operands use an IEEE float32 dot (``common.dot_precision``), bf16 ones the
tensor cores with float32 accumulation: the products XLA's ``precision=HIGHEST`` GEMM computes, summed in
another order.

Status (session 14): checked in interpret mode, lowered for CUDA on a CPU host, and measured on an H200, where it
ties XLA's autotuned GEMMs (661 vs 662 us of pack kernels per batch-64 step; every tile setting within ~1.5% of
the step): those already split K 16-32 ways, and at ~5 us a kernel fixed costs (ramp-up, tail, the reduction)
are likely most of the time, though how much was not measured (benchmarks/RESULTS.md, "Session 14"). So it stays
off (knob ``pack_kernel``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.grouped_lora import pallas_gpu_expand
from pallas_kernels.grouped_lora.pallas_gpu_expand import (
    MAX_SHARED_MEMORY_BYTES,
    ExpandConfig,
    shared_memory_bytes,
)

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


def fits(num_tokens: int, itemsize: int, config: PackConfig | None = None) -> bool:
    """Whether a call of ``num_tokens`` rows of ``itemsize`` bytes may run through this kernel: its loop's
    pipelined tiles are those of ``pallas_gpu_expand``'s W loop (``shared_memory_bytes``), under the same limit."""
    cfg = config or PackConfig.default()
    return 2 <= num_tokens <= PACK_KERNEL_MAX_TOKENS and (
        shared_memory_bytes(num_tokens, itemsize, cfg) <= MAX_SHARED_MEMORY_BYTES
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
    return pallas_gpu_expand.matmul(
        x_td,
        pack_dn,
        out_dtype=jnp.float32,
        name="lora_pack_matmul",
        interpret=interpret,
        config=config or PackConfig.default(),
    )
