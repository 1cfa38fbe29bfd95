"""The one public entry point for grouped MoE-LoRA, and the choice of backend.

``implementation`` is ``None`` (the fastest that works here), one name from ``IMPLEMENTATIONS``, or a
sequence of names tried in order; a backend that cannot serve a call (wrong platform, unsupported
shape) raises ``NotImplementedError`` and the next one is tried. A name with the suffix
``_interpret`` runs a Pallas backend in interpret mode (``mosaic_gpu``: Mosaic GPU's interpreter), or
``jax_triton``'s kernel in Triton's own interpreter (CPU tests). ``tokamax`` and ``jax_triton`` need their
optional packages (else NotImplementedError). ``mosaic_gpu`` (a Hopper GPU) is the Mosaic GPU fused prefill
GEMM (``pallas_mosaic_gpu.py``) over ``pallas_gpu_decode``.

Every backend except ``reference`` goes through the same ``custom_vjp`` (``vjp.py``); ``reference`` is
plain JAX and differentiated by JAX itself, which makes it an independent check of that VJP.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora import common, gating, vjp, xla
from pallas_kernels.grouped_lora.gating import RouteSpec
from pallas_kernels.grouped_lora.reference import grouped_lora_reference
from pallas_kernels.grouped_lora.vjp import grouped_lora_vjp

IMPLEMENTATIONS = (
    "pallas_gpu",
    "pallas_gpu_decode",
    "pallas_tpu",
    "mosaic_gpu",
    "jax_triton",
    "tokamax",
    "xla",
    "xla_ragged",
    "xla_dense",
    "xla_masked",
    "xla_masked_lowp",
    "xla_masked_batched",
    "xla_gather",
    "reference",
)
_AUTO = {"gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)}
# Measured on the H200 (benchmarks/RESULTS.md): with few expert columns (E * r <= 1024) XLA's dense
# path beats the Pallas kernels at every token count but one: single-token decode, where the one-launch
# decode kernel wins at every Llama-3-8B shape. ``pallas_gpu_decode`` is exactly that split.
_AUTO_GPU_SMALL_EXPERTS = ("pallas_gpu_decode", "xla", "pallas_gpu")


def resolve_implementation(name_or_none: str | None = None, expert_columns: int | None = None) -> str:
    """The backend name that ``implementation=name_or_none`` starts from on this platform.

    Meant for recording in a model config: ``None`` resolves to the platform's first choice, for
    ``expert_columns`` (E * r) when given, since the automatic choice on GPU depends on it.
    """
    if name_or_none is None:
        if expert_columns is not None:
            return _candidates(None, expert_columns)[0]
        return _AUTO.get(jax.default_backend(), ("xla",))[0]
    base = name_or_none.removesuffix("_interpret")
    interpretable = base.startswith("pallas") or base in ("jax_triton", "mosaic_gpu")
    if base not in IMPLEMENTATIONS or (name_or_none != base and not interpretable):
        raise ValueError(
            f"unknown grouped_lora implementation {name_or_none!r}; expected one of {IMPLEMENTATIONS}"
        )
    return name_or_none


def _candidates(implementation: str | Sequence[str] | None, expert_columns: int) -> tuple[str, ...]:
    if implementation is None:
        platform = jax.default_backend()
        if platform == "gpu" and xla.dense_fits(expert_columns):
            return _AUTO_GPU_SMALL_EXPERTS
        return _AUTO.get(platform, ("xla",))
    if isinstance(implementation, str):
        return (resolve_implementation(implementation),)
    return tuple(resolve_implementation(n) for n in implementation)


def _ops(name: str, num_experts: int, rank: int):  # noqa: ANN202
    """The backend's ops object, or NotImplementedError if it cannot run here."""
    interpret = name.endswith("_interpret")
    base = name.removesuffix("_interpret")
    dense = xla.dense_fits(num_experts * rank)
    # xla: the dense path (masked forward, bf16 sum at prefill sizes) for few expert columns, else sorted rows
    if base == "xla":
        return xla.DenseOps("xla_masked", xla.auto_masked_forward) if dense else xla.RaggedOps()
    if base == "xla_ragged":
        return xla.RaggedOps()
    if base == "xla_dense":  # shrink + expand, with their one-hot contractions, in inference too
        return xla.DenseOps()
    if base == "xla_masked":
        return xla.DenseOps("xla_masked", xla.masked_forward)
    if base == "xla_masked_lowp":  # xla_masked summing base and LoRA in bf16 at every T (training as xla)
        return xla.DenseOps("xla_masked_lowp", xla.masked_lowp_forward)
    if base == "xla_masked_batched":  # xla_masked with the shrink batched over experts (inference A/B)
        return xla.DenseOps("xla_masked_batched", xla.masked_batched_forward)
    if base == "xla_gather":  # gathered experts in inference; training as xla
        ops = xla.DenseOps if dense else xla.RaggedOps
        return ops("xla_gather", xla.gather_forward)
    if base == "pallas_gpu_decode":  # the decode kernel at T = 1 in inference, ``xla`` for everything else
        from pallas_kernels.grouped_lora import pallas_gpu_decode

        return pallas_gpu_decode.make_decode_ops(_ops("xla", num_experts, rank), interpret=interpret)
    if base == "mosaic_gpu":  # the Mosaic GPU fused prefill GEMM; the GPU decode backend below its sizes
        from pallas_kernels.grouped_lora import pallas_mosaic_gpu

        if not interpret:
            pallas_mosaic_gpu.require_hopper()  # before the decode backend's own refusal, which names itself
        suffix = "_interpret" if interpret else ""
        return pallas_mosaic_gpu.make_ops(
            _ops("pallas_gpu_decode" + suffix, num_experts, rank), interpret=interpret
        )
    if base == "tokamax":  # sorted rows through tokamax.ragged_dot_general (a peer; its wheel is optional)
        return _tokamax_ops()
    if base == "jax_triton":  # plain Triton through jax-triton, decode sizes only; ``xla`` otherwise
        from pallas_kernels.grouped_lora import jax_triton_decode

        return jax_triton_decode.make_ops(_ops("xla", num_experts, rank), interpret=interpret)
    if base == "pallas_gpu":
        from pallas_kernels.grouped_lora import pallas_gpu

        return pallas_gpu.make_ops(interpret=interpret)
    if base == "pallas_tpu":
        from pallas_kernels.grouped_lora import pallas_tpu

        return pallas_tpu.make_ops(interpret=interpret)
    raise NotImplementedError(name)


