"""``scripts/bench_generate.py``'s command line: ``--knob`` sets trace-time knobs for the run (recorded in the
JSON) and refuses an unknown one with a usage error that lists the knobs. The benchmark itself is a GPU script;
this runs its tiny CPU smoke configuration for one decode batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_unknown_knob_is_a_usage_error_naming_the_knobs():
    proc = _run("--tiny", "--knob", "nope=1")
    assert proc.returncode == 2
    assert "unknown knob 'nope'" in proc.stderr and "kernel_route" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_knobs_are_set_for_the_run_and_recorded(tmp_path):
    out = tmp_path / "gen.json"
    proc = _run(
        "--tiny", "--skip-hf", "--sections", "decode", "--decode-batches", "1",
        "--knob", "kernel_route=1", "--knob", "fused_expand=inf", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(out.read_text())
    knobs = written["knobs"]
    assert knobs["kernel_route"] == 1 and knobs["fused_expand"] == sys.maxsize
    assert written["command"].endswith("--knob kernel_route=1 --knob fused_expand=inf --out " + str(out))
