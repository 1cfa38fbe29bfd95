"""Pallas GPU (Triton) backend: grouped shrink / expand / tgmm, and the base GEMM with the LoRA fused in.

Kernels (all grids static, so ``interpret=True`` runs each one on CPU):

* ``_gmm``: a grouped matmul over rows in expert order. Grid = (work item, column tile); a work item
  is the part of one row tile owned by one expert (``routing.work_items``), so a tile shared by two
  experts is visited twice with complementary row masks. Rows are gathered from token- or slot-major
  inputs through index arrays and scattered the same way, so no sorted copy of ``x`` is made.
* ``_tgmm``: the weight gradient ``G[e] = lhs_e^T rhs_e``. Grid = (expert, K tile, N tile); each
  program walks its expert's rows with a dynamic trip count, an empty expert writes zeros.
* ``_token_shrink``: for a few tokens (decode) the routing sort costs more than the work; each program
  takes a block of tokens and gathers the rows of ``A[e_tj]`` it needs (``k * d * r`` elements/token).
* ``_fused``: ``x @ W`` with the LoRA expand as an extra K block. The expert columns ``c = e * r + i`` of
  ``B_flat = B.reshape(E * r, O)`` are the extra contraction rows; the matching ``H[t, c]`` is built in
  registers from the slot-major ``hc[t, j, i]`` where ``e_tj == e`` (zeros elsewhere). Blocks of expert
  columns that no token of the tile routes to are skipped (decode touches 2 of 28 experts).

In inference (nothing differentiated) with ``w`` given and at most ``DECODE_MAX_TOKENS`` tokens,
``PallasGpuOps.forward`` runs instead the one-launch decode kernel of ``pallas_gpu_decode.py`` (base GEMV,
shrink and expand in one kernel, no routing sort); with many expert columns (E * r > 1024) and rank <= 16, up to
64 rows (T * k), XLA's gathered forward (``GATHER_FORWARD_MAX_ROWS``). Training and larger T use the kernels above.

Index arithmetic: masked-off lanes get out-of-range indices, never clamped ones, so a masked store can
never alias a live row (interpret mode writes masked lanes back, so an alias would lose data) and the
column indices stay ``start + arange`` so Triton keeps the loads contiguous.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora import pallas_gpu_decode, xla
from pallas_kernels.grouped_lora.common import cdiv, dot_precision, pow2
from pallas_kernels.grouped_lora.routing import RoutingPlan, num_work_items, work_items

# Above this many expert columns (E * r) the fused extra-K block costs more than a separate expand.
FUSED_MAX_EXPERT_COLUMNS = 1024
# The token-major shrink is used at or below this many tokens (no routing sort at decode).
TOKEN_SHRINK_MAX_TOKENS = 16


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, pow2(n)))


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Tile sizes of the fused GEMM; ``for_tokens`` picks them from the token count."""

    block_t: int
    block_o: int
    block_d: int
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def for_tokens(cls, num_tokens: int) -> FusedConfig:
        if num_tokens <= 16:  # decode: memory-bound on W; narrow column tiles give every SM a program
            return cls(16, 32, 256, num_warps=4, num_stages=4)
        if num_tokens <= 64:
            return cls(64, 64, 128, num_warps=4, num_stages=4)
        return cls(128, 128, 64, num_warps=8, num_stages=3)


# The benchmark may set this to sweep tile sizes; None means FusedConfig.for_tokens.
FUSED_CONFIG_OVERRIDE: FusedConfig | None = None


