"""Portable XLA backends: sorted rows + ``lax.ragged_dot``, and a dense-masked path.

Every backend implements the three ops that ``vjp.py`` composes into the forward and backward pass
(see ``vjp.KernelOps``):

* ``shrink``:  ``h[t, j] = x[t] @ W[e_tj]``                 token-major in, slot-major [T, k, N] out
* ``expand``:  ``y[t] = sum_j h[t, j] @ W[e_tj]``           slot-major in, token-major out
* ``tgmm``:    ``G[e] = sum_{rows of e} lhs[row]^T rhs[row]`` the weight gradients

``transpose_w`` reads ``W[e]`` as its transpose, so the backward pass never copies a weight.

* ``ragged``: gathers the rows into expert order (a copy of ``x`` of ``k * T`` rows) and calls
  ``ragged_dot``. Work and memory scale with the chosen experts only; the choice for many experts.
* ``dense``: computes every expert for every token and masks with a one-hot of the routing. Work is
  ``E / k`` times larger, but it is plain matmuls with no gathers: the choice when ``E * r`` is small
  (it is ``x @ A_flat`` with ``A_flat: [d, E * r]``).

A backend may also carry a ``forward``: a whole forward pass used when nothing is differentiated
(``vjp.grouped_lora_vjp``'s primal, i.e. inference; it may return None to leave a call to shrink +
expand). The shrink / expand contract is slot-major ([T, k, ...]) because the backward pass needs per-slot
values; an inference forward does not, so:

* ``masked_forward`` (``xla_masked``): ``(x @ A_flat) * coef_te @ B_flat`` with ``coef_te`` [T, E] the
  routing weight times scaling of each token's chosen experts and zero elsewhere. The dense path without
  its two one-hot contractions (select slots, scatter them back): one elementwise multiply instead.
* ``gather_forward`` (``xla_gather``): gathers the chosen experts' A and B ([T, k, d, r]) and contracts
  them per token. Reads only the chosen experts, so it is meant for decode (few rows, ``T * k`` at most
  ``GATHER_MAX_ROWS``; above that it hands over to ``masked_forward``).

Both round like ``vjp._forward``: ``h`` in float32, ``h * coef`` cast to B's dtype, float32 accumulation.
``masked_lowp_forward`` (``xla_masked_lowp``) is ``masked_forward`` writing the LoRA term and the base GEMM
in x's dtype when that is bf16 / f16 and summing them there (``common.add_base_low_precision``: no float32
[T, O] arrays), as torch PEFT does in bf16. ``auto_masked_forward``, the dense forward of ``xla`` (and so of
the automatic choice on GPU), takes it from ``LOW_PRECISION_SUM_MIN_TOKENS`` rows on: on the H200 it took a
4096-token Llama-3-8B prefill from 142.7 to 131.4 ms (session 8) and a batch-64 decode step from 10.25 to
9.84 ms (session 9, with the batched shrink; benchmarks/RESULTS.md). A single token (batch-1 decode) keeps the
float32 sum; on GPU the decode kernel serves it anyway.
``masked_batched_forward`` (``xla_masked_batched``) is ``masked_forward`` with the shrink as a matmul batched
over experts; ``auto_masked_forward`` takes it up to ``BATCHED_SHRINK_MAX_TOKENS`` rows (see there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels.grouped_lora import common
from pallas_kernels.grouped_lora.routing import RoutingPlan

_HIGHEST = lax.Precision.HIGHEST
# Above this many expert columns (E * r) the dense path does more work than the gathers it saves.
DENSE_MAX_EXPERT_COLUMNS = 1024
# Above this many rows (T * k) gathering per-row expert weights copies more than the dense path reads.
GATHER_MAX_ROWS = 64
# From this many rows on, ``auto_masked_forward`` sums base and LoRA in bf16 (no float32 [T, O] arrays).
# Measured on the H200 (benchmarks/RESULTS.md): prefill 4096 142.7 -> 131.4 ms (session 8); batch-64 decode
# 6,245 -> 6,503 tok/s with the batched shrink on (session 9; 6,332 -> 6,484 without it).
LOW_PRECISION_SUM_MIN_TOKENS = 2
# Up to this many rows ``auto_masked_forward`` shrinks with the matmul batched over experts: it reads A as
# stored ([E, d, r]) where the flat shrink made XLA relayout A to [d, E * r] at every decode step. Batch-64
# decode on the H200: 6,332 -> 6,540 tok/s, 128 fewer kernels a step (session 9). Untimed between 65 rows and
# prefill sizes, where the flat GEMM is the one measured; ``scripts/profile_decode.py`` ``+batched=N`` A/Bs it.
BATCHED_SHRINK_MAX_TOKENS = 64


def dense_fits(expert_columns: int) -> bool:
    """Whether ``expert_columns`` (E * r) are few enough for the dense paths (every token times every expert
    column); above ``DENSE_MAX_EXPERT_COLUMNS`` the backends take sorted rows (or, at few rows, gathers)."""
    return expert_columns <= DENSE_MAX_EXPERT_COLUMNS


def masked_forward(
    x_td: Array,
    w_do: Array | None,
    lora_a_edr: Array,
    lora_b_ero: Array,
    ids_tk: Array,
    weights_tk: Array,
    scaling_e: Array,
    *,
    batched_shrink: bool = False,
    low_precision_sum: bool = False,
) -> Array:
    """The dense forward with the routing applied as one [T, E] coefficient mask (see the module doc).
    ``low_precision_sum`` (``xla_masked_lowp``): see ``common.add_base_low_precision``."""
    if batched_shrink:
        h_ter = jnp.transpose(shrink_batched(x_td, lora_a_edr), (1, 0, 2))
    else:
        h_ter = shrink_all(x_td, lora_a_edr)
    return masked_forward_from_shrink(
        x_td, w_do, h_ter, lora_b_ero, ids_tk, weights_tk, scaling_e, low_precision_sum=low_precision_sum
    )


def shrink_all(x_td: Array, lora_a_edr: Array) -> Float[Array, "T E R"]:
    """[T, E, R]: every expert's shrink, the same contraction as DenseOps.shrink."""
    return jnp.einsum("td,edr->ter", x_td, lora_a_edr, precision=_HIGHEST, preferred_element_type=jnp.float32)


