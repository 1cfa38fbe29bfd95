"""Save/load round trips, strict building, and atomic writes."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.io import atomic_directory
from meteora_jax.model.params_io import build_model, flat_params


@pytest.fixture(scope="module")
def tiny():
    cfg = mj.ModelConfig.tiny()
    moe = mj.MoEConfig(expert_names=("a", "b", "c"), rank=4, top_k=2)
    return cfg, moe, mj.MeteoraLlama(cfg, moe)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_roundtrip(tmp_path, tiny, dtype):
    cfg, moe, model = tiny
    model = build_model(cfg, moe, {k: np.asarray(v) for k, v in flat_params(model).items()}, dtype=dtype)
    out = tmp_path / "m"
    mj.save(model, out)
    loaded = mj.load(out)
    assert loaded.expert_names == ["a", "b", "c"] and loaded.dtype == jnp.dtype(dtype)
    ids = jnp.asarray(np.arange(12).reshape(2, 6))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(loaded(ids)))
    np.testing.assert_array_equal(
        np.asarray(model(ids, force_expert="b")), np.asarray(loaded(ids, force_expert=1))
    )
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_build_rejects_missing_extra_shape_nan(tiny):
    cfg, moe, model = tiny
    flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
    name = "layers.0.mlp.gate_proj.kernel_io"  # [64, 128]: its transpose is a wrong shape
    with pytest.raises(mj.MeteoraInputError, match="missing 1"):
        build_model(cfg, moe, {k: v for k, v in flat.items() if k != name}, source="f.safetensors")
    with pytest.raises(mj.MeteoraInputError, match="unexpected 1"):
        build_model(cfg, moe, {**flat, "bogus": np.zeros(1)}, source="f.safetensors")
    with pytest.raises(mj.MeteoraInputError, match="shape"):
        build_model(cfg, moe, {**flat, name: flat[name].T}, source="f.safetensors")
    bad = flat[name].copy()
    bad[0, 0] = np.nan
    with pytest.raises(mj.MeteoraInputError, match="NaN"):
        build_model(cfg, moe, {**flat, name: bad}, source="f.safetensors")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_refuses_existing_output(tmp_path, tiny):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(mj.MeteoraInputError, match="already exists"):
        mj.save(tiny[2], out)
    assert os.listdir(out) == ["keep"]


def test_load_errors(tmp_path, tiny):
    with pytest.raises(mj.MeteoraInputError, match="no such model directory"):
        mj.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(mj.MeteoraInputError, match="meteora_config.json"):
        mj.load(tmp_path / "empty")
    out = tmp_path / "m"
    mj.save(tiny[2], out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(mj.MeteoraInputError, match="truncated"):
        mj.load(out)


def test_force_expert_and_topk_validation(tiny):
    model = tiny[2]
    ids = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(mj.MeteoraInputError, match="not an expert"):
        model(ids, force_expert="zzz")
    with pytest.raises(mj.MeteoraInputError, match="top_k=4"):
        model(ids, top_k=4)


def test_kernel_choice_is_recorded_and_validated(tmp_path, tiny):
    import json

    from pallas_kernels.grouped_lora.api import resolve_implementation

    cfg, moe, model = tiny
    assert model.kernel_implementation == resolve_implementation(None)
    mj.save(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "meteora_config.json").read_text())
    assert saved["moe"]["implementation"] is None
    assert saved["kernel_implementation_resolved"] == model.kernel_implementation
    ref = mj.load(tmp_path / "m", implementation="reference")
    assert ref.kernel_implementation == "reference"
    ids = jnp.asarray(np.arange(12).reshape(2, 6))
    np.testing.assert_allclose(np.asarray(ref(ids)), np.asarray(model(ids)), rtol=1e-5, atol=1e-5)
    with pytest.raises(mj.MeteoraInputError, match="unknown grouped_lora implementation"):
        mj.MoEConfig(expert_names=("a",), top_k=1, implementation="cublas")


def test_write_text_atomic_keeps_old_content_on_failure(tmp_path):
    from meteora_jax.io import write_text_atomic

    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # fails inside the write, after the temp file exists
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
