"""The command line's persistent compilation cache (``meteora_jax/compile_cache.py``)."""

import os
import subprocess
import sys

from meteora_jax import compile_cache


def test_where_the_cache_goes(tmp_path):
    home = os.path.expanduser("~")
    assert compile_cache.cache_dir({}) == compile_cache.Path(home, ".cache", "meteora-jax", "xla")
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "meteora-jax" / "xla"
    assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path / "c")}) == tmp_path / "c"
    for off in ("0", "off", "OFF", "false"):
        assert compile_cache.cache_dir({compile_cache.ENV: off}) is None


def _child(code: str, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


ENABLE_AND_COMPILE = """
import jax, jax.numpy as jnp
from meteora_jax import compile_cache
print(compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the test's program compiles in ms
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
"""


def test_enable_writes_entries_in_a_fresh_process(tmp_path):
    """In a fresh process (the suite's own has the cache off): the directory is created and a compiled program
    lands in it; switched off, nothing is configured."""
    where = tmp_path / "cache"
    assert _child(ENABLE_AND_COMPILE, {compile_cache.ENV: str(where)}) == str(where)
    assert any(where.iterdir())
    assert _child(ENABLE_AND_COMPILE, {compile_cache.ENV: "0"}) == "None"


def test_a_directory_that_cannot_be_made_leaves_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = _child(
        "from meteora_jax import compile_cache; print(compile_cache.enable())",
        {compile_cache.ENV: str(blocker / "x")},
    )
    assert out == "None"