def shrink_batched(x_td: Array, lora_a_edr: Array) -> Float[Array, "E T R"]:
    """[E, T, R]: every expert's shrink from a matmul batched over experts. It reads A as stored ([E, d, r]),
    where ``shrink_all``'s flat form needs A as [d, E * r], a relayout XLA may redo every call; it costs a
    broadcast of x instead."""
    x_etd = jnp.broadcast_to(x_td, (lora_a_edr.shape[0], *x_td.shape))
    return jnp.einsum(
        "etd,edr->etr", x_etd, lora_a_edr, precision=_HIGHEST, preferred_element_type=jnp.float32
    )


def _coef_te(ids_tk: Array, weights_tk: Array, scaling_e: Array) -> Float[Array, "T E"]:
    """Routing weight times scaling, zero for experts a token did not pick. A token's k experts are distinct,
    so the sum over slots adds one weight to zeros (exact) and the product equals vjp's coef_tk; scaling is
    broadcast, not gathered."""
    hit_tke = ids_tk[:, :, None] == jnp.arange(scaling_e.shape[0], dtype=ids_tk.dtype)
    weight_te = jnp.sum(jnp.where(hit_tke, weights_tk.astype(jnp.float32)[:, :, None], 0.0), axis=1)
    return weight_te * scaling_e.astype(jnp.float32)[None, :]


