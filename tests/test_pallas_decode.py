"""The one-launch decode kernel (``pallas_gpu_decode``): interpret mode against the plain-JAX reference, its
wiring into ``pallas_gpu`` inference, and its lowering for CUDA at Llama-3-8B shapes on a CPU-only host.

The numerical cases use small shapes and small tiles, so the kernel's loops, sub-steps and masks all run:
several K steps with a masked tail (d_in not a multiple of block_k), a masked last column tile, padded
token rows (T = 3) and a padded rank (r = 3), repeated experts and a zero routing weight. Each runs with both
base products (``DecodeConfig.base_dot``: tensor-core "mma", CUDA-core "fma"). Their compiled twins and a
check at Llama-3-8B shapes with the default tiles are marked ``gpu`` (skipped without one).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.lib import triton
from jax._src.lib.mlir import ir

from pallas_kernels.grouped_lora import api, pallas_gpu, pallas_gpu_decode, shapes
from pallas_kernels.grouped_lora.reference import grouped_lora_reference
from pallas_kernels.grouped_lora.vjp import grouped_lora_vjp
from tests.grouped_lora_cases import rel_err

# Tiles small enough that the test shapes take several K steps, shrink sub-steps and column programs.
SMALL = pallas_gpu_decode.DecodeConfig(block_n=16, block_k=32, lora_elems=512)
# Relative to the LoRA term's norm: bf16 output rounding of y (~ x @ W + LoRA, both of norm ~ |x|) stays < 1e-2.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def _case(t: int, d_in: int, d_out: int, e: int, r: int, k: int, dtype: str) -> shapes.Case:
    return shapes.Case(f"decode_t{t}_{d_in}x{d_out}_e{e}_r{r}_k{k}", t, d_in, d_out, e, r, k, dtype=dtype)


# name -> (shapes, tiles); None = the default tiles (DecodeConfig.for_shape).
CASES = {
    "t1_k2_f32_default_tiles": (_case(1, 64, 48, 28, 8, 2, "float32"), None),
    "t1_k1_bf16_dmod": (_case(1, 100, 40, 28, 8, 1, "bfloat16"), SMALL),
    "t3_k2_f32_dmod": (_case(3, 72, 40, 5, 8, 2, "float32"), SMALL),
    "t3_k1_bf16_rank3": (_case(3, 48, 24, 4, 3, 1, "bfloat16"), SMALL),
    "t16_k2_bf16": (_case(16, 80, 56, 6, 8, 2, "bfloat16"), SMALL),
    "t16_k1_f32_dmod_rank3": (_case(16, 40, 33, 28, 3, 1, "float32"), SMALL),
    # split-K: 4 steps in 2 splits; 3 steps in 2 splits (the last split's second step lies past d_in)
    "t1_k2_bf16_split2": (_case(1, 128, 40, 28, 8, 2, "bfloat16"), dataclasses.replace(SMALL, split_k=2)),
    "t3_k2_f32_dmod_split2": (_case(3, 72, 40, 5, 8, 2, "float32"), dataclasses.replace(SMALL, split_k=2)),
    "t1_k1_f32_split_auto": (_case(1, 256, 48, 6, 4, 1, "float32"), dataclasses.replace(SMALL, split_k=0)),
    # tiles of the size "fma" is meant for (block_k 64, block_n 64), masked tails on both, split from the shape
    "t1_k2_bf16_fma_tiles": (
        _case(1, 200, 100, 28, 8, 2, "bfloat16"),
        pallas_gpu_decode.DecodeConfig(block_n=64, block_k=64, split_k=0),
    ),
}
BASE_DOTS = pallas_gpu_decode.BASE_DOTS


def _inputs(case: shapes.Case, name: str) -> dict:
    """Fresh random inputs seeded from the test name (NumPy: no compile), sized like ``shapes.make_inputs``.

    Token 0 routes every slot to one expert; the last slot gets weight 0 (unless it is the only one).
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t, d, o, e, r, k = case.num_tokens, case.d_in, case.d_out, case.num_experts, case.rank, case.top_k
    ids_tk = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    ids_tk[0, :] = ids_tk[0, 0]
    weights_tk = rng.dirichlet(np.ones(k), size=t).astype(np.float32)
    if t * k > 1:
        weights_tk[-1, -1] = 0.0
    dtype = jnp.dtype(case.dtype)
    normal = lambda *shape, scale: jnp.asarray(rng.standard_normal(shape) * scale, dtype)  # noqa: E731
    return {
        "x": normal(t, d, scale=1.0),
        "w": normal(d, o, scale=d**-0.5),
        "lora_a": normal(e, d, r, scale=d**-0.5),
        "lora_b": normal(e, r, o, scale=r**-0.5),
        "expert_ids": jnp.asarray(ids_tk),
        "expert_weights": jnp.asarray(weights_tk),
        "scaling": jnp.asarray(rng.uniform(0.5, 2.0, e), jnp.float32),
    }