def _params(num_warps: int = 4, num_stages: int = 3) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------
# Grouped matmul over expert-sorted rows.
def _gmm_kernel(items_ref, lhs_idx_ref, out_idx_ref, lhs_ref, w_ref, out_ref, *, bm, bn, bk, transpose_w):  # noqa: ANN001, ANN202
    item, col_block = pl.program_id(0), pl.program_id(1)
    k_dim = lhs_ref.shape[1]
    n_dim = out_ref.shape[1]
    group, start, lo, hi = items_ref[0, item], items_ref[1, item], items_ref[2, item], items_ref[3, item]

    @pl.when(hi > lo)
    def _():
        rows = start + jnp.arange(bm, dtype=jnp.int32)
        rmask = (rows >= lo) & (rows < hi)
        src = plgpu.load(lhs_idx_ref.at[rows], mask=rmask, other=lhs_ref.shape[0])
        dst = plgpu.load(out_idx_ref.at[rows], mask=rmask, other=out_ref.shape[0])
        dst = jnp.where(rmask, dst, out_ref.shape[0])
        cols = col_block * bn + jnp.arange(bn, dtype=jnp.int32)
        cmask = cols < n_dim

        def body(kb, acc):  # noqa: ANN001, ANN202
            kk = kb * bk + jnp.arange(bk, dtype=jnp.int32)
            kmask = kk < k_dim
            a_mk = plgpu.load(
                lhs_ref.at[src[:, None], kk[None, :]], mask=rmask[:, None] & kmask[None, :], other=0
            )
            wmask = kmask[:, None] & cmask[None, :]
            if transpose_w:  # W[e] stored [N, K]
                w_kn = plgpu.load(w_ref.at[group, cols[None, :], kk[:, None]], mask=wmask, other=0)
            else:
                w_kn = plgpu.load(w_ref.at[group, kk[:, None], cols[None, :]], mask=wmask, other=0)
            return acc + jnp.dot(
                a_mk.astype(w_kn.dtype),
                w_kn,
                preferred_element_type=jnp.float32,
                precision=dot_precision(w_kn.dtype),
            )

        acc = lax.fori_loop(0, cdiv(k_dim, bk), body, jnp.zeros((bm, bn), jnp.float32))
        plgpu.store(
            out_ref.at[dst[:, None], cols[None, :]],
            acc.astype(out_ref.dtype),
            mask=rmask[:, None] & cmask[None, :],
        )


def _gmm(
    lhs_lk: Array,
    lhs_index_m: Int[Array, " M"],
    w_ekn: Array,
    out_index_m: Int[Array, " M"],
    out_rows: int,
    plan: RoutingPlan,
    *,
    transpose_w: bool,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> Array:
    """out[out_index[m]] = lhs[lhs_index[m]] @ W[expert_of_row[m]] for every row m (others untouched)."""
    k_dim = lhs_lk.shape[1]
    n_dim = w_ekn.shape[1] if transpose_w else w_ekn.shape[2]
    bm = 64 if plan.num_rows > 16 else 16
    bn, bk = _clamp_pow2(n_dim, 16, 128), _clamp_pow2(k_dim, 16, 64)
    items = work_items(plan, bm)
    n_items = num_work_items(plan.num_rows, plan.num_experts, bm)
    kernel = functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, transpose_w=transpose_w)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((out_rows, n_dim), out_dtype),
        grid=(n_items, cdiv(n_dim, bn)),
        compiler_params=_params(4, 3),
        interpret=interpret,
        name="lora_gmm",
    )(items, lhs_index_m, out_index_m, lhs_lk, w_ekn)


