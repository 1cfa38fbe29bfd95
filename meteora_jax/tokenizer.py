"""The base model's tokenizer, as copied into a converted model directory by ``meteora-jax convert``.

Loaded with transformers' ``AutoTokenizer`` from local files only (never a hub, never remote code).
"""

from __future__ import annotations

import os

from meteora_jax.errors import MeteoraInputError


def load_tokenizer(model_dir: str | os.PathLike):  # noqa: ANN201 (a transformers tokenizer)
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise MeteoraInputError(
            f"{model_dir}: no such model directory. Create one with `meteora-jax convert`."
        )
    has_files = any(
        os.path.isfile(os.path.join(model_dir, n))
        for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
    if not has_files:
        raise MeteoraInputError(
            f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer.model / vocab.json). The model directory "
            "was written without its base checkpoint's tokenizer; copy the tokenizer files from the base "
            "checkpoint into it, or re-run `meteora-jax convert` with a --base that has them."
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise MeteoraInputError(
            f"{model_dir}: the tokenizer files cannot be loaded ({type(e).__name__}: {e}). Copy them again from "
            "the base checkpoint."
        ) from e
    if tok.pad_token_id is None:
        # Padding is always masked out; reuse EOS (or id 0) so that batches can be built.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok
