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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels.grouped_lora.routing import RoutingPlan

_HIGHEST = lax.Precision.HIGHEST
# Above this many expert columns (E * r) the dense path does more work than the gathers it saves.
DENSE_MAX_EXPERT_COLUMNS = 1024


def _slot_rows(v: Array, plan: RoutingPlan) -> Array:
    """[T, K] (by token) or [T, k, K] (by slot) -> [M, K] in row (expert) order."""
    if v.ndim == 2:
        return v[plan.token_of_row]
    return v.reshape(plan.num_rows, -1)[plan.slot_of_row]


@dataclasses.dataclass(frozen=True)
class RaggedOps:
    name: str = "xla_ragged"

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
        h_mn = lax.ragged_dot_general(
            x_mk, w_ekn, plan.group_sizes, dn, precision=_HIGHEST, preferred_element_type=jnp.float32
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
        g_ekn = lax.ragged_dot_general(
            _slot_rows(lhs, plan),
            _slot_rows(rhs, plan),
            plan.group_sizes,
            dn,
            precision=_HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return g_ekn.astype(out_dtype)

    fused = None


@dataclasses.dataclass(frozen=True)
class DenseOps:
    name: str = "xla_dense"

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
