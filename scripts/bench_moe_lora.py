"""Benchmark one MoE-LoRA projection (base GEMM + grouped LoRA) against the plain base GEMM.

Usage: python scripts/bench_moe_lora.py [--out benchmarks/results/moe_lora_<gpu>.json] [--merge]
       [--impls pallas_gpu_decode,xla,xla+prefill_cublas=1,pallas_gpu] [--filter REGEX]
       [--timer both|profile|fori] [--calls 20] [--reps 50] [--l2 cold|warm] [--tiny] [--decode-max-tokens N]
       [--peers meteora_bmm_torch_v1,meteora_triton_v4 [--peers-dir DIR]] [--breakdown]
       python scripts/bench_moe_lora.py --table benchmarks/results/moe_lora_h200.json
       python scripts/bench_moe_lora.py --combine PIECE.json [PIECE.json ...] --out ALL.json

With no arguments it runs every row issue 3 asks for (``shapes.bench_cases``) with every backend that is the
best somewhere (``DEFAULT_IMPLS``), timed from the profiler, and writes ``benchmarks/results/moe_lora_<gpu>.json``
(``moe_lora_h200.json`` on an H200, ``moe_lora_h100.json`` on an H100). With MeteoRA's peers that took 300 s on an
H100. A run longer than one device call goes in pieces with ``--filter``: each piece into its own ``--out``,
joined afterwards with ``--combine`` (no GPU needed), or into one file with ``--merge`` (each piece keeps the rows
the file already holds for the cases and impls it does not rerun). ``--table`` prints the issue's table from the
JSON: per row the best of ours, its ratio to the bound and to the target, and MeteoRA's best peer.

``pallas_gpu`` runs the one-launch decode kernel (``pallas_gpu_decode.py``) for T <= ``DECODE_MAX_TOKENS``
(``--decode-max-tokens`` moves that threshold for this run). An impl written ``pallas_gpu@BNxBKxWxS[xK][f]``
runs it with those tiles (block_n, block_k, num_warps, num_stages, and split_k: 1 = none, 0 or left out =
chosen from the shape; a trailing ``f`` = ``base_dot="fma"``, the base GEMV on CUDA cores) instead of
``DecodeConfig.for_shape``, so one run can sweep them:
``--impls pallas_gpu,pallas_gpu@64x256x4x4,pallas_gpu@32x512x4x3x1,pallas_gpu@64x128x4x3f,xla``. A suffix
``+KNOB=N`` sets a trace-time knob (``meteora_jax.knobs``) for that impl's rows only:
``pallas_gpu_decode+fused_expand=64`` runs 2..64-token calls through ``pallas_gpu_expand``, and
``xla+prefill_cublas=1`` compiles that impl's program as the model compiles its prefill (GEMMs on cuBLAS only,
so XLA folds the expand into the base GEMM as its ``C`` input; the base row keeps XLA's default).
``pallas_gpu_decode`` is the
automatic GPU choice for few experts: that kernel at T=1, ``xla`` otherwise. ``jax_triton`` is the same decode
product written in plain Triton and called through jax-triton (T <= 16; ``jax_triton@...`` takes the same
tiles); carry the jax-triton 0.3.1 wheel to the GPU image. ``--peers`` adds MeteoRA's own torch paths
(``scripts/meteora_peers.py``) to every case, timed beside torch's base ``F.linear`` in the same run, after
all the JAX rows (once torch's profiler has run, JAX's cannot use CUPTI in that process).

Timing (``pallas_kernels/timing.py`` has the details and the validity rules):
- ``profile``: GPU kernel time per call from a profiler trace of ``calls`` dispatches; valid at any T.
- ``fori``: in-jit ``fori_loop`` of ``reps`` calls minus an empty loop; valid only when the empty loop
  costs < 10% of an iteration (on an H200: T >= 4096).
``--timer both`` runs both and reports them side by side (``us_profile``, ``us_fori``, ...); ``us`` and
``x_vs_base`` come from the first timer in (profile, fori) that is valid for both the row and its base
(``timer`` names it, ``timer_valid`` says whether any was). With ``--l2 cold`` (default) the calls cycle
through copies of the inputs so weights are not L2-resident between calls. ``x_vs_base`` divides by the
base GEMM (``x @ W``, XLA/cuBLAS) timed the same way in the same run. ``bound`` is the memory-traffic bound
of the row: (W + touched experts + x + y bytes) / (W + x + y bytes). ``peak_mb`` is XLA's temp allocation
of the compiled call (``memory_analysis().temp_size_in_bytes``): transient memory beyond inputs and output.
``--tiny`` is the CPU smoke mode: two small shapes, ``xla`` only, few calls; on CPU the trace has no GPU
kernels, so ``profile`` reports that and the row falls back to ``fori``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))  # meteora_peers

from meteora_jax import knobs as run_knobs  # noqa: E402
from meteora_jax.io import write_text_atomic  # noqa: E402
from pallas_kernels import timing  # noqa: E402
from pallas_kernels.grouped_lora import api, pallas_gpu_decode, shapes  # noqa: E402

TIMERS = ("profile", "fori")
# Every backend that is the best of ours at some row on an H200/H100 (sessions 18-22): the decode kernel at T = 1
# and its fused expand at T = 2..64, XLA's dense path at prefill sizes (compiled as the model's prefill), the
# Pallas grouped GEMMs for many experts. The first is the others' error reference.
DEFAULT_IMPLS = "pallas_gpu_decode,xla,xla+prefill_cublas=1,pallas_gpu"
PEER_IMPLS = ("meteora_bmm_torch_v1", "meteora_triton_v4", "tokamax")  # rows of others' code, not ours
TINY_CASES = (
    shapes.Case("tiny_64x48_T1_E28_r8_k2_uniform", 1, 64, 48, 28, 8, 2, "uniform", "bfloat16", ("bench",)),
    shapes.Case("tiny_64x48_T16_E28_r8_k2_uniform", 16, 64, 48, 28, 8, 2, "uniform", "bfloat16", ("bench",)),
)


_TILES = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)(?:x(\d+))?(f?)")


def parse_impl(spec: str) -> tuple[str, pallas_gpu_decode.DecodeConfig | None]:
    """``name`` or ``name@BNxBKxWxS[xK][f]``: the implementation and the decode-kernel tiles it should run with.

    K is split_k (0 or left out: from the shape); a trailing ``f`` selects ``base_dot="fma"`` (else "mma").
    """
    name, at, tiles = spec.partition("@")
    if not at:
        return name, None
    match = _TILES.fullmatch(tiles)
    if match is None:
        raise ValueError(f"{spec!r}: expected name@BNxBKxWxS[xK][f], e.g. pallas_gpu@64x128x4x3x0f")
    block_n, block_k, num_warps, num_stages = (int(v) for v in match.group(1, 2, 3, 4))
    return name, pallas_gpu_decode.DecodeConfig(
        block_n,
        block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        split_k=int(match.group(5) or 0),
        base_dot="fma" if match.group(6) else "mma",
    )


def split_knobs(spec: str) -> tuple[str, dict[str, int]]:
    """``impl[@tiles]+KNOB=N+...`` -> (``impl[@tiles]``, {knob: N}): trace-time knobs (``meteora_jax.knobs``)
    set while that impl's rows are traced and timed, e.g. ``pallas_gpu_decode+fused_expand=64``."""
    name, *opts = spec.split("+")
    return name, run_knobs.parse(opts, where=f"impl {spec!r}")


