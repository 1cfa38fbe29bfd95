"""The benchmark timers: trace parsing on a hand-written trace, the validity rules, and one CPU smoke row."""

import json
import math

import jax
import jax.numpy as jnp
import pytest
from script_loader import load_script

from pallas_kernels import timing

ROW_KEYS = {"d_in", "d_out", "T", "E", "r", "k", "routing", "impl", "us", "x_vs_base", "bound", "peak_mb"}


def _meta(kind, pid, name, tid=None):
    event = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
    return event if tid is None else {**event, "tid": tid}


def _trace():
    """A trace laid out as XLA's CUPTI collector names things: host, GPU streams, overhead, derived lines."""
    return {
        "traceEvents": [
            _meta("process_name", 1, "/device:GPU:0"),
            _meta("thread_name", 1, "Stream #13(Kernel,MemcpyD2D)", tid=13),
            _meta("thread_name", 1, "CUPTI overhead", tid=99),
            _meta("thread_name", 1, "XLA Ops", tid=100),
            _meta("process_name", 701, "/host:CPU"),
            _meta("thread_name", 701, "python", tid=5),
            {"ph": "X", "pid": 1, "tid": 13, "ts": 20.0, "dur": 3.0, "name": "loop_fusion"},
            {"ph": "X", "pid": 1, "tid": 13, "ts": 10.0, "dur": 2.0, "name": "gemm_kernel"},
            {"ph": "X", "pid": 1, "tid": 99, "ts": 11.0, "dur": 50.0, "name": "overhead"},
            {"ph": "X", "pid": 1, "tid": 100, "ts": 10.0, "dur": 13.0, "name": "fusion.1"},
            {"ph": "X", "pid": 701, "tid": 5, "ts": 0.0, "dur": 40.0, "name": "PjitFunction(f)"},
        ]
    }


def test_kernel_events_are_the_gpu_stream_lines_only_in_time_order():
    events = timing.gpu_kernel_events(_trace())
    assert events == [(10.0, 2.0, "gemm_kernel"), (20.0, 3.0, "loop_fusion")]
    assert "CUPTI overhead" in timing.device_lines(_trace())


def test_per_call_split_and_validity_rule():
    even = [(float(i), d, "k") for i, d in enumerate([2.0, 3.0] * 8)]  # 8 calls of two kernels, 5 us each
    t = timing.per_call_kernel_us(even, calls=8)
    assert (t.timer, t.us, t.valid, t.kernels_per_call) == ("profile", 5.0, True, 2)

    uneven = timing.per_call_kernel_us(even[:-1], calls=8)
    assert not uneven.valid and "do not divide" in uneven.note

    noisy = [(float(i), d, "k") for i, d in enumerate([1.0, 5.0, 1.0, 5.0])]
    assert not timing.per_call_kernel_us(noisy, calls=4).valid  # spread far above MAX_SPREAD

    none = timing.per_call_kernel_us([], calls=4)
    assert not none.valid and math.isnan(none.us) and "no GPU kernel events" in none.note


def test_breakdown_is_each_kernel_position_median_in_launch_order():
    # 5 calls of [shrink, expand]; the expand is 10 us in four calls and 30 us in one (the median ignores it)
    durations = [(1.0, 10.0), (2.0, 10.0), (1.0, 30.0), (3.0, 10.0), (1.0, 10.0)]
    kernels, t0 = [], 0.0
    for shrink, expand in durations:
        kernels += [(t0, shrink, "shrink"), (t0 + 1.0, expand, "expand")]
        t0 += 100.0
    t = timing.per_call_kernel_us(kernels, calls=5)
    assert t.breakdown == (("shrink", 1.0), ("expand", 10.0))
    assert timing.per_call_kernel_us(kernels[:-1], calls=5).breakdown == ()  # uneven: no positions to name


def test_cold_copies_are_separate_buffers_of_the_same_values():
    x = jnp.arange(12.0).reshape(3, 4)
    sets = timing.cold_copies((x,), l2_bytes=100)  # 48 bytes a set: 1 + ceil(200 / 48) = 6 sets
    assert len(sets) == 6
    assert len({s[0].unsafe_buffer_pointer() for s in sets}) == 6
    assert all(bool((s[0] == x).all()) for s in sets)


def _bench_module():
    return load_script("bench_moe_lora")


