"""``scripts/profile_prefill.py``: kernel kinds from names, per-kind sums and busy time on hand-made trace
events, and a CPU smoke run of the whole script."""

from __future__ import annotations

import json

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def prof():
    return load_script("profile_prefill")


def test_kind_of_real_kernel_names(prof):
    assert prof.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert prof.kind_of("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert prof.kind_of("triton_gemm_dot_fusion_12") == "gemm"
    assert prof.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert prof.kind_of("lora_fused_gemm") == "lora_kernel"  # ours first, although it says gemm
    assert prof.kind_of("Memcpy DtoD (Device -> Device)") == "copy"
    assert prof.kind_of("loop_multiply_fusion_3") == "other"


def test_kernels_by_kind_sums_and_overlap(prof):
    events = [  # (start us, duration us, name); the second overlaps the first by 5 us
        (0.0, 10.0, "nvjet_a"),
        (5.0, 10.0, "nvjet_a"),
        (20.0, 4.0, "lora_gmm"),
        (30.0, 2.0, "loop_add_fusion"),
    ]
    s = prof.kernels_by_kind(events, top=2)
    assert s["busy_ms"] == pytest.approx((15 + 4 + 2) / 1e3)
    assert s["ms_by_kind"] == pytest.approx({"gemm": 0.020, "lora_kernel": 0.004, "other": 0.002})
    assert s["kernels_by_kind"] == {"gemm": 2, "lora_kernel": 1, "other": 1}
    assert [k["name"] for k in s["top_kernels"]] == ["nvjet_a", "lora_gmm"] and s["top_kernels"][0][
        "calls"
    ] == 2


def test_cpu_smoke_run_writes_json(prof, tmp_path):
    out = tmp_path / "p.json"
    assert (
        prof.main(["--tiny", "--tokens", "32", "--reps", "1", "--variants", "base,xla", "--out", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["rows"]] == ["base", "xla"]
    assert all("error" not in r and r["wall_ms"] > 0 for r in res["rows"])
    assert res["rows"][1]["implementation"] == "xla" and "note" in res["rows"][0]["trace"]


def test_dump_hlo_keeps_each_variants_compiled_prefill(prof, tmp_path):
    """``--dump-hlo``: one member per variant (names made safe), each the compiled program's text; a second
    run into the same archive replaces its members and keeps the others."""
    import tarfile

    out, dump = tmp_path / "p.json", tmp_path / "hlo.tar.gz"
    argv = [
        "--tiny",
        "--tokens",
        "16",
        "--reps",
        "1",
        "--no-trace",
        "--out",
        str(out),
        "--dump-hlo",
        str(dump),
    ]
    assert prof.main([*argv, "--variants", "base,xla+lowp=1"]) == 0
    assert prof.main([*argv, "--variants", "base"]) == 0
    with tarfile.open(dump, "r:gz") as tf:
        members = {m.name: tf.extractfile(m).read().decode() for m in tf.getmembers()}
    assert sorted(members) == ["base_t16.hlo.txt", "xla_lowp=1_t16.hlo.txt"]
    assert all("ENTRY" in text and "HloModule" in text for text in members.values())
    assert not list(tmp_path.glob("*.tmp"))