def compiler_options(impl_knobs: dict[str, int]) -> dict[str, object]:
    """XLA options for an impl's program. ``+prefill_cublas=1`` compiles it as the model compiles its prefill
    (``sampler.prefill_compiler_options``: every GEMM on cuBLAS, so that XLA can fold the expand's output into the
    base GEMM as cuBLAS's ``C`` input); the base GEMM keeps XLA's default. Nothing off a GPU."""
    if not impl_knobs.get("prefill_cublas") or jax.default_backend() != "gpu":
        return {}
    from meteora_jax.generate import sampler

    with run_knobs.knobs_set(impl_knobs):  # + prefill_dot_merger=N too, as in the model
        return sampler.prefill_compiler_options()


@contextlib.contextmanager
def decode_config(config: pallas_gpu_decode.DecodeConfig | None):  # noqa: ANN201
    """Sets the decode kernel's tile override while a row is traced and timed (None: leave it alone)."""
    saved = pallas_gpu_decode.DECODE_CONFIG_OVERRIDE  # also the tiles of ``jax_triton`` (``launch_params``)
    if config is not None:
        pallas_gpu_decode.DECODE_CONFIG_OVERRIDE = config
    try:
        yield
    finally:
        pallas_gpu_decode.DECODE_CONFIG_OVERRIDE = saved