def _tokamax_ops() -> xla.RaggedOps:
    """``xla_ragged`` with tokamax's ragged dot (its Mosaic GPU / Triton kernels on a GPU, XLA elsewhere), at
    the default precision below float32 (its GPU kernels need not take HIGHEST for bf16, where it changes
    nothing) and HIGHEST for float32 operands."""
    import importlib

    try:
        tokamax = importlib.import_module("tokamax")
    except ImportError as e:
        raise NotImplementedError(f"tokamax is not installed ({e}); pip install tokamax") from e
    ragged_dot_general = getattr(tokamax, "ragged_dot_general", None)
    if ragged_dot_general is None:  # 0.0.17 exports only ragged_dot; the general form is in its api module
        try:
            api_module = importlib.import_module("tokamax._src.ops.ragged_dot.api")
            ragged_dot_general = api_module.ragged_dot_general
        except (ImportError, AttributeError) as e:
            raise NotImplementedError(f"this tokamax has no ragged_dot_general ({e})") from e
    from absl import flags  # tokamax's dependency

    if not flags.FLAGS.is_parsed():  # tokamax <= 0.0.12 parses sys.argv as absl flags and rejects our options
        flags.FLAGS.mark_as_parsed()
    return xla.RaggedOps("tokamax", ragged_dot_general=ragged_dot_general, precision=common.dot_precision)


def _dispatch(x, w, lora_a, lora_b, expert_ids, expert_weights, scaling, implementation):  # noqa: ANN001, ANN202
    scaling = jnp.broadcast_to(jnp.asarray(scaling, jnp.float32), (lora_a.shape[0],))
    errors = []
    for name in _candidates(implementation, lora_a.shape[0] * lora_a.shape[2]):
        if name == "reference":
            y = grouped_lora_reference(x, lora_a, lora_b, expert_ids, expert_weights, scaling_e=scaling)
            if w is None:
                return y
            base = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
            return (base + y.astype(jnp.float32)).astype(x.dtype)
        try:
            ops = _ops(name, lora_a.shape[0], lora_a.shape[2])
            return grouped_lora_vjp(ops, x, w, lora_a, lora_b, expert_ids, expert_weights, scaling)
        except NotImplementedError as e:  # fall through to the next candidate
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no grouped_lora implementation could run: " + "; ".join(errors))


