"""Per-call device time of a jitted function: two timers, each with its own validity rule.

``profile`` (primary, valid at any size): the function is dispatched ``calls`` times under
``jax.profiler.trace``; the per-call figure is the GPU kernel time read from the trace the profiler writes
(``*.trace.json.gz``, the same events as ``perfetto_trace.json.gz``). Kernel events are the complete
(``"ph": "X"``) events on threads named ``Stream #...`` of processes named ``/device:GPU:N``; that is how
XLA's CUPTI collector names its lines (``GetDeviceXLineName``), and it leaves out the ``CUPTI overhead``
line and the derived ``XLA Ops`` / ``XLA Modules`` lines. Host dispatch, the gaps between launches and the
profiler's own cost are not kernel time, so nothing has to be subtracted. The kernels are cut into calls
in time order (``n_kernels / calls`` each, which must divide); the figure is the median per-call sum.
Valid when kernels were found, their count divides evenly into calls, and the spread across calls is small:
(p75 - p25) / median <= ``MAX_SPREAD``. It measures device busy time: launch gaps inside one call (several
kernels, no CUDA graph under the profiler) are not in it, so a multi-kernel call reads a little low
compared with its latency in a CUDA-graphed program.

``fori`` (cross-check, the earlier timer): one jit runs the call ``reps`` times in a ``fori_loop``; per-call
wall time minus the same loop around a trivial body, median of 5 runs. On a GPU each iteration costs
10-20 us of loop overhead (the predicate's round trip to the host), so it is valid only when that empty-loop
cost is below ``MAX_LOOP_OVERHEAD`` of the loop's per-iteration time, which in practice means T >= 4096.

Both timers can rotate through several copies of the inputs (``cold_copies``) so consecutive calls do not
find the weights in L2: an H200's 50 MB L2 holds a whole 4096x4096 bf16 W, and decoding streams every
layer's weights through it, so back-to-back calls on one W would read it from cache.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

MAX_SPREAD = 0.10  # profile: (p75 - p25) / median of the per-call kernel time
MAX_LOOP_OVERHEAD = 0.10  # fori: empty-loop cost / loop-with-call cost per iteration
L2_BYTES = 50 * 2**20  # H100 / H200


@dataclasses.dataclass(frozen=True)
class Timing:
    """One timer's per-call figure; ``note`` says why it is (in)valid."""

    timer: str
    us: float
    valid: bool
    note: str
    kernels_per_call: int | None = None
    # profile: (kernel name, median us over calls) for each kernel position in a call, in launch order: where
    # a multi-kernel call's time goes (names are the trace's, e.g. XLA fusion or Triton kernel names).
    breakdown: tuple[tuple[str, float], ...] = ()


def cold_copy_count(set_bytes: int, l2_bytes: int = L2_BYTES, max_sets: int = 64) -> int:
    """How many input sets of ``set_bytes`` each ``cold_copies`` cycles through (at most ``max_sets``)."""
    return min(max_sets, 1 + math.ceil(2 * l2_bytes / max(1, set_bytes)))


def cold_copies(args: Sequence[jax.Array], l2_bytes: int = L2_BYTES, max_sets: int = 64) -> list[tuple]:
    """Enough separate copies of ``args`` that, used in turn, each call's inputs were last touched more
    than twice the L2 size ago (one set when a set alone is over that)."""
    n = cold_copy_count(sum(a.size * a.dtype.itemsize for a in args), l2_bytes, max_sets)
    return [tuple(args)] + [tuple(jax.numpy.array(a, copy=True) for a in args) for _ in range(n - 1)]


def _newest_profile(log_dir: str) -> str:
    runs = glob.glob(os.path.join(log_dir, "plugins", "profile", "*"))
    if not runs:
        raise FileNotFoundError(f"no profile under {log_dir}")
    return max(runs, key=os.path.getmtime)


def read_trace(log_dir: str) -> dict:
    """The trace JSON of the newest profile under ``log_dir`` (the layout ``jax.profiler.trace`` writes)."""
    newest = _newest_profile(log_dir)
    paths = glob.glob(os.path.join(newest, "*.trace.json.gz")) or glob.glob(
        os.path.join(newest, "perfetto_trace.json.gz")
    )
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz in {newest}")
    with gzip.open(paths[0], "rb") as f:
        return json.load(f)


def _is_gpu_process(name: str) -> bool:
    return name.startswith("/device:GPU:")


def _is_stream(name: str) -> bool:
    return name.startswith("Stream #")