def test_tiny_bench_writes_the_issue_schema_with_timer_fields(tmp_path):
    bench = _bench_module()
    out = tmp_path / "rows.json"
    bench.bench(bench.TINY_CASES[:1], ["xla"], str(out), calls=4, reps=5)

    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert {"device", "date", "rows"} <= doc.keys()
    (row,) = doc["rows"]
    assert ROW_KEYS <= row.keys()
    assert row["timer"] in bench.TIMERS and isinstance(row["timer_valid"], bool)
    for name in bench.TIMERS:  # both timers side by side, each with its verdict and the reason
        assert {f"us_{name}", f"base_us_{name}", f"valid_{name}", f"note_{name}"} <= row.keys()
    assert row["us"] == row[f"us_{row['timer']}"] and row["base_us"] == row[f"base_us_{row['timer']}"]
    if jax.default_backend() == "cpu":  # no device kernels in a CPU trace: profile says so, fori is used
        assert row["us_profile"] is None and "no GPU kernel events" in row["note_profile"]
        assert row["timer"] == "fori" and "used fori" in row["timer_note"]
        assert row["us"] is not None and row["x_vs_base"] is not None


def test_bench_runs_the_decode_kernel_with_the_tiles_named_in_the_impl(tmp_path):
    """``pallas_gpu@BNxBKxWxS[f]`` rows: parsed, run (interpret mode) and labelled; the override is undone."""
    from pallas_kernels.grouped_lora import pallas_gpu_decode

    bench = _bench_module()
    assert bench.parse_impl("xla") == ("xla", None)
    name, cfg = bench.parse_impl("pallas_gpu@64x512x8x3")
    assert name == "pallas_gpu"
    assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split_k) == (64, 512, 8, 3, 0)
    assert bench.parse_impl("pallas_gpu@32x256x4x4x2")[1].split_k == 2
    assert bench.parse_impl("pallas_gpu@32x256x4x4x2")[1].base_dot == "mma"  # no f: the tensor-core base
    with pytest.raises(ValueError, match="BNxBKxWxS"):
        bench.parse_impl("pallas_gpu@32x256x4x4x2x1")

    out = tmp_path / "rows.json"
    impls = ["xla", "pallas_gpu_interpret@16x32x4x2", "pallas_gpu_interpret@16x32x4x2f"]
    bench.bench(bench.TINY_CASES[:1], impls, str(out), timers=("fori",), calls=2, reps=5)
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == impls
    assert rows[1]["decode_config"]["block_n"] == 16 and rows[1]["decode_config"]["block_k"] == 32
    assert rows[1]["rel_err_vs_first_impl"] < 1e-2  # bf16 output, same inputs as the xla row
    assert [r["decode_config"]["base_dot"] for r in rows[1:]] == ["mma", "fma"]
    assert rows[2]["rel_err_vs_first_impl"] < 1e-2
    assert pallas_gpu_decode.DECODE_CONFIG_OVERRIDE is None


@pytest.mark.parametrize(
    "spec,split_k",
    [("pallas_gpu@64x128x4x3x0f", 0), ("pallas_gpu@64x128x4x3f", 0), ("pallas_gpu@64x128x4x3x2f", 2)],
)
def test_parse_impl_reads_the_fma_flag(spec, split_k):
    """A trailing ``f`` after the numbers selects the CUDA-core base product; the tiles parse as without it."""
    name, cfg = _bench_module().parse_impl(spec)
    assert name == "pallas_gpu" and cfg.base_dot == "fma"
    assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split_k) == (64, 128, 4, 3, split_k)


@pytest.mark.parametrize(
    "spec",
    [
        "pallas_gpu@64x128x4x3ff",
        "pallas_gpu@64x128x4f",
        "pallas_gpu@64x128x4x3xf",
        "pallas_gpu@f64x128x4x3",
        "pallas_gpu@64x128x4x3g",
        "pallas_gpu@64x128x4x3x0fx1",
        "pallas_gpu@64x128x4x3 f",
        "pallas_gpu@",
    ],
)
def test_parse_impl_refuses_malformed_tiles(spec):
    """Anything but four or five numbers and an optional ``f`` after the ``@`` is an error, not a guess."""
    with pytest.raises(ValueError, match=r"BNxBKxWxS\[xK\]\[f\]"):
        _bench_module().parse_impl(spec)