def _masked_expand(
    x_td: Array,
    w_do: Array | None,
    h_ter: Array,
    coef_te: Array,
    lora_b_ero: Array,
    low_precision_sum: bool,
    residual_to: Array | None = None,
) -> Array:
    """``(h * coef) @ B_flat`` plus the base term (plus ``residual_to`` where given), summed in float32 or
    (``low_precision_sum``) x's dtype."""
    hc_ter = _weighted(h_ter, coef_te, lora_b_ero.dtype)
    # bf16 / f16: the expand writes x's dtype and the base GEMM adds it (common.add_base_low_precision)
    low = low_precision_sum and x_td.dtype != jnp.float32 and lora_b_ero.dtype == x_td.dtype
    y_to = jnp.einsum(
        "ter,ero->to",
        hc_ter,
        lora_b_ero,
        precision=_HIGHEST,
        preferred_element_type=x_td.dtype if low else jnp.float32,
    )
    if not low:
        y_to = common.add_base(x_td, w_do, y_to)
        return y_to if residual_to is None else y_to + residual_to
    if residual_to is not None:
        # Added to the expand first, so that XLA folds it into the expand GEMM's C and the base GEMM then
        # takes that sum as its C: base + LoRA + residual in two epilogues, the sum written once.
        y_to = y_to + residual_to.astype(y_to.dtype)
    return common.add_base_low_precision(x_td, w_do, y_to)


def shared_masked_forward(
    x_td: Array,
    ws_do: Sequence[Array],
    lora_as_edr: Sequence[Array],
    lora_bs_ero: Sequence[Array],
    ids_tk: Sequence[Array],
    weights_tk: Sequence[Array],
    scalings_e: Sequence[Array],
    *,
    low_precision_sum: bool,
) -> list[Array]:
    """``masked_forward`` of several projections that read the same ``x``, with ONE shrink GEMM over their
    experts' A concatenated (``x @ [A_1 | A_2 | ...]_flat``): at decode sizes each shrink is a small,
    latency-bound GEMM, so P of them cost about P times one. Every column is the same dot product as the
    projection's own shrink; the rest (mask, expand, base) is per projection as in ``masked_forward``.
    Measured SLOWER on the H200 at batch-64 decode (6,222 vs 6,332 tok/s, session 9: the kernel count did not
    fall, the concatenation costs what the GEMMs saved), so ``api.SHARED_SHRINK_MIN_TOKENS`` leaves it off."""
    h_tnr = shrink_all(x_td, jnp.concatenate(list(lora_as_edr), axis=0))
    outs, start = [], 0
    for w_do, a_edr, b_ero, ids, wts, scaling_e in zip(
        ws_do, lora_as_edr, lora_bs_ero, ids_tk, weights_tk, scalings_e, strict=True
    ):
        h_ter = h_tnr[:, start : start + a_edr.shape[0]]
        start += a_edr.shape[0]
        outs.append(
            masked_forward_from_shrink(
                x_td, w_do, h_ter, b_ero, ids, wts, scaling_e, low_precision_sum=low_precision_sum
            )
        )
    return outs


def flat_shrink_weights(lora_as_edr: Sequence[Array]) -> Float[Array, "D N"]:
    """``[A_1 | A_2 | ...]`` as one [d, sum(E * r)] matrix, each A flattened expert-major ([d, E * r], the
    column order of ``shrink_all``'s [T, E, R] output): the layout ``masked_forward_from_shrink`` reads
    ``x @ A`` in. A relayout of every A: meant to be built once per inference call, not per step."""
    return jnp.concatenate([jnp.transpose(a, (1, 0, 2)).reshape(a.shape[1], -1) for a in lora_as_edr], axis=1)


def _weighted(h_ter: Array, coef_te: Array, dtype: jnp.dtype) -> Array:
    return (h_ter * coef_te[:, :, None]).astype(dtype)


def masked_coefficients(
    h_ter: Float[Array, "T E R"],
    ids_tk: Array,
    weights_tk: Array,
    scaling_e: Array,
    dtype: jnp.dtype,
) -> Float[Array, "T N"]:
    """The dense path's expand input from every expert's shrink: ``h * coef`` flattened to [T, E * R] in
    ``dtype``, zero for experts a token did not pick; ``hc @ B_flat`` is the LoRA term
    (``pallas_gpu_expand`` adds it inside the base GEMM)."""
    t, e, r = h_ter.shape
    return _weighted(h_ter, _coef_te(ids_tk, weights_tk, scaling_e), dtype).reshape(t, e * r)