def gpu_kernel_events(trace: dict) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every device-stream event in a trace JSON, in time order."""
    events = trace.get("traceEvents", [])
    meta = [e for e in events if e.get("ph") == "M"]
    gpu_pids = {
        e["pid"]
        for e in meta
        if e.get("name") == "process_name" and _is_gpu_process(str(e.get("args", {}).get("name", "")))
    }
    streams = {
        (e["pid"], e["tid"])
        for e in meta
        if e.get("name") == "thread_name"
        and e.get("pid") in gpu_pids
        and _is_stream(str(e.get("args", {}).get("name", "")))
    }
    kernels = [
        (float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", "")))
        for e in events
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams
    ]
    return sorted(kernels)


def device_lines(trace: dict) -> list[str]:
    """Names of the threads (XLines) of GPU processes: what to look at when no kernel was found."""
    events = trace.get("traceEvents", [])
    gpu_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and _is_gpu_process(str(e.get("args", {}).get("name", "")))
    }
    return sorted(
        str(e.get("args", {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids
    )


def gpu_kernel_events_xplane(log_dir: str) -> list[tuple[float, float, str]]:
    """The same events read from the ``*.xplane.pb`` (for a jax that writes no trace JSON)."""
    paths = glob.glob(os.path.join(_newest_profile(log_dir), "*.xplane.pb"))
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz or *.xplane.pb under {log_dir}")
    data = jax.profiler.ProfileData.from_file(paths[0])
    kernels = [
        (e.start_ns / 1e3, e.duration_ns / 1e3, e.name)
        for plane in data.planes
        if _is_gpu_process(plane.name)
        for line in plane.lines
        if _is_stream(line.name)
        for e in line.events
    ]
    return sorted(kernels)


def per_call_kernel_us(kernels: Sequence[tuple[float, float, str]], calls: int) -> Timing:
    """Cut time-ordered kernels into ``calls`` equal groups and apply the profile validity rule."""
    if not kernels:
        return Timing("profile", float("nan"), False, "no GPU kernel events in the trace")
    total = sum(d for _, d, _ in kernels)
    if len(kernels) % calls:
        note = f"{len(kernels)} kernels do not divide into {calls} calls; us = total / calls"
        return Timing("profile", total / calls, False, note)
    k = len(kernels) // calls
    per_call = [sum(d for _, d, _ in kernels[i * k : (i + 1) * k]) for i in range(calls)]
    q25, med, q75 = np.percentile(per_call, [25, 50, 75])
    spread = (q75 - q25) / med if med > 0 else float("inf")
    valid = med > 0 and spread <= MAX_SPREAD
    note = f"{k} kernels/call, spread (p75-p25)/median {spread:.3f} ({'<=' if valid else '>'} {MAX_SPREAD})"
    breakdown = tuple(
        (kernels[j][2], float(np.median([kernels[i * k + j][1] for i in range(calls)]))) for j in range(k)
    )
    return Timing("profile", float(med), bool(valid), note, kernels_per_call=k, breakdown=breakdown)


def time_profile(fn: Callable, arg_sets: Sequence[tuple], calls: int = 50) -> Timing:
    """Median per-call GPU kernel time of ``fn`` over ``calls`` dispatches that cycle through ``arg_sets``."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            y = None
            for i in range(calls):
                y = fn(*arg_sets[i % len(arg_sets)])
            jax.block_until_ready(y)
        try:
            trace = read_trace(log_dir)
            kernels, lines = gpu_kernel_events(trace), device_lines(trace)
        except FileNotFoundError:
            try:
                kernels, lines = gpu_kernel_events_xplane(log_dir), []
            except (
                FileNotFoundError,
                AttributeError,
            ) as e:  # a timer that cannot read is reported, not fatal
                return Timing("profile", float("nan"), False, f"trace not readable: {e}")
    timing = per_call_kernel_us(kernels, calls)
    if not kernels and lines:  # a GPU process without stream lines: say what its lines were called
        timing = dataclasses.replace(timing, note=f"{timing.note}; GPU lines: {lines[:8]}")
    return timing


def _looped(fn: Callable, reps: int) -> Callable:
    """One jit that runs ``fn`` ``reps`` times; each call's x depends on the last output (one element,
    updated in place) so XLA cannot hoist or merge the calls."""

    def many(x: jax.Array, *rest: Any) -> jax.Array:
        def body(_: jax.Array, x: jax.Array) -> jax.Array:
            y = fn(x, *rest)
            return x.at[0, 0].add((y[0, 0] * 0).astype(x.dtype))

        return jax.lax.fori_loop(0, reps, body, x)

    return jax.jit(many)


def time_fori(fn: Callable, args: Sequence[jax.Array], reps: int) -> Timing:
    """Per-call time from an in-jit loop of ``reps`` calls minus the same loop around a trivial body."""

    def per_iteration_us(f: Callable) -> float:
        looped = _looped(f, reps)
        jax.block_until_ready(looped(*args))
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(looped(*args))
            runs.append((time.perf_counter() - t0) / reps * 1e6)
        return statistics.median(runs)

    loop_us = per_iteration_us(fn)
    empty_us = per_iteration_us(lambda x, *rest: x[:1, :1])
    us = loop_us - empty_us
    overhead = empty_us / loop_us if loop_us > 0 else float("inf")
    valid = us > 0 and overhead < MAX_LOOP_OVERHEAD
    verdict = f"{'<' if valid else '>='} {MAX_LOOP_OVERHEAD:.0%}"
    note = f"empty loop {empty_us:.1f} us/iter = {overhead:.0%} of the loop ({verdict})"
    return Timing("fori", us, bool(valid), note)


def card_slug(device_kind: str) -> str:
    """A short lower-case name for a device kind, for result files named by the card that measured them:
    ``"NVIDIA H200"`` -> ``"h200"``, ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, ``"TPU v5 lite"`` -> ``"tpu_v5_lite"``.
    Figures from two cards must not share a file."""
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_kind)
    slug = model.group(1) if model else re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_") or "device"
    return slug.lower()
