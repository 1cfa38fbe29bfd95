"""``load_base``: one entry point for base checkpoints, an HF directory or a ``.gguf`` file.

Whatever the source, the result is a ``BaseCheckpoint``: the ``ModelConfig``, the flat base params in the
model's naming (``embed_vd``, ``layers.{i}.attn.q_proj.kernel_io``, ...; no expert or gate keys), the
directory whose tokenizer files go into a converted model, and the source path for error messages. Weights
keep their stored dtype (bf16 stays ``ml_dtypes.bfloat16``); ``build_model`` casts them.

An HF directory must hold ``config.json`` and its weights: safetensors (``model.safetensors`` or a sharded
``model.safetensors.index.json``), or, as older exports have them, ``pytorch_model.bin`` (or a sharded
``pytorch_model.bin.index.json``), read tensors-only (``torch_bin``: ``weights_only=True``, nothing else in
the pickle is ever restored; needs the torch extra). Other pickled files are refused.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from meteora_jax.config import ModelConfig
from meteora_jax.convert import hf_llama, safetensors_io, torch_bin
from meteora_jax.errors import MeteoraInputError

SINGLE_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class BaseCheckpoint:
    config: ModelConfig
    params: dict[str, np.ndarray]  # flat base params in the model's naming (no expert/gate keys)
    tokenizer_dir: str | None  # a directory holding tokenizer files to copy into the converted model
    source: str  # path, for error messages


def load_base(path: str | os.PathLike) -> BaseCheckpoint:
    """Reads an HF checkpoint directory or a ``.gguf`` file; raises ``MeteoraInputError`` on anything amiss."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            from meteora_jax.convert.gguf import load_gguf_base

            return load_gguf_base(path)
        raise MeteoraInputError(
            f"{path}: is a file, not a checkpoint directory or a .gguf file. Pass --base the directory that "
            "holds config.json and the *.safetensors weights (or a .gguf file)."
        )
    if not os.path.isdir(path):
        raise MeteoraInputError(
            f"{path}: no such file or directory. Pass --base an HF checkpoint directory (config.json + "
            "safetensors) or a .gguf file."
        )
    return load_hf_dir(path)


def load_hf_dir(directory: str) -> BaseCheckpoint:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        hint = ""
        if os.path.isfile(os.path.join(directory, "adapter_config.json")):
            hint = " It holds adapter_config.json: it is a LoRA adapter; pass it as --adapter NAME=PATH."
        raise MeteoraInputError(
            f"{config_path}: missing. {directory} is not a transformers checkpoint directory; --base needs "
            f"the directory written by `model.save_pretrained(dir)` (config.json + safetensors).{hint}"
        )
    cfg = ModelConfig.from_hf_json(config_path)
    tensors, weights_source = _read_weights(directory)
    params = hf_llama.convert_state_dict(cfg, tensors, source=weights_source)
    has_tokenizer = any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_MARKERS)
    return BaseCheckpoint(
        config=cfg, params=params, tokenizer_dir=directory if has_tokenizer else None, source=directory
    )


def _read_weights(directory: str) -> tuple[dict[str, np.ndarray], str]:
    index = os.path.join(directory, safetensors_io.INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index):
        return safetensors_io.read_sharded(index), index
    if os.path.isfile(single):
        return safetensors_io.read_file(single), single
    bin_index, bin_single = os.path.join(directory, BIN_INDEX_FILE), os.path.join(directory, BIN_FILE)
    if os.path.isfile(bin_index):
        return safetensors_io.read_sharded(bin_index, read=torch_bin.read_state_dict), bin_index
    if os.path.isfile(bin_single):
        return torch_bin.read_state_dict(bin_single), bin_single
    pickled = sorted(
        glob.glob(os.path.join(directory, "*.bin")) + glob.glob(os.path.join(directory, "*.pt*"))
    )
    if pickled:
        raise MeteoraInputError(
            f"{directory}: holds only pickled PyTorch files ({', '.join(os.path.basename(p) for p in pickled[:3])})"
            f" and none of {SINGLE_FILE}, {BIN_FILE} or their index files, the layouts this tool reads. Re-save "
            "the model with transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` "
            "(safetensors), then pass new_dir."
        )
    others = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    found = f" (it has {[os.path.basename(p) for p in others[:3]]})" if others else ""
    raise MeteoraInputError(
        f"{directory}: no {SINGLE_FILE} or {safetensors_io.INDEX_FILE}{found}. The weights are missing or "
        "named unusually; download the full checkpoint or re-save it with `model.save_pretrained(dir)`."
    )