def masked_forward_from_shrink(
    x_td: Array,
    w_do: Array | None,
    h_ter: Float[Array, "T E R"],
    lora_b_ero: Array,
    ids_tk: Array,
    weights_tk: Array,
    scaling_e: Array,
    *,
    low_precision_sum: bool,
    residual_to: Array | None = None,
) -> Array:
    """``masked_forward`` given every expert's shrink ``h = x @ A`` (float32 [T, E, R]) computed by the caller,
    e.g. in one GEMM with other projections' shrinks and gates (``flat_shrink_weights``), plus ``residual_to``
    where given (with the bf16 sum: inside the GEMMs' epilogues, see ``_masked_expand``). Inference only."""
    coef_te = _coef_te(ids_tk, weights_tk, scaling_e)
    return _masked_expand(x_td, w_do, h_ter, coef_te, lora_b_ero, low_precision_sum, residual_to)


def masked_lowp_forward(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e):  # noqa: ANN001, ANN201
    """``masked_forward`` summing base and LoRA in x's dtype when that is bf16 / f16 (``xla_masked_lowp``)."""
    return masked_forward(
        x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e, low_precision_sum=True
    )


def auto_masked_forward(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e):  # noqa: ANN001, ANN201
    """``xla``'s dense forward: ``masked_lowp_forward`` from ``LOW_PRECISION_SUM_MIN_TOKENS`` rows on, else
    ``masked_forward``; the batched shrink up to ``BATCHED_SHRINK_MAX_TOKENS`` rows (the row count is static:
    the choices are made at trace time)."""
    return masked_forward(
        x_td,
        w_do,
        lora_a_edr,
        lora_b_ero,
        ids_tk,
        weights_tk,
        scaling_e,
        low_precision_sum=x_td.shape[0] >= LOW_PRECISION_SUM_MIN_TOKENS,
        batched_shrink=x_td.shape[0] <= BATCHED_SHRINK_MAX_TOKENS,
    )


def masked_batched_forward(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e):  # noqa: ANN001, ANN201
    """``masked_forward`` with the shrink batched over experts (``xla_masked_batched``)."""
    return masked_forward(
        x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e, batched_shrink=True
    )


def gather_forward(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e):  # noqa: ANN001, ANN201
    """Reads only each token's k experts. Above ``GATHER_MAX_ROWS`` it hands over to ``masked_forward`` for few
    expert columns, and returns None (sorted rows: shrink + expand) above ``DENSE_MAX_EXPERT_COLUMNS``, where
    the dense path would compute every one of E * r columns for every token."""
    if ids_tk.size > GATHER_MAX_ROWS:
        if not dense_fits(lora_a_edr.shape[0] * lora_a_edr.shape[2]):
            return None
        return masked_forward(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e)
    coef_tk = common.coef_tk(ids_tk, weights_tk, scaling_e)
    a_tkdr = jnp.take(lora_a_edr, ids_tk, axis=0)
    h_tkr = jnp.einsum("td,tkdr->tkr", x_td, a_tkdr, precision=_HIGHEST, preferred_element_type=jnp.float32)
    hc_tkr = (h_tkr * coef_tk[:, :, None]).astype(lora_b_ero.dtype)
    b_tkro = jnp.take(lora_b_ero, ids_tk, axis=0)
    y_to = jnp.einsum("tkr,tkro->to", hc_tkr, b_tkro, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return common.add_base(x_td, w_do, y_to)


def _slot_rows(v: Array, plan: RoutingPlan) -> Array:
    """[T, K] (by token) or [T, k, K] (by slot) -> [M, K] in row (expert) order."""
    if v.ndim == 2:
        return v[plan.token_of_row]
    return v.reshape(plan.num_rows, -1)[plan.slot_of_row]


@dataclasses.dataclass(frozen=True)
class RaggedOps:
    name: str = "xla_ragged"
    forward: Callable | None = None  # an inference-only forward (module doc); None: shrink + expand
    # ``lax.ragged_dot_general`` or a drop-in with its signature (the ``tokamax`` backend passes tokamax's)
    ragged_dot_general: Callable = lax.ragged_dot_general
    precision: Callable[[jnp.dtype], lax.Precision | None] = lambda dtype: _HIGHEST

    def shrink(
        self, x_td: Float[Array, "T K"], w_ekn: Array, plan: RoutingPlan, *, transpose_w: bool = False
    ) -> Float[Array, "T k N"]:
        x_mk = _slot_rows(x_td, plan)
        w_dims = 2 if transpose_w else 1
        dn = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([1], [w_dims]), ([], [])),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[0],
        )
        h_mn = self.ragged_dot_general(
            x_mk,
            w_ekn,
            plan.group_sizes,
            dn,
            precision=self.precision(x_mk.dtype),
            preferred_element_type=jnp.float32,
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
        y_mn = self.shrink(h_tkr, w_ekn, plan, transpose_w=transpose_w)
        return y_mn.sum(axis=1).astype(out_dtype)

    def tgmm(
        self, lhs: Array, rhs: Array, plan: RoutingPlan, *, out_dtype: jnp.dtype
    ) -> Float[Array, "E K N"]:
        dn = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[],
        )
        g_ekn = self.ragged_dot_general(
            _slot_rows(lhs, plan),
            _slot_rows(rhs, plan),
            plan.group_sizes,
            dn,
            precision=self.precision(lhs.dtype),
            preferred_element_type=jnp.float32,
        )
        return g_ekn.astype(out_dtype)

    fused = None


