"""``meteora-jax info``: the summary read from the header alone, and ``--check`` finding what is wrong."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.info import model_info
from meteora_jax.io import read_flat_weights


def _saved(tmp_path, dtype: str = "float32", **moe_kw) -> tuple[str, mj.MeteoraLlama]:
    cfg = mj.ModelConfig.tiny(vocab_size=99)
    moe = mj.MoEConfig(expert_names=("math", "code", "chat"), rank=4, **moe_kw)
    model = mj.MeteoraLlama(cfg, moe, dtype=dtype, rngs=nnx.Rngs(0))
    return mj.save(model, tmp_path / "model"), model


def _count(model: mj.MeteoraLlama, kind: type) -> int:
    return sum(math.prod(v.value.shape) for _, v in nnx.to_flat_state(nnx.state(model, kind)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_summary_counts_each_role(tmp_path, dtype):
    """Parameter counts by role equal the model's own (by NNX variable type); bytes follow the stored dtype
    (bf16 weights 2 bytes, gates and scalings always float32)."""
    path, model = _saved(tmp_path, dtype, target_modules=("q_proj", "down_proj"))
    info = model_info(path)
    gates, experts = _count(model, mj.GateParam), _count(model, mj.ExpertParam)
    assert info["params"] == {
        "gates": gates,
        "experts": experts,
        "base": _count(model, nnx.Param) - gates - experts,
    }
    scalings = _count(model, mj.ExpertParam) - sum(
        math.prod(v.value.shape)
        for p, v in nnx.to_flat_state(nnx.state(model, mj.ExpertParam))
        if p[-1] != "scaling_e"
    )
    width = 2 if dtype == "bfloat16" else 4
    assert info["bytes"]["gates"] == 4 * gates
    assert info["bytes"]["experts"] == width * (experts - scalings) + 4 * scalings
    assert info["experts"] == ["math", "code", "chat"] and info["rank"] == 4
    assert info["target_modules"] == ["q_proj", "down_proj"] and info["dtype"] == dtype
    assert not info["gates_trained"] and "problems" not in info


def test_cli_text_json_and_check_ok(tmp_path, capsys):
    path, _ = _saved(tmp_path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "experts    3, rank 4" in out and "math, code, chat" in out and "NOT trained" in out
    assert main(["info", path, "--json", "--check"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["problems"] == [] and info["routing"]["top_k"] == 2
    assert main(["info", path, "--check"]) == 0
    assert "check      OK" in capsys.readouterr().out


def test_check_reports_nan_missing_and_misshapen_tensors(tmp_path, capsys):
    path, _ = _saved(tmp_path)
    weights = f"{path}/model.safetensors"
    flat = read_flat_weights(weights)
    flat["layers.0.attn.q_proj.gate_de"][0, 0] = np.nan
    flat["layers.1.mlp.up_proj.lora_b_ero"] = flat["layers.1.mlp.up_proj.lora_b_ero"][:, :2]
    del flat["layers.0.mlp.down_proj.kernel_io"]
    save_file(flat, weights)
    problems = model_info(path, check=True)["problems"]
    assert any("missing tensor layers.0.mlp.down_proj.kernel_io" in p for p in problems)
    assert any("layers.1.mlp.up_proj.lora_b_ero has shape (3, 2," in p for p in problems)
    assert any("layers.0.attn.q_proj.gate_de holds NaN" in p for p in problems)
    assert len(problems) == 3
    assert main(["info", path, "--check"]) == 1
    captured = capsys.readouterr()
    assert "3 problem(s)" in captured.out and "3 problem(s) found" in captured.err


def test_trained_model_and_bad_paths(tmp_path, capsys):
    path, _ = _saved(tmp_path)
    cfg_path = f"{path}/meteora_config.json"
    cfg = json.loads(open(cfg_path).read())
    cfg["training"] = {"steps": 400, "mode": "gate", "prompt_template": "chat"}
    open(cfg_path, "w").write(json.dumps(cfg))
    info = model_info(path)
    assert info["gates_trained"] and info["training"]["steps"] == 400
    assert main(["info", path]) == 0
    assert "trained: 400 steps" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    open(f"{path}/model.safetensors", "wb").write(b"\x00" * 7)
    assert main(["info", path]) == 2
    assert "cannot read the safetensors header" in capsys.readouterr().err
