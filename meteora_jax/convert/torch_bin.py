"""Pickled PyTorch weight files (``pytorch_model*.bin``, PEFT's ``adapter_model.bin``), tensors only.

``torch.load(..., weights_only=True)`` restores tensors and plain containers and refuses every other pickled
object, so nothing in the file can run code; ``mmap=True`` maps the storage instead of reading it up front.
torch is an optional extra: without it the error says how to get it or how to re-save the file as
safetensors.
"""

from __future__ import annotations

import numpy as np

from meteora_jax.errors import MeteoraInputError


def read_state_dict(path: str, *, float32: bool = False) -> dict[str, np.ndarray]:
    """``{name: array}`` of a tensors-only PyTorch file, in the stored dtype (bf16 as ``ml_dtypes.bfloat16``)
    or, with ``float32``, cast to float32."""
    try:
        import torch
    except ImportError as e:
        raise MeteoraInputError(
            f"{path}: pickled PyTorch weights need torch to read, and torch is not installed. Install the extra "
            "(`pip install 'meteora-jax[torch]'`), or re-save the weights as safetensors once on a machine "
            "with torch (`save_pretrained(dir)` writes safetensors)."
        ) from e
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a pre-zipfile (torch < 1.6) save cannot be mapped: read it whole
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise MeteoraInputError(
            f"{path}: cannot be read as a tensors-only PyTorch file ({type(e).__name__}: {str(e)[:200]}). It is "
            "truncated, corrupt or holds more than tensors (which is never unpickled); re-save it as safetensors."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MeteoraInputError(f"{path}: not a state dict of tensors; re-save it as safetensors.")
    return {str(k): _numpy(v, torch, float32) for k, v in state.items()}


def _numpy(t, torch, float32: bool) -> np.ndarray:  # noqa: ANN001 (a torch.Tensor and the torch module)
    t = t.detach().contiguous()
    if float32:
        return t.to(torch.float32).numpy()
    if t.dtype == torch.bfloat16:  # NumPy has no bf16: reinterpret the bits as ml_dtypes' bfloat16
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()
