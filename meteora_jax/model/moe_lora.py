"""The MoE-LoRA linear layer: a frozen base projection plus token-routed LoRA experts.

    y = x @ W (+ b) + sum_j w[t, j] * s[e] * (x @ A[e]) @ B[e],   e = expert_ids[t, j]

Experts are stacked (``lora_a_edr`` [E, d_in, r_max], ``lora_b_ero`` [E, r_max, d_out]); an adapter of lower
rank is zero-padded, and an adapter that does not target this projection has zero A/B and scaling 0, so it
contributes nothing. One bias-free gate ``gate_de`` [d_in, E] per projection routes each token (MeteoRA).
The expert contribution is computed by ``pallas_kernels.grouped_lora_fused``; this layer never picks kernels.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from meteora_jax.model.gate import RoutingOptions, forced, route
from meteora_jax.params import ExpertParam, GateParam
from pallas_kernels import grouped_lora_fused, grouped_lora_fused_routed, grouped_lora_fused_shared
from pallas_kernels.grouped_lora import api as kernel_api
from pallas_kernels.grouped_lora import pallas_gpu_expand as kernel_gpu_expand
from pallas_kernels.grouped_lora import pallas_gpu_pack as kernel_gpu_pack
from pallas_kernels.grouped_lora import xla as kernel_xla

# logical axes of each projection's (d_in, d_out)
PROJECTION_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


# From this many tokens on (prefill, training), bf16 activations reach the gate through ``split_gate_logits``;
# fewer (decode) keep the one float32 GEMV, which is latency-bound there and whose weight-splitting fusion
# would be one more launch per gate and token.
SPLIT_GATE_MIN_TOKENS = 256


def gate_logits(x_td: Float[Array, "T D"], gate_de: Float[Array, "D E"]) -> Float[Array, "T E"]:
    """``x @ gate`` with float32 accuracy: routing decisions should not flip with the activation dtype."""
    if x_td.dtype == jnp.bfloat16 and x_td.shape[0] >= SPLIT_GATE_MIN_TOKENS:
        return split_gate_logits(x_td, gate_de)
    return float32_gate_logits(x_td, gate_de)


def float32_gate_logits(x_td: Float[Array, "T D"], gate_de: Float[Array, "D E"]) -> Float[Array, "T E"]:
    return jnp.dot(x_td.astype(jnp.float32), gate_de, precision=jax.lax.Precision.HIGHEST)


def float32_gate_logits_rows(x_td: Float[Array, "T D"], gates_ed: Float[Array, "E D"]) -> Float[Array, "T E"]:
    """``float32_gate_logits`` from the gates stored one row per expert ([E, D], ``GATE_PACK_ROWS``)."""
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(x_td.astype(jnp.float32), gates_ed, dims, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def split_gate_logits(x_td: Float[Array, "T D"], gate_de: Float[Array, "D E"]) -> Float[Array, "T E"]:
    """``float32_gate_logits`` for bf16 ``x`` as ONE bf16 tensor-core GEMM: ``x @ [W_hi | W_lo]``, halves summed.

    ``W_hi = bf16(W)``, ``W_lo = bf16(W - W_hi)`` carry ~16 of W's 24 mantissa bits (|W - W_hi - W_lo| <=
    2^-17 |W|); x is exact in bf16, each product is exact in the float32 accumulator. So the logits are within
    ~1e-5 of the float32 ones, without float32 GEMMs on CUDA cores or converting [T, D] activations to float32
    (on the H200 the float32 gates were ~15 ms of a 4096-token Llama-3-8B prefill, benchmarks/RESULTS.md).
    The backward is the float32 one (``float32_gate_logits``' own): gate training sees the same gradients.
    """
    num_experts = gate_de.shape[1]
    hi_de = gate_de.astype(jnp.bfloat16)
    lo_de = (gate_de - hi_de.astype(jnp.float32)).astype(jnp.bfloat16)
    both_tn = jnp.dot(x_td, jnp.concatenate([hi_de, lo_de], axis=1), preferred_element_type=jnp.float32)
    return both_tn[:, :num_experts] + both_tn[:, num_experts:]


def _split_gate_fwd(x_td, gate_de):  # noqa: ANN001, ANN202
    return split_gate_logits(x_td, gate_de), (x_td, gate_de)


def _split_gate_bwd(residuals, g_te):  # noqa: ANN001, ANN202
    return jax.vjp(float32_gate_logits, *residuals)[1](g_te)


split_gate_logits.defvjp(_split_gate_fwd, _split_gate_bwd)


def gate_input(x_td: Float[Array, "T D"], routing: RoutingOptions) -> Float[Array, "T D"]:
    """What the gate reads: ``x``, cut from the gradient when ``routing.detach_gate_input``."""
    return jax.lax.stop_gradient(x_td) if routing.detach_gate_input else x_td


# From this many tokens on, projections that share an input also share ONE top-k over their stacked logits
# ([T * P, E]: one TopK kernel per group instead of one per projection). On the H200 (session 9,
# benchmarks/RESULTS.md): batch-1 decode 109.1 -> 117.6 tok/s, batch-64 5,998 -> 6,332 tok/s; the device
# copies that came with each TopK fell from 449 to 193 per batch-1 token.
GROUP_ROUTE_MIN_TOKENS = 1


@dataclasses.dataclass(frozen=True)
class SharedRoute:
    """A projection's routing computed by its caller: gate logits, and the top-k when it was done jointly."""

    logits_te: Float[Array, "T E"]
    ids_tk: Int[Array, "T K"] | None = None
    weights_tk: Float[Array, "T K"] | None = None
    # With the joint top-k: the whole group's logits [T, P, E], which the decode kernel can route from itself.
    group_logits_tpe: Float[Array, "T P E"] | None = None


def concat_gates(projections: Sequence[MoELoRALinear]) -> Float[Array, "D N"]:
    """``[G_1 | G_2 | ...]`` of the projections that route: the one gate matrix ``shared_gate_logits`` reads."""
    return jnp.concatenate([p.gate_de[...] for p in projections if p.num_experts > 0], axis=1)


def shared_gate_logits(
    projections: Sequence[MoELoRALinear],
    x_btd: Float[Array, "B T D"],
    routing: RoutingOptions,
    gates_dn: Float[Array, "D N"] | None = None,
    gates_nd: Float[Array, "N D"] | None = None,
) -> list[SharedRoute | None]:
    """The routing of projections that read the same input (q/k/v, gate/up), from ONE gate product.

    ``x @ [G_q | G_k | G_v]`` instead of three products: at batch-1 decode each gate GEMV is a ~5 us kernel
    bound by latency, not bytes (0.93 ms of a 9.4 ms Llama-3-8B token on the H200, benchmarks/RESULTS.md).
    Each column is the same dot product as the projection's own, so routing is unchanged. From
    ``GROUP_ROUTE_MIN_TOKENS`` tokens on, and when the projections have the same expert count, the top-k runs
    once over the stacked [T, P, E] logits: per row the same selection and weights as each projection's own.
    None (the projection computes its own, or needs none) where fewer than two projections route.
    ``gates_dn``: ``concat_gates(projections)`` made once by the caller (an inference pack, see
    ``PACK_GATES``), else it is concatenated here, at every call. ``gates_nd``: the same transposed, used for
    calls of up to ``GATE_PACK_ROWS`` tokens (float32 product); there a single routed projection is served too.
    """
    routed = [p for p in projections if p.num_experts > 0]
    num_tokens = x_btd.shape[0] * x_btd.shape[1]
    split = x_btd.dtype == jnp.bfloat16 and num_tokens >= SPLIT_GATE_MIN_TOKENS
    rows = gates_nd is not None and num_tokens <= GATE_PACK_ROWS and not split
    if routing.no_experts or routing.force_expert is not None or len(routed) < (1 if rows else 2):
        return [None] * len(projections)
    x_td = gate_input(x_btd.reshape(-1, x_btd.shape[-1]), routing)
    if rows:
        logits_tn = float32_gate_logits_rows(x_td, gates_nd)
    else:
        logits_tn = gate_logits(x_td, concat_gates(projections) if gates_dn is None else gates_dn)
    num_experts = {p.num_experts for p in routed}
    if len(num_experts) == 1 and x_td.shape[0] >= GROUP_ROUTE_MIN_TOKENS:
        (e,) = num_experts
        logits_tpe = logits_tn.reshape(x_td.shape[0], len(routed), e)
        ids_tpk, weights_tpk = route_group(logits_tpe, routing)
        parts = iter(
            SharedRoute(logits_tpe[:, i], ids_tpk[:, i], weights_tpk[:, i], logits_tpe)
            for i in range(len(routed))
        )
    else:
        bounds = list(itertools.accumulate(p.num_experts for p in routed))[:-1]
        parts = iter(SharedRoute(lg) for lg in jnp.split(logits_tn, bounds, axis=1))
    return [next(parts) if p.num_experts > 0 else None for p in projections]


# From this many tokens on, a group with an inference pack (``pack_group``, made once per model state by the
# sampler: ``MeteoraLlama.inference_packs``, passed into its jitted prefill / decode) takes every expert's shrink
# AND its gate logits from ONE GEMM, ``x @ [A_1 | ... | A_P | G_hi | G_lo]``, where its backend's forward would
# be the dense masked one. What it removes per group and step: the gate GEMV, P - 1 shrink GEMMs, the
# per-step relayout or concatenation of A (which made the unpacked shared shrink slower, session 9) and P - 1
# reads of x. The gate becomes the bf16 hi/lo split of ``split_gate_logits`` (prefill's gate already; logits
# within ~1e-5 of float32). Measured on an H100 (session 11, benchmarks/RESULTS.md): batch-64 decode 5,444 ->
# 6,063 tok/s, a 4096-token prefill 135.6 -> 132.1 ms; hence on from 2 tokens (one token keeps the decode
# kernel). Knob ``packed`` (inf = no packs are made at all). On the GPU decode backend the GEMM itself may run
# as ``pallas_gpu_pack`` (knob ``pack_kernel``; off: it ties XLA's, session 14).
PACKED_MIN_TOKENS = 2
# ... and up to this many tokens (knob ``packed_max``): no cap, since prefill gained too.
PACKED_MAX_TOKENS = sys.maxsize
# 1: ``inference_packs`` also holds each group's ``concat_gates``, made once per model state, which the
# unpacked path's shared gate GEMV then reads: on the H200 that concatenation ran as its own kernel at every
# step, twice a layer (batch-64 decode, session 9: ~0.26 ms of a 9.8 ms step;
# profile_decode_h200_b64_s9_defaults.json).
# The same matrix and the same dot products, so routing is bitwise unchanged. On an H100 (session 11) it made
# no difference with the inference packs off (b64 5,444 vs 5,446 tok/s with ``+packed_gates=0``); it serves
# the calls the packed path does not (one token, non-dense backends).
PACK_GATES = 1
# N > 0: those gate packs are also stored one row per expert column ([N, D]), for every group including o
# and down, and calls of up to N tokens contract their rows (larger calls keep the [D, N] pack). Why: at
# batch-1 decode XLA runs the [1, D] x [D, N] float32 gate product as a column reduction with too few blocks
# (4.8-6.6 us for ~1 MB, session 4's profile); over [N, D] it is a row reduction, one warp per output.
# Logits equal the float32 GEMV's to summation order. H100, session 11: b1 decode 114.6 -> 121.9 tok/s; at
# batch 64 the rows were slower (5,444 -> 5,121), hence a token threshold.
GATE_PACK_ROWS = 1


def pack_group(projections: Sequence[MoELoRALinear]) -> Float[Array, "D N"] | None:
    """``[A_1 | ... | A_P | gates]`` of the projections with experts among ``projections`` (which read the same
    input), in their compute dtype: each A flattened expert-major ([d, E * r]); the gates float32
    ``[G_1 | ... | G_P]`` for a float32 model, else their bf16 hi / lo halves (``split_gate_logits``). None
    where no projection has experts, expert counts or ranks differ, or the dtype is neither bf16 nor float32."""
    routed = [p for p in projections if p.num_experts > 0]
    if not routed:
        return None
    dtype = routed[0].kernel_io.dtype
    shapes = {(p.d_in, p.num_experts, p.lora_a_edr.shape[2], p.kernel_io.dtype) for p in routed}
    if len(shapes) != 1 or dtype not in (jnp.bfloat16, jnp.float32):
        return None
    gates_dn = concat_gates(routed).astype(jnp.float32)
    if dtype == jnp.bfloat16:
        hi_dn = gates_dn.astype(jnp.bfloat16)
        gate_parts = [hi_dn, (gates_dn - hi_dn.astype(jnp.float32)).astype(jnp.bfloat16)]
    else:
        gate_parts = [gates_dn]
    a_dn = kernel_xla.flat_shrink_weights([p.lora_a_edr[...].astype(dtype) for p in routed])
    return jnp.concatenate([a_dn, *gate_parts], axis=1)


def packed_forward(
    projections: Sequence[MoELoRALinear],
    pack_dn: Array | None,
    x_btd: Float[Array, "B T D"],
    routing: RoutingOptions,
    aux: list | None,
    residual_btd: Float[Array, "B T O"] | None = None,
) -> list[Float[Array, "B T O"]] | None:
    """The group's outputs through its pack (see ``PACKED_MIN_TOKENS``), or None where the pack may not serve
    this call: no pack, a token count outside [``PACKED_MIN_TOKENS``, ``PACKED_MAX_TOKENS``], a forced expert
    or no experts, another dtype, or a backend whose forward here is not the dense masked one
    (``kernel_api.masked_forward_plan``). Projections without experts run their own base GEMM. Inference only:
    the pack is a copy, so no gradient would reach the gates or factors through it. ``residual_btd`` (a group
    of one projection): added to its output, on the dense path inside its GEMMs (``project_group``)."""
    b, t, d = x_btd.shape
    num_tokens = b * t
    routed = [p for p in projections if p.num_experts > 0]
    if (
        pack_dn is None
        or not routed
        or not PACKED_MIN_TOKENS <= num_tokens <= PACKED_MAX_TOKENS
        or routing.no_experts
        or routing.force_expert is not None
        or x_btd.dtype != pack_dn.dtype
    ):
        return None
    e, r = routed[0].num_experts, routed[0].lora_a_edr.shape[2]
    plans = {kernel_api.masked_forward_plan(p.implementation, num_tokens, e * r) for p in routed}
    if len(plans) != 1 or None in plans:
        return None
    ((_, low),) = plans
    x_td = x_btd.reshape(num_tokens, d)
    interpret = kernel_api.expand_fused_plan(routed[0].implementation, num_tokens, e * r, x_td.dtype.itemsize)
    fusable = interpret is not None and len({p.implementation for p in routed}) == 1
    # the kernel routes from ``wide`` itself unless ``aux`` wants XLA's ids
    in_kernel = (
        fusable
        and aux is None
        and bool(kernel_gpu_expand.EXPAND_ROUTE)
        and kernel_gpu_expand.coef_work(num_tokens, [p.d_out for p in routed])
        <= kernel_gpu_expand.EXPAND_ROUTE_MAX_WORK
    )
    wide_tn, h_tper, logits_tpe = _packed_gemm(routed, pack_dn, x_td)
    ids_tpk, weights_tpk = route_group(logits_tpe, routing)
    fused = (
        iter(
            _expand_fused(routed, x_td, wide_tn, h_tper, ids_tpk, weights_tpk, routing, in_kernel, interpret)
        )
        if fusable
        else None
    )
    outs, i = [], 0
    for p in projections:
        if p.num_experts == 0:
            outs.append(p(x_btd, routing, aux))
            continue
        residual_to = None if residual_btd is None else residual_btd.reshape(num_tokens, p.d_out)
        # XLA's dense path takes the residual into its GEMMs (``project_group``); a bias comes before it
        folded = fused is None and p.bias_o is None
        if fused is not None:
            y_to = next(fused)
        else:
            w_do, _, b_ero, scaling_e = p.expert_factors()
            y_to = kernel_xla.masked_forward_from_shrink(
                x_td,
                w_do,
                h_tper[:, i],
                b_ero,
                ids_tpk[:, i],
                weights_tpk[:, i],
                scaling_e,
                low_precision_sum=low,
                residual_to=residual_to if folded else None,
            )
        if p.bias_o is not None:
            y_to = y_to + p.bias_o[...]
        if residual_to is not None and not folded:
            y_to = y_to + residual_to
        if aux is not None:
            aux.append({"name": p.name, "gate_logits": logits_tpe[:, i], "expert_ids": ids_tpk[:, i]})
        outs.append(y_to.reshape(b, t, p.d_out))
        i += 1
    return outs


def _packed_gemm(
    routed: Sequence[MoELoRALinear], pack_dn: Array, x_td: Array
) -> tuple[Float[Array, "T C"], Float[Array, "T P E R"], Float[Array, "T P E"]]:
    """The group's packed GEMM ``x @ pack`` in float32 (XLA's, or ``pallas_gpu_pack``'s where it serves):
    ``wide`` [T, shrinks | gates], every projection's shrink as [T, P, E, R] and its gate logits [T, P, E]
    (the bf16 hi / lo halves summed)."""
    num_tokens = x_td.shape[0]
    n, e, r = len(routed), routed[0].num_experts, routed[0].lora_a_edr.shape[2]
    a_cols = n * e * r
    pack_interpret = kernel_api.pack_kernel_plan(
        routed[0].implementation, num_tokens, e * r, x_td.dtype.itemsize
    )
    if pack_interpret is not None:  # every routed projection has this backend (``packed_forward``'s plans)
        wide_tn = kernel_gpu_pack.pack_matmul(x_td, pack_dn, interpret=pack_interpret)
    else:
        wide_tn = jnp.dot(
            x_td, pack_dn, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
    h_tper = wide_tn[:, :a_cols].reshape(num_tokens, n, e, r)
    gates_tn = wide_tn[:, a_cols:]
    if gates_tn.shape[1] == 2 * n * e:  # bf16 hi / lo halves
        gates_tn = gates_tn[:, : n * e] + gates_tn[:, n * e :]
    return wide_tn, h_tper, gates_tn.reshape(num_tokens, n, e)


def _routed_spec(
    routed: Sequence[MoELoRALinear], pack_cols: int, routing: RoutingOptions
) -> kernel_gpu_expand.Routed:
    """Where the routed expand finds each projection's shrink and gate logits in a pack of ``pack_cols``
    columns ([shrinks | gates], the gates once or as bf16 hi / lo halves): ``pallas_gpu_expand.Routed``."""
    n, e, r = len(routed), routed[0].num_experts, routed[0].lora_a_edr.shape[2]
    halves = pack_cols - n * e * r == 2 * n * e
    return kernel_gpu_expand.Routed.of_pack(routing.spec, e, r, n, halves=halves)


def _expand_fused(
    routed: Sequence[MoELoRALinear],
    x_td: Array,
    wide_tn: Array,
    h_tper: Array,
    ids_tpk: Array,
    weights_tpk: Array,
    routing: RoutingOptions,
    in_kernel: bool,
    interpret: bool,
) -> list[Array]:
    """``packed_forward``'s outputs of the routed projections through ``pallas_gpu_expand`` (one launch: each
    base GEMM with its expand as an extra K block), from the packed GEMM's output ``wide_tn`` ([shrinks |
    gates]; its shrinks as [T, P, E, R]: ``h_tper``). ``in_kernel``: the kernel builds ``hc`` and routes itself
    (``EXPAND_ROUTE``); else ``hc`` comes from XLA's routing ``ids_tpk`` / ``weights_tpk``."""
    ws, bs, scalings = _expand_operands(routed)
    if in_kernel:
        spec = _routed_spec(routed, wide_tn.shape[1], routing)
        return kernel_gpu_expand.expand_forward_group_routed(
            x_td, ws, wide_tn, bs, scalings, routed=spec, interpret=interpret
        )
    hcs = [
        kernel_xla.masked_coefficients(h_tper[:, i], ids_tpk[:, i], weights_tpk[:, i], scaling_e, b_no.dtype)
        for i, (b_no, scaling_e) in enumerate(zip(bs, scalings, strict=True))
    ]
    return kernel_gpu_expand.expand_forward_group(x_td, ws, hcs, bs, interpret=interpret)


def _expand_operands(
    routed: Sequence[MoELoRALinear],
) -> tuple[list[Float[Array, "D O"]], list[Float[Array, "N O"]], list[Float[Array, " E"]]]:
    """What ``pallas_gpu_expand``'s group kernels take of each routed projection (``expert_factors``): its W,
    its B flattened to [E * R, O] (expert-major rows), and its scaling."""
    factors = [p.expert_factors() for p in routed]
    ws = [w_do for w_do, _, _, _ in factors]
    bs = [b_ero.reshape(-1, b_ero.shape[2]) for _, _, b_ero, _ in factors]
    return ws, bs, [scaling_e for _, _, _, scaling_e in factors]


def route_group(
    logits_tpe: Float[Array, "T P E"], routing: RoutingOptions
) -> tuple[Int[Array, "T P K"], Float[Array, "T P K"]]:
    """``route`` of P projections' logits in ONE top-k: rows flattened to [T * P, E], since XLA's TopK kernel
    takes a 2-D operand (3-D becomes a full sort on CPU)."""
    t, p, e = logits_tpe.shape
    ids_mk, weights_mk = route(
        logits_tpe.reshape(t * p, e), top_k=routing.top_k, temperature=routing.temperature, mode=routing.mode
    )
    return ids_mk.reshape(t, p, -1), weights_mk.reshape(t, p, -1)


def project_group(
    projections: Sequence[MoELoRALinear],
    x_btd: Float[Array, "B T D"],
    routing: RoutingOptions,
    aux: list | None,
    pack_dn: Array | None = None,
    gates_dn: Array | None = None,
    gates_nd: Array | None = None,
    *,
    residual_btd: Float[Array, "B T O"] | None = None,
) -> list[Float[Array, "B T O"]]:
    """Projections that read the same input (q/k/v, gate/up; or one alone): through their inference pack
    where it serves (``packed_forward``); else their gates in one product, their top-k in one
    (``shared_gate_logits``) and, when every one routes through the same backend, their expert terms through
    ``grouped_lora_fused_shared`` (one shrink GEMM where that backend shares it), or, where the decode kernel
    serves and routes itself (``kernel_api.routes_in_kernel``), ``grouped_lora_fused_routed`` from the logits
    alone (not when ``aux`` asks for the ids: XLA computes them then). Same results as calling
    each projection alone (the pack: to the bf16 gate split's rounding). ``pack_dn`` / ``gates_dn`` /
    ``gates_nd``: this group's ``pack_group`` / ``concat_gates`` / its transpose, made once per model state
    (``MeteoraLlama.inference_packs``).

    ``residual_btd`` (a group of one projection: o, down) is added to its output. Where the dense path serves,
    inside its GEMMs: the expand GEMM takes it as C and the base GEMM takes that sum as C, as the experts-off
    model's GEMM takes the residual. Added afterwards instead, XLA fused the add into every consumer and never
    wrote the residual stream: at a 4096-token prefill each RMSNorm re-summed the embedding and all earlier
    o / down outputs (2-layer trace, session 20)."""
    if residual_btd is not None and len(projections) != 1:
        raise ValueError(f"residual_btd is for a group of one projection, got {len(projections)}")
    packed = packed_forward(projections, pack_dn, x_btd, routing, aux, residual_btd)
    if packed is not None:
        return packed
    ys = _project_unpacked(projections, x_btd, routing, aux, gates_dn, gates_nd)
    return ys if residual_btd is None else [ys[0] + residual_btd]


def _project_unpacked(
    projections: Sequence[MoELoRALinear],
    x_btd: Float[Array, "B T D"],
    routing: RoutingOptions,
    aux: list | None,
    gates_dn: Array | None,
    gates_nd: Array | None,
) -> list[Float[Array, "B T O"]]:
    """``project_group`` where no inference pack serves."""
    shared = shared_gate_logits(projections, x_btd, routing, gates_dn, gates_nd)
    impls = {p.implementation for p in projections}
    grouped = all(s is not None and s.ids_tk is not None for s in shared)
    if not grouped or len(impls) != 1 or any(p.bias_o is not None for p in projections):
        return [p(x_btd, routing, aux, s) for p, s in zip(projections, shared, strict=True)]
    b, t, d = x_btd.shape
    impl = impls.pop()
    ws, lora_as, lora_bs, scalings = (list(c) for c in zip(*(p.expert_factors() for p in projections)))
    if aux is None and kernel_api.routes_in_kernel(impl, b * t, lora_as, ws):
        # The decode kernel routes from the logits itself; XLA drops the top-k computed above, now unused.
        ys = grouped_lora_fused_routed(
            x_btd.reshape(b * t, d),
            ws,
            lora_as,
            lora_bs,
            shared[0].group_logits_tpe,
            scalings=scalings,
            route=routing.spec,
            implementation=impl,
        )
        return [y_to.reshape(b, t, p.d_out) for p, y_to in zip(projections, ys, strict=True)]
    ys = grouped_lora_fused_shared(
        x_btd.reshape(b * t, d),
        ws,
        lora_as,
        lora_bs,
        [s.ids_tk for s in shared],
        [s.weights_tk for s in shared],
        scalings=scalings,
        implementation=impl,
    )
    if aux is not None:
        for p, s in zip(projections, shared, strict=True):
            aux.append({"name": p.name, "gate_logits": s.logits_te, "expert_ids": s.ids_tk})
    return [y_to.reshape(b, t, p.d_out) for p, y_to in zip(projections, ys, strict=True)]


class MoELoRALinear(nnx.Module):
    """A projection ``d_in -> d_out``; with ``num_experts > 0`` it also carries experts and a gate."""

    def __init__(
        self,
        name: str,
        d_in: int,
        d_out: int,
        *,
        use_bias: bool,
        num_experts: int,
        rank: int,
        dtype: jnp.dtype,
        implementation: str | None,
        rngs: nnx.Rngs,
    ):
        self.name = name
        self.d_in, self.d_out = d_in, d_out
        self.num_experts = num_experts
        self.implementation = implementation
        ax_in, ax_out = PROJECTION_AXES[name]
        init = nnx.initializers.lecun_normal()
        self.kernel_io = nnx.Param(init(rngs.params(), (d_in, d_out), dtype), logical_axes=(ax_in, ax_out))
        self.bias_o = nnx.Param(jnp.zeros((d_out,), dtype), logical_axes=(ax_out,)) if use_bias else None
        if num_experts > 0:
            # Random experts (not zeros): a fresh layer must exercise every path; loaders overwrite them.
            small = nnx.initializers.normal(0.02)
            self.lora_a_edr = ExpertParam(
                small(rngs.params(), (num_experts, d_in, rank), dtype),
                logical_axes=("expert", ax_in, "lora_rank"),
            )
            self.lora_b_ero = ExpertParam(
                small(rngs.params(), (num_experts, rank, d_out), dtype),
                logical_axes=("expert", "lora_rank", ax_out),
            )
            self.scaling_e = ExpertParam(jnp.ones((num_experts,), jnp.float32), logical_axes=("expert",))
            self.gate_de = GateParam(
                small(rngs.params(), (d_in, num_experts), jnp.float32), logical_axes=(ax_in, "expert")
            )
        else:
            self.lora_a_edr = self.lora_b_ero = self.scaling_e = self.gate_de = None

    def expert_factors(self) -> tuple[Array, Array, Array, Array]:
        """``(W, A, B, scaling)`` as the kernel takes them. The factors may be float32 master copies
        (gate_and_experts training of a bf16 model): the kernel computes in the base's dtype (a no-op cast
        otherwise)."""
        compute = self.kernel_io.dtype
        return (
            self.kernel_io[...],
            self.lora_a_edr[...].astype(compute),
            self.lora_b_ero[...].astype(compute),
            self.scaling_e[...],
        )

    def __call__(
        self,
        x_btd: Float[Array, "B T D"],
        routing: RoutingOptions,
        aux: list | None = None,
        shared: SharedRoute | None = None,
    ) -> Float[Array, "B T O"]:
        """``shared``: this projection's routing when the caller computed it (``shared_gate_logits``)."""
        b, t, _ = x_btd.shape
        x_td = x_btd.reshape(b * t, self.d_in)
        if self.num_experts == 0 or routing.no_experts:
            # The GEMM writes x's dtype (it accumulates in float32 either way): a float32 output plus a convert
            # made cuBLAS write [T, O] float32 and XLA launch a separate convert, 64 of them (5.4 ms) in the
            # experts-off model's 4096-token Llama-3-8B prefill on the H200 (profile_prefill_h200_s9.json).
            y_to = jnp.dot(x_td, self.kernel_io[...], preferred_element_type=x_td.dtype)
        else:
            if routing.force_expert is not None:
                ids_tk, weights_tk = forced(b * t, routing.force_expert)
                logits_te = None
            elif shared is not None and shared.ids_tk is not None:
                logits_te, ids_tk, weights_tk = shared.logits_te, shared.ids_tk, shared.weights_tk
            else:
                if shared is not None:
                    logits_te = shared.logits_te
                else:
                    logits_te = gate_logits(gate_input(x_td, routing), self.gate_de[...])
                ids_tk, weights_tk = route(
                    logits_te, top_k=routing.top_k, temperature=routing.temperature, mode=routing.mode
                )
            w_do, a_edr, b_ero, scaling_e = self.expert_factors()
            y_to = grouped_lora_fused(
                x_td,
                w_do,
                a_edr,
                b_ero,
                ids_tk,
                weights_tk,
                scaling=scaling_e,
                implementation=self.implementation,
            )
            if aux is not None:
                aux.append({"name": self.name, "gate_logits": logits_te, "expert_ids": ids_tk})
        if self.bias_o is not None:
            y_to = y_to + self.bias_o[...]
        return y_to.reshape(b, t, self.d_out)
