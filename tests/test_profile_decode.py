"""The parsers of ``scripts/profile_decode.py``: compiled-HLO step counts and perfetto-trace kernel stats."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest
from script_loader import load_script

from pallas_kernels import timing


@pytest.fixture(scope="module")
def prof():
    return load_script("profile_decode")


def test_hlo_step_summary_counts_the_loop_body_only(prof):
    def f(x, w):
        body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ w) * 2.0)
        return jax.lax.while_loop(lambda c: c[0] < 5, body, (0, x))[1]

    x = jnp.ones((4, 8))
    w = jnp.ones((8, 8))
    text = jax.jit(f).lower(x, w).compile().as_text()
    summary = prof.hlo_step_summary(text)
    assert summary["by_opcode"].get("dot", 0) + summary["by_target"].get("fusion:kCustom", 0) >= 1
    assert 1 <= summary["ops_per_step"] <= 12
    assert "error" in prof.hlo_step_summary(jax.jit(lambda v: v @ w).lower(x).compile().as_text())


def test_hlo_step_summary_reads_tuple_shaped_ops(prof):
    """cuBLAS gemms and TopK return tuples: `%c = (f32[1,2]{1,0}, s32[1,2]{1,0}) custom-call(...)`."""
    text = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %g = f32[4]{0} get-tuple-element(%p), index=1
  %cc = (f32[4]{0}, s8[1024]{0}) custom-call(%g, %g), custom_call_target="__cublas$gemm"
  %tk = (f32[2]{0}, s32[2]{0}) custom-call(%g), custom_call_target="TopK"
  %f = f32[4]{0} fusion(%g), kind=kLoop, calls=%fc
  ROOT %t = (s32[], f32[4]{0}) tuple(%p, %f)
}

ENTRY %main (a: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = (s32[], f32[4]{0}) parameter(0)
  ROOT %w = (s32[], f32[4]{0}) while(%a), condition=%cond, body=%body
}
"""
    s = prof.hlo_step_summary(text)
    assert s["ops_per_step"] == 3
    assert s["by_target"] == {"__cublas$gemm": 1, "TopK": 1, "fusion:kLoop": 1}


def _trace(tmp_path, events):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "XLA Ops"}},
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return str(tmp_path)


def test_kernel_summary_from_a_trace(prof, tmp_path):
    ev = lambda name, pid, tid, ts, dur: {
        "ph": "X",
        "name": name,
        "pid": pid,
        "tid": tid,
        "ts": ts,
        "dur": dur,
    }
    events = [
        ev("gemv", 2, 7, 0.0, 10.0),
        ev("fusion_1", 2, 7, 15.0, 5.0),
        ev("gemv", 2, 7, 30.0, 10.0),
        ev("MemcpyD2H", 2, 7, 45.0, 1.0),
        ev("fusion_1", 2, 9, 15.0, 5.0),  # a derived line: not counted twice
        ev("python", 1, 1, 0.0, 100.0),  # host: not a kernel
    ]
    # The trace reader is pallas_kernels.timing's, shared with the kernel benchmark.
    trace = timing.read_trace(_trace(tmp_path, events))
    kernels = timing.gpu_kernel_events(trace)
    assert sorted(k[2] for k in kernels) == ["MemcpyD2H", "fusion_1", "gemv", "gemv"]
    s = prof.kernel_summary(kernels, steps=2, top=5)
    assert s["kernels_per_token"] == 1.5 and s["kernel_us_per_token"] == 12.5
    assert s["memcpy_per_token"] == 0.5
    assert s["busy_us_per_token"] == 13.0  # 26 us of intervals, none overlapping
    assert s["top_kernels"][0] == {"name": "gemv", "calls_per_token": 1.0, "us_per_token": 10.0}


def test_variant_knobs_parse_set_and_restore(prof):
    """``auto+group_route=inf+lowp=1``: the knobs hold while the variant is traced and are restored after,
    an exception included; an unknown knob or a non-integer value is refused, naming the knobs."""
    from meteora_jax.model import moe_lora
    from pallas_kernels.grouped_lora import xla

    name, knobs = prof.parse_variant("auto+group_route=inf+lowp=1")
    assert name == "auto" and knobs["lowp"] == 1 and knobs["group_route"] > 10**9
    assert prof.parse_variant("xla_masked") == ("xla_masked", {})
    before = (moe_lora.GROUP_ROUTE_MIN_TOKENS, xla.LOW_PRECISION_SUM_MIN_TOKENS)
    with pytest.raises(RuntimeError), prof.knobs_set(knobs):
        assert (moe_lora.GROUP_ROUTE_MIN_TOKENS, xla.LOW_PRECISION_SUM_MIN_TOKENS) == (
            knobs["group_route"],
            1,
        )
        raise RuntimeError
    assert (moe_lora.GROUP_ROUTE_MIN_TOKENS, xla.LOW_PRECISION_SUM_MIN_TOKENS) == before
    for bad in ("auto+nope=1", "auto+lowp=x", "auto+lowp"):
        with pytest.raises(ValueError, match="group_route"):
            prof.parse_variant(bad)


def test_flag_sets_rerun_drops_the_option_in_either_spelling(prof):
    """``--flag-sets`` reruns the script without itself: as ``--flag-sets 'a=..'`` or ``--flag-sets='a=..'``."""
    argv = ["--layers", "8", "--flag-sets", "default=;x=--flag", "--batches", "64"]
    assert prof.without_option(argv, "--flag-sets") == ["--layers", "8", "--batches", "64"]
    argv = ["--flag-sets=default=;x=--flag", "--batches", "64"]
    assert prof.without_option(argv, "--flag-sets") == ["--batches", "64"]