@jax.jit
def _want(inp: dict) -> tuple[jax.Array, jax.Array]:
    """(x @ W + LoRA, LoRA) in float32, from the plain-JAX reference."""
    lora_to = grouped_lora_reference(
        inp["x"].astype(jnp.float32),
        inp["lora_a"],
        inp["lora_b"],
        inp["expert_ids"],
        inp["expert_weights"],
        scaling_e=inp["scaling"],
    )
    base_to = jnp.dot(
        inp["x"].astype(jnp.float32), inp["w"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return base_to + lora_to, lora_to


def _norm(v: jax.Array) -> float:
    return float(np.linalg.norm(np.asarray(v, np.float64)))


def _args(inp: dict) -> tuple:
    keys = ("x", "w", "lora_a", "lora_b", "expert_ids", "expert_weights", "scaling")
    return tuple(inp[k] for k in keys)


def _check(
    case: shapes.Case, config: pallas_gpu_decode.DecodeConfig | None, name: str, *, interpret: bool
) -> None:
    inp = _inputs(case, name)
    y_to = jax.jit(lambda *a: pallas_gpu_decode.decode_forward(*a, interpret=interpret, config=config))(
        *_args(inp)
    )
    want_to, lora_to = _want(inp)
    assert y_to.dtype == inp["x"].dtype and y_to.shape == want_to.shape
    # The LoRA term is about the size of the base term, so dropping or misrouting it cannot pass.
    assert _norm(lora_to) > 0.3 * _norm(want_to - lora_to)
    assert _norm(y_to.astype(jnp.float32) - want_to) / _norm(lora_to) < TOLERANCE[case.dtype]


def _with_base_dot(
    config: pallas_gpu_decode.DecodeConfig | None, case: shapes.Case, base_dot: str
) -> pallas_gpu_decode.DecodeConfig:
    """``config`` (None: the default tiles for ``case``) with the base product ``base_dot``."""
    config = config or pallas_gpu_decode.DecodeConfig.for_shape(case.num_tokens, case.d_in, case.d_out)
    return dataclasses.replace(config, base_dot=base_dot)


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("base_dot", BASE_DOTS)
@pytest.mark.parametrize("name", list(CASES))
def test_decode_kernel_matches_reference(name, base_dot, interpret):
    case, config = CASES[name]
    # Seeded by the case, not the test id: the compiled run and both base products see the same inputs.
    _check(case, _with_base_dot(config, case, base_dot), name, interpret=interpret)


# Cases whose loops have one to four K steps, shrink sub-steps, split-K, and a masked d_in tail.
PREFETCH_CASES = [
    "t1_k2_f32_default_tiles",
    "t1_k1_bf16_dmod",
    "t3_k2_f32_dmod",
    "t1_k2_bf16_split2",
    "t3_k2_f32_dmod_split2",
]


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("name", PREFETCH_CASES)
def test_decode_kernel_with_and_without_shrink_prefetch_matches_reference(name, prefetch, interpret):
    """``prefetch`` (the default): each step's shrink operands arrive one step early through the loop carry, and
    the last step reloads its own. A carry used one step late or a lost first step would move the LoRA term.
    Without it (the other cases run the default), each step loads its own."""
    case, config = CASES[name]
    config = dataclasses.replace(_with_base_dot(config, case, "mma"), prefetch=prefetch)
    assert (
        pallas_gpu_decode._tiles(config, case.num_tokens, case.d_in, case.d_out, case.rank).prefetch
        == prefetch
    )
    _check(case, config, name, interpret=interpret)


def test_shrink_prefetch_follows_its_knob_unless_the_config_says(monkeypatch):
    cfg = pallas_gpu_decode.DecodeConfig.for_shape(1, 4096, 4096)
    assert pallas_gpu_decode._tiles(cfg, 1, 4096, 4096, 8).prefetch  # the default
    monkeypatch.setattr(pallas_gpu_decode, "DECODE_SHRINK_PREFETCH", 0)
    assert not pallas_gpu_decode._tiles(cfg, 1, 4096, 4096, 8).prefetch
    assert pallas_gpu_decode._tiles(dataclasses.replace(cfg, prefetch=True), 1, 4096, 4096, 8).prefetch


def test_base_dot_defaults_to_mma_reaches_the_tiles_and_refuses_unknown_names():
    fma = pallas_gpu_decode.DecodeConfig(block_n=64, block_k=128, base_dot="fma")
    assert pallas_gpu_decode.DecodeConfig(block_n=64, block_k=128).base_dot == "mma"  # the default
    assert pallas_gpu_decode._tiles(fma, 1, 4096, 4096, 8).fma
    assert not pallas_gpu_decode._tiles(dataclasses.replace(fma, base_dot="mma"), 1, 4096, 4096, 8).fma
    with pytest.raises(ValueError, match="base_dot"):
        pallas_gpu_decode.DecodeConfig(block_n=64, block_k=128, base_dot="wmma")


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
def test_decode_kernel_compiled_at_llama_shapes(num_tokens, d_in, d_out, request):
    """Triton-compiled with the default tiles (E=28, r=8, top-2, bf16): registers and shared memory fit."""
    _check(_case(num_tokens, d_in, d_out, 28, 8, 2, "bfloat16"), None, request.node.name, interpret=False)


def test_pallas_gpu_inference_runs_the_decode_kernel_only_for_few_tokens(request):
    """``grouped_lora_fused(implementation="pallas_gpu")``: decode kernel in inference up to the threshold."""
    case = _case(pallas_gpu_decode.DECODE_MAX_TOKENS, 32, 32, 6, 8, 2, "float32")
    inp = _inputs(case, request.node.name)

    def fused(x, implementation="pallas_gpu_interpret"):
        return api.grouped_lora_fused(
            x,
            inp["w"],
            inp["lora_a"],
            inp["lora_b"],
            inp["expert_ids"],
            inp["expert_weights"],
            scaling=inp["scaling"],
            implementation=implementation,
        )

    jaxpr = str(jax.make_jaxpr(fused)(inp["x"]))
    assert "lora_decode_fused" in jaxpr and "sort" not in jaxpr and "lora_token_shrink" not in jaxpr
    want_to, _ = _want(inp)
    assert rel_err(jax.jit(fused)(inp["x"]), want_to) < TOLERANCE["float32"]
    # Differentiated calls keep the shrink / fused-GEMM path and its residuals.
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: fused(x).sum()))(inp["x"]))
    assert "lora_decode_fused" not in grad_jaxpr and "lora_fused_gemm" in grad_jaxpr
    # Above DECODE_MAX_TOKENS: the old path.
    many = pallas_gpu_decode.DECODE_MAX_TOKENS + 1
    x_many = jnp.zeros((many, case.d_in), jnp.float32)
    ids_many = jnp.zeros((many, case.top_k), jnp.int32)
    jaxpr_many = str(
        jax.make_jaxpr(
            lambda x: api.grouped_lora_fused(
                x,
                inp["w"],
                inp["lora_a"],
                inp["lora_b"],
                ids_many,
                jnp.ones((many, case.top_k)),
                scaling=inp["scaling"],
                implementation="pallas_gpu_interpret",
            )
        )(x_many)
    )
    assert "lora_decode_fused" not in jaxpr_many and "lora_fused_gemm" in jaxpr_many