# ----------------------------------------------------------------------------------------------------
# Weight gradient: per expert, lhs rows^T @ rhs rows.
def _tgmm_kernel(off_ref, lhs_idx_ref, rhs_idx_ref, lhs_ref, rhs_ref, out_ref, *, bm, bk, bn):  # noqa: ANN001, ANN202
    group, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k_dim, n_dim = out_ref.shape[1], out_ref.shape[2]
    lo, hi = off_ref[group], off_ref[group + 1]
    kk = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    nn = nb * bn + jnp.arange(bn, dtype=jnp.int32)
    kmask, nmask = kk < k_dim, nn < n_dim

    def body(chunk, acc):  # noqa: ANN001, ANN202
        rows = lo + chunk * bm + jnp.arange(bm, dtype=jnp.int32)
        rmask = rows < hi
        li = plgpu.load(lhs_idx_ref.at[rows], mask=rmask, other=lhs_ref.shape[0])
        ri = plgpu.load(rhs_idx_ref.at[rows], mask=rmask, other=rhs_ref.shape[0])
        a_mk = plgpu.load(lhs_ref.at[li[:, None], kk[None, :]], mask=rmask[:, None] & kmask[None, :], other=0)
        b_mn = plgpu.load(rhs_ref.at[ri[:, None], nn[None, :]], mask=rmask[:, None] & nmask[None, :], other=0)
        dims = (((0,), (0,)), ((), ()))
        return acc + lax.dot_general(
            a_mk.astype(b_mn.dtype),
            b_mn,
            dims,
            preferred_element_type=jnp.float32,
            precision=dot_precision(b_mn.dtype),
        )

    acc = lax.fori_loop(0, (hi - lo + bm - 1) // bm, body, jnp.zeros((bk, bn), jnp.float32))
    plgpu.store(
        out_ref.at[group, kk[:, None], nn[None, :]],
        acc.astype(out_ref.dtype),
        mask=kmask[:, None] & nmask[None, :],
    )


# ----------------------------------------------------------------------------------------------------
# Token-major shrink for a few tokens: no routing sort.
def _token_shrink_kernel(ids_ref, x_ref, w_ref, out_ref, *, bt, bk, bn, top_k, transpose_w):  # noqa: ANN001, ANN202
    n_tok, k_dim = x_ref.shape
    n_dim = out_ref.shape[2]
    toks = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
    tmask = toks < n_tok
    nn = jnp.arange(bn, dtype=jnp.int32)
    nmask = nn < n_dim
    for j in range(top_k):
        ids = plgpu.load(ids_ref.at[toks, j], mask=tmask, other=w_ref.shape[0])

        def body(kb, acc, ids=ids):  # noqa: ANN001, ANN202
            kk = kb * bk + jnp.arange(bk, dtype=jnp.int32)
            kmask = kk < k_dim
            x_tk = plgpu.load(
                x_ref.at[toks[:, None], kk[None, :]], mask=tmask[:, None] & kmask[None, :], other=0
            )
            mask3 = tmask[:, None, None] & kmask[None, :, None] & nmask[None, None, :]
            if transpose_w:
                w_tkn = plgpu.load(
                    w_ref.at[ids[:, None, None], nn[None, None, :], kk[None, :, None]], mask=mask3, other=0
                )
            else:
                w_tkn = plgpu.load(
                    w_ref.at[ids[:, None, None], kk[None, :, None], nn[None, None, :]], mask=mask3, other=0
                )
            prod = x_tk.astype(jnp.float32)[:, :, None] * w_tkn.astype(jnp.float32)
            return acc + jnp.sum(prod, axis=1)

        acc = lax.fori_loop(0, cdiv(k_dim, bk), body, jnp.zeros((bt, bn), jnp.float32))
        plgpu.store(out_ref.at[toks[:, None], j, nn[None, :]], acc, mask=tmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------------
# x @ W with the LoRA expand as an extra block of contraction rows.
def _fused_kernel(x_ref, w_ref, hc_ref, ids_ref, b_ref, o_ref, *, cfg: FusedConfig, rank, top_k):  # noqa: ANN001, ANN202
    bm, bn, bk, bc = cfg.block_t, cfg.block_o, cfg.block_d, cfg.block_c
    n_tok, d_in = x_ref.shape
    d_out = o_ref.shape[1]
    n_cols = b_ref.shape[0]  # E * r
    row0, col0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    rmask = rows < n_tok
    cols = col0 + jnp.arange(bn, dtype=jnp.int32)
    cmask = cols < d_out

    def base_body(kb, acc):  # noqa: ANN001, ANN202
        x_mk = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(kb * bk, bk)], mask=rmask[:, None], other=0)
        w_kn = plgpu.load(w_ref.at[pl.ds(kb * bk, bk), pl.ds(col0, bn)], mask=cmask[None, :], other=0)
        return acc + jnp.dot(
            x_mk, w_kn, preferred_element_type=jnp.float32, precision=dot_precision(w_kn.dtype)
        )

    if d_in % bk:
        raise NotImplementedError(f"fused kernel needs d_in % {bk} == 0, got {d_in}")
    acc = lax.fori_loop(0, d_in // bk, base_body, jnp.zeros((bm, bn), jnp.float32))

    # [bm] per slot: expert ids, -1 for rows past the end.
    ids = [jnp.where(rmask, plgpu.load(ids_ref.at[rows, j], mask=rmask, other=-1), -1) for j in range(top_k)]

    def lora_body(cb, acc):  # noqa: ANN001, ANN202
        c = cb * bc + jnp.arange(bc, dtype=jnp.int32)
        e_c, i_c = c // rank, c % rank
        e_lo, e_hi = (cb * bc) // rank, (cb * bc + bc - 1) // rank
        present = jnp.zeros((), jnp.int32)
        for ids_j in ids:
            present = jnp.maximum(present, jnp.max(((ids_j >= e_lo) & (ids_j <= e_hi)).astype(jnp.int32)))

        def add_block(acc):  # noqa: ANN001, ANN202
            h_mc = jnp.zeros((bm, bc), jnp.float32)
            for j, ids_j in enumerate(ids):
                hit = ids_j[:, None] == e_c[None, :]
                h_mc += plgpu.load(hc_ref.at[rows[:, None], j, i_c[None, :]], mask=hit, other=0).astype(
                    jnp.float32
                )
            b_cn = plgpu.load(
                b_ref.at[pl.ds(cb * bc, bc), pl.ds(col0, bn)],
                mask=(c < n_cols)[:, None] & cmask[None, :],
                other=0,
            )
            return acc + jnp.dot(
                h_mc.astype(b_cn.dtype),
                b_cn,
                preferred_element_type=jnp.float32,
                precision=dot_precision(b_cn.dtype),
            )

        return lax.cond(present > 0, add_block, lambda acc: acc, acc)

    acc = lax.fori_loop(0, cdiv(n_cols, bc), lora_body, acc)
    plgpu.store(
        o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)],
        acc.astype(o_ref.dtype),
        mask=rmask[:, None] & cmask[None, :],
    )


