"""Base checkpoint loading: sharded and bf16 round trips, and every bad input refused with a one-paragraph
``MeteoraInputError`` that names the file and says what to do."""

import json
import os
import shutil
import struct

import numpy as np
import pytest

pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from meteora_jax.convert.base import load_base  # noqa: E402
from meteora_jax.convert.safetensors_io import read_file  # noqa: E402
from meteora_jax.errors import MeteoraInputError  # noqa: E402
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("src") / "llama3", "llama3")


@pytest.fixture
def ckpt(source, tmp_path):
    """A fresh, writable copy of the tiny checkpoint for one test to damage."""
    return shutil.copytree(source, tmp_path / "ckpt")


def _weights(d):
    return os.path.join(d, "model.safetensors")


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _rewrite_tensors(d, edit):
    tensors = read_file(_weights(d))
    edit(tensors)
    save_file(tensors, _weights(d))


def _refused(path, names, *fix):
    """load_base(path) raises one paragraph naming ``names`` and containing each ``fix`` phrase."""
    with pytest.raises(MeteoraInputError) as e:
        load_base(path)
    msg = str(e.value)
    assert str(names) in msg, msg
    assert "\n" not in msg, msg
    for phrase in fix:
        assert phrase in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ what must work
def test_loads_a_checkpoint_with_its_tokenizer(source):
    base = load_base(source)
    assert base.tokenizer_dir == os.path.abspath(source)
    assert base.params["layers.0.attn.q_proj.kernel_io"].shape == (64, 64)  # [d_in, d_out]
    assert base.params["layers.1.attn.k_proj.kernel_io"].shape == (64, 32)  # GQA: 2 kv heads x 16
    assert not any("lora" in k or "gate_ed" in k for k in base.params)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    import transformers as tf

    single = make_tiny_hf_checkpoint(tmp_path / "single", "qwen2")
    model = tf.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    a, b = load_base(single), load_base(tmp_path / "sharded")
    assert a.config == b.config and sorted(a.params) == sorted(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert b.tokenizer_dir is None  # save_pretrained of a model alone writes no tokenizer


def test_tied_checkpoint_with_a_saved_head_copy(tmp_path):
    d = make_tiny_hf_checkpoint(tmp_path / "tied", "smollm2")
    _rewrite_tensors(d, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    assert "unembed_vd" not in load_base(d).params


# ------------------------------------------------------------------------------------------ bad inputs
def test_missing_path(tmp_path):
    _refused(tmp_path / "nope", tmp_path / "nope", "no such file or directory")


def test_directory_without_config(ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    _refused(ckpt, os.path.join(ckpt, "config.json"), "save_pretrained")


def test_adapter_directory_given_as_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    _refused(tmp_path, tmp_path, "--adapter NAME=PATH")


def test_weights_missing(ckpt):
    os.remove(_weights(ckpt))
    _refused(ckpt, ckpt, "weights are missing")


def _save_bin(ckpt, tensors: dict, name: str = "pytorch_model.bin") -> str:
    """Replaces the checkpoint's safetensors with a torch.save of ``tensors`` (how older exports stored it)."""
    import torch

    if os.path.exists(_weights(ckpt)):
        os.remove(_weights(ckpt))
    path = os.path.join(ckpt, name)
    torch.save(tensors, path)
    return path


def _torch_tensors(ckpt) -> dict:
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in read_file(_weights(ckpt)).items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pytorch_bin_checkpoint_equals_safetensors(ckpt, dtype):
    """``pytorch_model.bin`` (single and sharded with its index) loads bit for bit as the safetensors save of
    the same weights, in the stored dtype (bf16 stays bf16)."""
    import torch

    want = load_base(ckpt).params
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in _torch_tensors(ckpt).items()}
    _save_bin(ckpt, tensors)
    got = load_base(ckpt).params
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype.name == dtype
        np.testing.assert_array_equal(got[k].astype(np.float32), v.astype(dtype).astype(np.float32))
    os.remove(os.path.join(ckpt, "pytorch_model.bin"))
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: tensors[k] for k in keys}, os.path.join(ckpt, shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    with open(os.path.join(ckpt, "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f)
    sharded = load_base(ckpt).params
    for k in want:
        np.testing.assert_array_equal(sharded[k].astype(np.float32), got[k].astype(np.float32))


class _Payload:
    """Unpickling this would call ``os.system``: weights_only must refuse it without running anything."""

    def __reduce__(self):
        return (os.system, ("echo PAYLOAD-RAN > payload_ran.txt",))


def test_pickle_holding_code_is_refused_unrun(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tensors = _torch_tensors(ckpt)
    _save_bin(ckpt, {**tensors, "model.norm.weight": tensors["model.norm.weight"], "extra": _Payload()})
    _refused(ckpt, "pytorch_model.bin", "tensors-only", "never unpickled", "safetensors")
    assert not os.path.exists(tmp_path / "payload_ran.txt")


def test_garbage_bin_is_refused(ckpt):
    os.remove(_weights(ckpt))
    with open(os.path.join(ckpt, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not a checkpoint")
    _refused(ckpt, "pytorch_model.bin", "cannot be read as a tensors-only PyTorch file")


def test_bin_index_naming_a_shard_outside_the_directory(ckpt, tmp_path):
    tensors = _torch_tensors(ckpt)
    outside = _save_bin(tmp_path, tensors, "elsewhere.bin")
    os.remove(_weights(ckpt))
    with open(os.path.join(ckpt, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": {k: os.path.relpath(outside, ckpt) for k in tensors}}, f)
    _refused(ckpt, "pytorch_model.bin.index.json", "fetch every shard file")


def test_other_pickles_are_refused(ckpt):
    _save_bin(ckpt, _torch_tensors(ckpt), "consolidated.00.pth")
    _refused(ckpt, "consolidated.00.pth", "none of model.safetensors, pytorch_model.bin", "save_pretrained")


def test_weights_file_instead_of_directory(ckpt):
    _refused(_weights(ckpt), _weights(ckpt), "Pass --base the directory")


def test_invalid_config_json(ckpt):
    path = os.path.join(ckpt, "config.json")
    with open(path, "w") as f:
        f.write("{ not json")
    _refused(ckpt, path, "not valid JSON")


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unsupported_architecture(ckpt, model_type):
    path = _edit_config(ckpt, model_type=model_type)
    _refused(ckpt, path, repr(model_type), "Llama, Mistral, Qwen2 or SmolLM2")


def test_truncated_safetensors(ckpt):
    with open(_weights(ckpt), "r+b") as f:
        f.truncate(os.path.getsize(_weights(ckpt)) - 100)
    _refused(ckpt, _weights(ckpt), "truncated or corrupt", "download or re-save")


def test_header_length_beyond_file(ckpt):
    with open(_weights(ckpt), "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    _refused(ckpt, _weights(ckpt), "declared header length")


def test_garbage_header(ckpt):
    with open(_weights(ckpt), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    _refused(ckpt, _weights(ckpt), "does not parse")


def test_tiny_file(ckpt):
    with open(_weights(ckpt), "wb") as f:
        f.write(b"abc")
    _refused(ckpt, _weights(ckpt), "shorter than the 8-byte header")


def test_index_names_a_missing_shard(tmp_path):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(make_tiny_hf_checkpoint(tmp_path / "s", "llama2"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))
    os.remove(tmp_path / "sharded" / shards[-1])
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    _refused(tmp_path / "sharded", index, shards[-1], "download is incomplete")


def test_shape_mismatch(ckpt):
    _edit_config(ckpt, intermediate_size=96)
    _refused(ckpt, _weights(ckpt), "intermediate_size=96", "config.json saved with these weights")


def test_nan_weights(ckpt):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan

    _rewrite_tensors(ckpt, poison)
    _refused(ckpt, _weights(ckpt), "model.layers.1.mlp.up_proj.weight", "NaN", "re-export")


def test_unknown_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.__setitem__("score.weight", np.zeros((2, 64), np.float32)))
    _refused(ckpt, _weights(ckpt), "score.weight", "*ForCausalLM")


def test_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    _refused(ckpt, _weights(ckpt), "layers.1.attn.v_proj.kernel_io", "download it again")


def test_extra_layer_beyond_config(ckpt):
    _edit_config(ckpt, num_hidden_layers=1)
    _refused(ckpt, _weights(ckpt), "model.layers.1.", "*ForCausalLM")


def test_pre_zipfile_pytorch_bin(ckpt):
    """A torch < 1.6 save (no zip container, so it cannot be memory-mapped) is read whole instead."""
    import torch

    want = load_base(ckpt).params
    tensors = _torch_tensors(ckpt)
    os.remove(_weights(ckpt))
    torch.save(tensors, os.path.join(ckpt, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    got = load_base(ckpt).params
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
