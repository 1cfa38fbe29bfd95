"""Grouped MoE-LoRA: every backend against the reference, outputs and every gradient.

One base class holds the checks; each backend is a small subclass. The Pallas backends run here in
interpret mode (their grids are static, so the same kernels run on CPU); the real GPU runs are marked
``gpu`` and skipped without one. The reference itself is checked against a float64 NumPy loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_lora import api, pallas_gpu, pallas_tpu, routing, shapes
from pallas_kernels.grouped_lora.vjp import grouped_lora_vjp
from tests.grouped_lora_cases import (
    GRAD_ARGS,
    TOLERANCE,
    gate_only_jaxpr,
    inputs_for,
    reference_result,
    rel_err,
    run,
)

CASES = {c.name: c for c in shapes.CI_CASES}


def _numpy_oracle(inp: dict) -> np.ndarray:
    """A float64 loop over tokens and slots: the definition, with nothing shared with the reference."""
    x = np.asarray(jnp.asarray(inp["x"], jnp.float32), np.float64)
    a = np.asarray(jnp.asarray(inp["lora_a"], jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(inp["lora_b"], jnp.float32), np.float64)
    ids, w, s = (
        np.asarray(inp["expert_ids"]),
        np.asarray(inp["expert_weights"], np.float64),
        np.asarray(inp["scaling"], np.float64),
    )
    y = np.zeros((x.shape[0], b.shape[2]))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            y[t] += w[t, j] * s[e] * (x[t] @ a[e]) @ b[e]
    return y


@pytest.mark.parametrize(
    "name", ["uniform_small", "skewed_t_not_block_multiple", "many_experts", "rank64_top1"]
)
def test_reference_matches_float64_oracle(name, request):
    inp = inputs_for(CASES[name], request.node.name)
    y = api.grouped_lora(
        inp["x"],
        inp["lora_a"],
        inp["lora_b"],
        inp["expert_ids"],
        inp["expert_weights"],
        scaling=inp["scaling"],
        implementation="reference",
    )
    assert rel_err(y, _numpy_oracle(inp)) < 1e-6


@pytest.mark.parametrize("routing_name", shapes.ROUTINGS)
@pytest.mark.parametrize("block_rows", [16, 64])
def test_work_items_cover_each_row_once(routing_name, block_rows, request):
    case = shapes.Case("c", 45, 8, 8, 12, 4, 3, routing_name)
    inp = inputs_for(case, request.node.name)
    plan = routing.make_plan(inp["expert_ids"], case.num_experts)
    group, start, lo, hi = np.asarray(routing.work_items(plan, block_rows))
    covered = np.zeros(plan.num_rows, int)
    expert_of_row = np.asarray(plan.expert_of_row)
    for g, s, lo_i, hi_i in zip(group, start, lo, hi):
        assert s <= lo_i <= hi_i <= s + block_rows and s % block_rows == 0
        covered[lo_i:hi_i] += 1
        assert np.all(expert_of_row[lo_i:hi_i] == g)
    np.testing.assert_array_equal(covered, 1)
    ids = np.asarray(inp["expert_ids"]).reshape(-1)
    np.testing.assert_array_equal(ids[np.asarray(plan.slot_of_row)], expert_of_row)
    assert np.all(np.diff(expert_of_row) >= 0)


def test_resolve_implementation():
    assert api.resolve_implementation(None) in api.IMPLEMENTATIONS
    assert api.resolve_implementation("xla_ragged") == "xla_ragged"
    assert api.resolve_implementation("pallas_gpu_interpret") == "pallas_gpu_interpret"
    with pytest.raises(ValueError):
        api.resolve_implementation("cublas")


def test_falls_through_to_next_implementation(request):
    inp = inputs_for(CASES["uniform_small"], request.node.name)
    args = (inp["x"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])
    want = api.grouped_lora(*args, scaling=inp["scaling"], implementation="reference")
    got = api.grouped_lora(*args, scaling=inp["scaling"], implementation=("pallas_tpu", "xla"))
    if jax.default_backend() != "tpu":  # pallas_tpu refuses a non-TPU platform, xla takes over
        assert rel_err(got, want) < 1e-5


class GroupedLoraTestBase:
    """Checks shared by every backend; subclasses set IMPLEMENTATION and may narrow CASE_NAMES."""

    IMPLEMENTATION: str = ""
    CASE_NAMES: tuple[str, ...] = tuple(CASES)
    FUSED_CASE_NAMES: tuple[str, ...] = ("skewed_t_not_block_multiple", "bf16_uniform", "decode_one_token")

    def _check(self, name: str, fused: bool) -> None:
        # Seeded from the test function and case, not the backend class: one reference run serves all.
        case = CASES[name]
        seed_name = f"{'fused' if fused else 'lora'}[{name}]"
        y, grads = run(inputs_for(case, seed_name), self.IMPLEMENTATION, fused=fused)
        y_ref, grads_ref = reference_result(case, seed_name, fused)
        tol = TOLERANCE[case.dtype]
        assert rel_err(y, y_ref) < tol, "output"
        for arg in GRAD_ARGS:
            assert rel_err(grads[arg], grads_ref[arg]) < tol, f"d {arg}"

    def test_outputs_and_gradients(self, case_name):
        if case_name not in self.CASE_NAMES:
            pytest.skip("case not run for this backend")
        self._check(case_name, fused=False)

    def test_fused_outputs_and_gradients(self, fused_case_name):
        if fused_case_name not in self.FUSED_CASE_NAMES:
            pytest.skip("case not run for this backend")
        self._check(fused_case_name, fused=True)

    def test_gate_only_step_launches_no_expert_weight_gradient(self, request):
        inp = inputs_for(CASES["skewed_t_not_block_multiple"], request.node.name)
        jaxpr = gate_only_jaxpr(inp, self.IMPLEMENTATION)
        assert "lora_tgmm" not in jaxpr
        # The positive control: asking for dA and dB does trace them.
        _, grads = run(inp, self.IMPLEMENTATION, wrt=("lora_b",))
        full = str(
            jax.make_jaxpr(lambda i: run(i, self.IMPLEMENTATION, wrt=("lora_a", "lora_b", "expert_weights")))(
                inp
            )
        )
        assert "lora_tgmm_da" in full and "lora_tgmm_db" in full
        assert set(grads) == {"lora_b"}


def pytest_generate_tests(metafunc):  # noqa: D103  (pytest hook for this module)
    if "case_name" in metafunc.fixturenames:
        metafunc.parametrize("case_name", list(CASES))
    if "fused_case_name" in metafunc.fixturenames:
        metafunc.parametrize("fused_case_name", list(GroupedLoraTestBase.FUSED_CASE_NAMES))


class TestXlaRagged(GroupedLoraTestBase):
    IMPLEMENTATION = "xla_ragged"


class TestXlaDense(GroupedLoraTestBase):
    IMPLEMENTATION = "xla_dense"
    CASE_NAMES = ("skewed_t_not_block_multiple", "empty_experts", "one_expert_top2", "rank1", "bf16_uniform")


class TestPallasGpuInterpret(GroupedLoraTestBase):
    """The Triton kernels in interpret mode; cases chosen to cover every kernel path cheaply."""

    IMPLEMENTATION = "pallas_gpu_interpret"
    CASE_NAMES = ("empty_experts", "many_experts", "bf16_uniform", "rank64_top1", "rank1")
    FUSED_CASE_NAMES = ("decode_one_token", "bf16_uniform")


@pytest.mark.parametrize("num_tokens", [1, 200])
def test_pallas_gpu_lowers_for_cuda(num_tokens, request):
    """The Triton kernels (forward and every gradient) lower for CUDA on a CPU-only host."""
    case = shapes.Case("c", num_tokens, 512, 256, 28, 8, 2, dtype="bfloat16")
    inp = inputs_for(case, request.node.name)

    ops = pallas_gpu.PallasGpuOps(interpret=False)

    def loss(x, w, a, b, ew):
        y = grouped_lora_vjp(ops, x, w, a, b, inp["expert_ids"], ew, inp["scaling"])
        return jnp.sum(y.astype(jnp.float32) * inp["dy"])

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
    args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_weights"])
    text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("lora_fused_gemm", "lora_tgmm", "lora_gmm" if num_tokens > 16 else "lora_token_shrink"):
        assert name in text, name


class TestPallasTpuInterpret(GroupedLoraTestBase):
    """The Mosaic TPU kernels in interpret mode: skewed, empty experts, one expert, r in {1, 8, 64}, bf16."""

    IMPLEMENTATION = "pallas_tpu_interpret"
    CASE_NAMES = (
        "skewed_t_not_block_multiple",
        "empty_experts",
        "one_expert",
        "rank1",
        "rank64_top1",
        "bf16_uniform",
    )
    FUSED_CASE_NAMES = ()  # no fused TPU kernel: the fused entry point is the same expand plus XLA's x @ W


@pytest.mark.parametrize(
    "case",
    [shapes.Case("c", 160, 256, 384, 28, 8, 2, dtype="bfloat16"), shapes.Case("c", 3, 96, 640, 5, 1, 2)],
    ids=["bf16_prefill", "f32_decode_odd_dims"],
)
def test_pallas_tpu_lowers_for_tpu(case, request):
    """The Mosaic kernels (forward and every gradient) lower for TPU on a CPU-only host.

    This runs Pallas's lowering to the Mosaic dialect (block shapes, index maps, scalar prefetch); the
    Mosaic compiler passes themselves (layouts, VMEM budget) run only on a TPU.
    """
    inp = inputs_for(case, request.node.name)
    ops = pallas_tpu.PallasTpuOps(interpret=False)

    def loss(x, w, a, b, ew):
        y = grouped_lora_vjp(ops, x, w, a, b, inp["expert_ids"], ew, inp["scaling"])
        return jnp.sum(y.astype(jnp.float32) * inp["dy"])

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
    args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_weights"])
    text = grad.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    # Forward shrink + expand, backward shrink + expand through transposed weights, dA and dB.
    assert text.count('kernel_name = "lora_gmm"') == 4
    assert text.count('kernel_name = "lora_tgmm"') == 2


def test_pallas_tpu_is_first_choice_on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert api.resolve_implementation(None) == "pallas_tpu"
    assert api._candidates(None, 28 * 8) == ("pallas_tpu", "xla")
    assert api.resolve_implementation("pallas_tpu_interpret") == "pallas_tpu_interpret"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
class TestPallasGpu(GroupedLoraTestBase):
    """The same kernels compiled by Triton on a real GPU: every case, fused too."""

    IMPLEMENTATION = "pallas_gpu"
    FUSED_CASE_NAMES = ("skewed_t_not_block_multiple", "bf16_uniform", "decode_one_token")
