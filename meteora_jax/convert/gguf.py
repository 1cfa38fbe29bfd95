"""GGUF base checkpoints (llama.cpp's format) -> ``BaseCheckpoint``, dequantised to float32.

Only ``general.architecture == "llama"`` is read (Llama 2/3, SmolLM2, Mistral as llama.cpp exports them);
anything else is refused. The ``llama.*`` metadata becomes an HF-style config dict, so the one
``ModelConfig.from_hf_dict`` validates it; tied embeddings are implied by an absent ``output.weight``, as in
transformers' own GGUF loader.

Two layout facts, written once:

* ggml lists dimensions innermost first, so a tensor of ``ne = [d_in, d_out]`` dequantises to a NumPy
  [d_out, d_in] array: torch's ``nn.Linear`` layout, which we transpose into ``kernel_io`` [d_in, d_out].
* llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` per head from the HF ``rotate_half``
  layout (two halves) to its interleaved-pairs RoPE layout. We undo it exactly as transformers does
  (``LlamaTensorProcessor._reverse_permute_weights``): rows [heads, 2, Dh/2] <- [heads, Dh/2, 2].

The tokenizer travels through transformers (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), saved into
a temporary directory that lives as long as the process.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError
from meteora_jax.model.params_io import check_finite, expected_shapes

if TYPE_CHECKING:
    from meteora_jax.convert.base import BaseCheckpoint

SUPPORTED_ARCHITECTURES = ("llama",)


def unpermute_rope_rows(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: per head, interleaved (pair) row order -> HF two-halves order."""
    half = w_oi.shape[0] // n_head // 2
    return w_oi.reshape(n_head, half, 2, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def permute_rope_rows(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (HF -> GGUF), for tests that write GGUF files."""
    half = w_oi.shape[0] // n_head // 2
    return w_oi.reshape(n_head, 2, half, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def _table(cfg: ModelConfig) -> tuple[tuple[re.Pattern, str, Callable[[np.ndarray], np.ndarray]], ...]:
    t = lambda w: np.ascontiguousarray(w.T)  # [out, in] -> kernel_io [in, out]
    q = lambda w: t(unpermute_rope_rows(w, cfg.num_attention_heads))
    k = lambda w: t(unpermute_rope_rows(w, cfg.num_key_value_heads))
    same = lambda w: w
    rows = (
        (r"token_embd\.weight", "embed_vd", same),
        (r"output\.weight", "unembed_vd", same),
        (r"output_norm\.weight", "final_norm.scale_d", same),
        (r"blk\.(\d+)\.attn_norm\.weight", "layers.{0}.input_norm.scale_d", same),
        (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{0}.post_attn_norm.scale_d", same),
        (r"blk\.(\d+)\.attn_q\.weight", "layers.{0}.attn.q_proj.kernel_io", q),
        (r"blk\.(\d+)\.attn_k\.weight", "layers.{0}.attn.k_proj.kernel_io", k),
        (r"blk\.(\d+)\.attn_v\.weight", "layers.{0}.attn.v_proj.kernel_io", t),
        (r"blk\.(\d+)\.attn_output\.weight", "layers.{0}.attn.o_proj.kernel_io", t),
        (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{0}.mlp.gate_proj.kernel_io", t),
        (r"blk\.(\d+)\.ffn_up\.weight", "layers.{0}.mlp.up_proj.kernel_io", t),
        (r"blk\.(\d+)\.ffn_down\.weight", "layers.{0}.mlp.down_proj.kernel_io", t),
    )
    return tuple((re.compile(p), target, f) for p, target, f in rows)


def _refuse(path: str, what: str, fix: str) -> MeteoraInputError:
    return MeteoraInputError(f"{path}: {what}. {fix}")


def _open(path: str):  # noqa: ANN202 (a gguf.GGUFReader)
    from gguf import GGML_QUANT_SIZES, GGUFReader

    bad_file = "Download it again (an interrupted download or copy leaves a truncated file) or re-export it."
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/struct.error on junk
        raise _refuse(path, f"not a readable GGUF file ({type(e).__name__}: {e})", bad_file) from e
    size = os.path.getsize(path)
    # Every tensor's declared extent must lie in the file and agree with its type's block size.
    for t in reader.tensors:
        block, type_bytes = GGML_QUANT_SIZES[t.tensor_type]
        n = math.prod(int(s) for s in t.shape)
        want = n // block * type_bytes
        if n != t.n_elements or n % block or t.n_bytes != want or t.data.nbytes != want:
            raise _refuse(path, f"tensor {t.name!r} declares {n} elements in {t.n_bytes} bytes", bad_file)
        if t.data_offset + t.n_bytes > size:
            raise _refuse(path, f"tensor {t.name!r} ends past the end of the {size}-byte file", bad_file)
    return reader


def _field(reader, key: str, default: object = None) -> object:  # noqa: ANN001
    f = reader.get_field(key)
    return default if f is None else f.contents()


def gguf_config_dict(reader, path: str) -> dict:  # noqa: ANN001
    """The ``llama.*`` / ``tokenizer.ggml.*`` metadata as an HF config dict."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _refuse(
            path,
            f"GGUF architecture {arch!r} is not supported (only {', '.join(SUPPORTED_ARCHITECTURES)})",
            "Pass a Llama-family GGUF (Llama 2/3, SmolLM2, Mistral), or the model's HF safetensors directory.",
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or _field(reader, "llama.rope.scaling.type", "none") not in (
        "none",
        "linear",
    ):
        raise _refuse(
            path,
            "the file carries per-frequency RoPE factors (llama3-style scaling), which this reader does not map",
            "Convert from the model's HF safetensors directory instead: its config.json states the scaling.",
        )
    required = {
        "hidden_size": "llama.embedding_length",
        "intermediate_size": "llama.feed_forward_length",
        "num_hidden_layers": "llama.block_count",
        "num_attention_heads": "llama.attention.head_count",
    }
    cfg: dict = {"model_type": "llama"}
    for hf_key, key in required.items():
        value = _field(reader, key)
        if value is None:
            raise _refuse(
                path, f"metadata key {key!r} is missing", "Re-export the GGUF with a current llama.cpp."
            )
        cfg[hf_key] = int(value)
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = int(_field(reader, "llama.attention.head_count_kv", heads))
    cfg["head_dim"] = int(_field(reader, "llama.rope.dimension_count", cfg["hidden_size"] // heads))
    cfg["max_position_embeddings"] = int(_field(reader, "llama.context_length", 4096))
    cfg["rms_norm_eps"] = float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    cfg["rope_theta"] = float(_field(reader, "llama.rope.freq_base", 10000.0))
    if _field(reader, "llama.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(_field(reader, "llama.rope.scaling.factor")),
        }
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = (
        _field(reader, "llama.vocab_size") or len(tokens) or (int(embd.shape[1]) if embd is not None else 0)
    )
    cfg["vocab_size"] = int(vocab)
    cfg["tie_word_embeddings"] = "output.weight" not in names
    cfg["bos_token_id"] = _field(reader, "tokenizer.ggml.bos_token_id")
    cfg["eos_token_id"] = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg["pad_token_id"] = _field(reader, "tokenizer.ggml.padding_token_id")
    cfg["dtype"] = "float32"  # everything is dequantised to float32
    return cfg


def convert_tensors(reader, cfg: ModelConfig, path: str) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Dequantised, un-permuted, transposed tensors by flat name, strictly accounted."""
    from gguf.quants import dequantize

    expected = expected_shapes(cfg, MoEConfig(expert_names=()))
    table = _table(cfg)
    out: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        hit = next(((p, target, f) for p, target, f in table if p.fullmatch(t.name)), None)
        target = hit[1].format(*hit[0].fullmatch(t.name).groups()) if hit else None
        if target not in expected:
            unknown.append(t.name)
            continue
        # numpy shape = ggml ne reversed; kernel_io reverses it again.
        stored = tuple(int(s) for s in reversed(t.shape))
        want = expected[target][::-1] if target.endswith("kernel_io") else expected[target]
        if stored != want:
            raise _refuse(
                path,
                f"tensor {t.name!r} has shape {stored}, the metadata implies {want}",
                "The file's metadata and weights disagree; re-export it with a current llama.cpp.",
            )
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(stored)
        w = hit[2](w)
        check_finite(t.name, w, path)
        out[target] = w
    if unknown:
        raise _refuse(
            path,
            f"{len(unknown)} tensor(s) a plain llama model does not have, e.g. {sorted(unknown)[:5]}",
            "The file is not a plain Llama-family decoder; pass its HF safetensors directory instead.",
        )
    missing = sorted(set(expected) - set(out))
    if missing:
        raise _refuse(
            path,
            f"{len(missing)} weight(s) the metadata implies are absent, e.g. {missing[:5]} (model naming)",
            "The file is incomplete; download or export it again.",
        )
    return out


def save_gguf_tokenizer(path: str) -> str:
    """The GGUF's tokenizer, rebuilt by transformers and saved as tokenizer.json & co. into a temp dir."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:  # transformers raises many types for tokenizer metadata it cannot map
        raise _refuse(
            path,
            f"its tokenizer metadata cannot be rebuilt by transformers ({type(e).__name__}: {e})",
            "Use the model's HF directory, which carries tokenizer.json.",
        ) from e
    out = tempfile.mkdtemp(prefix="meteora-gguf-tokenizer-")
    atexit.register(shutil.rmtree, out, True)
    tok.save_pretrained(out)
    return out


def load_gguf_base(path: str) -> BaseCheckpoint:
    """A ``.gguf`` file as a ``BaseCheckpoint`` (float32 params, tokenizer in a temp dir)."""
    from meteora_jax.convert.base import BaseCheckpoint  # base.py imports this module lazily too

    path = os.path.abspath(path)
    reader = _open(path)
    cfg = ModelConfig.from_hf_dict(gguf_config_dict(reader, path), source=path)
    params = convert_tensors(reader, cfg, path)
    return BaseCheckpoint(config=cfg, params=params, tokenizer_dir=save_gguf_tokenizer(path), source=path)