@pytest.mark.parametrize("num_tokens,want_kernel", [(1, True), (2, False)])
def test_pallas_gpu_decode_takes_the_kernel_only_for_one_token(num_tokens, want_kernel, monkeypatch):
    """``implementation="pallas_gpu_decode"``: the kernel in inference at T <= DECODE_MAX_TOKENS, else ``xla``.

    Values match the reference either way, and a differentiated call is all ``xla`` (no Pallas kernel).
    """
    monkeypatch.setattr(pallas_gpu_decode, "DECODE_MAX_TOKENS", 1)
    d_in = 72
    case = _case(num_tokens, d_in, 40, 6, 8, 2, "float32")
    inp = _inputs(case, f"hybrid_{num_tokens}_{d_in}")

    def fused(x, w):
        return api.grouped_lora_fused(
            x,
            w,
            inp["lora_a"],
            inp["lora_b"],
            inp["expert_ids"],
            inp["expert_weights"],
            scaling=inp["scaling"],
            implementation="pallas_gpu_decode_interpret",
        )

    jaxpr = str(jax.make_jaxpr(fused)(inp["x"], inp["w"]))
    assert ("lora_decode_fused" in jaxpr) == want_kernel
    want_to, _ = _want(inp)
    assert rel_err(jax.jit(fused)(inp["x"], inp["w"]), want_to) < TOLERANCE["float32"]
    grad = lambda x: jax.grad(lambda x_: fused(x_, inp["w"]).sum())(x)  # noqa: E731
    assert "pallas_call" not in str(jax.make_jaxpr(grad)(inp["x"]))
    ref_grad = jax.grad(
        lambda x: (
            grouped_lora_reference(
                x,
                inp["lora_a"],
                inp["lora_b"],
                inp["expert_ids"],
                inp["expert_weights"],
                scaling_e=inp["scaling"],
            ).sum()
            + (x @ inp["w"]).sum()
        )
    )(inp["x"])
    assert rel_err(jax.jit(grad)(inp["x"]), ref_grad) < TOLERANCE["float32"]


