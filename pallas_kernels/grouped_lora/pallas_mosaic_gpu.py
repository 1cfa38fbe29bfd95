"""Mosaic GPU (Hopper: TMA + wgmma) kernel for prefill: ``x @ W + hc @ B_flat`` as ONE GEMM over a longer K.

    y[t] = x[t] @ W + sum_{e, r} hc[t, e * R + r] * B[e, r, :]

``hc`` is the dense path's masked, weighted shrink (``xla.masked_coefficients``: every expert's ``x @ A[e]``
times the token's routing weight and scaling, zero for experts it did not pick), computed by XLA's GEMM. The
kernel accumulates the base product and the expand into the same float32 wgmma accumulator, so the expand's
output is never written and re-read (the cost that the dense XLA path pays at prefill: an extra [T, d_out]
array per projection) and base and LoRA are summed before the one rounding to x's dtype. What it costs instead:
E * R extra K (224 for 28 rank-8 experts, padded to ``block_k``; ~5.5% more MMA work at d_in = 4096).

Structure: a persistent grid (one CTA per SM, ``plgpu.nd_loop`` over output tiles in a planar-snake order for
L2 reuse of W), one warpgroup per CTA; per tile two ``emit_pipeline`` loops (TMA loads, ``max_concurrent_steps``
deep, swizzled shared memory) feed ``wgmma`` into one accumulator: first over d_in (x, W), then over the expert
columns (hc, B_flat). The epilogue casts once and stores through shared memory with TMA.

Status (session 17): checked in Mosaic GPU's interpret mode on the CPU against float64 (tests/
test_mosaic_gpu.py), lowered for CUDA on a CPU host, and equal to ``reference`` on an H100 (GPU test). Measured
there (4096 x 4096 x 4096 + 256 expert columns, benchmarks/RESULTS.md "Session 17"): 216 us against XLA's 171 us
``x @ W`` (1.265x). JAX's own warp-specialized Hopper matmul takes 186 us for the same K-extended product, and
XLA's GEMM 182 us. The whole ``mosaic_gpu`` op (with XLA's shrink) is 1.385x, against ``xla``'s 1.171x. So it is
not in the automatic choice; it would need two consumer warpgroups with warp specialization to approach 1.06.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels.grouped_lora import xla
from pallas_kernels.grouped_lora.common import cdiv, kernel_first

Ref = Any
# From this many tokens on, the ``mosaic_gpu`` backend's inference forward (with ``w``) is this kernel; below it,
# ``pallas_gpu_decode``'s (the decode kernel at T = 1, XLA's dense path in between). Prefill sizes: at 64 rows
# the GEMMs are bandwidth-bound and the extra K block would be pure cost.
MOSAIC_MIN_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the fused kernel. One warpgroup holds a ``block_m x block_n`` float32 accumulator in registers
    (128 x 128: 128 registers a thread). Shared memory: ``stages * (block_m + block_n) * block_k * 2`` bytes of
    input buffers plus the ``block_m x block_n`` output tile (160 KiB at the defaults, of Hopper's 227)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    grid_width: int = 8  # planar-snake band width, in output tiles along N

    def __post_init__(self) -> None:
        if self.block_m % 64 or self.block_n % 8 or self.block_k % 16 or self.stages < 2:
            raise ValueError(
                f"{self}: wgmma needs block_m % 64 == 0, block_n % 8 == 0, block_k % 16 == 0; the pipeline stages >= 2"
            )


def _num_sms() -> int:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or 132)


def fused_matmul(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"],
    hc_tn: Float[Array, "T N"],
    b_no: Float[Array, "N O"],
    *,
    config: MosaicConfig | None = None,
    interpret: bool = False,
    num_programs: int | None = None,
) -> Float[Array, "T O"]:
    """``x @ W + hc @ B`` in one Mosaic GPU kernel (float32 accumulation, x's dtype out).

    T must be a multiple of ``block_m``, d_out of ``block_n``, d_in and N of ``block_k`` (``fused_forward``
    pads); all operands in one 16-bit dtype. ``interpret`` runs Mosaic GPU's CPU interpreter."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config or MosaicConfig()
    (t, d_in), (d_in_w, d_out), (t_h, n_extra), (n_b, d_out_b) = (
        x_td.shape,
        w_do.shape,
        hc_tn.shape,
        b_no.shape,
    )
    if (d_in_w, t_h, n_b, d_out_b) != (d_in, t, n_extra, d_out):
        raise ValueError(f"fused_matmul: x {x_td.shape}, W {w_do.shape}, hc {hc_tn.shape}, B {b_no.shape}")
    if t % cfg.block_m or d_out % cfg.block_n or d_in % cfg.block_k or n_extra % cfg.block_k:
        raise ValueError(
            f"fused_matmul: shapes {x_td.shape} x {w_do.shape} (+{n_extra}) do not tile by {cfg}"
        )
    if len({a.dtype for a in (x_td, w_do, hc_tn, b_no)}) != 1 or jnp.dtype(x_td.dtype).itemsize != 2:
        raise ValueError("fused_matmul: x, W, hc and B must share one 16-bit dtype")
    m_tiles, n_tiles = t // cfg.block_m, d_out // cfg.block_n
    swizzle = plgpu.find_swizzle(cfg.block_k * 2 * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    def body(x_gmem: Ref, w_gmem: Ref, hc_gmem: Ref, b_gmem: Ref, out_gmem: Ref) -> None:
        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info: Any) -> None:
            mi, ni = plgpu.planar_snake(info.index[0], (m_tiles, n_tiles), 1, cfg.grid_width)

            def accumulate(acc_ref: Ref) -> Array:
                def k_loop(lhs_gmem: Ref, rhs_gmem: Ref, steps: int) -> None:
                    def step(_: Any, lhs_smem: Ref, rhs_smem: Ref) -> None:
                        plgpu.wgmma(acc_ref, lhs_smem, rhs_smem)
                        plgpu.wgmma_wait(1)  # one wgmma in flight: the slot it reads is released a step later

                    plgpu.emit_pipeline(
                        step,
                        grid=(steps,),
                        in_specs=[
                            plgpu.BlockSpec(
                                (cfg.block_m, cfg.block_k),
                                lambda k: (mi, k),
                                transforms=transforms,
                                delay_release=1,
                            ),
                            plgpu.BlockSpec(
                                (cfg.block_k, cfg.block_n),
                                lambda k: (k, ni),
                                transforms=transforms,
                                delay_release=1,
                            ),
                        ],
                        max_concurrent_steps=cfg.stages,
                    )(lhs_gmem, rhs_gmem)
                    # the next loop's TMA may reuse this loop's buffers: the last wgmma must be done reading them
                    plgpu.wgmma_wait(0)

                k_loop(x_gmem, w_gmem, d_in // cfg.block_k)
                k_loop(hc_gmem, b_gmem, n_extra // cfg.block_k)
                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((cfg.block_m, cfg.block_n)))

            @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((cfg.block_m, cfg.block_n), out_gmem.dtype))
            def _store(out_smem: Ref) -> None:
                out_smem[...] = acc.astype(out_smem.dtype)
                plgpu.commit_smem()
                rows, cols = pl.ds(mi * cfg.block_m, cfg.block_m), pl.ds(ni * cfg.block_n, cfg.block_n)
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[rows, cols])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # out_smem is reused by the next tile

    kwargs = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        kwargs["interpret"] = InterpretGPUParams()
    programs = num_programs or (min(4, m_tiles * n_tiles) if interpret else _num_sms())
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t, d_out), x_td.dtype),
        grid=(programs,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs,
    )
    return kernel(x_td, w_do, hc_tn, b_no)


