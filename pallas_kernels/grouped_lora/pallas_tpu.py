"""Pallas Mosaic TPU backend: grouped shrink / expand (``_gmm``) and the weight gradient (``_tgmm``).

Both kernels walk the rows of the ``RoutingPlan`` in expert order, in the shape of JAX's megablox: the
rows are gathered once (in XLA) into an expert-sorted ``[M_pad, K]`` operand, and every grid step moves
whole blocks through ``BlockSpec`` index maps driven by scalar-prefetched work items
(``pltpu.PrefetchScalarGridSpec``: the item arrays sit in SMEM before the grid starts, so an index map
can read them to pick the next DMA).

* Work items are ``routing.work_items``: (expert, row tile, lo, hi), one per (tile, expert) pair that
  share rows, in row order. Their count is a static worst case, so the grid is static and
  ``interpret=True`` runs every kernel on CPU; unused items have ``lo == hi`` and ``pl.when`` skips them.
  Unused items are re-pointed at the last used item's tile and expert: their block indices then repeat
  the previous step's, so the pipeline issues no DMA for them and, above all, never leaves an output
  block it has not written (on TPU an output block is written back whenever its index changes; a
  padding item pointing at tile 0 would write uninitialised VMEM over it).
* ``_gmm``: ``out[rows of e] = lhs[rows of e] @ W[e]``. Grid = (column tile, item, K tile); items of one
  row tile are consecutive, so its output block stays resident in VMEM while each expert of the tile
  writes its rows (a row mask selects them, the first write of a tile leaves the others untouched). The
  K loop accumulates in an f32 VMEM scratch. Used for shrink (K = d_in, N = r), expand (K = r,
  N = d_out) and their transposed-weight forms in the backward pass.
* ``_tgmm``: ``G[e] = lhs[rows of e]^T rhs[rows of e]``. Grid = (K tile, N tile, item); the items of one
  expert are consecutive, so the f32 accumulator is zeroed on an expert's first item and stored on its
  last. Rows outside ``[lo, hi)`` are masked to zero on both sides. Experts with no rows have no items;
  their blocks are never written and are zeroed afterwards in XLA (``E * K * N`` elements: small).

Block sizes (TPU tiling: the last two block dims must be multiples of (8, 128), or the full dims):

* rows: ``block_rows`` is a multiple of 16 (bf16 packs two rows per sublane), 128 from 512 rows up (one
  MXU pass), smaller below so decode does not pad 2 rows to 128.
* the rank ``r`` is kept as a **full-array dimension**, never padded to 128 lanes in HBM: ``h`` is
  ``[M, r]`` and ``A``/``B`` are read as ``[tk, r]`` / ``[r, tn]`` blocks. Mosaic pads to the vreg
  layout inside VMEM anyway, while padding in HBM would multiply the bytes of ``A``, ``B`` and ``h`` by
  ``128 / r`` (16x at r=8) and add copy kernels around every call; the MXU is under-filled for r < 128
  whatever the layout, and these ops are bandwidth-bound on x / y, not on r.
* d_in / d_out: tiles of 512, 256 or 128 when the dimension is a multiple of 128, else the full
  dimension (legal for any size; only very wide non-128-multiple dims would strain VMEM).

Not done: the row gather/scatter runs in XLA (``k * T * d_in`` extra bytes for the shrink's sorted
copy of ``x``); a manual-DMA gather (``memory_space=pl.ANY`` + ``pltpu.make_async_copy`` per row)
would remove it. There is no fused base GEMM on TPU (``fused = None``): the base ``x @ W`` is XLA's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora.common import cdiv, dot_precision
from pallas_kernels.grouped_lora.routing import RoutingPlan, work_items


def block_rows_for(num_rows: int) -> int:
    """Row tile: 128 for prefill, down to 16 (about four tiles) for few rows; always a multiple of 16."""
    quarter = max(1, num_rows // 4)
    return max(16, min(128, 1 << (quarter - 1).bit_length()))


def _lane_tile(dim: int) -> int:
    """A tile of a minor (lane) dimension: 512/256/128 if one divides it, else the whole dimension."""
    for tile in (512, 256, 128):
        if dim % tile == 0:
            return tile
    return dim


def _items(plan: RoutingPlan, bm: int) -> tuple[Int[Array, " W"], ...]:
    """(expert, row tile, lo, hi) per work item, unused items pointing at the last used one's blocks."""
    group_w, start_w, lo_w, hi_w = work_items(plan, bm)
    used_w = hi_w > lo_w
    last = jnp.maximum(jnp.sum(used_w.astype(jnp.int32)) - 1, 0)  # used items come first
    tile_w = start_w // bm
    group_w = jnp.where(used_w, group_w, group_w[last])
    tile_w = jnp.where(used_w, tile_w, tile_w[last])
    return group_w, tile_w, lo_w, hi_w


