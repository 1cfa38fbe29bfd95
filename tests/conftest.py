"""Shared test set-up: GPU-marked tests are skipped without a GPU; seeds come from the test's name."""

import hashlib
import os

# The command line turns on JAX's persistent compilation cache in ~/.cache (meteora_jax/compile_cache.py); the
# suite calls it in-process and must neither write there nor load programs a previous run compiled.
os.environ["METEORA_JAX_COMPILE_CACHE"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; its interpret-mode twin runs on CPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator seeded from the test's node id: fresh inputs per test, reproducible per test."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little")
    return np.random.default_rng(seed)
