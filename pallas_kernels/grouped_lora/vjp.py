"""The one ``custom_vjp`` of grouped MoE-LoRA, built from each backend's shrink / expand / tgmm.

Forward (``c = expert_weight * scaling[e]``, ``h = x @ A[e]``)::

    y[t] = x[t] @ W  +  sum_j c[t, j] * h[t, j] @ B[e_tj]          (the ``x @ W`` term only when fused)

Backward, with ``g[t, j] = dy[t] @ B[e_tj]^T`` (a shrink through transposed B)::

    d expert_weight[t, j] = scaling[e] * <g[t, j], h[t, j]>       always: it trains the gate
    dx[t]  = sum_j c[t, j] g[t, j] @ A[e_tj]^T  (+ dy @ W^T)      an expand through transposed A
    dA[e]  = sum_{rows of e} x^T (c g)                             tgmm, only if A is differentiated
    dB[e]  = sum_{rows of e} (c h)^T dy                            tgmm, only if B is differentiated

``symbolic_zeros=True`` tells the forward which inputs carry a tangent; it records that as static
structure in the residuals, so a gate-only step traces no tgmm at all (tests check the jaxpr). The
tgmm calls are wrapped in jits named ``lora_tgmm_*`` so that check is a string search.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora import common
from pallas_kernels.grouped_lora.routing import RoutingPlan, make_plan


class KernelOps(Protocol):
    """What a backend provides; see ``xla.py`` for the contract of each op."""

    name: str
    fused: object  # None, or fused(x_td, w_do, hc_tkr, b_ero, plan, out_dtype) -> [T, O] | None

    def shrink(self, x_td: Array, w_ekn: Array, plan: RoutingPlan, *, transpose_w: bool = False) -> Array: ...

    def expand(
        self,
        h_tkr: Array,
        w_ekn: Array,
        plan: RoutingPlan,
        *,
        transpose_w: bool = False,
        out_dtype: jnp.dtype,
    ) -> Array: ...

    def tgmm(self, lhs: Array, rhs: Array, plan: RoutingPlan, *, out_dtype: jnp.dtype) -> Array: ...


@dataclasses.dataclass(frozen=True)
class _Needs:
    """Which inputs the caller differentiates; static, so it lives in the residuals' tree structure."""

    x: bool
    w: bool
    a: bool
    b: bool
    weights: bool
    scaling: bool


jax.tree_util.register_static(_Needs)


def _named(name: str, fn, *args):  # noqa: ANN001, ANN202
    wrapped = lambda *a: fn(*a)
    wrapped.__name__ = name
    return jax.jit(wrapped)(*args)


def _forward(ops: KernelOps, x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e):  # noqa: ANN001, ANN202
    plan = make_plan(expert_ids_tk, lora_a_edr.shape[0])
    coef_tk = common.coef_tk(expert_ids_tk, expert_weights_tk, scaling_e)  # [T, k], float32
    h_tkr = ops.shrink(x_td, lora_a_edr, plan)
    hc_tkr = (h_tkr * coef_tk[..., None]).astype(lora_b_ero.dtype)
    y_to = None
    if w_do is not None and ops.fused is not None:  # a backend may decline a shape by returning None
        y_to = ops.fused(x_td, w_do, hc_tkr, lora_b_ero, plan, x_td.dtype)
    if y_to is None:
        y_to = common.add_base(x_td, w_do, ops.expand(hc_tkr, lora_b_ero, plan, out_dtype=jnp.float32))
    return y_to, (plan, coef_tk, h_tkr, hc_tkr)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def grouped_lora_vjp(
    ops: KernelOps,
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"] | None,
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    expert_ids_tk: Int[Array, "T K"],
    expert_weights_tk: Float[Array, "T K"],
    scaling_e: Float[Array, " E"],
) -> Float[Array, "T O"]:
    """``x @ w`` (if ``w`` is not None) plus the grouped LoRA term, with the backend ``ops``.

    This body runs only when nothing is differentiated (inference): there a backend's ``forward``, which
    keeps no residuals, replaces shrink + expand (it may return None for a call it does not serve).
    Under differentiation ``_fwd`` runs instead.
    """
    forward = getattr(ops, "forward", None)
    if forward is not None:
        y_to = forward(x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e)
        if y_to is not None:
            return y_to
    y_to, _ = _forward(ops, x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e)
    return y_to


def _fwd(ops, x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e):  # noqa: ANN001, ANN202
    args = (x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e)
    perturbed = [
        any(p.perturbed for p in jax.tree_util.tree_leaves(arg, is_leaf=lambda v: hasattr(v, "perturbed")))
        for arg in args
    ]
    x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e = jax.tree_util.tree_map(
        lambda p: p.value, args, is_leaf=lambda v: hasattr(v, "perturbed")
    )
    needs = _Needs(
        x=perturbed[0],
        w=perturbed[1],
        a=perturbed[2],
        b=perturbed[3],
        weights=perturbed[5],
        scaling=perturbed[6],
    )
    y_to, (plan, coef_tk, h_tkr, hc_tkr) = _forward(
        ops, x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e
    )
    res = (x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e, plan)
    return y_to, (res, coef_tk, h_tkr, hc_tkr, needs)