def _num(x: float, digits: int = 2) -> float | None:
    """Rounded, or None where a timer gave no number (JSON has no NaN)."""
    return round(x, digits) if np.isfinite(x) else None


def _time_all(fn, args, timers, calls: int, reps: int, l2: str) -> dict[str, timing.Timing]:
    """Each requested timer's figure for ``fn(*args)``."""
    out = {}
    if "profile" in timers:
        arg_sets = timing.cold_copies(args) if l2 == "cold" else [tuple(args)]
        out["profile"] = timing.time_profile(fn, arg_sets, calls)
    if "fori" in timers or not np.isfinite(out["profile"].us):  # fallback when the trace had no kernels
        out["fori"] = timing.time_fori(fn, args, reps)
    return out


def _pick(impl_t: dict[str, timing.Timing], base_t: dict[str, timing.Timing]) -> str:
    """The timer for ``us``: first valid for both row and base, else first with a number for both."""
    for ok in (lambda t: t.valid, lambda t: np.isfinite(t.us)):
        for name in TIMERS:
            if name in impl_t and ok(impl_t[name]) and ok(base_t[name]):
                return name
    return next(name for name in TIMERS if name in impl_t)


ROW_CASE_KEYS = ("d_in", "d_out", "T", "E", "r", "k", "routing")  # the issue's row keys that name the problem


def _case_fields(case: shapes.Case) -> dict:
    """The issue's row keys that name the problem."""
    values = (case.d_in, case.d_out, case.num_tokens, case.num_experts, case.rank, case.top_k, case.routing)
    return dict(zip(ROW_CASE_KEYS, values, strict=True))


def _bound(case: shapes.Case, expert_ids: jax.Array) -> float:
    touched = len(np.unique(np.asarray(expert_ids)))
    itemsize = 2
    w = case.d_in * case.d_out * itemsize
    xy = case.num_tokens * (case.d_in + case.d_out) * itemsize
    experts = touched * case.rank * (case.d_in + case.d_out) * itemsize
    return (w + experts + xy) / (w + xy)


def _torch_copies(case: shapes.Case, l2: str) -> int:
    """How many input sets the peers cycle through: enough that each call's W is L2-cold (``cold_copies``'s
    rule, at most 16 sets: torch shares the GPU's memory with JAX)."""
    if l2 != "cold":
        return 1
    set_bytes = 2 * (case.d_in * case.d_out + case.num_experts * case.rank * (case.d_in + case.d_out))
    return timing.cold_copy_count(set_bytes, max_sets=16)