def test_bench_impl_knob_suffix_is_set_for_that_impl_only(tmp_path, monkeypatch):
    """``impl+KNOB=N``: parsed (a bad knob is refused, naming the knobs), set while that impl's rows are traced
    (``pallas_gpu_expand`` runs at T=16 with ``fused_expand`` on) and restored after."""
    from meteora_jax.errors import MeteoraInputError
    from pallas_kernels.grouped_lora import pallas_gpu_expand

    monkeypatch.setattr(pallas_gpu_expand, "FUSED_EXPAND_MAX_TOKENS", 0)  # off unless the suffix sets it
    bench = _bench_module()
    assert bench.split_knobs("pallas_gpu_decode+fused_expand=64") == (
        "pallas_gpu_decode",
        {"fused_expand": 64},
    )
    assert bench.split_knobs("pallas_gpu@64x256x4x3") == ("pallas_gpu@64x256x4x3", {})
    with pytest.raises(MeteoraInputError, match="knobs are"):
        bench.split_knobs("xla+nope=1")
    seen = []
    launch = pallas_gpu_expand._launch  # every entry point of the kernel (hc given or built inside) ends here
    pallas_gpu_expand._launch = lambda *a, **kw: seen.append(1) or launch(*a, **kw)
    try:
        impls = ["pallas_gpu_decode_interpret", "pallas_gpu_decode_interpret+fused_expand=64"]
        bench.bench(bench.TINY_CASES[1:2], impls, str(tmp_path / "r.json"), timers=("fori",), calls=2, reps=5)
    finally:
        pallas_gpu_expand._launch = launch
    assert seen and pallas_gpu_expand.FUSED_EXPAND_MAX_TOKENS == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == impls and rows[1]["rel_err_vs_first_impl"] < 1e-2


def test_prefill_cublas_impl_compiles_as_the_model_prefill(monkeypatch):
    """``+prefill_cublas=1`` asks for the model's prefill compile options on a GPU (cuBLAS GEMMs only), and for
    none on another backend or without the knob, where XLA would reject or ignore them."""
    bench = _bench_module()
    from meteora_jax.generate import sampler
    from meteora_jax.knobs import knobs_set

    assert bench.compiler_options({}) == {}
    if jax.default_backend() != "gpu":
        assert bench.compiler_options({"prefill_cublas": 1}) == {}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(sampler, "_on_gpu", lambda: True)
    options = bench.compiler_options({"prefill_cublas": 1})
    assert options["xla_gpu_enable_triton_gemm"] is False
    with knobs_set({"prefill_cublas": 1}):  # the model's prefill options, its dot_merger setting included
        assert options == sampler.prefill_compiler_options()
    assert bench.compiler_options({"prefill_cublas": 0}) == {}
    # session 18's measured rows: the dot_merger pass still on
    merged = bench.compiler_options({"prefill_cublas": 1, "prefill_dot_merger": 1})
    assert merged == {"xla_gpu_enable_triton_gemm": False}


def test_merge_keeps_the_rows_not_rerun_and_refuses_another_device(tmp_path):
    """``--merge``: a second run adds its rows to the file and replaces only its own (case, impl) rows; a file
    measured on another device kind is refused, naming the file, rather than mixed into one table."""
    bench = _bench_module()
    out = tmp_path / "rows.json"
    bench.bench(bench.TINY_CASES[:1], ["xla"], str(out), timers=("fori",), calls=2, reps=5)
    first = json.loads(out.read_text())
    bench.bench(bench.TINY_CASES, ["xla"], str(out), timers=("fori",), calls=2, reps=5, merge=True)
    doc = json.loads(out.read_text())
    assert [(r["T"], r["impl"]) for r in doc["rows"]] == [
        (1, "xla"),
        (16, "xla"),
    ]  # T=1 rerun: replaced, once
    assert len(doc["commands"]) == 2 and doc["commands"][0] == first["command"]
    bench.bench(bench.TINY_CASES[1:], ["xla"], str(out), timers=("fori",), calls=2, reps=5, merge=True)
    assert json.loads(out.read_text())["rows"][0] == doc["rows"][0]  # the T=1 row kept as it was

    out.write_text(json.dumps({**doc, "device": "NVIDIA H100 80GB HBM3"}))
    with pytest.raises(SystemExit, match=f"{out}.*H100.*another --out"):
        bench.bench(bench.TINY_CASES[:1], ["xla"], str(out), timers=("fori",), calls=2, reps=5, merge=True)
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a bench_moe_lora JSON.*another --out"):
        bench.bench(bench.TINY_CASES[:1], ["xla"], str(out), timers=("fori",), calls=2, reps=5, merge=True)
    assert out.read_text() == "{not json"  # refused before anything was timed or written