def _bwd(ops, residuals, dy_to):  # noqa: ANN001, ANN202
    (x_td, w_do, lora_a_edr, lora_b_ero, expert_ids_tk, expert_weights_tk, scaling_e, plan) = residuals[0]
    coef_tk, h_tkr, hc_tkr, needs = residuals[1:]
    dy_to = dy_to.astype(x_td.dtype)
    # [T, k, R]: the output gradient pulled back through each slot's B.
    g_tkr = ops.shrink(dy_to, lora_b_ero, plan, transpose_w=True)
    dcoef_tk = jnp.sum(g_tkr * h_tkr, axis=-1)
    scale_tk = scaling_e.astype(jnp.float32)[expert_ids_tk]
    d_weights = (dcoef_tk * scale_tk).astype(expert_weights_tk.dtype) if needs.weights else None
    d_scaling = None
    if needs.scaling:
        d_scaling = (
            jnp.zeros(scaling_e.shape, jnp.float32)
            .at[expert_ids_tk]
            .add(dcoef_tk * expert_weights_tk.astype(jnp.float32))
            .astype(scaling_e.dtype)
        )
    gc_tkr = (g_tkr * coef_tk[..., None]).astype(lora_a_edr.dtype)
    dx = dw = da = db = None
    if needs.x:
        dx = ops.expand(gc_tkr, lora_a_edr, plan, transpose_w=True, out_dtype=jnp.float32)
        if w_do is not None:
            dx = dx + jnp.dot(
                dy_to, w_do.T, preferred_element_type=jnp.float32, precision=common.dot_precision(x_td.dtype)
            )
        dx = dx.astype(x_td.dtype)
    if needs.w:
        dw = jnp.dot(
            x_td.T, dy_to, preferred_element_type=jnp.float32, precision=common.dot_precision(x_td.dtype)
        ).astype(w_do.dtype)
    if needs.a:
        tgmm = functools.partial(ops.tgmm, out_dtype=lora_a_edr.dtype)
        da = _named("lora_tgmm_da", tgmm, x_td, gc_tkr, plan)
    if needs.b:
        tgmm = functools.partial(ops.tgmm, out_dtype=lora_b_ero.dtype)
        db = _named("lora_tgmm_db", tgmm, hc_tkr, dy_to, plan)
    return dx, dw, da, db, None, d_weights, d_scaling


grouped_lora_vjp.defvjp(_fwd, _bwd, symbolic_zeros=True)


def fast_forward(fast: Callable[..., Any], slow: Callable[..., Any], *args: Any) -> Any:
    """``fast(*args)`` when nothing is differentiated; under differentiation ``slow(*args)`` and slow's own
    derivative. For a forward-only kernel (the decode kernel routing from gate logits) whose plain-JAX path
    computes the same function: training stays correct without a backward of its own.

    ``slow`` is differentiated over the perturbed inputs only (``symbolic_zeros``), the others closed over
    as constants, so the ``custom_vjp`` rules inside it still see which inputs carry no tangent: a gate-only
    step traces no dA / dB there either."""
    leaves, treedef = jax.tree_util.tree_flatten(args)

    @jax.custom_vjp
    def primal(*xs: Any) -> Any:
        return fast(*jax.tree_util.tree_unflatten(treedef, xs))

    def fwd(*prims: Any) -> tuple[Any, Any]:
        values = [p.value for p in prims]
        hot = [i for i, p in enumerate(prims) if p.perturbed]

        def slow_of_hot(*diff: Any) -> Any:
            xs = list(values)
            for i, d in zip(hot, diff, strict=True):
                xs[i] = d
            return slow(*jax.tree_util.tree_unflatten(treedef, xs))

        y, pullback = jax.vjp(slow_of_hot, *(values[i] for i in hot))
        # Which inputs get a cotangent, as residual tree structure (None = none): static, like ``_Needs``.
        marks = tuple(jnp.zeros((), jnp.int8) if p.perturbed else None for p in prims)
        return y, (pullback, marks)

    def bwd(res: Any, dy: Any) -> tuple[Any, ...]:
        pullback, marks = res
        dy = jax.tree_util.tree_map(
            lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c,
            dy,
            is_leaf=lambda c: isinstance(c, SymbolicZero),
        )
        grads = iter(pullback(dy))
        return tuple(None if m is None else next(grads) for m in marks)

    primal.defvjp(fwd, bwd, symbolic_zeros=True)
    return primal(*leaves)
