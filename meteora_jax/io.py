"""A converted model on disk, and ``mj.load``.

Layout of a model directory (self-describing; nothing else is needed to load it):

    meteora_config.json   {"format": "meteora-jax", "version": 1, "model": {...}, "moe": {...}, "dtype": ...}
    model.safetensors     every nnx.Param by flat name (params_io), base + experts + gates
    tokenizer files       copied from the base checkpoint (tokenizer.json, tokenizer_config.json, ...)

Writes are atomic: everything goes to a sibling temp directory that is renamed into place only when
complete, so an interrupted convert leaves no half directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError
from meteora_jax.model.llama import MeteoraLlama
from meteora_jax.model.params_io import build_model, flat_params

CONFIG_FILE = "meteora_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp directory next to ``out_dir``; renames it to ``out_dir`` only if the block succeeds."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise MeteoraInputError(
                f"{out_dir}: output path already exists. Choose a new --out, or pass --overwrite to replace it."
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to a temp file beside ``path``, then renames it: readers never see half a file,
    and a failed write leaves only what was there before."""
    _write_atomic(path, text, "w", "utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``write_text_atomic`` for bytes."""
    _write_atomic(path, data, "wb", None)


def _write_atomic(path: str | os.PathLike, data: str | bytes, mode: str, encoding: str | None) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or "."
    )
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = os.path.join(src_dir, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def write_model_dir(
    model: MeteoraLlama, dst_dir: str, *, extra_config: dict | None = None, tokenizer_dir: str | None = None
) -> None:
    """Writes config + weights (+ tokenizer) into an existing (temp) directory."""
    from safetensors.numpy import save_file

    flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
    # safetensors.numpy has no bfloat16: store its raw bits as uint16 and say so in the metadata.
    bf16 = sorted(k for k, v in flat.items() if v.dtype == jnp.bfloat16)
    tensors = {k: (v.view(np.uint16) if k in bf16 else v) for k, v in flat.items()}
    save_file(tensors, os.path.join(dst_dir, WEIGHTS_FILE), metadata={"bfloat16": json.dumps(bf16)})
    cfg = {
        "format": "meteora-jax",
        "version": FORMAT_VERSION,
        "dtype": jnp.dtype(model.dtype).name,
        "model": model.config.to_dict(),
        "moe": model.moe_config.to_dict(),
        # informational: the grouped-LoRA backend `moe.implementation` resolved to where this was written
        "kernel_implementation_resolved": model.kernel_implementation,
    }
    cfg.update(extra_config or {})
    write_json_atomic(os.path.join(dst_dir, CONFIG_FILE), cfg)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, dst_dir)


def save(
    model: MeteoraLlama,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
    extra_config: dict | None = None,
) -> str:
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_model_dir(model, tmp, extra_config=extra_config, tokenizer_dir=tokenizer_dir)
    return os.path.abspath(os.fspath(out_dir))


def read_model_config(model_dir: str | os.PathLike) -> dict:
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isdir(model_dir):
        raise MeteoraInputError(
            f"{model_dir}: no such model directory. Create one with `meteora-jax convert`."
        )
    if not os.path.isfile(path):
        raise MeteoraInputError(
            f"{path}: missing. {model_dir} is not a meteora-jax model directory (an HF checkpoint must first go "
            "through `meteora-jax convert --base ... --adapter NAME=PATH --out DIR`)."
        )
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise MeteoraInputError(f"{path}: not valid JSON ({e}); re-run `meteora-jax convert`.") from e
    if cfg.get("format") != "meteora-jax" or cfg.get("version") != FORMAT_VERSION:
        raise MeteoraInputError(
            f"{path}: format {cfg.get('format')!r} version {cfg.get('version')!r} is not one this version reads "
            f"(meteora-jax v{FORMAT_VERSION}); re-run `meteora-jax convert`."
        )
    return cfg


def stored_bf16_names(metadata: dict[str, str] | None) -> set[str]:
    """The tensors a weights file stores as the uint16 bits of bfloat16 (see ``write_model_dir``)."""
    return set(json.loads((metadata or {}).get("bfloat16", "[]")))


def from_stored(name: str, value: np.ndarray, bf16_names: set[str]) -> np.ndarray:
    """A tensor as read from a weights file, with bfloat16 restored from its stored uint16 bits."""
    return value.view(jnp.bfloat16) if name in bf16_names else value


def read_flat_weights(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise MeteoraInputError(f"{path}: missing weights file; re-run `meteora-jax convert`.")
    try:
        with safe_open(path, framework="numpy") as f:
            bf16 = stored_bf16_names(f.metadata())
            return {k: from_stored(k, f.get_tensor(k), bf16) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise MeteoraInputError(
            f"{path}: cannot read safetensors ({e}). The file is truncated or not safetensors; re-create it."
        ) from e


def load(
    model_dir: str | os.PathLike,
    dtype: str | None = None,
    *,
    top_k: int | None = None,
    temperature: float | None = None,
    implementation: str | None = None,
) -> MeteoraLlama:
    """Loads a directory written by ``meteora-jax convert`` (or by gate training).

    ``dtype`` defaults to the dtype it was saved in; ``top_k``/``temperature``/``implementation`` override the
    saved routing defaults.
    """
    cfg = read_model_config(model_dir)
    model_cfg = ModelConfig.from_dict(cfg["model"])
    moe_dict = dict(cfg["moe"])
    for key, val in (("top_k", top_k), ("temperature", temperature), ("implementation", implementation)):
        if val is not None:
            moe_dict[key] = val
    moe_cfg = MoEConfig.from_dict(moe_dict)
    path = os.path.join(os.fspath(model_dir), WEIGHTS_FILE)
    flat = read_flat_weights(path)
    model = build_model(model_cfg, moe_cfg, flat, dtype=dtype or cfg.get("dtype", "float32"), source=path)
    model.model_dir = os.path.abspath(os.fspath(model_dir))
    return model
