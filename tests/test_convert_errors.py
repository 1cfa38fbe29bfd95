"""Bad inputs to ``meteora-jax convert``: each gives exit code 2 and a one-paragraph message that names the
file (or argument) at fault and what to do, and leaves nothing in the output's parent directory.

Bad adapters are made by editing a copy of one real PEFT adapter (its config or its safetensors), so every
case differs from a working input in exactly one way.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from meteora_jax.cli import main
from meteora_jax.testing.peft_adapters import make_peft_adapter
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint

pytest.importorskip("peft")

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    base = make_tiny_hf_checkpoint(root / "base", "llama2", seed=1)
    adapter = make_peft_adapter(
        base, root / "adapter", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"]
    )
    return root, base, adapter


def _variant(good, tmp_path, name, *, config=None, tensors=None):
    """A copy of the good adapter with its config dict and/or tensor dict edited in place by callbacks."""
    _, _, adapter = good
    d = tmp_path / name
    shutil.copytree(adapter, d)
    if config is not None:
        path = d / "adapter_config.json"
        conf = json.loads(path.read_text())
        config(conf)
        path.write_text(json.dumps(conf))
    if tensors is not None:
        path = str(d / "adapter_model.safetensors")
        t = load_file(path)
        t = tensors(t) or t
        save_file(t, path)
    return str(d)


def _run(args, tmp_path, capsys, *, out_name="out"):
    out = tmp_path / "outs" / out_name
    out.parent.mkdir(exist_ok=True)
    before = set(os.listdir(out.parent))
    capsys.readouterr()  # drop what building the inputs printed
    rc = main(["convert", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert set(os.listdir(out.parent)) == before, "an output or temp directory was left behind"
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("meteora-jax convert: warning:")]
    assert len(lines) == 1 and lines[0].startswith("meteora-jax convert: error: "), err  # one paragraph
    return lines[0]


def _gpt2_name(key):
    return key.replace("model.layers.", "transformer.h.").replace("self_attn.q_proj", "attn.c_attn")


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


# (case id, how to build the adapter variant, substrings the message must contain)
ADAPTER_CASES = [
    ("dora", dict(config=_set("use_dora", True)), ["adapter_config.json", "use_dora", "plain LoRA"]),
    ("bias_all", dict(config=_set("bias", "all")), ["adapter_config.json", "'bias'", "plain LoRA"]),
    ("modules_to_save", dict(config=_set("modules_to_save", ["lm_head"])), ["modules_to_save", "Train"]),
    ("ia3", dict(config=_set("peft_type", "IA3")), ["adapter_config.json", "peft_type", "LORA"]),
    ("nan", dict(tensors=lambda t: t[KEY_A].__setitem__((0, 0), np.nan)), ["adapter_model.safetensors", "NaN"]),
    ("missing_b", dict(tensors=lambda t: t.__delitem__(KEY_B)), ["adapter_model.safetensors", "lora_B", "missing"]),
    ("unknown_key", dict(tensors=lambda t: t.__setitem__("base_model.model.extra.weight", np.zeros(2, np.float32))),
     ["adapter_model.safetensors", "extra.weight", "not a LoRA weight"]),
    ("hidden_size", dict(tensors=lambda t: {k: (v[:, :32] if ".lora_A." in k else v[:32]) for k, v in t.items()}),
     ["adapter_model.safetensors", "hidden_size=64", "another base model"]),
    ("rank_vs_config", dict(config=_set("r", 8)), ["adapter_model.safetensors", "rank-8", "another base model"]),
    ("c_attn", dict(config=_set("target_modules", ["c_attn"]),
                    tensors=lambda t: {_gpt2_name(k): v for k, v in t.items() if "q_proj" in k}),
     ["adapter_config.json", "c_attn", "another architecture"]),
    ("lm_head_target", dict(config=_set("target_modules", ["q_proj", "lm_head"])), ["lm_head", "Retrain"]),
    ("deeper_model", dict(tensors=lambda t: t.update({k.replace("layers.0.", "layers.7."): v for k, v in t.items()})),
     ["layer 7", "2 layers"]),
    ("config_weights_disagree", dict(config=_set("target_modules", ["q_proj"])),
     ["adapter_model.safetensors", "v_proj", "does not target"]),
]  # fmt: skip


@pytest.mark.parametrize("case,edit,needles", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter(good, tmp_path, capsys, case, edit, needles):
    _, base, _ = good
    bad = _variant(good, tmp_path, case, **edit)
    msg = _run(["--base", base, "--adapter", f"x={bad}"], tmp_path, capsys)
    assert bad in msg
    for needle in needles:
        assert needle in msg, msg


def test_truncated_safetensors(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, "trunc")
    path = os.path.join(bad, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    msg = _run(["--base", good[1], "--adapter", f"x={bad}"], tmp_path, capsys)
    assert path in msg and "truncated" in msg


def test_no_weights_file(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, "noweights")
    os.remove(os.path.join(bad, "adapter_model.safetensors"))
    msg = _run(["--base", good[1], "--adapter", f"x={bad}"], tmp_path, capsys)
    assert bad in msg and "save_pretrained" in msg


def test_bin_without_torch(good, tmp_path, capsys, monkeypatch):
    _, base, _ = good
    bad = make_peft_adapter(base, tmp_path / "bin", seed=2, r=2, target_modules=["q_proj"], save_bin=True)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    msg = _run(["--base", base, "--adapter", f"x={bad}"], tmp_path, capsys)
    assert (
        os.path.join(bad, "adapter_model.bin") in msg
        and "torch is not installed" in msg
        and "safetensors" in msg
    )


def test_missing_base(good, tmp_path, capsys):
    msg = _run(["--base", str(tmp_path / "nope"), "--adapter", f"x={good[2]}"], tmp_path, capsys)
    assert str(tmp_path / "nope") in msg and "--base" in msg


def test_missing_adapter(good, tmp_path, capsys):
    msg = _run(["--base", good[1], "--adapter", f"x={tmp_path / 'nope'}"], tmp_path, capsys)
    assert str(tmp_path / "nope") in msg and "save_pretrained" in msg


def test_wrong_base_architecture(good, tmp_path, capsys):
    base = tmp_path / "gpt2base"
    shutil.copytree(good[1], base)
    conf = json.loads((base / "config.json").read_text())
    conf["model_type"] = "gpt2"
    (base / "config.json").write_text(json.dumps(conf))
    msg = _run(["--base", str(base), "--adapter", f"x={good[2]}"], tmp_path, capsys)
    assert "config.json" in msg and "gpt2" in msg and "Llama" in msg


def test_adapter_passed_as_base(good, tmp_path, capsys):
    msg = _run(["--base", good[2], "--adapter", f"x={good[2]}"], tmp_path, capsys)
    assert "config.json" in msg and "--adapter" in msg


def test_duplicate_expert_names(good, tmp_path, capsys):
    msg = _run(
        ["--base", good[1], "--adapter", f"x={good[2]}", "--adapter", f"x={good[2]}"], tmp_path, capsys
    )
    assert "duplicate expert names ['x']" in msg and "rename" in msg


@pytest.mark.parametrize("spec", ["nopath", "=/a/b", "name="])
def test_malformed_adapter_argument(good, tmp_path, capsys, spec):
    msg = _run(["--base", good[1], "--adapter", spec], tmp_path, capsys)
    assert repr(spec) in msg and "NAME=PATH" in msg


def test_top_k_larger_than_experts(good, tmp_path, capsys):
    msg = _run(["--base", good[1], "--adapter", f"x={good[2]}", "--top-k", "2"], tmp_path, capsys)
    assert "--top-k 2" in msg and "number of experts (1)" in msg


def test_output_exists(good, tmp_path, capsys):
    out = tmp_path / "outs" / "taken"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    msg = _run(["--base", good[1], "--adapter", f"x={good[2]}"], tmp_path, capsys, out_name="taken")
    assert str(out) in msg and "--overwrite" in msg
    assert (out / "keep.txt").read_text() == "precious"


def test_meteora_checkpoint_without_tasks(good, tmp_path, capsys):
    msg = _run(["--base", good[1], "--meteora-checkpoint", str(tmp_path / "m.safetensors")], tmp_path, capsys)
    assert "m.safetensors" in msg and "--tasks" in msg


def test_meteora_checkpoint_that_is_a_peft_adapter(good, tmp_path, capsys):
    ckpt = os.path.join(good[2], "adapter_model.safetensors")
    msg = _run(["--base", good[1], "--meteora-checkpoint", ckpt, "--tasks", "a,b"], tmp_path, capsys)
    assert ckpt in msg and "--adapter" in msg


@pytest.mark.parametrize(
    "args,needle",
    [(["--base", "/no/such/base", "--adapter", "x=/no/such/adapter"], "/no/such/base"),
     (["--base", "/no/such/base", "--adapter", "noequals"], "NAME=PATH")],
)  # fmt: skip
def test_console_process(tmp_path, args, needle):
    """The real process: exit status 2, the message on stderr, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "meteora_jax.cli", "convert", *args, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_base_name_warning(tmp_path):
    """The adapter's declared base is compared with --base: a GGUF file inside the declared directory is the
    same base (transformers loads a GGUF as (directory, gguf_file=...), and PEFT records the directory)."""
    import warnings

    from meteora_jax.convert.peft_lora import _check_base_name

    base_dir = tmp_path / "smollm2"
    base_dir.mkdir()
    gguf = base_dir / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.Q4_1.gguf").write_bytes(b"GGUF")

    def warned(declared, base) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _check_base_name({"base_model_name_or_path": str(declared)}, "adapter_config.json", str(base))
        return bool(caught)

    assert not warned(base_dir, base_dir)
    assert not warned(base_dir, gguf)
    assert not warned("org/smollm2", base_dir)  # a hub name with the same last part
    assert warned(base_dir, other / "model.Q4_1.gguf")
    assert warned("org/llama-3-8b", gguf)


def test_adapter_for_another_model_errors_without_the_shapes_fit_warning(good, tmp_path, capsys):
    """An adapter whose declared base differs and whose shapes do not fit: the error alone, not first a warning
    that says the shapes fit."""
    root, base, adapter = good
    other = make_tiny_hf_checkpoint(tmp_path / "other_base", "llama3", seed=2)
    assert (
        main(["convert", "--base", other, "--adapter", f"x={adapter}", "--out", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err
    assert "error:" in err and "the shapes fit" not in err