def grouped_lora(
    x: Float[Array, "T D"],
    lora_a: Float[Array, "E D R"],
    lora_b: Float[Array, "E R O"],
    expert_ids: Int[Array, "T K"],
    expert_weights: Float[Array, "T K"],
    *,
    scaling: Float[Array, " E"],
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "T O"]:
    """LoRA contribution of each token's top-k experts: sum_j w[t,j] * s[e] * x[t] @ A[e] @ B[e]."""
    return _dispatch(x, None, lora_a, lora_b, expert_ids, expert_weights, scaling, implementation)


def grouped_lora_fused(
    x: Float[Array, "T D"],
    w: Float[Array, "D O"],
    lora_a: Float[Array, "E D R"],
    lora_b: Float[Array, "E R O"],
    expert_ids: Int[Array, "T K"],
    expert_weights: Float[Array, "T K"],
    *,
    scaling: Float[Array, " E"],
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "T O"]:
    """``x @ w`` plus the grouped LoRA contribution; backends with a fused kernel do both in one GEMM."""
    return _dispatch(x, w, lora_a, lora_b, expert_ids, expert_weights, scaling, implementation)


# From this many tokens on, ``grouped_lora_fused_shared`` runs projections that share ``x`` with ONE shrink GEMM
# (``xla.shared_masked_forward``) where their backend's inference forward is the dense masked one. Off: at
# batch-64 decode on the H200 it was slower (6,222 vs 6,332 tok/s, session 9). An A/B knob
# (``scripts/profile_decode.py``'s ``+shared_shrink=N``).
SHARED_SHRINK_MIN_TOKENS = sys.maxsize
# Backends whose inference forward for more than one token is ``xla.masked_forward``; value: its bf16-sum rule.
_MASKED_FORWARDS = {"xla": None, "xla_masked": False, "xla_masked_lowp": True, "pallas_gpu_decode": None}


def _shared_plan(
    implementation: str | Sequence[str] | None, num_tokens: int, lora_as: Sequence[Array]
) -> tuple[str, str] | None:
    """(backend, ``_shared_vjp`` mode "masked" / "masked_lowp") when the shared shrink may serve these
    projections, else None."""
    shapes = {(a.shape[1], a.shape[2]) for a in lora_as}
    if len(lora_as) < 2 or num_tokens < max(2, SHARED_SHRINK_MIN_TOKENS) or len(shapes) != 1:
        return None
    plans = {masked_forward_plan(implementation, num_tokens, a.shape[0] * a.shape[2]) for a in lora_as}
    if len(plans) != 1 or None in plans:
        return None
    ((name, low),) = plans
    return name, "masked_lowp" if low else "masked"


def masked_forward_plan(
    implementation: str | Sequence[str] | None, num_tokens: int, expert_columns: int
) -> tuple[str, bool] | None:
    """``(backend, low_precision_sum)`` when the inference forward that ``implementation`` gives for this many
    tokens and ``expert_columns`` (E * r) is the dense masked one (``xla.masked_forward``), else None. A
    caller that computes the shrink itself (``xla.masked_forward_from_shrink``) must ask this first, so that
    it only ever replaces that path, with the same bf16-sum rule."""
    if num_tokens < 2 or not xla.dense_fits(expert_columns):
        return None
    name = _candidates(implementation, expert_columns)[0]
    base = name.removesuffix("_interpret")
    if base not in _MASKED_FORWARDS or num_tokens <= _decode_max_tokens(base):
        return None
    low = _MASKED_FORWARDS[base]
    return name, (num_tokens >= xla.LOW_PRECISION_SUM_MIN_TOKENS) if low is None else low


def _decode_max_tokens(name: str) -> int:
    if name != "pallas_gpu_decode":
        return 0
    from pallas_kernels.grouped_lora import pallas_gpu_decode

    return pallas_gpu_decode.DECODE_MAX_TOKENS