def _run_peer(mp, peer: str, inp: dict, sets: list, device: str, calls: int, peers_dir, label: str):  # noqa: ANN001, ANN202
    """(output, timing, dtype) of one peer, or None (printed why). MeteoRA's Triton path was written for fp16:
    if it rejects bf16 it runs on fp16 copies of the inputs, and the row says so."""
    import torch

    for dtype in ("bfloat16", "float16") if peer == "meteora_triton_v4" else ("bfloat16",):
        try:
            run_sets = sets if dtype == "bfloat16" else [mp.to_torch(inp, device, dtype) for _ in sets]
            fns = [mp.peer_call(peer, p, peers_dir) for p in run_sets]
            with torch.no_grad():
                y = fns[0]().float().cpu().numpy()
            return y, mp.time_peer(fns, calls), dtype
        except Exception as e:  # noqa: BLE001 (a peer that fails is reported, not fatal)
            print(f"{label} {peer} ({dtype}): not run: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if isinstance(e, mp.PeerUnavailable):
                return None
    return None


def peer_rows(
    case: shapes.Case,
    inp: dict,
    peers: list[str],
    ref: np.ndarray | None,
    bound: float,
    *,
    calls: int = 50,
    l2: str = "cold",
    peers_dir: str | None = None,
) -> list[dict]:
    """One row per MeteoRA peer (``meteora_peers.py``) that can run here, timed beside torch's own base
    ``F.linear`` in the same way; a peer that cannot run prints why and is left out."""
    import meteora_peers as mp
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sets = [mp.to_torch(inp, device) for _ in range(_torch_copies(case, l2))]
    base_t = mp.time_peer([mp.base_call(p) for p in sets], calls)
    rows = []
    for peer in peers:
        ran = _run_peer(mp, peer, inp, sets, device, calls, peers_dir, case.name)
        if ran is None:
            continue
        y, peer_t, dtype = ran
        chosen = next(t for t in ("kernels", "events", "wall") if t in peer_t.us and peer_t.valid[t])
        us, t_base = peer_t.us[chosen], base_t.us[chosen]
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) if ref is not None else float("nan")
        row = {
            **_case_fields(case),
            "impl": peer,
            "us": _num(us),
            "base_us": _num(t_base),
            "base": "torch F.linear (bf16)",
            "dtype": dtype,
            "x_vs_base": _num(us / t_base, 3),
            "bound": round(bound, 4),
            "peak_mb": None if peer_t.peak_mb is None else round(peer_t.peak_mb, 2),
            "rel_err_vs_first_impl": _num(err, 5),
            "timer": chosen,
            "timer_valid": peer_t.valid[chosen] and base_t.valid[chosen],
            "l2": l2,
        }
        for name, t_us in peer_t.us.items():
            row[f"us_{name}"] = _num(t_us)
            row[f"base_us_{name}"] = _num(base_t.us[name])
            row[f"valid_{name}"] = peer_t.valid[name] and base_t.valid[name]
            row[f"note_{name}"] = f"row: {peer_t.notes[name]}; base: {base_t.notes[name]}"
        if peer_t.kernels_per_call is not None:
            row["kernels_per_call_kernels"] = peer_t.kernels_per_call
        rows.append(row)
        print(
            f"{case.d_in:>5}->{case.d_out:<5} T={case.num_tokens:<5} E={case.num_experts:<4} r={case.rank:<2} "
            f"k={case.top_k} {case.routing:<7} {peer:<10} {us:9.1f}us base {t_base:8.1f}us "
            f"x{us / t_base:6.3f} [{chosen}] bound {bound:.3f} peak {row['peak_mb']}MB err {err:.1e}",
            flush=True,
        )
    return rows


