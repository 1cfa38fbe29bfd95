"""Shared test set-up: GPU-marked tests are skipped without a GPU; seeds come from the test's name."""

import hashlib
import os
import shutil
import tempfile

# The command line turns on JAX's persistent compilation cache in ~/.cache (meteora_jax/compile_cache.py); the
# suite must neither write there nor load programs an earlier run compiled. It keeps a cache of its own run
# instead: many tests compile the same tiny models' programs, in-process and in the CLI subprocesses they start
# (which inherit the variable); on 2 CPU cores that took the decode, generate and resume tests from 236 to 152 s.
# pytest's main process (the xdist controller) makes the directory before the workers start, so they inherit
# it, and removes it at the end. METEORA_TEST_COMPILE_CACHE=0 runs the suite without it.
_OWNER = not os.environ.get("PYTEST_XDIST_WORKER")
if os.environ.get("METEORA_TEST_COMPILE_CACHE", "1") == "0":
    os.environ["METEORA_JAX_COMPILE_CACHE"] = "0"
elif _OWNER:
    os.environ["METEORA_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="meteora-jax-test-xla-")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from meteora_jax import compile_cache  # noqa: E402

if compile_cache.enable() is not None:  # also programs that compile fast: a tiny model's take 0.2-2 s
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
    path = os.environ["METEORA_JAX_COMPILE_CACHE"]
    if _OWNER and path != "0":
        shutil.rmtree(path, ignore_errors=True)


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
