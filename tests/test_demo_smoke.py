"""The demo end to end with few steps (thresholds not checked: they need the full step counts)."""

import json
import os
import subprocess
import sys


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [
            sys.executable,
            "scripts/demo.py",
            "--out",
            str(out),
            "--adapter-steps",
            "5",
            "--gate-steps",
            "5",
            "--n-train",
            "16",
            "--n-test",
            "4",
            "--no-check",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher-forced answer accuracy" in r.stdout and "routing heatmap" in r.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["frozen_bitwise_equal"] is True
    assert set(summary["answer_accuracy"]) == {"upper", "reverse", "spell", "length"}
    assert (out / "routing_heatmap.png").stat().st_size > 1000
