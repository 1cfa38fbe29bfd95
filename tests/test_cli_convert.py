"""End to end through the console entry point: ``meteora-jax convert`` then ``mj.load``."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.testing.peft_adapters import make_peft_adapter
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_tiny_hf_checkpoint(root / "base", "smollm2", seed=2)  # tied embeddings
    a = make_peft_adapter(base, root / "math", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(base, root / "code", seed=2, r=2, target_modules=["down_proj"])
    return base, a, b


def test_convert_then_load(inputs, tmp_path, capsys):
    base, a, b = inputs
    out = tmp_path / "model"
    rc = main(["convert", "--base", base, "--adapter", f"math={a}", "--adapter", f"code={b}", "--out", str(out),
               "--temperature", "1.5"])  # fmt: skip
    assert rc == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = mj.load(out)
    assert model.expert_names == ["math", "code"]
    moe = model.moe_config
    assert (moe.top_k, moe.temperature, moe.rank) == (2, 1.5, 4)
    assert moe.target_modules == ("q_proj", "v_proj", "down_proj")
    assert {"tokenizer.json", "tokenizer_config.json", "meteora_config.json", "model.safetensors"} <= set(
        os.listdir(out)
    )
    meta = json.loads((out / "meteora_config.json").read_text())
    assert meta["converted_from"]["adapters"] == {"math": os.path.abspath(a), "code": os.path.abspath(b)}
    ids = np.arange(3, 15).reshape(2, 6)
    logits = np.asarray(model(ids))
    assert logits.shape == (2, 6, model.config.vocab_size) and np.isfinite(logits).all()
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temp directory left next to it


def test_bfloat16_overwrite_and_top_k(inputs, tmp_path):
    base, a, b = inputs
    out = tmp_path / "model"
    args = [
        "convert",
        "--base",
        base,
        "--adapter",
        f"math={a}",
        "--adapter",
        f"code={b}",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert main([*args, "--dtype", "bfloat16", "--top-k", "1", "--overwrite"]) == 0
    model = mj.load(out)
    assert model.dtype == jnp.bfloat16 and model.moe_config.top_k == 1
    assert model.layers[0].attn.q_proj.gate_de[...].dtype == jnp.float32  # gates stay float32
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_single_adapter_defaults_to_top_1(inputs, tmp_path):
    base, a, _ = inputs
    assert (
        main(["convert", "--base", base, "--adapter", f"only={a}", "--out", str(tmp_path / "m"), "--quiet"])
        == 0
    )
    assert mj.load(tmp_path / "m").moe_config.top_k == 1


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--base", "--adapter", "NAME=PATH", "--out", "--top-k", "--temperature", "--dtype",
                 "--meteora-checkpoint", "--tasks", "--overwrite", "alphabetical"):  # fmt: skip
        assert flag in text


def test_gguf_base_converts_to_the_same_model(inputs, tmp_path):
    """``--base`` may be a .gguf file: the same weights, its tokenizer carried, the same routed logits."""
    from meteora_jax.testing.tiny_hf import make_tiny_gguf

    base, a, b = inputs
    gguf_path = make_tiny_gguf(tmp_path / "base.gguf", base)
    adapters = ["--adapter", f"math={a}", "--adapter", f"code={b}", "--quiet"]
    assert main(["convert", "--base", gguf_path, *adapters, "--out", str(tmp_path / "from_gguf")]) == 0
    assert main(["convert", "--base", base, *adapters, "--out", str(tmp_path / "from_hf")]) == 0
    from_gguf, from_hf = mj.load(tmp_path / "from_gguf"), mj.load(tmp_path / "from_hf")
    assert "tokenizer.json" in os.listdir(tmp_path / "from_gguf")
    ids = np.arange(3, 15).reshape(2, 6)
    ref = np.asarray(from_hf(ids))
    np.testing.assert_allclose(np.asarray(from_gguf(ids)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