# Up to this many tokens, ``grouped_lora_fused_shared`` runs projections whose backend's inference forward is
# the one-launch decode kernel (``pallas_gpu_decode``) as ONE launch for the whole group
# (``pallas_gpu_decode.decode_forward_group``): q/k/v in one kernel, gate/up in another. Measured on an H100
# (session 11, ``scripts/profile_decode.py --batches 1``): b1 decode 101.4 -> 104.9 tok/s with the old tiles,
# 121.9 -> 126.5 with the new ones and the gate rows; knob ``group_decode`` (0 = one launch per projection).
GROUP_DECODE_MAX_TOKENS = 1


def _group_decode_plan(
    implementation: str | Sequence[str] | None, num_tokens: int, lora_as: Sequence[Array], ws: Sequence
) -> tuple[str, str] | None:
    """(backend, ``_shared_vjp`` mode "decode") when the group decode kernel may serve, else None."""
    if len(lora_as) < 2 or any(w is None for w in ws):
        return None
    if not 0 < num_tokens <= min(GROUP_DECODE_MAX_TOKENS, _decode_max_tokens("pallas_gpu_decode")):
        return None
    if len({a.shape[1] for a in lora_as}) != 1:
        return None
    names = {_candidates(implementation, a.shape[0] * a.shape[2])[0] for a in lora_as}
    if names == {"pallas_gpu_decode"} and jax.default_backend() == "gpu":
        return "pallas_gpu_decode", "decode"
    return ("pallas_gpu_decode_interpret", "decode") if names == {"pallas_gpu_decode_interpret"} else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _shared_vjp(names, mode, x, ws, lora_as, lora_bs, ids, weights, scalings):  # noqa: ANN001, ANN202
    """The group forward when nothing is differentiated (``mode``: "masked" / "masked_lowp", the shared
    shrink; "decode", the group decode kernel, in interpret mode for a ``_interpret`` backend); under
    differentiation each projection's own ``grouped_lora_vjp`` rules (so gate-only training still traces no
    dA / dB, and gradients are unchanged)."""
    if mode == "decode":
        from pallas_kernels.grouped_lora import pallas_gpu_decode

        return pallas_gpu_decode.decode_forward_group(
            x, ws, lora_as, lora_bs, ids, weights, scalings, interpret=names[0].endswith("_interpret")
        )
    low = mode == "masked_lowp"
    return xla.shared_masked_forward(x, ws, lora_as, lora_bs, ids, weights, scalings, low_precision_sum=low)


def _shared_fwd(names, mode, x, ws, lora_as, lora_bs, ids, weights, scalings):  # noqa: ANN001, ANN202
    del mode
    outs, residuals = [], []
    for i, name in enumerate(names):
        ops = _ops(name, lora_as[i].value.shape[0], lora_as[i].value.shape[2])
        y, res = vjp._fwd(ops, x, ws[i], lora_as[i], lora_bs[i], ids[i], weights[i], scalings[i])
        outs.append(y)
        residuals.append(res)
    return outs, residuals


def _shared_bwd(names, mode, residuals, dys):  # noqa: ANN001, ANN202
    del mode
    dx, dws, das, dbs, dwts, dscs = None, [], [], [], [], []
    for name, res, dy in zip(names, residuals, dys, strict=True):
        a = res[0][2]
        d_x, d_w, d_a, d_b, _, d_wt, d_sc = vjp._bwd(_ops(name, a.shape[0], a.shape[2]), res, dy)
        if d_x is not None:
            dx = d_x if dx is None else dx + d_x  # as JAX sums the cotangents of a shared input
        dws.append(d_w)
        das.append(d_a)
        dbs.append(d_b)
        dwts.append(d_wt)
        dscs.append(d_sc)
    return dx, dws, das, dbs, [None] * len(names), dwts, dscs


_shared_vjp.defvjp(_shared_fwd, _shared_bwd, symbolic_zeros=True)