@dataclasses.dataclass(frozen=True)
class DenseOps:
    name: str = "xla_dense"
    forward: Callable | None = None

    def _onehot(self, plan: RoutingPlan) -> Float[Array, "T k E"]:
        return jax.nn.one_hot(plan.expert_ids_tk, plan.num_experts, dtype=jnp.float32)

    def shrink(
        self, x_td: Float[Array, "T K"], w_ekn: Array, plan: RoutingPlan, *, transpose_w: bool = False
    ) -> Float[Array, "T k N"]:
        spec = "tk,enk->ten" if transpose_w else "tk,ekn->ten"
        h_ten = jnp.einsum(spec, x_td, w_ekn, precision=_HIGHEST, preferred_element_type=jnp.float32)
        # [T, k, N]: pick each slot's expert.
        return jnp.einsum("ten,tje->tjn", h_ten, self._onehot(plan), precision=_HIGHEST)

    def expand(
        self,
        h_tkr: Float[Array, "T k R"],
        w_ekn: Array,
        plan: RoutingPlan,
        *,
        transpose_w: bool = False,
        out_dtype: jnp.dtype = jnp.float32,
    ) -> Float[Array, "T N"]:
        # [T, E, R]: the slots scattered into their experts' columns (zeros elsewhere).
        h_ter = jnp.einsum("tjr,tje->ter", h_tkr.astype(jnp.float32), self._onehot(plan), precision=_HIGHEST)
        spec = "ter,enr->tn" if transpose_w else "ter,ern->tn"
        y_tn = jnp.einsum(
            spec, h_ter.astype(w_ekn.dtype), w_ekn, precision=_HIGHEST, preferred_element_type=jnp.float32
        )
        return y_tn.astype(out_dtype)

    def tgmm(
        self, lhs: Array, rhs: Array, plan: RoutingPlan, *, out_dtype: jnp.dtype
    ) -> Float[Array, "E K N"]:
        onehot_tke = self._onehot(plan)
        if lhs.ndim == 2:  # lhs by token, rhs by slot
            r_ten = jnp.einsum("tjn,tje->ten", rhs.astype(jnp.float32), onehot_tke, precision=_HIGHEST)
            g = jnp.einsum("tk,ten->ekn", lhs.astype(jnp.float32), r_ten, precision=_HIGHEST)
        else:  # lhs by slot, rhs by token
            l_tek = jnp.einsum("tjk,tje->tek", lhs.astype(jnp.float32), onehot_tke, precision=_HIGHEST)
            g = jnp.einsum("tek,tn->ekn", l_tek, rhs.astype(jnp.float32), precision=_HIGHEST)
        return g.astype(out_dtype)

    fused = None