def bench(
    cases,
    impls,
    out_path: str | None,
    *,
    timers=TIMERS,
    calls=50,
    reps=50,
    l2="cold",
    fori_min_t=0,
    peers: list[str] | None = None,
    peers_dir: str | None = None,
    breakdown: bool = False,
    merge: bool = False,
) -> list[dict]:
    """Times every case x impl (then the peers) and rewrites ``out_path`` after each case. ``merge``: the rows
    ``out_path`` already holds stay, except those of a (case, impl) this run times again."""
    kept, kept_commands = merged_run(out_path) if merge and out_path else ([], [])
    rows = []
    all_timers = timers
    deferred_peers = []  # (case, ref, bound): peers run after every JAX row, see below
    for case in cases:
        timers = [t for t in all_timers if t != "fori" or case.num_tokens >= fori_min_t] or list(all_timers)
        inp = shapes.make_inputs(case, jax.random.key(0))
        # The plain ``x @ W`` in x's dtype (float32 accumulation inside the GEMM). Until session 18 the base asked
        # for a float32 output and cast it, which XLA ran as 2-3 kernels at some shapes: up to 1.25x slower on an
        # H100 (benchmarks/RESULTS.md, "Session 18"), so every ratio above it was flattered there.
        base = jax.jit(lambda x, w: jnp.dot(x, w))
        n_reps = max(5, min(reps, int(4e5 / max(1, case.num_tokens))))
        base_t = _time_all(base, (inp["x"], inp["w"]), timers, calls, n_reps, l2)
        bound = _bound(case, inp["expert_ids"])
        args = (inp["x"], inp["w"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["expert_weights"])
        ref = None
        for impl in impls:
            impl_spec, impl_knobs = split_knobs(impl)
            impl_name, tiles = parse_impl(impl_spec)
            fn = jax.jit(
                lambda x, w, a, b, ids, ew, impl_name=impl_name, s=inp["scaling"]: api.grouped_lora_fused(
                    x, w, a, b, ids, ew, scaling=s, implementation=impl_name
                ),
                compiler_options=compiler_options(impl_knobs) or None,
            )
            try:
                # traced (and retraced by the timers) under these tiles and knobs
                with run_knobs.knobs_set(impl_knobs), decode_config(tiles):
                    compiled = fn.lower(*args).compile()
                    mem = compiled.memory_analysis()
                    peak_mb = (mem.temp_size_in_bytes / 2**20) if mem is not None else float("nan")
                    y = np.asarray(fn(*args), np.float32)
                    if ref is None:
                        ref = y
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    impl_t = _time_all(fn, args, timers, calls, n_reps, l2)
            except Exception as e:  # keep going: a failing row is reported, not fatal
                print(f"{case.name} {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            chosen = _pick(impl_t, base_t)
            us, t_base = impl_t[chosen].us, base_t[chosen].us
            row = {
                **_case_fields(case),
                "impl": impl,
                "us": _num(us),
                "base_us": _num(t_base),
                "x_vs_base": _num(us / t_base, 3),
                "bound": round(bound, 4),
                "peak_mb": round(peak_mb, 2),
                "rel_err_vs_first_impl": round(err, 5),
                "timer": chosen,
                "timer_valid": impl_t[chosen].valid and base_t[chosen].valid,
                "l2": l2,
            }
            if impl_name.startswith("pallas_gpu") and case.num_tokens <= pallas_gpu_decode.DECODE_MAX_TOKENS:
                shape = case.num_tokens, case.d_in, case.d_out
                cfg = tiles or pallas_gpu_decode.DecodeConfig.for_shape(*shape)
                row["decode_config"] = dataclasses.asdict(cfg)
                # split_k as run (0 in the config means "from the shape")
                row["decode_split_k"] = pallas_gpu_decode._tiles(cfg, *shape, case.rank).split_k
            if chosen != timers[0]:
                row["timer_note"] = f"{timers[0]} not usable here ({impl_t[timers[0]].note}); used {chosen}"
            for name, t in impl_t.items():  # every timer side by side, with the reason for its verdict
                row[f"us_{name}"] = _num(t.us)
                row[f"base_us_{name}"] = _num(base_t[name].us)
                row[f"valid_{name}"] = t.valid and base_t[name].valid
                row[f"note_{name}"] = f"row: {t.note}; base: {base_t[name].note}"
                if t.kernels_per_call is not None:
                    row[f"kernels_per_call_{name}"] = t.kernels_per_call
                if t.breakdown:  # profile: each kernel of one call, median us, in launch order
                    row[f"kernels_{name}"] = [[k, round(v, 2)] for k, v in t.breakdown]
                    row[f"base_kernels_{name}"] = [[k, round(v, 2)] for k, v in base_t[name].breakdown]
            rows.append(row)
            side = " ".join(
                f"{n} {t.us:.1f}/{base_t[n].us:.1f}{'' if row[f'valid_{n}'] else '?'}"
                for n, t in impl_t.items()
            )
            print(
                f"{case.d_in:>5}->{case.d_out:<5} T={case.num_tokens:<5} E={case.num_experts:<4} r={case.rank:<2} "
                f"k={case.top_k} {case.routing:<7} {impl:<10} {us:9.1f}us base {t_base:8.1f}us "
                f"x{us / t_base:6.3f} [{chosen}{'' if row['timer_valid'] else ' INVALID'}] bound {bound:.3f} "
                f"peak {peak_mb:8.1f}MB err {err:.1e} | {side}",
                flush=True,
            )
            if breakdown and "profile" in impl_t:
                for kname, kus in impl_t["profile"].breakdown:
                    print(f"    {kus:9.2f}us  {kname[:110]}", flush=True)
        if peers:
            deferred_peers.append((case, ref, bound))
        if out_path:
            _write(rows, out_path, kept, kept_commands)
    # After torch's profiler has run in a process, JAX's cannot subscribe to CUPTI any more (H100, session 17:
    # every later JAX row lost its profile timer), so the peers come last, on the same inputs (same key).
    for case, ref, bound in deferred_peers:
        inp = shapes.make_inputs(case, jax.random.key(0))
        rows += peer_rows(case, inp, peers, ref, bound, calls=calls, l2=l2, peers_dir=peers_dir)
        if out_path:
            _write(rows, out_path, kept, kept_commands)
    return rows


def _replace_rows(kept: Sequence[dict], fresh: Sequence[dict]) -> list[dict]:
    """``kept`` without the (case, impl) rows that ``fresh`` times again, then ``fresh``: the one rule by which
    ``--merge`` and ``--combine`` join runs."""
    keys = {_row_key(r) for r in fresh}
    return [r for r in kept if _row_key(r) not in keys] + list(fresh)


def _row_key(row: dict) -> tuple:
    return (*(row[k] for k in ROW_CASE_KEYS), row["impl"])


def merged_run(out_path: str) -> tuple[list[dict], list[str]]:
    """The rows and commands of the earlier runs in ``out_path`` (none if there is no file), refused if they were
    measured on another kind of device: one table must not mix an H100's ratios with an H200's."""
    if not os.path.exists(out_path):
        return [], []
    doc = read_doc(out_path, "--merge", "pass another --out")
    rows, device = doc["rows"], doc["device"]
    here = str(jax.devices()[0].device_kind)
    if device != here:
        raise SystemExit(
            f"--merge: {out_path} was measured on {device!r}, this run is on {here!r}; pass another --out or "
            "leave out --merge to start a new file"
        )
    return rows, _commands(doc)


def _commands(doc: dict) -> list[str]:
    """Every command whose rows ``doc`` holds (files older than ``commands`` name only their own)."""
    return doc.get("commands") or [doc["command"]] * ("command" in doc)


def read_doc(path: str, flag: str, fix: str) -> dict:
    """A JSON this script wrote (its ``device`` and ``rows`` present), or exit naming ``flag``, the file and
    ``fix``."""
    try:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or "device" not in doc:
            raise ValueError("no 'device' and 'rows'")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}: {path} is not a bench_moe_lora JSON ({e}); {fix}") from e
    return doc


def default_out(device_kind: str) -> str:
    """The JSON a full run writes when no ``--out`` is given, named for its card: a table measured on an H100 must
    not land in ``moe_lora_h200.json``."""
    return f"benchmarks/results/moe_lora_{timing.card_slug(device_kind)}.json"


def combine(paths: Sequence[str], out_path: str) -> dict:
    """Join JSONs this script wrote on one device kind into ``out_path``: a later file's (case, impl) rows replace
    an earlier file's, as ``--merge`` does; files of different devices are refused before anything is written."""
    docs = [read_doc(p, "--combine", "pass files that --out wrote") for p in paths]
    devices = {d["device"] for d in docs}
    if len(devices) != 1:
        raise SystemExit(
            f"--combine: {', '.join(paths)} were measured on {sorted(devices)}; one table must hold one device kind"
        )
    rows: list[dict] = []
    for d in docs:
        rows = _replace_rows(rows, d["rows"])
    commands = [c for d in docs for c in _commands(d)]
    doc = {
        **docs[-1],
        "date": max(d.get("date", "") for d in docs),
        "commands": commands,
        "rows": rows,
    }
    write_text_atomic(out_path, json.dumps(doc, indent=1))
    return doc


def _write(
    rows: list[dict], out_path: str, kept: Sequence[dict] = (), kept_commands: Sequence[str] = ()
) -> None:
    command = " ".join(["python3", *sys.argv])
    doc = {
        "device": str(jax.devices()[0].device_kind),
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "command": command,
        "commands": [*kept_commands, command],  # every run whose rows the file holds
        "timing": (
            "us/x_vs_base from `timer`: profile = median per-call GPU kernel time from a profiler trace, valid if "
            "(p75-p25)/median <= 0.10; fori = in-jit fori_loop minus an empty loop, valid if the empty loop is < 10% "
            "of an iteration. timer_valid needs the row and its base valid under that timer."
        ),
        "rows": _replace_rows(kept, rows),
    }
    write_text_atomic(out_path, json.dumps(doc, indent=1))


def issue_target(row: dict) -> tuple[str, bool] | None:
    """Issue 3's target for a row of ours and whether the row meets it; None where the issue sets none (it sets
    them for E = 28, r = 8, top-2 only)."""
    if (row["E"], row["r"], row["k"]) != (28, 8, 2) or row["x_vs_base"] is None:
        return None
    x = row["x_vs_base"]
    if row["T"] in (1, 64):
        return f"<= 1.03 x bound = {1.03 * row['bound']:.3f}", x <= 1.03 * row["bound"]
    if row["T"] == 4096:
        return "<= 1.03, <= 64 MiB", x <= 1.03 and row["peak_mb"] is not None and row["peak_mb"] <= 64
    if row["T"] == 16384:
        return "<= 1.03", x <= 1.03
    return None


def _best(rows: list[dict]) -> dict | None:
    """The fastest row by ``x_vs_base``, rows timed validly first."""
    # x_vs_base < 0: a base below the fori timer's floor (session 1's JSON has some)
    timed = [r for r in rows if r["x_vs_base"] is not None and r["x_vs_base"] > 0]
    return min(timed, key=lambda r: (not r["timer_valid"], r["x_vs_base"]), default=None)


def table(doc: dict) -> str:
    """Issue 3's table from a bench JSON: per case the best of ours (its ratio to the base, the bound, and the
    issue's target where it sets one) and the best of MeteoRA's peers timed beside it."""
    cases: dict[tuple, list[dict]] = {}
    for row in doc["rows"]:
        cases.setdefault(tuple(row[k] for k in ROW_CASE_KEYS), []).append(row)
    lines = [
        f"{doc['device']}, {doc['date']}, jax {doc.get('jax', '?')}; `us` = kernel time per call, `x_vs_base` "
        "against XLA's bf16 `x @ W` timed in the same run (torch's `F.linear` for MeteoRA's); `?` = not validly "
        "timed.",
        "",
        "| d_in->d_out | T | E | r | k | routing | best of ours | us | base us | x_vs_base | bound | x / bound "
        "| peak MB | issue target | met | MeteoRA's best: x_vs_base (peak MB) |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    shape_order = {shape: i for i, shape in enumerate(shapes.LLAMA3_8B_PROJECTIONS)}
    # the issue's order: the E = 28 rows by T, each T in its shape order, then the many-expert rows
    for key, rows in sorted(
        cases.items(), key=lambda kv: (kv[0][3:6], kv[0][2], shape_order.get(kv[0][:2], 9))
    ):
        ours = _best([r for r in rows if r["impl"] not in PEER_IMPLS])
        peer = _best([r for r in rows if r["impl"] in PEER_IMPLS])
        if ours is None:
            continue
        target = issue_target(ours)
        valid = "" if ours["timer_valid"] else "?"
        peer_txt = (
            ""
            if peer is None
            else f"{peer['impl']} {peer['x_vs_base']:.2f} ({'?' if peer['peak_mb'] is None else peer['peak_mb']})"
        )
        lines.append(
            f"| {key[0]}->{key[1]} | {key[2]} | {key[3]} | {key[4]} | {key[5]} | {key[6]} | {ours['impl']} "
            f"| {ours['us']}{valid} | {ours['base_us']} | {ours['x_vs_base']:.3f}{valid} | {ours['bound']:.3f} "
            f"| {ours['x_vs_base'] / ours['bound']:.3f} | {ours['peak_mb']} | {target[0] if target else ''} "
            f"| {('yes' if target[1] else '**no**') if target else ''} | {peer_txt} |"
        )
    return "\n".join(lines)


def jax_triton_check() -> str:
    """Whether the jax-triton wheel imports and runs one Triton kernel through ``triton_call``."""
    try:
        import jax_triton as jt
        import triton
        import triton.language as tl

        @triton.jit
        def add_kernel(x_ptr, y_ptr, o_ptr, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(o_ptr + i, tl.load(x_ptr + i) + tl.load(y_ptr + i))

        x = jnp.arange(1024, dtype=jnp.float32)
        out = jt.triton_call(
            x, x, kernel=add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(8,), BLOCK=128
        )
        ok = bool(jnp.allclose(out, 2 * x))
        return f"jax_triton {jt.__version__} with triton {triton.__version__}: triton_call ran, correct={ok}"
    except Exception as e:  # report, do not fail the benchmark
        return f"jax_triton failed: {type(e).__name__}: {str(e)[:300]}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path, rewritten after every case (default: benchmarks/results/moe_lora_<gpu>.json, <gpu> from the "
        "device kind: h200 on an H200; none with --tiny)",
    )
    parser.add_argument(
        "--impls",
        default=DEFAULT_IMPLS,
        help="comma-separated backends of pallas_kernels.grouped_lora.api.IMPLEMENTATIONS (default "
        f"{DEFAULT_IMPLS}); the first is the others' error reference; pallas_gpu@BNxBKxWxS[xK][f] sets the "
        "decode tiles (f: base_dot=fma), +KNOB=N a knob (see above)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows --out already holds (same device kind only), except those of a case and impl this "
        "run times again: a table too long for one call, built in pieces with --filter",
    )
    parser.add_argument(
        "--table",
        metavar="JSON",
        default=None,
        help="print issue 3's Markdown table (best of ours per row, bound, target, MeteoRA's best) from a JSON "
        "this script wrote, and exit; needs no GPU",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        default=None,
        help="join JSONs this script wrote on one device kind (later files' rows replace earlier ones of the same "
        "case and impl) into --out, and exit; needs no GPU",
    )
    parser.add_argument("--filter", default="", help="regex searched in the case name")
    parser.add_argument(
        "--timer",
        default="profile",
        choices=("both", *TIMERS),
        help="how rows are timed (see above; default profile)",
    )
    parser.add_argument(
        "--calls", type=int, default=20, help="profile timer: dispatches traced per row (default 20)"
    )
    parser.add_argument(
        "--reps", type=int, default=50, help="fori timer: calls per loop, fewer at large T (default 50)"
    )
    parser.add_argument(
        "--l2",
        default="cold",
        choices=("cold", "warm"),
        help="cold: cycle through input copies larger than L2 between calls (default); warm: reuse one set",
    )
    parser.add_argument(
        "--fori-min-t", type=int, default=0, help="with --timer both: run fori only for T >= this (default 0)"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: two tiny shapes, xla only")
    parser.add_argument(
        "--jax-triton-check",
        action="store_true",
        help="first run one Triton kernel through jax-triton's triton_call and print whether it ran",
    )
    parser.add_argument(
        "--peers",
        default="",
        help="comma-separated MeteoRA torch peers timed in the same run: meteora_bmm_torch_v1, meteora_triton_v4 "
        "(needs a clone of github.com/NJUDeepEngine/meteora in peers/meteora; see scripts/meteora_peers.py)",
    )
    parser.add_argument("--peers-dir", default=None, help="the MeteoRA clone (default: peers/meteora)")
    parser.add_argument(
        "--decode-max-tokens",
        type=int,
        default=None,
        help=f"pallas_gpu: largest T for the decode kernel (default {pallas_gpu_decode.DECODE_MAX_TOKENS})",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="profile timer: also print each kernel of a row's call with its median us (the JSON always "
        "has them, as kernels_profile and base_kernels_profile)",
    )
    opts = parser.parse_args()
    if opts.table:
        print(table(read_doc(opts.table, "--table", "pass a file that --out wrote")))
        return
    if opts.combine:
        if not opts.out:
            parser.error("--combine needs --out")
        doc = combine(opts.combine, opts.out)
        print(f"{opts.out}: {len(doc['rows'])} rows from {len(opts.combine)} files")
        return
    if (
        opts.peers
    ):  # torch shares the GPU: JAX must not take 75% of its memory up front (before its first use)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if opts.decode_max_tokens is not None:
        pallas_gpu_decode.DECODE_MAX_TOKENS = opts.decode_max_tokens
    if opts.jax_triton_check:
        print(jax_triton_check(), flush=True)
    timers = TIMERS if opts.timer == "both" else (opts.timer,)
    if opts.tiny:
        cases, impls = TINY_CASES, ["xla"]
    else:
        cases, impls = shapes.bench_cases(), opts.impls.split(",")
    cases = [c for c in cases if re.search(opts.filter, c.name)]
    out = opts.out if opts.out or opts.tiny else default_out(str(jax.devices()[0].device_kind))
    bench(
        cases,
        impls,
        out,
        timers=timers,
        calls=opts.calls,
        reps=opts.reps,
        l2=opts.l2,
        fori_min_t=opts.fori_min_t,
        peers=[p for p in opts.peers.split(",") if p],
        peers_dir=opts.peers_dir,
        breakdown=opts.breakdown,
        merge=opts.merge,
    )


if __name__ == "__main__":
    main()