def grouped_lora_fused_shared(
    x: Float[Array, "T D"],
    ws: Sequence[Float[Array, "D O"]],
    lora_as: Sequence[Float[Array, "E D R"]],
    lora_bs: Sequence[Float[Array, "E R O"]],
    expert_ids: Sequence[Int[Array, "T K"]],
    expert_weights: Sequence[Float[Array, "T K"]],
    *,
    scalings: Sequence[Float[Array, " E"]],
    implementation: str | Sequence[str] | None = None,
) -> list[Float[Array, "T O"]]:
    """``grouped_lora_fused`` of several projections that read the same ``x`` (q/k/v, gate/up), one result
    each. From ``SHARED_SHRINK_MIN_TOKENS`` tokens on, where the backend's inference forward is the dense
    masked one, their shrinks run as one GEMM (``xla.shared_masked_forward``); up to
    ``GROUP_DECODE_MAX_TOKENS``, where it is the decode kernel, the group is one launch
    (``pallas_gpu_decode.decode_forward_group``); otherwise, and for every gradient, each projection is its
    own ``grouped_lora_fused``."""
    plan = _group_decode_plan(implementation, x.shape[0], lora_as, ws) or _shared_plan(
        implementation, x.shape[0], lora_as
    )
    if plan is None:
        return [
            grouped_lora_fused(x, w, a, b, i, wt, scaling=s, implementation=implementation)
            for w, a, b, i, wt, s in zip(
                ws, lora_as, lora_bs, expert_ids, expert_weights, scalings, strict=True
            )
        ]
    name, mode = plan
    scalings = [
        jnp.broadcast_to(jnp.asarray(s, jnp.float32), (a.shape[0],)) for s, a in zip(scalings, lora_as)
    ]
    names = tuple(name for _ in lora_as)
    return _shared_vjp(
        names,
        mode,
        x,
        list(ws),
        list(lora_as),
        list(lora_bs),
        list(expert_ids),
        list(expert_weights),
        scalings,
    )


# Up to this many tokens, ``grouped_lora_fused_routed`` lets the decode kernel route from the gate logits itself
# (``pallas_gpu_decode.decode_forward_routed``) where the backend's inference forward is that kernel: the top-k
# (a sort fusion whose slices XLA runs as device memcpys) and the softmax fusions no longer run between the
# gate and the kernel. Knob ``kernel_route`` (0 = route in XLA, as before). On since session 13: on the H100 the
# 8B model's batch-1 decode went from 1.125x to 1.00x the experts-off model (benchmarks/RESULTS.md).
ROUTED_DECODE_MAX_TOKENS = 1


def routes_in_kernel(
    implementation: str | Sequence[str] | None,
    num_tokens: int,
    lora_as: Sequence[Array],
    ws: Sequence[Array | None],
) -> bool:
    """Whether ``grouped_lora_fused_routed`` would route these projections inside the decode kernel (else it
    routes in XLA and calls ``grouped_lora_fused_shared``, which a caller holding the routing can call itself)."""
    return _routed_plan(implementation, num_tokens, lora_as, ws) is not None


def _routed_plan(
    implementation: str | Sequence[str] | None,
    num_tokens: int,
    lora_as: Sequence[Array],
    ws: Sequence[Array | None],
) -> str | None:
    """The decode backend's name when the kernel may route, else None."""
    limit = min(ROUTED_DECODE_MAX_TOKENS, _decode_max_tokens("pallas_gpu_decode"))
    if not lora_as or any(w is None for w in ws) or not 0 < num_tokens <= limit:
        return None
    if len({(a.shape[0], a.shape[1]) for a in lora_as}) != 1:
        return None
    names = {_candidates(implementation, a.shape[0] * a.shape[2])[0] for a in lora_as}
    if names == {"pallas_gpu_decode"} and jax.default_backend() == "gpu":
        return "pallas_gpu_decode"
    return "pallas_gpu_decode_interpret" if names == {"pallas_gpu_decode_interpret"} else None