@dataclasses.dataclass(frozen=True)
class PallasGpuOps:
    """The ops of ``vjp.KernelOps`` on Pallas Triton kernels."""

    interpret: bool = False
    name: str = "pallas_gpu"

    def shrink(
        self, x_td: Float[Array, "T K"], w_ekn: Array, plan: RoutingPlan, *, transpose_w: bool = False
    ) -> Float[Array, "T k N"]:
        n_dim = w_ekn.shape[1] if transpose_w else w_ekn.shape[2]
        if plan.num_tokens <= TOKEN_SHRINK_MAX_TOKENS:
            bt, bn = 16, pow2(n_dim)
            bk = max(4, 8192 // (bt * bn))
            kernel = functools.partial(
                _token_shrink_kernel, bt=bt, bk=bk, bn=bn, top_k=plan.top_k, transpose_w=transpose_w
            )
            ids_tk = plan.expert_ids_tk
            return pl.pallas_call(
                kernel,
                out_shape=jax.ShapeDtypeStruct((plan.num_tokens, plan.top_k, n_dim), jnp.float32),
                grid=(cdiv(plan.num_tokens, bt),),
                compiler_params=_params(4, 2),
                interpret=self.interpret,
                name="lora_token_shrink",
            )(ids_tk, x_td, w_ekn)
        h_mn = _gmm(
            x_td,
            plan.token_of_row,
            w_ekn,
            plan.slot_of_row,
            plan.num_rows,
            plan,
            transpose_w=transpose_w,
            out_dtype=jnp.float32,
            interpret=self.interpret,
        )
        return h_mn.reshape(plan.num_tokens, plan.top_k, n_dim)

    def expand(
        self,
        h_tkr: Float[Array, "T k R"],
        w_ekn: Array,
        plan: RoutingPlan,
        *,
        transpose_w: bool = False,
        out_dtype: jnp.dtype = jnp.float32,
    ) -> Float[Array, "T N"]:
        h_mr = h_tkr.reshape(plan.num_rows, -1)
        if plan.top_k == 1:  # one row per token: scatter straight into the output
            out_index, out_rows, dtype = plan.token_of_row, plan.num_tokens, out_dtype
        else:  # rows land in expert order, then each token sums its k rows
            out_index, out_rows, dtype = (
                jnp.arange(plan.num_rows, dtype=jnp.int32),
                plan.num_rows,
                jnp.float32,
            )
        y = _gmm(
            h_mr,
            plan.slot_of_row,
            w_ekn,
            out_index,
            out_rows,
            plan,
            transpose_w=transpose_w,
            out_dtype=dtype,
            interpret=self.interpret,
        )
        if plan.top_k == 1:
            return y
        return y[plan.row_of_slot].reshape(plan.num_tokens, plan.top_k, -1).sum(axis=1).astype(out_dtype)

    def tgmm(
        self, lhs: Array, rhs: Array, plan: RoutingPlan, *, out_dtype: jnp.dtype
    ) -> Float[Array, "E K N"]:
        def rows_and_index(v):  # noqa: ANN001, ANN202
            if v.ndim == 2:
                return v, plan.token_of_row
            return v.reshape(plan.num_rows, -1), plan.slot_of_row

        lhs_lk, lhs_index = rows_and_index(lhs)
        rhs_rn, rhs_index = rows_and_index(rhs)
        k_dim, n_dim = lhs_lk.shape[1], rhs_rn.shape[1]
        bm, bk, bn = 64, _clamp_pow2(k_dim, 16, 64), _clamp_pow2(n_dim, 16, 64)
        return pl.pallas_call(
            functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn),
            out_shape=jax.ShapeDtypeStruct((plan.num_experts, k_dim, n_dim), out_dtype),
            grid=(plan.num_experts, cdiv(k_dim, bk), cdiv(n_dim, bn)),
            compiler_params=_params(4, 3),
            interpret=self.interpret,
            name="lora_tgmm",
        )(plan.group_offsets, lhs_index, rhs_index, lhs_lk, rhs_rn)

    def fused(
        self,
        x_td: Float[Array, "T D"],
        w_do: Float[Array, "D O"],
        hc_tkr: Float[Array, "T k R"],
        lora_b_ero: Float[Array, "E R O"],
        plan: RoutingPlan,
        out_dtype: jnp.dtype,
    ) -> Float[Array, "T O"] | None:
        num_experts, rank, d_out = lora_b_ero.shape
        if num_experts * rank > FUSED_MAX_EXPERT_COLUMNS:
            return None  # the caller falls back to a base GEMM plus the grouped expand
        cfg = FUSED_CONFIG_OVERRIDE or FusedConfig.for_tokens(plan.num_tokens)
        d_in = x_td.shape[1]
        block_d = min(cfg.block_d, d_in & -d_in)  # the largest power of two dividing d_in, at most block_d
        if block_d < 16:
            return None
        cfg = dataclasses.replace(cfg, block_d=block_d)
        ids_tk = plan.expert_ids_tk
        kernel = functools.partial(_fused_kernel, cfg=cfg, rank=rank, top_k=plan.top_k)
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((plan.num_tokens, d_out), out_dtype),
            grid=(cdiv(plan.num_tokens, cfg.block_t), cdiv(d_out, cfg.block_o)),
            compiler_params=_params(cfg.num_warps, cfg.num_stages),
            interpret=self.interpret,
            name="lora_fused_gemm",
        )(x_td, w_do, hc_tkr.astype(lora_b_ero.dtype), ids_tk, lora_b_ero.reshape(num_experts * rank, d_out))

    def forward(
        self,
        x_td: Float[Array, "T D"],
        w_do: Float[Array, "D O"] | None,
        lora_a_edr: Float[Array, "E D R"],
        lora_b_ero: Float[Array, "E R O"],
        expert_ids_tk: Int[Array, "T K"],
        expert_weights_tk: Float[Array, "T K"],
        scaling_e: Float[Array, " E"],
    ) -> Float[Array, "T O"] | None:
        """Inference: the one-launch decode kernel for a few tokens; with many experts, up to
        ``GATHER_FORWARD_MAX_ROWS`` rows, XLA's gathered forward; None leaves the call to shrink + expand."""
        args = (x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e)
        y = pallas_gpu_decode.forward_if_few_tokens(*args, interpret=self.interpret)
        if y is None and w_do is not None and _gathers(lora_a_edr, expert_ids_tk):
            return xla.gather_forward(*args)
        return y