# "fma" lowering: its intended tiles (DecodeConfig doc), split-K from the shape.
FMA_LOWERING_CONFIG = pallas_gpu_decode.DecodeConfig(block_n=128, block_k=64, split_k=0, base_dot="fma")


@pytest.mark.parametrize("base_dot", BASE_DOTS)
@pytest.mark.parametrize("num_tokens", [1, 16])
@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (4096, 14336), (14336, 4096), (72, 40)])
def test_decode_kernel_lowers_for_cuda_as_one_kernel(num_tokens, d_in, d_out, base_dot, monkeypatch):
    """Llama-3-8B projections (E=28, r=8, top-2, bf16) lower to Triton for CUDA as one custom call.

    The only other ops allowed are the sum of the split-K partials (reshape, reduce, convert), present
    exactly when the tiles split d_in. This runs Pallas's lowering to Triton IR on a CPU-only jaxlib;
    Triton's own compiler passes (layouts, registers, shared memory) run only when XLA compiles the module
    on a GPU. (72, 40) lowers the masks. "mma" runs the default tiles, "fma" ``FMA_LOWERING_CONFIG``. In
    the Triton IR only "mma" has a ``tt.dot``, and no ``tt.reduce`` is inside the K loop.
    """
    monkeypatch.setattr(pallas_gpu_decode, "DECODE_MAX_TOKENS", 16)  # the kernel itself serves any T
    if base_dot == "fma":
        monkeypatch.setattr(pallas_gpu_decode, "DECODE_CONFIG_OVERRIDE", FMA_LOWERING_CONFIG)
    num_experts, rank, top_k = 28, 8, 2
    spec = jax.ShapeDtypeStruct
    args = (
        spec((num_tokens, d_in), jnp.bfloat16),
        spec((d_in, d_out), jnp.bfloat16),
        spec((num_experts, d_in, rank), jnp.bfloat16),
        spec((num_experts, rank, d_out), jnp.bfloat16),
        spec((num_tokens, top_k), jnp.int32),
        spec((num_tokens, top_k), jnp.float32),
        spec((num_experts,), jnp.float32),
    )
    ops = pallas_gpu.PallasGpuOps(interpret=False)
    lowered = jax.jit(lambda *a: grouped_lora_vjp(ops, *a)).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    ops_in_module = {
        line.split("=", 1)[-1].split()[0].split("(")[0] for line in text.splitlines() if "stablehlo." in line
    }
    cfg = pallas_gpu_decode.DECODE_CONFIG_OVERRIDE or pallas_gpu_decode.DecodeConfig.for_shape(
        num_tokens, d_in, d_out
    )
    assert cfg.base_dot == base_dot
    split = pallas_gpu_decode._tiles(cfg, num_tokens, d_in, d_out, rank).split_k
    partial_sum = {"stablehlo.reshape", "stablehlo.reduce", "stablehlo.convert", "stablehlo.constant"}
    want = {"stablehlo.custom_call"} | (partial_sum if split > 1 else set())
    assert ops_in_module == want, (split, ops_in_module)
    (kernel,) = _triton_kernels(lowered)
    ops = [op.name for op in _walk(kernel)]
    assert ("tt.dot" in ops) == (base_dot == "mma")
    # Both the base ("fma") and the shrink accumulate elementwise and reduce once, after the K loop: one sum
    # per slot's shrink, one over r for all slots' expand terms together, one over block_k for "fma" (each is a
    # cross-warp reduction with barriers in the kernel's tail; session 22 took two out: -1 to -4% at T = 1).
    (loop,) = [op for op in _walk(kernel) if op.name == "scf.for"]
    assert "tt.reduce" not in [op.name for op in _walk(loop)]
    assert ops.count("tt.reduce") == top_k + 1 + (base_dot == "fma")


