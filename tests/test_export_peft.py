"""``meteora-jax export-adapter``: experts back out as PEFT adapters, checked against the adapters they came
from (our PEFT reader and PEFT itself) and against factors changed inside MeteoRA."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.config import ModelConfig
from meteora_jax.convert.export_peft import export_peft_adapter
from meteora_jax.convert.peft_lora import load_peft_adapter
from meteora_jax.testing.peft_adapters import load_torch_base, make_peft_adapter
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny base, three real PEFT adapters (ranks 4 / 2 and a rank pattern; all-linear with rsLoRA and an
    alpha pattern on one layer; different targets) and the model converted from them."""
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_hf_checkpoint(root / "base", "llama3", seed=3)
    adapters = {
        "math": make_peft_adapter(
            base, root / "math", seed=1, r=4, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2}
        ),
        "code": make_peft_adapter(base, root / "code", seed=2, r=2, alpha=8, target_modules=["down_proj"]),
        "chat": make_peft_adapter(
            base, root / "chat", seed=3, r=3, alpha=5, use_rslora=True, layers_to_transform=[1],
            alpha_pattern={"o_proj": 7},
        ),
    }  # fmt: skip
    out = root / "model"
    args = ["convert", "--base", base, "--out", str(out)]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    assert main(args) == 0
    return base, adapters, str(out)


@pytest.mark.parametrize("expert", ["math", "code", "chat"])
def test_export_reads_back_as_the_source_adapter(converted, tmp_path, expert):
    """Our PEFT reader (PEFT's semantics: targets, rank / alpha patterns, rsLoRA) sees the exported adapter as
    the original: the same modules, A and B bit for bit, the same scaling."""
    base, adapters, model_dir = converted
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(model_dir, "meteora_config.json")))["model"])
    exported = export_peft_adapter(model_dir, expert, tmp_path / expert)
    want, got = load_peft_adapter(adapters[expert], cfg), load_peft_adapter(exported, cfg)
    assert sorted(got.modules) == sorted(want.modules)
    for key, m in want.modules.items():
        np.testing.assert_array_equal(got.modules[key].a_rd, m.a_rd)
        np.testing.assert_array_equal(got.modules[key].b_or, m.b_or)
        assert got.modules[key].scaling == pytest.approx(m.scaling, rel=1e-6)
    conf = json.load(open(os.path.join(exported, "adapter_config.json")))
    assert conf["base_model_name_or_path"] == base  # convert's provenance


def test_peft_loads_the_export_with_the_same_logits(converted, tmp_path):
    """PEFT itself (``PeftModel.from_pretrained``) gives the same logits from the exported adapter as from the
    one it came from (float32; the rank-pattern adapter)."""
    import peft
    import torch

    base, adapters, model_dir = converted
    exported = export_peft_adapter(model_dir, "math", tmp_path / "math")
    ids = torch.arange(3, 19).reshape(2, 8)
    logits = []
    for path in (adapters["math"], exported):
        model = peft.PeftModel.from_pretrained(load_torch_base(base), path)
        with torch.no_grad():
            logits.append(model(ids).logits.numpy())
    with torch.no_grad():
        base_logits = load_torch_base(base)(ids).logits.numpy()
    assert np.abs(logits[0] - base_logits).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_export_carries_factors_changed_inside_meteora(converted, tmp_path):
    """An expert whose factors changed after conversion (as gate_and_experts training changes them) exports the
    changed values; untouched padding (rank 2 inside r_max 4) stays out of the adapter."""
    _, _, model_dir = converted
    model = mj.load(model_dir)
    q = model.layers[0].attn.q_proj
    e = model.expert_names.index("code")  # code targets down_proj only: give it a q_proj delta
    a = np.asarray(q.lora_a_edr[...]).copy()
    b = np.asarray(q.lora_b_ero[...]).copy()
    s = np.asarray(q.scaling_e[...]).copy()
    a[e, :, :2] = 0.01 * np.arange(a.shape[1] * 2).reshape(-1, 2)
    b[e, :2, :] = 0.02
    s[e] = 0.75
    q.lora_a_edr[...], q.lora_b_ero[...], q.scaling_e[...] = a, b, s
    trained = mj.save(model, tmp_path / "trained")
    exported = export_peft_adapter(trained, "code", tmp_path / "code")
    conf = json.load(open(os.path.join(exported, "adapter_config.json")))
    assert "model.layers.0.self_attn.q_proj" in conf["target_modules"]
    cfg = model.config
    got = load_peft_adapter(exported, cfg).modules[(0, "q_proj")]
    np.testing.assert_array_equal(got.a_rd, a[e, :, :2].T.astype(np.float32))
    np.testing.assert_array_equal(got.b_or, b[e, :2, :].T.astype(np.float32))
    assert got.scaling == pytest.approx(0.75)


def test_cli_all_and_bad_input(converted, tmp_path, capsys):
    _, _, model_dir = converted
    out = tmp_path / "all"
    assert main(["export-adapter", "--model", model_dir, "--expert", "all", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["chat", "code", "math"]
    assert sorted(os.listdir(out / "code")) == ["adapter_config.json", "adapter_model.safetensors"]
    capsys.readouterr()
    assert (
        main(["export-adapter", "--model", model_dir, "--expert", "poetry", "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "no expert named 'poetry'" in err and "'math'" in err
    assert main(["export-adapter", "--model", model_dir, "--expert", "code", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_nan_factors_are_refused(converted, tmp_path, capsys):
    """A model saved after a diverged run: the export names the expert and module instead of writing NaNs."""
    _, _, model_dir = converted
    model = mj.load(model_dir)
    up = model.layers[1].mlp.up_proj
    a = np.asarray(up.lora_a_edr[...]).copy()
    a[model.expert_names.index("math"), 0, 0] = np.nan
    up.lora_a_edr[...] = a
    broken = mj.save(model, tmp_path / "broken")
    assert main(["export-adapter", "--model", broken, "--expert", "math", "--out", str(tmp_path / "m")]) == 2
    assert "'math' holds NaN/Inf values at model.layers.1.mlp.up_proj" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")
    assert main(["export-adapter", "--model", broken, "--expert", "code", "--out", str(tmp_path / "c")]) == 0
