"""Base-model logits vs transformers (torch, float32, eager attention) for every supported family.

Each family's tiny random checkpoint is written by ``make_tiny_hf_checkpoint`` in both config.json forms
(transformers v4 and v5), read back through ``load_base`` and built with no experts. The oracle is the same
directory loaded by ``AutoModelForCausalLM``. Sequences run past position 64 (the tiny llama3 rope's
original context) and past Mistral's sliding window of 8.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from meteora_jax.config import MoEConfig  # noqa: E402
from meteora_jax.convert.base import load_base  # noqa: E402
from meteora_jax.model.params_io import build_model  # noqa: E402
from meteora_jax.testing.tiny_hf import FAMILIES, VOCAB_SIZE, make_tiny_hf_checkpoint  # noqa: E402

SEQ = 80


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, form) -> directory, built once per module (~0.1 s each)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for fam in FAMILIES:
        for form in ("v5", "v4"):
            out[fam, form] = make_tiny_hf_checkpoint(
                root / f"{fam}-{form}", fam, transformers_v4_config=form == "v4"
            )
    return out


def _ours(directory, dtype="float32"):
    base = load_base(directory)
    return base, build_model(
        base.config, MoEConfig(expert_names=()), base.params, dtype=dtype, source=directory
    )


def _reference(directory):
    return tf.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("form", ["v5", "v4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family, form, rng):
    directory = checkpoints[family, form]
    _, model = _ours(directory)
    ids = rng.integers(0, VOCAB_SIZE, (2, SEQ))
    with torch.no_grad():
        ref = _reference(directory)(torch.tensor(ids)).logits.numpy()
    assert _rel(model(ids), ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_v4_and_v5_configs_agree(checkpoints, family):
    v5 = load_base(checkpoints[family, "v5"]).config
    v4 = load_base(checkpoints[family, "v4"]).config
    assert v4 == v5


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_left_padded_batch(checkpoints, family, rng):
    """Left padding with an attention mask: positions count real tokens only, as transformers' generate does."""
    directory = checkpoints[family, "v5"]
    _, model = _ours(directory)
    ids = rng.integers(3, VOCAB_SIZE, (3, 24))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    ids = np.where(mask == 1, ids, 0)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = _reference(directory)(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    ours = np.asarray(model(ids, attention_mask=mask))
    valid = mask == 1
    assert _rel(ours[valid], ref[valid]) <= 1e-4
    # A row's real tokens give the same logits with or without padding in front of them.
    alone = np.asarray(model(ids[2:3, 11:]))
    assert _rel(ours[2, 11:], alone[0]) <= 1e-5


def test_bfloat16_checkpoint_and_compute(tmp_path, rng):
    """bf16 weights on disk (read as ml_dtypes.bfloat16), computed in bf16: close to the float32 oracle."""
    directory = make_tiny_hf_checkpoint(tmp_path / "bf16", "llama3", dtype="bfloat16")
    base, model = _ours(directory, dtype="bfloat16")
    assert base.config.torch_dtype == "bfloat16"
    assert base.params["embed_vd"].dtype.name == "bfloat16"
    ids = rng.integers(0, VOCAB_SIZE, (1, 40))
    with torch.no_grad():
        ref = _reference(directory)(torch.tensor(ids)).logits.numpy()
    ours = model(ids)
    assert ours.dtype == np.float32  # logits are accumulated in float32
    assert _rel(ours, ref) <= 5e-2


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_hidden_states_layer_by_layer(checkpoints, family, rng):
    """Each decoder layer's residual stream against transformers' ``output_hidden_states``, so a mismatch
    names the first layer where it appears."""
    import jax.numpy as jnp

    from meteora_jax.model.llama import AttentionInputs
    from meteora_jax.model.rope import rope_cos_sin

    directory = checkpoints[family, "v5"]
    _, model = _ours(directory)
    ids = rng.integers(0, VOCAB_SIZE, (1, SEQ))
    with torch.no_grad():
        ref = _reference(directory)(torch.tensor(ids), output_hidden_states=True).hidden_states
    positions = jnp.arange(SEQ)[None]
    cos, sin = rope_cos_sin(positions, model.inv_freq[...])
    mask = jnp.tril(jnp.ones((SEQ, SEQ), bool))[None]
    x = jnp.take(model.embed_vd[...], jnp.asarray(ids), axis=0)
    routing = model.routing_options()
    for i, layer in enumerate(model.layers):
        assert _rel(x, ref[i].numpy()) <= 1e-5, f"input of layer {i}"
        x, _ = layer(x, AttentionInputs(cos, sin, mask), routing, None, None)
    # transformers' last entry is after the final norm.
    assert _rel(model.final_norm(x), ref[-1].numpy()) <= 1e-5
