"""``--dump-hlo F.tar.gz`` of the profiling scripts: each variant's compiled program as a text member of one
gzipped tar, so that a kernel in a GPU trace can be traced back to its fusion and the backend config XLA
chose for it (e.g. the autotuned tiles and split-K of a Triton GEMM)."""

from __future__ import annotations

import io
import os
import re
import tarfile

from meteora_jax.io import write_bytes_atomic


def member_name(variant: str, suffix: str) -> str:
    """``variant`` with anything but letters, digits and ``_.=-`` replaced, plus ``suffix``."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", variant) + suffix


def add_to_tar(path: str, member: str, text: str) -> None:
    """Adds (or replaces) one text member of the gzipped tar at ``path``. The archive is rewritten whole, since
    gzip cannot be appended to, and replaces the old one only once complete (``write_bytes_atomic``)."""
    members = {}
    if os.path.exists(path):
        with tarfile.open(path, "r:gz") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    members[member] = text.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    write_bytes_atomic(path, buf.getvalue())