def _row_mask(tile, lo, hi, bm: int, width: int) -> Array:  # noqa: ANN001
    """[bm, width] bool: rows of this tile that belong to the item's expert."""
    rows = tile * bm + lax.broadcasted_iota(jnp.int32, (bm, width), 0)
    return (rows >= lo) & (rows < hi)


# ----------------------------------------------------------------------------------------------------
# Grouped matmul over expert-sorted rows.
def _gmm_kernel(group_ref, tile_ref, lo_ref, hi_ref, lhs_ref, w_ref, out_ref, acc_ref, *, bm, transpose_w):  # noqa: ANN001, ANN202
    del group_ref  # only the index maps read it
    item, k_i = pl.program_id(1), pl.program_id(2)
    lo, hi = lo_ref[item], hi_ref[item]

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi > lo)
    def _accumulate():
        w = w_ref[...]
        dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(
            lhs_ref[...].astype(w.dtype),
            w,
            dims,
            preferred_element_type=jnp.float32,
            precision=dot_precision(w.dtype),
        )

    @pl.when((hi > lo) & (k_i == pl.num_programs(2) - 1))
    def _store():
        mask = _row_mask(tile_ref[item], lo, hi, bm, out_ref.shape[1])
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _gmm(
    lhs_mk: Float[Array, "Mp K"],
    w_ekn: Array,
    plan: RoutingPlan,
    bm: int,
    *,
    transpose_w: bool,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> Float[Array, "Mp N"]:
    """Row m of the result is ``lhs[m] @ W[expert_of_row[m]]``; rows past ``M`` are undefined."""
    m_pad, k_dim = lhs_mk.shape
    n_dim = w_ekn.shape[1] if transpose_w else w_ekn.shape[2]
    tk, tn = _lane_tile(k_dim), _lane_tile(n_dim)
    items = _items(plan, bm)

    def lhs_map(n_i, item, k_i, group_w, tile_w, lo_w, hi_w):  # noqa: ANN001, ANN202
        return tile_w[item], k_i

    def w_map(n_i, item, k_i, group_w, tile_w, lo_w, hi_w):  # noqa: ANN001, ANN202
        return (group_w[item], n_i, k_i) if transpose_w else (group_w[item], k_i, n_i)

    def out_map(n_i, item, k_i, group_w, tile_w, lo_w, hi_w):  # noqa: ANN001, ANN202
        return tile_w[item], n_i

    w_block = (None, tn, tk) if transpose_w else (None, tk, tn)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, bm=bm, transpose_w=transpose_w),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_dim), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(n_dim // tn, items[0].shape[0], k_dim // tk),
            in_specs=[pl.BlockSpec((bm, tk), lhs_map), pl.BlockSpec(w_block, w_map)],
            out_specs=pl.BlockSpec((bm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((bm, tn), jnp.float32)],
        ),
        # Items revisit one output tile in turn, and K accumulates: only the column axis is parallel.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="lora_gmm",
    )(*items, lhs_mk, w_ekn)


