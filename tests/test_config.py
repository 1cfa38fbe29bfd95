"""ModelConfig reads both transformers config layouts; MoEConfig refuses bad routing settings."""

import pytest

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError

V4 = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "torch_dtype": "bfloat16",
    "eos_token_id": [1, 2],
}


def test_v4_and_v5_layouts_agree():
    v5 = dict(V4)
    rope = dict(v5.pop("rope_scaling"))
    rope["rope_theta"] = v5.pop("rope_theta")
    v5["rope_parameters"] = rope
    v5["dtype"] = v5.pop("torch_dtype")
    a, b = ModelConfig.from_hf_dict(V4), ModelConfig.from_hf_dict(v5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling.rope_type == "llama3" and a.rope_scaling.factor == 8.0
    assert a.head_dim == 16 and a.num_key_value_heads == 2 and a.eos_token_ids == (1, 2)
    assert a.torch_dtype == "bfloat16"


def test_roundtrip_dict():
    a = ModelConfig.from_hf_dict(V4)
    assert ModelConfig.from_dict(a.to_dict()) == a


def test_qwen2_has_qkv_bias_only():
    c = ModelConfig.from_hf_dict({**V4, "model_type": "qwen2", "rope_scaling": None})
    assert c.projection_has_bias("q_proj") and not c.projection_has_bias("o_proj")


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({**V4, "model_type": "gpt2"}, "model_type 'gpt2'"),
        ({k: v for k, v in V4.items() if k != "hidden_size"}, "hidden_size"),
        ({**V4, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ],
)
def test_bad_hf_configs(cfg, match):
    with pytest.raises(MeteoraInputError, match=match):
        ModelConfig.from_hf_dict(cfg, source="x/config.json")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expert_names=("a", "a")), "duplicate"),
        (dict(expert_names=("a", "b"), top_k=3), "top_k=3"),
        (dict(expert_names=("a",), top_k=0), "top_k"),
        (dict(expert_names=("a",), top_k=1, routing="nope"), "routing"),
        (dict(expert_names=("a",), top_k=1, target_modules=("c_attn",)), "c_attn"),
        (dict(expert_names=("a",), top_k=1, temperature=0.0), "temperature"),
    ],
)
def test_bad_moe_configs(kwargs, match):
    with pytest.raises(MeteoraInputError, match=match):
        MoEConfig(**kwargs)


@pytest.mark.parametrize("tie", [True, False])
def test_abstract_model_has_the_real_models_parameters(tie):
    """``abstract_model`` (shapes only, built with ``ShapeOnlyRngs``) lists exactly the parameters, shapes and
    dtypes of a model built with real random keys, so loading fills the same structure."""
    import jax
    from flax import nnx

    from meteora_jax.config import ModelConfig, MoEConfig
    from meteora_jax.model.llama import MeteoraLlama
    from meteora_jax.model.params_io import abstract_model, flat_params

    cfg = ModelConfig.tiny(tie_word_embeddings=tie)
    moe = MoEConfig(expert_names=("a", "b", "c"), rank=4, top_k=2)
    abstract = flat_params(abstract_model(cfg, moe, "bfloat16"))
    real = flat_params(MeteoraLlama(cfg, moe, dtype="bfloat16", rngs=nnx.Rngs(1)))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in abstract.values())
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in real.items()
    }
