"""HF LLaMA-family state dict (``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` names) ->
the model's flat parameter names, as one table of (regex -> target, transform).

torch ``nn.Linear`` stores its weight as [d_out, d_in] and computes ``x @ W.T``; our projections store
``kernel_io`` [d_in, d_out] and compute ``x @ kernel``, hence the one transpose (``_T``) on every projection
weight. Everything else (embeddings [V, D], norms [D], biases [d_out]) keeps its layout.

Accounting is strict: every source key must match a row (or be a known non-weight), every target the config
implies must be filled exactly once, and every shape must equal the one the config implies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError
from meteora_jax.model.params_io import check_finite, expected_shapes

_T: Callable[[np.ndarray], np.ndarray] = lambda w: np.ascontiguousarray(w.T)  # [out, in] -> [in, out]
_ID: Callable[[np.ndarray], np.ndarray] = lambda w: w

# (source regex, target template filled from the groups, transform)
TABLE: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"model\.embed_tokens\.weight", "embed_vd", _ID),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", "layers.{0}.attn.{1}_proj.kernel_io", _T),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias", "layers.{0}.attn.{1}_proj.bias_o", _ID),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel_io", _T),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", "layers.{0}.mlp.{1}_proj.bias_o", _ID),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.input_norm.scale_d", _ID),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.post_attn_norm.scale_d", _ID),
    (r"model\.norm\.weight", "final_norm.scale_d", _ID),
    (r"lm_head\.weight", "unembed_vd", _ID),
)
# Buffers some older exports saved next to the weights; they are recomputed from the config.
IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)
_COMPILED = tuple((re.compile(p), t, f) for p, t, f in TABLE)


def _match(key: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    for pattern, template, transform in _COMPILED:
        m = pattern.fullmatch(key)
        if m:
            return template.format(*m.groups()), transform
    return None


def convert_state_dict(
    cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, source: str
) -> dict[str, np.ndarray]:
    """HF tensors -> flat base params in the model's naming, strictly accounted (see module docstring)."""
    expected = expected_shapes(cfg, MoEConfig(expert_names=()))
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in tensors.items():
        if any(p.fullmatch(key) for p in IGNORED):
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            # Tied models reuse embed_tokens; transformers ignores a saved copy of the head too.
            continue
        hit = _match(key)
        if hit is None:
            unknown.append(key)
            continue
        target, transform = hit
        if target not in expected:
            unknown.append(key)  # e.g. a layer index beyond num_hidden_layers, or a bias the config disables
            continue
        value = transform(np.asarray(value))
        if tuple(value.shape) != expected[target]:
            raise MeteoraInputError(
                f"{source}: tensor {key!r} has shape {tuple(np.shape(tensors[key]))}, but config.json implies "
                f"{expected[target][::-1] if transform is _T else expected[target]} (hidden_size="
                f"{cfg.hidden_size}, heads={cfg.num_attention_heads}, kv_heads={cfg.num_key_value_heads}, "
                f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}). The weights and "
                "config.json come from different models; use the config.json saved with these weights."
            )
        check_finite(key, value, source)
        out[target] = value
    if unknown:
        raise MeteoraInputError(
            f"{source}: {len(unknown)} tensor(s) this {cfg.model_type} converter does not know, e.g. "
            f"{sorted(unknown)[:5]}. The checkpoint is not a plain causal-LM of the architecture config.json "
            "declares (a classification head, a quantised or merged export, or extra layers?); point --base at "
            "a plain *ForCausalLM checkpoint saved with `save_pretrained`."
        )
    missing = sorted(set(expected) - set(out))
    if missing:
        raise MeteoraInputError(
            f"{source}: {len(missing)} weight(s) that config.json implies are absent, e.g. {missing[:5]} "
            f"(model naming). The checkpoint is incomplete or belongs to another config; download it again "
            "or use the config.json saved with these weights."
        )
    return out