# ----------------------------------------------------------------------------------------------------
# Weight gradient: per expert, lhs rows^T @ rhs rows.
def _tgmm_kernel(group_ref, tile_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, bm):  # noqa: ANN001, ANN202
    item, n_items = pl.program_id(2), pl.num_programs(2)
    group, lo, hi = group_ref[item], lo_ref[item], hi_ref[item]
    prev_group = group_ref[jnp.maximum(item - 1, 0)]
    next_group = group_ref[jnp.minimum(item + 1, n_items - 1)]

    @pl.when((item == 0) | (prev_group != group))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi > lo)
    def _accumulate():
        tile = tile_ref[item]
        in_dtype = rhs_ref.dtype
        # Rows of other experts in this tile (and padding rows) must not contribute. The select runs
        # in f32 because older TPUs have no bf16 VPU; the transpose is explicit so the MXU sees a
        # plain [tk, bm] @ [bm, tn] (as in megablox's tgmm).
        lhs_mk = lhs_ref[...].astype(jnp.float32)
        rhs_mn = rhs_ref[...].astype(jnp.float32)
        lhs_mk = jnp.where(_row_mask(tile, lo, hi, bm, lhs_mk.shape[1]), lhs_mk, 0.0)
        rhs_mn = jnp.where(_row_mask(tile, lo, hi, bm, rhs_mn.shape[1]), rhs_mn, 0.0)
        acc_ref[...] += jnp.dot(
            lhs_mk.T.astype(in_dtype),
            rhs_mn.astype(in_dtype),
            preferred_element_type=jnp.float32,
            precision=dot_precision(in_dtype),
        )

    @pl.when((item == n_items - 1) | (next_group != group))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm(
    lhs_mk: Float[Array, "Mp K"],
    rhs_mn: Float[Array, "Mp N"],
    plan: RoutingPlan,
    bm: int,
    *,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> Float[Array, "E K N"]:
    k_dim, n_dim = lhs_mk.shape[1], rhs_mn.shape[1]
    tk, tn = _lane_tile(k_dim), _lane_tile(n_dim)
    items = _items(plan, bm)

    def lhs_map(k_i, n_i, item, group_w, tile_w, lo_w, hi_w):  # noqa: ANN001, ANN202
        return tile_w[item], k_i

    def rhs_map(k_i, n_i, item, group_w, tile_w, lo_w, hi_w):  # noqa: ANN001, ANN202
        return tile_w[item], n_i

    def out_map(k_i, n_i, item, group_w, tile_w, lo_w, hi_w):  # noqa: ANN001, ANN202
        return group_w[item], k_i, n_i

    g_ekn = pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm),
        out_shape=jax.ShapeDtypeStruct((plan.num_experts, k_dim, n_dim), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(k_dim // tk, n_dim // tn, items[0].shape[0]),
            in_specs=[pl.BlockSpec((bm, tk), lhs_map), pl.BlockSpec((bm, tn), rhs_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="lora_tgmm",
    )(*items, lhs_mk, rhs_mn)
    # Experts without rows have no work item, so their blocks were never written.
    return jnp.where(plan.group_sizes[:, None, None] > 0, g_ekn, jnp.zeros((), out_dtype))


# ----------------------------------------------------------------------------------------------------
def _sorted_rows(v: Array, plan: RoutingPlan, m_pad: int) -> Float[Array, "Mp K"]:
    """[T, K] (by token) or [T, k, K] (by slot) -> [M_pad, K] in expert order, zero padding rows."""
    v_mk = v[plan.token_of_row] if v.ndim == 2 else v.reshape(plan.num_rows, -1)[plan.slot_of_row]
    return jnp.pad(v_mk, ((0, m_pad - plan.num_rows), (0, 0)))


@dataclasses.dataclass(frozen=True)
class PallasTpuOps:
    """The ops of ``vjp.KernelOps`` on Pallas Mosaic TPU kernels."""

    interpret: bool = False
    name: str = "pallas_tpu"
    fused = None  # the base GEMM stays XLA's; see the module docstring

    def _blocking(self, plan: RoutingPlan) -> tuple[int, int]:
        bm = block_rows_for(plan.num_rows)
        return bm, cdiv(plan.num_rows, bm) * bm

    def shrink(
        self, x_td: Float[Array, "T K"], w_ekn: Array, plan: RoutingPlan, *, transpose_w: bool = False
    ) -> Float[Array, "T k N"]:
        """Token-major ``[T, K]`` or slot-major ``[T, k, K]`` input; slot-major ``[T, k, N]`` f32 out."""
        bm, m_pad = self._blocking(plan)
        h_mn = _gmm(
            _sorted_rows(x_td, plan, m_pad),
            w_ekn,
            plan,
            bm,
            transpose_w=transpose_w,
            out_dtype=jnp.float32,
            interpret=self.interpret,
        )
        return h_mn[plan.row_of_slot].reshape(plan.num_tokens, plan.top_k, -1)

    def expand(
        self,
        h_tkr: Float[Array, "T k R"],
        w_ekn: Array,
        plan: RoutingPlan,
        *,
        transpose_w: bool = False,
        out_dtype: jnp.dtype = jnp.float32,
    ) -> Float[Array, "T N"]:
        # Slot-major rows through the same grouped matmul, then each token sums its k rows in f32.
        y_tkn = self.shrink(h_tkr, w_ekn, plan, transpose_w=transpose_w)
        return y_tkn.sum(axis=1).astype(out_dtype)

    def tgmm(
        self, lhs: Array, rhs: Array, plan: RoutingPlan, *, out_dtype: jnp.dtype
    ) -> Float[Array, "E K N"]:
        bm, m_pad = self._blocking(plan)
        return _tgmm(
            _sorted_rows(lhs, plan, m_pad),
            _sorted_rows(rhs, plan, m_pad),
            plan,
            bm,
            out_dtype=out_dtype,
            interpret=self.interpret,
        )


def make_ops(*, interpret: bool = False) -> PallasTpuOps:
    if not interpret and jax.default_backend() != "tpu":
        raise NotImplementedError("pallas_tpu needs a TPU (or the _interpret variant)")
    return PallasTpuOps(interpret=interpret)
