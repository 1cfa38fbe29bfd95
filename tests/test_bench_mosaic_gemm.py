"""The Mosaic GPU GEMM probe's CPU-side parts: config parsing, the refusal off-GPU, the table."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import bench_mosaic_gemm as bench  # noqa: E402


def test_config_parses_into_jax_tuning_config():
    cfg = bench.MosaicConfig.parse("128x256x64x3xMx8xN")
    assert (cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages, cfg.grid_width) == (128, 256, 64, 3, 8)
    tuned = cfg.jax_config()  # JAX's own Hopper matmul config, importable on a CPU host
    assert tuned.tile_n == 256 and str(tuned.grid_minor_dim) == "M" and str(tuned.wg_dimension) == "N"


@pytest.mark.parametrize(
    "spec", ["128x128x64x4xNx8", "128x128x64x4xQx8xN", "128x128x64x4xx8xN", "axbxcxdxNx8xN"]
)
def test_bad_config_is_refused_before_any_work(spec):
    with pytest.raises(ValueError):
        bench.MosaicConfig.parse(spec)


def test_refuses_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--shapes", "256x128", "--out", str(out)]) == 2
    assert "needs a GPU" in capsys.readouterr().err and not out.exists()


def test_table_shows_rejected_configs():
    rows = [
        {
            "d_in": 64,
            "d_out": 32,
            "T": 128,
            "impl": "xla",
            "us": 10.0,
            "x_vs_base": 1.0,
            "max_rel_err": 0.0,
            "valid": True,
        },
        {"d_in": 64, "d_out": 32, "T": 128, "impl": "mosaic@256x256x64x9xNx8xN", "error": "ValueError: smem"},
    ]
    table = bench.format_table(rows)
    assert "| 64->32 | 128 | xla | 10.0 | 1.000 |" in table and "ValueError: smem" in table