def grouped_lora_fused_routed(
    x: Float[Array, "T D"],
    ws: Sequence[Float[Array, "D O"]],
    lora_as: Sequence[Float[Array, "E D R"]],
    lora_bs: Sequence[Float[Array, "E R O"]],
    logits_tpe: Float[Array, "T P E"],
    *,
    scalings: Sequence[Float[Array, " E"]],
    route: RouteSpec,
    implementation: str | Sequence[str] | None = None,
) -> list[Float[Array, "T O"]]:
    """``grouped_lora_fused_shared`` of P projections that read ``x``, routed from their gate logits: projection
    p's experts and weights are ``gating.route_spec(logits_tpe[:, p], route)``.

    Up to ``ROUTED_DECODE_MAX_TOKENS`` tokens, where the backend's inference forward is the decode kernel, the
    kernel routes itself (one launch for the group where ``GROUP_DECODE_MAX_TOKENS`` allows, else one per
    projection). Otherwise, and for every gradient (``vjp.fast_forward``: the same function through
    ``gating.route`` and ``grouped_lora_fused_shared``), the routing runs in XLA first."""
    t, p, e = gating.group_shape(logits_tpe, lora_as)
    scalings = [
        jnp.broadcast_to(jnp.asarray(s, jnp.float32), (a.shape[0],)) for s, a in zip(scalings, lora_as)
    ]

    def in_xla(x, ws, lora_as, lora_bs, logits_tpe, scalings):  # noqa: ANN001, ANN202
        ids_mk, weights_mk = gating.route_spec(logits_tpe.reshape(t * p, e), route)
        ids_tpk, weights_tpk = ids_mk.reshape(t, p, -1), weights_mk.reshape(t, p, -1)
        ids, weights = [ids_tpk[:, i] for i in range(p)], [weights_tpk[:, i] for i in range(p)]
        return grouped_lora_fused_shared(
            x, ws, lora_as, lora_bs, ids, weights, scalings=scalings, implementation=implementation
        )

    name = _routed_plan(implementation, t, lora_as, ws)
    args = (x, list(ws), list(lora_as), list(lora_bs), logits_tpe, scalings)
    if name is None:
        return in_xla(*args)
    from pallas_kernels.grouped_lora import pallas_gpu_decode as decode

    interpret = name.endswith("_interpret")

    def in_kernel(x, ws, lora_as, lora_bs, logits_tpe, scalings):  # noqa: ANN001, ANN202
        if p > 1 and t <= GROUP_DECODE_MAX_TOKENS:
            return decode.decode_forward_group_routed(
                x, ws, lora_as, lora_bs, logits_tpe, scalings, spec=route, interpret=interpret
            )
        return [
            decode.decode_forward_routed(
                x,
                ws[i],
                lora_as[i],
                lora_bs[i],
                logits_tpe[:, i],
                scalings[i],
                spec=route,
                interpret=interpret,
            )
            for i in range(p)
        ]

    return vjp.fast_forward(in_kernel, in_xla, *args)


def expand_fused_plan(
    implementation: str | Sequence[str] | None, num_tokens: int, expert_columns: int, itemsize: int = 2
) -> bool | None:
    """``interpret`` (a bool) when ``pallas_gpu_expand`` may serve this call, else None: the dense masked
    forward (``masked_forward_plan``) of the GPU decode backend, up to ``pallas_gpu_expand.FUSED_EXPAND_MAX_TOKENS``
    tokens of ``itemsize`` bytes whose tiles fit in shared memory (``pallas_gpu_expand.fits``; the caller
    computes the shrink: ``moe_lora.packed_forward``)."""
    from pallas_kernels.grouped_lora import pallas_gpu_expand

    if not pallas_gpu_expand.fits(num_tokens, itemsize):
        return None
    return _gpu_decode_interpret(implementation, num_tokens, expert_columns)


def _gpu_decode_interpret(
    implementation: str | Sequence[str] | None, num_tokens: int, expert_columns: int
) -> bool | None:
    """``interpret`` where the dense masked forward of this call is the GPU decode backend's (False on a GPU,
    True for its ``_interpret`` twin), else None."""
    plan = masked_forward_plan(implementation, num_tokens, expert_columns)
    if plan is None:
        return None
    name = plan[0]
    if name == "pallas_gpu_decode" and jax.default_backend() == "gpu":
        return False
    return True if name == "pallas_gpu_decode_interpret" else None


def pack_kernel_plan(
    implementation: str | Sequence[str] | None, num_tokens: int, expert_columns: int, itemsize: int = 2
) -> bool | None:
    """``interpret`` (a bool) when ``pallas_gpu_pack`` may compute the packed GEMM of ``moe_lora.packed_forward``
    for this call, else None: the same backends as ``expand_fused_plan``, up to
    ``pallas_gpu_pack.PACK_KERNEL_MAX_TOKENS`` tokens whose tiles fit in shared memory."""
    from pallas_kernels.grouped_lora import pallas_gpu_pack

    if not pallas_gpu_pack.fits(num_tokens, itemsize):
        return None
    return _gpu_decode_interpret(implementation, num_tokens, expert_columns)