# Up to this many rows (T * k), an inference call with more than ``xla.DENSE_MAX_EXPERT_COLUMNS`` expert columns
# and rank <= ``GATHER_FORWARD_MAX_RANK`` runs ``xla.gather_forward`` (each row's experts gathered, as MeteoRA's
# bmm-torch v1 does) instead of the sorted grouped kernels, which at few rows pay mostly for routing and empty
# groups. Measured on an H100 (session 18, 4096->4096, 64 tokens, k = 1, skewed; moe_lora_h100_s18_gather.json):
# r = 16: 100.1 -> 42.1 us (E = 128), 117.7 -> 42.0 us (E = 1024); r = 64: 108.5 -> 185.6, 126.6 -> 185.3 us
# (the gathered [T, k, d, r] copies grow with r), hence the rank limit. Knobs ``pallas_gather`` (0 = off) and
# ``pallas_gather_rank``.
GATHER_FORWARD_MAX_ROWS = 64
GATHER_FORWARD_MAX_RANK = 16


def _gathers(lora_a_edr: Array, expert_ids_tk: Array) -> bool:
    """Whether an inference call with these experts and routing takes ``xla.gather_forward``."""
    num_experts, _, rank = lora_a_edr.shape
    rows = expert_ids_tk.size
    # above ``xla.GATHER_MAX_ROWS`` the gather itself returns None (sorted rows), whatever this limit says
    return (
        not xla.dense_fits(num_experts * rank)
        and rank <= GATHER_FORWARD_MAX_RANK
        and 0 < rows <= GATHER_FORWARD_MAX_ROWS
    )


def make_ops(*, interpret: bool = False) -> PallasGpuOps:
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError("pallas_gpu needs a GPU (or the _interpret variant)")
    return PallasGpuOps(interpret=interpret)