def _walk(op: ir.Operation):
    """``op`` and every operation nested in it."""
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _walk(child.operation)


def _triton_kernels(lowered: jax.stages.Lowered) -> list[ir.Operation]:
    """The Triton IR modules of the lowered module's Pallas custom calls (serialized in ``backend_config``)."""
    kernels = []
    for op in _walk(lowered.compiler_ir("stablehlo").operation):
        if op.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            ctx = ir.Context()
            triton.dialect.register_dialect(ctx)
            with ctx:
                kernels.append(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation)
    return kernels


# A q/k/v-like group: one x, three widths (the narrow two with masked column tails at block_n 16).
GROUP_CASES = {
    "t1_k2_f32": (1, 72, (40, 24, 24), 2, "float32", SMALL),
    "t3_k1_bf16": (3, 72, (40, 24, 24), 1, "bfloat16", SMALL),
    "t1_k2_bf16_split2": (1, 128, (48, 16), 2, "bfloat16", dataclasses.replace(SMALL, split_k=2)),
    "t1_k2_f32_default_tiles": (1, 64, (64, 32, 32), 2, "float32", None),
}


def _group_inputs(name: str) -> tuple[dict, list[dict]]:
    t, d_in, d_outs, k, dtype, _ = GROUP_CASES[name]
    parts = [
        _inputs(_case(t, d_in, o, 6, 8 if i else 3, k, dtype), f"{name}-{i}") for i, o in enumerate(d_outs)
    ]
    x = parts[0]["x"]
    return {"x": x}, [{**p, "x": x} for p in parts]


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_group_decode_kernel_matches_each_projection(name):
    """``decode_forward_group`` (one launch for P projections) equals each projection's reference, and each
    projection's own ``decode_forward`` with the same tiles; ranks differ (3 and 8) inside one group."""
    *_, dtype, config = GROUP_CASES[name]
    shared, parts = _group_inputs(name)
    ys = jax.jit(
        lambda x, parts: pallas_gpu_decode.decode_forward_group(
            x,
            [p["w"] for p in parts],
            [p["lora_a"] for p in parts],
            [p["lora_b"] for p in parts],
            [p["expert_ids"] for p in parts],
            [p["expert_weights"] for p in parts],
            [p["scaling"] for p in parts],
            interpret=True,
            config=config,
        )
    )(shared["x"], parts)
    assert len(ys) == len(parts)
    for y_to, inp in zip(ys, parts, strict=True):
        want_to, lora_to = _want(inp)
        assert y_to.dtype == inp["x"].dtype and y_to.shape == want_to.shape
        # float32: against the LoRA term (misrouting fails); bf16: against y (its output rounding dominates)
        scale = _norm(lora_to) if dtype == "float32" else _norm(want_to)
        assert _norm(y_to.astype(jnp.float32) - want_to) / scale < TOLERANCE[dtype]
        own = pallas_gpu_decode.decode_forward(*_args(inp), interpret=True, config=config)
        np.testing.assert_array_equal(np.asarray(y_to), np.asarray(own))  # same tiles, same sums