def _pad_to(a: Array, axis: int, multiple: int) -> Array:
    extra = cdiv(a.shape[axis], multiple) * multiple - a.shape[axis]
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def fits(x_td: Array, w_do: Array | None, config: MosaicConfig | None = None) -> bool:
    """Whether ``fused_forward`` serves this call: ``w`` given, 16-bit operands, ``MOSAIC_MIN_TOKENS`` rows or
    more, d_in and d_out multiples of the tiles (the rows and expert columns are padded)."""
    cfg = config or MosaicConfig()
    if w_do is None or x_td.shape[0] < MOSAIC_MIN_TOKENS or jnp.dtype(x_td.dtype).itemsize != 2:
        return False
    return w_do.dtype == x_td.dtype and x_td.shape[1] % cfg.block_k == 0 and w_do.shape[1] % cfg.block_n == 0


def fused_forward(
    x_td: Array,
    w_do: Array,
    lora_a_edr: Array,
    lora_b_ero: Array,
    ids_tk: Array,
    weights_tk: Array,
    scaling_e: Array,
    *,
    config: MosaicConfig | None = None,
    interpret: bool = False,
) -> Array:
    """The dense forward with the expand inside the base GEMM: XLA's shrink and routing mask give ``hc``
    (zero-padded to ``block_k`` columns, B_flat with it), then ``fused_matmul``. Rows are padded to
    ``block_m`` (a copy of x, only when T is not a multiple)."""
    cfg = config or MosaicConfig()
    num_tokens = x_td.shape[0]
    num_experts, rank, d_out = lora_b_ero.shape
    h_ter = xla.shrink_all(x_td, lora_a_edr)
    hc_tn = xla.masked_coefficients(h_ter, ids_tk, weights_tk, scaling_e, x_td.dtype)
    hc_tn = _pad_to(_pad_to(hc_tn, 1, cfg.block_k), 0, cfg.block_m)
    b_no = _pad_to(lora_b_ero.reshape(num_experts * rank, d_out).astype(x_td.dtype), 0, cfg.block_k)
    y_to = fused_matmul(_pad_to(x_td, 0, cfg.block_m), w_do, hc_tn, b_no, config=cfg, interpret=interpret)
    return y_to[:num_tokens]


def require_hopper() -> None:
    """NotImplementedError unless the default device is a Hopper GPU (wgmma is sm_90a only, not Blackwell)."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError("mosaic_gpu needs a GPU (or mosaic_gpu_interpret)")
    device = jax.devices()[0]
    if str(getattr(device, "compute_capability", "")) != "9.0":
        raise NotImplementedError(
            f"mosaic_gpu's kernel uses wgmma (Hopper, sm_90); this is {device.device_kind}"
        )


def make_ops(fallback: Any, *, interpret: bool = False) -> Any:
    """``fallback`` (the GPU decode backend's ops, or its interpret twin) whose inference forward, for a call
    that ``fits``, is ``fused_forward``; everything else, and all of training, is ``fallback``'s."""
    if not interpret:
        require_hopper()

    def kernel(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e):  # noqa: ANN001, ANN202
        if not fits(x_td, w_do):
            return None
        return fused_forward(
            x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e, interpret=interpret
        )

    return kernel_first(fallback, "mosaic_gpu", kernel)
