"""``pallas_gpu_pack``: the packed shrink + gate GEMM ``x @ pack`` (float32 out) for batched decode, in interpret
mode against a float64 NumPy reference, wired into the model's packed path (``pack_kernel`` knob), and lowered
for CUDA at Llama-3-8B shapes on this CPU-only host. Compiled twins are marked ``gpu``."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_lora import api, pallas_gpu_expand, pallas_gpu_pack
from pallas_kernels.grouped_lora.pallas_gpu_pack import PackConfig
from tests.grouped_lora_cases import rel_err
from tests.test_pallas_decode import _triton_kernels, _walk, three_prompt_logits, tiny_decode_model

# name -> (T, d_in, N, dtype, tiles); d_in and N off the blocks' multiples where it tests a masked tail
CASES = {
    "t2_f32_split1": (2, 72, 40, "float32", PackConfig(16, 32, split_k=1)),
    "t5_bf16_split2": (5, 100, 33, "bfloat16", PackConfig(16, 32, split_k=2)),
    "t16_f32_split_auto": (16, 200, 52, "float32", PackConfig(16, 32)),
    "t64_bf16_default_tiles": (64, 384, 280, "bfloat16", None),
    "t3_f32_split_past_the_steps": (3, 40, 20, "float32", PackConfig(16, 16, split_k=8)),
}


def _inputs(name: str) -> tuple[jax.Array, jax.Array]:
    t, d_in, n, dtype, _ = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = jnp.asarray(rng.standard_normal((t, d_in)), dtype)
    pack = jnp.asarray(rng.standard_normal((d_in, n)) * d_in**-0.5, dtype)
    return x, pack


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(CASES))
def test_pack_kernel_matches_float64(name, interpret):
    """float32 out whatever the operands (bf16 products are exact in float32, so bf16 is held to 1e-5 too)."""
    x, pack = _inputs(name)
    config = CASES[name][-1]
    got = jax.jit(lambda a, b: pallas_gpu_pack.pack_matmul(a, b, interpret=interpret, config=config))(x, pack)
    want = np.asarray(x, np.float64) @ np.asarray(pack, np.float64)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want) < 1e-5
    # every column and row is written (a missed tail block would leave zeros or garbage)
    assert np.all(np.abs(np.asarray(got) - want) <= 1e-4 * (1 + np.abs(want)))


def test_pack_kernel_refuses_mismatched_inputs():
    x, pack = _inputs("t2_f32_split1")
    with pytest.raises(ValueError, match="do not match"):
        pallas_gpu_pack.pack_matmul(x, pack[:-1], interpret=True)
    with pytest.raises(ValueError, match="do not match"):
        pallas_gpu_pack.pack_matmul(x, pack.astype(jnp.bfloat16), interpret=True)


def test_pack_kernel_tiles_split_narrow_packs_to_fill_the_gpu():
    """Llama-3-8B's q/k/v pack at batch 64 (840 columns: 14 blocks of 64) splits d_in 16 ways for >= 132
    programs; each split keeps >= 2 steps; an explicit split is clamped to the steps there are."""
    tiles = pallas_gpu_expand._tiles(PackConfig(), 64, 4096, (840,), 0)
    assert (tiles.rows, tiles.block_n, tiles.split_k, tiles.split_steps) == (64, 64, 16, 2)
    assert tiles.lora_steps == 0  # the W loop alone
    assert pallas_gpu_expand._tiles(PackConfig(split_k=99), 2, 256, (40,), 0).split_k == 2
    assert pallas_gpu_expand._tiles(PackConfig(), 2, 4096, (4096 * 4,), 0).split_k == 1


def test_pack_kernel_plan_and_shared_memory(monkeypatch):
    """Off by default (until a GPU A/B); with the knob on: the GPU decode backend from 2 tokens to the knob, if
    the tiles fit in shared memory, never XLA's backend."""
    assert pallas_gpu_pack.PACK_KERNEL_MAX_TOKENS == 0
    impl = "pallas_gpu_decode_interpret"
    assert api.pack_kernel_plan(impl, 8, 48) is None
    monkeypatch.setattr(pallas_gpu_pack, "PACK_KERNEL_MAX_TOKENS", 256)
    assert api.pack_kernel_plan(impl, 8, 48) is True
    assert api.pack_kernel_plan(impl, 1, 48) is None  # one token: the decode kernel routes itself
    assert api.pack_kernel_plan("xla", 8, 48) is None
    assert pallas_gpu_expand.shared_memory_bytes(64, 2, PackConfig()) == 96 * 1024
    assert api.pack_kernel_plan(impl, 128, 48) is True
    assert api.pack_kernel_plan(impl, 256, 48) is None  # 240 KiB > 227 KiB
    monkeypatch.setattr(pallas_gpu_pack, "PACK_KERNEL_MAX_TOKENS", 64)
    assert api.pack_kernel_plan(impl, 65, 48) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_packed_step_with_pack_kernel_matches(monkeypatch, dtype):
    """The tiny model's packed path (the sampler's) with ``pack_kernel`` on: every group's packed GEMM through
    the kernel, beside the routed fused expand, and the logits of XLA's GEMM (knob off)."""
    model = tiny_decode_model(8, dtype, packed=True)
    cfg = model.config
    calls: list[int] = []
    kernel = pallas_gpu_pack.pack_matmul
    monkeypatch.setattr(
        pallas_gpu_pack, "pack_matmul", lambda x, p, **kw: calls.append(p.shape[1]) or kernel(x, p, **kw)
    )

    assert pallas_gpu_expand.FUSED_EXPAND_MAX_TOKENS >= 12 and pallas_gpu_expand.EXPAND_ROUTE == 1
    off = three_prompt_logits(model)
    assert not calls
    monkeypatch.setattr(pallas_gpu_pack, "PACK_KERNEL_MAX_TOKENS", 64)
    on = three_prompt_logits(model)
    assert len(calls) == 4 * cfg.num_hidden_layers
    assert rel_err(on, off) < (1e-5 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("d_in,n_cols", [(4096, 840), (4096, 280), (4096, 560), (14336, 280)])
def test_pack_kernel_lowers_for_cuda_as_one_kernel(d_in, n_cols):
    """Llama-3-8B's packs at batch 64 (bf16; q/k/v, o, gate/up, down with 28 rank-8 experts and bf16 gate
    halves) lower to ONE Triton kernel with one K loop."""
    spec = jax.ShapeDtypeStruct
    args = (spec((64, d_in), jnp.bfloat16), spec((d_in, n_cols), jnp.bfloat16))
    lowered = jax.jit(pallas_gpu_pack.pack_matmul).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    (kernel,) = _triton_kernels(lowered)
    assert sum(op.name == "scf.for" for op in _walk(kernel)) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("d_in,n_cols", [(4096, 840), (14336, 280)])
@pytest.mark.parametrize("num_tokens", [8, 64])
def test_pack_kernel_compiled_at_llama_shapes(d_in, n_cols, num_tokens):
    rng = np.random.default_rng(num_tokens + n_cols)
    x = jnp.asarray(rng.standard_normal((num_tokens, d_in)), jnp.bfloat16)
    pack = jnp.asarray(rng.standard_normal((d_in, n_cols)) / 64, jnp.bfloat16)
    got = jax.jit(pallas_gpu_pack.pack_matmul)(x, pack)
    want = np.asarray(x, np.float64) @ np.asarray(pack, np.float64)
    assert np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want) < 1e-5
    xla = jnp.dot(x, pack, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    assert rel_err(got, xla) < 1e-5
