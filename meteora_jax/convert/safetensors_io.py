"""A defensive safetensors reader: the header is validated against the file before any tensor is allocated.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data buffer;
offsets are relative to the buffer. A truncated download or a file that is not safetensors at all must give
a clear ``MeteoraInputError`` rather than a giant allocation or a Rust panic, so every declared size and
offset is checked against the real file size first. Tensors are read with plain NumPy (bf16 as an
``ml_dtypes.bfloat16`` view of the raw bits), nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np

from meteora_jax.errors import MeteoraInputError

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _corrupt(path: str, what: str) -> MeteoraInputError:
    return MeteoraInputError(
        f"{path}: not a valid safetensors file ({what}). The file is truncated or corrupt (an interrupted "
        "download or copy?); download or re-save it (`model.save_pretrained(dir, safe_serialization=True)`)."
    )


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor table and the ``__metadata__`` of one file, every entry checked against the file size."""
    if not os.path.isfile(path):
        raise MeteoraInputError(f"{path}: no such file. Check the path of the checkpoint.")
    size = os.path.getsize(path)
    if size < 8:
        raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise _corrupt(path, f"declared header length {n} does not fit in the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"the JSON header does not parse: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "the JSON header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(path, f"tensor {name!r} has a malformed or unsupported entry {entry!r}") from e
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise _corrupt(path, f"tensor {name!r} has a negative shape or offsets {shape}, [{begin}, {end}]")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _corrupt(
                path, f"tensor {name!r}: {end - begin} bytes declared for {nbytes} of {shape} {dtype}"
            )
        if end > data_len:
            raise _corrupt(path, f"tensor {name!r} ends at byte {end} but the data buffer holds {data_len}")
        infos[name] = TensorInfo(dtype, shape, data_start + begin, nbytes)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _corrupt(path, f"tensors {a!r} and {b!r} overlap")
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file, as NumPy arrays in their stored dtype."""
    infos, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in infos.items():
            f.seek(info.start)
            buf = f.read(info.nbytes)
            if len(buf) != info.nbytes:  # the file shrank under us
                raise _corrupt(path, f"tensor {name!r} could not be read in full")
            out[name] = np.frombuffer(buf, dtype=info.dtype).reshape(info.shape).copy()
    return out


def read_index(index_path: str) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint index: tensor name -> shard file name."""
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MeteoraInputError(
            f"{index_path}: not a valid checkpoint index ({type(e).__name__}: {e}); it must hold a "
            '"weight_map" {tensor: shard file}. Download or re-save the checkpoint.'
        ) from e
    return {str(k): str(v) for k, v in weight_map.items()}


def read_sharded(
    index_path: str, read: Callable[[str], dict[str, np.ndarray]] = read_file
) -> dict[str, np.ndarray]:
    """All tensors of a sharded checkpoint; each shard must hold exactly the tensors the index gives it, and
    must be a plain file name in the index's directory. ``read`` reads one shard (``torch_bin`` for
    ``pytorch_model.bin.index.json``)."""
    weight_map = read_index(index_path)
    directory = os.path.dirname(index_path)
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    for shard in sorted(by_shard):
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(directory, shard)):
            raise MeteoraInputError(
                f"{index_path}: names shard {shard!r}, which is not in {directory}. The download is incomplete; "
                "fetch every shard file the index lists."
            )
    out: dict[str, np.ndarray] = {}
    for shard, names in sorted(by_shard.items()):
        shard_path = os.path.join(directory, shard)
        tensors = read(shard_path)
        if set(tensors) != names:
            missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
            raise MeteoraInputError(
                f"{shard_path}: does not match {index_path} (missing {missing[:5]}, not in the index "
                f"{extra[:5]}). The shard and the index come from different saves; download both again."
            )
        out.update(tensors)
    return out