def test_combine_joins_pieces_of_one_device_and_refuses_two(tmp_path):
    """``--combine``: files written by separate device calls join into one table, a later file's (case, impl)
    rows replacing an earlier one's; pieces of two device kinds are refused before anything is written."""
    bench = _bench_module()
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    bench.bench(bench.TINY_CASES, ["xla"], str(a), timers=("fori",), calls=2, reps=5)
    bench.bench(bench.TINY_CASES[1:], ["xla"], str(b), timers=("fori",), calls=2, reps=5)
    doc = bench.combine([str(a), str(b)], str(out))
    rows_a, rows_b = json.loads(a.read_text())["rows"], json.loads(b.read_text())["rows"]
    assert json.loads(out.read_text()) == doc
    assert doc["rows"] == [rows_a[0], rows_b[0]]  # T=1 from a, T=16 from b (the later file)
    assert len(doc["commands"]) == 2

    b.write_text(json.dumps({**json.loads(b.read_text()), "device": "NVIDIA H200"}))
    out.unlink()
    with pytest.raises(SystemExit, match="--combine: .*one device kind"):
        bench.combine([str(a), str(b)], str(out))
    assert not out.exists()
    b.write_text("{not json")
    with pytest.raises(SystemExit, match=f"--combine: {b} is not a bench_moe_lora JSON"):
        bench.combine([str(a), str(b)], str(out))
    assert not out.exists()


@pytest.mark.parametrize(
    ("device_kind", "name"),
    [
        ("NVIDIA H200", "moe_lora_h200.json"),
        ("NVIDIA H100 80GB HBM3", "moe_lora_h100.json"),
        ("NVIDIA A100-SXM4-80GB", "moe_lora_a100.json"),
        ("TPU v5 lite", "moe_lora_tpu_v5_lite.json"),
        ("cpu", "moe_lora_cpu.json"),
    ],
)
def test_default_out_is_named_for_the_card(device_kind, name):
    """With no ``--out`` a full run's JSON is named for its card, so an H100's table never lands in the H200's
    (``bench_generate.py`` names its JSON by the same ``timing.card_slug``)."""
    assert _bench_module().default_out(device_kind) == f"benchmarks/results/{name}"


@pytest.mark.parametrize("text", [None, "{not json", '{"rows": []}', "[1, 2]"])
def test_table_refuses_a_file_this_script_did_not_write(tmp_path, text):
    """``--table`` on a missing file, broken JSON, or JSON without ``device`` and ``rows``: an exit naming the
    flag and the file, not a traceback."""
    bench = _bench_module()
    path = tmp_path / "rows.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match=f"--table: {path} is not a bench_moe_lora JSON"):
        bench.read_doc(str(path), "--table", "pass a file that --out wrote")


def _table_row(impl, T, x, bound, peak=1.0, valid=True, d_out=4096):
    return {"d_in": 4096, "d_out": d_out, "T": T, "E": 28, "r": 8, "k": 2, "routing": "uniform", "impl": impl,
            "us": 10.0 * x, "base_us": 10.0, "x_vs_base": x, "bound": bound, "peak_mb": peak,
            "timer": "profile", "timer_valid": valid}  # fmt: skip


def test_table_picks_the_best_valid_row_and_checks_the_issue_targets():
    """``--table``: per case the fastest validly timed row of ours (a faster invalid one and the peers are not
    ours to claim), its ratio to the bound, and issue 3's target: 1.03 x bound at T = 1 / 64, 1.03 and 64 MiB
    at T = 4096."""
    bench = _bench_module()
    rows = [
        _table_row("xla", 1, 1.30, 1.008),
        _table_row("pallas_gpu_decode", 1, 1.02, 1.008),
        _table_row("pallas_gpu", 1, 0.50, 1.008, valid=False),
        _table_row("meteora_triton_v4", 1, 2.0, 1.008),
        _table_row("xla", 4096, 1.02, 1.036, peak=80.0),
        _table_row("xla", 4096, 1.02, 1.046, peak=30.0, d_out=1024),
    ]
    text = bench.table({"device": "GPU", "date": "2026-12-06", "rows": rows})
    lines = [line for line in text.splitlines() if line.startswith("| 4096->")]
    assert len(lines) == 3
    t1 = lines[0].split(" | ")
    assert t1[6] == "pallas_gpu_decode" and t1[9] == "1.020" and t1[11] == "1.012"
    assert t1[13] == "<= 1.03 x bound = 1.038" and t1[14] == "yes" and "meteora_triton_v4 2.00" in t1[15]
    assert lines[1].split(" | ")[14] == "**no**"  # 4096->4096: 1.02 but 80 MB transient
    assert lines[2].split(" | ")[14] == "yes"  # 4096->1024: 1.02, 30 MB