def test_group_decode_through_the_api_and_its_gradients(monkeypatch):
    """``grouped_lora_fused_shared`` takes the group kernel only with ``GROUP_DECODE_MAX_TOKENS`` on and for
    the decode kernel's backend; its outputs and gradients (each projection's own rules) equal the knob off."""
    shared, parts = _group_inputs("t1_k2_f32")
    cols = lambda k: [p[k] for p in parts]  # noqa: E731
    impl = "pallas_gpu_decode_interpret"

    def run(x, wts):
        return api.grouped_lora_fused_shared(
            x, cols("w"), cols("lora_a"), cols("lora_b"), cols("expert_ids"), wts,
            scalings=cols("scaling"), implementation=impl,
        )  # fmt: skip

    def loss(x, wts):
        return sum(jnp.sum(y * (i + 1)) for i, y in enumerate(run(x, wts)))

    calls = []
    group = pallas_gpu_decode.decode_forward_group
    monkeypatch.setattr(
        pallas_gpu_decode, "decode_forward_group", lambda *a, **kw: calls.append(1) or group(*a, **kw)
    )
    monkeypatch.setattr(api, "GROUP_DECODE_MAX_TOKENS", 0)
    off = run(shared["x"], cols("expert_weights"))
    off_grads = jax.grad(loss, argnums=(0, 1))(shared["x"], cols("expert_weights"))
    assert not calls
    monkeypatch.setattr(api, "GROUP_DECODE_MAX_TOKENS", 1)
    on = run(shared["x"], cols("expert_weights"))
    assert calls
    for a, b in zip(on, off, strict=True):
        assert rel_err(a, b) < 1e-5
    on_grads = jax.grad(loss, argnums=(0, 1))(shared["x"], cols("expert_weights"))
    for a, b in zip(jax.tree.leaves(on_grads), jax.tree.leaves(off_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert api._group_decode_plan("xla", 1, cols("lora_a"), cols("w")) is None
    assert api._group_decode_plan(impl, 2, cols("lora_a"), cols("w")) is None  # above DECODE_MAX_TOKENS
    assert api._group_decode_plan(impl, 1, cols("lora_a")[:1], cols("w")[:1]) is None


@pytest.mark.parametrize("d_outs", [(4096, 1024, 1024), (14336, 14336)], ids=["qkv", "gate_up"])
def test_group_decode_kernel_lowers_for_cuda_as_one_kernel(d_outs):
    """q/k/v (4096 -> 4096, 1024, 1024) and gate/up (4096 -> 14336 twice) of Llama-3-8B (E=28, r=8, top-2,
    bf16, T=1) lower to ONE Triton kernel (plus the split-K sum) for CUDA on this CPU-only host, with one K
    loop per projection branch."""
    spec = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    args = (
        spec((1, 4096), bf16),
        [spec((4096, o), bf16) for o in d_outs],
        [spec((28, 4096, 8), bf16) for _ in d_outs],
        [spec((28, 8, o), bf16) for o in d_outs],
        [spec((1, 2), jnp.int32) for _ in d_outs],
        [spec((1, 2), jnp.float32) for _ in d_outs],
        [spec((28,), jnp.float32) for _ in d_outs],
    )
    lowered = jax.jit(pallas_gpu_decode.decode_forward_group).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    (kernel,) = _triton_kernels(lowered)
    assert sum(op.name == "scf.for" for op in _walk(kernel)) == len(d_outs)
    assert sum(op.name == "scf.if" for op in _walk(kernel)) >= len(d_outs)


def test_model_decode_step_with_group_decode_matches(monkeypatch):
    """A tiny model's one-token decode step (the decode kernel in interpret mode on every projection): with
    q/k/v and gate/up each in one launch, the same logits as one launch per projection."""
    model = tiny_decode_model(4)
    cfg = model.config
    assert api.GROUP_DECODE_MAX_TOKENS == 1  # the default since session 11 (H100 A/B, benchmarks/RESULTS.md)
    monkeypatch.setattr(api, "GROUP_DECODE_MAX_TOKENS", 0)
    # given routing here; routing inside the kernel is tests/test_routed_decode.py's
    monkeypatch.setattr(api, "ROUTED_DECODE_MAX_TOKENS", 0)
    calls = []
    group = pallas_gpu_decode.decode_forward_group
    monkeypatch.setattr(
        pallas_gpu_decode, "decode_forward_group", lambda *a, **kw: calls.append(1) or group(*a, **kw)
    )

    off = one_token_step(model)
    assert not calls
    monkeypatch.setattr(api, "GROUP_DECODE_MAX_TOKENS", 1)
    on = one_token_step(model)
    assert len(calls) == 2 * cfg.num_hidden_layers  # q/k/v and gate/up of every layer, at the one-token step
    assert rel_err(on, off) < 1e-5


def tiny_decode_model(seed: int, dtype: str = "float32", *, packed: bool = False):  # noqa: ANN201
    """The tiny Llama with 6 experts on ``pallas_gpu_decode`` in interpret mode (the GPU decode paths on this
    CPU host); ``packed``: with its inference packs attached, as the sampler runs it."""
    from flax import nnx

    from meteora_jax import MeteoraLlama, ModelConfig, MoEConfig

    cfg = ModelConfig.tiny(vocab_size=99)
    moe = MoEConfig(
        expert_names=tuple(f"e{i}" for i in range(6)), implementation="pallas_gpu_decode_interpret"
    )
    model = MeteoraLlama(cfg, moe, dtype=dtype, rngs=nnx.Rngs(seed))
    if packed:
        model.pack_for_inference()
    return model


def traced_logits(model, ids, mask, positions, **forward_kw) -> jax.Array:  # noqa: ANN001
    """``model.forward(...).logits`` jitted as the sampler runs it (eager, the interpreted kernels take about
    twice as long), traced afresh at every call so that thresholds a test patches between calls apply;
    ``forward_kw`` are static options."""
    fn = nnx.jit(lambda m, i, a, p: m.forward(i, attention_mask=a, positions=p, **forward_kw).logits)
    return fn(model, ids, mask, positions)


def three_prompt_logits(model) -> jax.Array:  # noqa: ANN001
    """``traced_logits`` of three unpadded 4-token prompts: 12 rows, a batched-decode size for the group kernels."""
    ids = jnp.asarray([[1, 5, 6, 7], [1, 8, 9, 3], [4, 4, 2, 1]])
    return traced_logits(model, ids, jnp.ones((3, 4), jnp.int32), jnp.arange(4)[None])


def one_token_step(model, **forward_kw) -> jax.Array:  # noqa: ANN001
    """A 4-token prefill into a fresh cache, then the logits of one decoded token (a decode step).

    Jitted as the sampler runs it (eager, the interpreted kernels took about twice as long), and traced afresh at
    every call: a new function each time, so thresholds a test patches between calls apply."""

    def forward(model, ids, mask, positions, cache, kw):  # noqa: ANN001, ANN202
        out = model.forward(ids, attention_mask=mask, positions=positions, cache=cache, **kw)
        return out.logits, out.cache

    prefill = nnx.jit(functools.partial(forward, kw={}))
    step = nnx.jit(functools.partial(forward, kw=forward_kw))  # the options are static, as the sampler's
    mask = jnp.zeros((1, 8), jnp.int32).at[:, :4].set(1)
    _, cache = prefill(model, jnp.asarray([[1, 5, 6, 7]]), mask, jnp.arange(4)[None], model.init_cache(1, 8))
    logits, _ = step(model, jnp.asarray([[9]]), mask.at[:, 4].set(1), jnp.full((1, 1), 4), cache)
    return logits


@pytest.mark.gpu
@pytest.mark.parametrize("d_outs", [(4096, 1024, 1024), (14336, 14336)], ids=["qkv", "gate_up"])
def test_group_decode_compiled_at_llama_shapes(d_outs, request):
    """Triton-compiled with the default tiles at Llama-3-8B's q/k/v and gate/up (E=28, r=8, top-2, bf16,
    T=1): every projection against its reference."""
    parts = [
        _inputs(_case(1, 4096, o, 28, 8, 2, "bfloat16"), f"{request.node.name}-{i}")
        for i, o in enumerate(d_outs)
    ]
    x = parts[0]["x"]
    ys = jax.jit(pallas_gpu_decode.decode_forward_group)(
        x,
        *(
            [{**p, "x": x}[k] for p in parts]
            for k in ("w", "lora_a", "lora_b", "expert_ids", "expert_weights", "scaling")
        ),
    )
    for y_to, inp in zip(ys, parts, strict=True):
        want_to, _ = _want({**inp, "x": x})
        assert _norm(y_to.astype(jnp.float32) - want_to) / _norm(want_to) < TOLERANCE["bfloat16"]
