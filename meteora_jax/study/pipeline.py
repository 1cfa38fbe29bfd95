"""The MeteoRA study at small scale: SmolLM2-135M + 22 BIG-bench tasks, as resumable steps (issue 6).

Steps, in order; each records its outputs, wall seconds and a done-marker in ``<work>/state.json`` (written
atomically), and each is sized to fit one <= 9 minute GPU run:

    data                 22 task folders (capped), from a packed tar.gz (``pack-data``) or BIG-bench's files
    base                 SmolLM2-135M-Instruct GGUF (from the wheel, joined from two chunks) -> HF safetensors dir
    adapters:A-B         one PEFT LoRA per task A..B (sorted task index), K adapters trained in ONE model
    adapters:baselines   LoRA-B (1,000 balanced samples per task) and LoRA-F (all data), together
    convert              meteora_init (22 experts, top-2) and pool (22 + LoRA-B + LoRA-F, for single-expert evals)
    gates:top2           gate training, the MeteoRA recipe (``meteora_jax.train.train_gates``); one step per
                         ``gates.top_k`` entry (default [2]: one training per seed)
    eval:single          base, oracle (own adapter forced), LoRA-B, LoRA-F on every task's test split
    eval:meteora         MeteoRA top-1 and top-2 (``eval.meteora_top_ks``: the top-2 gates run with k=1 and
                         k=2) on every task's test split (no task label)
    eval:composite       composite-3/5/10 (MeteoRA top-2 vs LoRA-B vs LoRA-F), ``composite.protocol`` turns | numbered
    report               bigbench_small.json (the issue's schema), a RESULTS.md section, plots, "must show" table

The steps live by concern: ``packs`` (data, base), ``training`` (adapters, convert, gates), ``evaluate``
(eval:single, eval:meteora), ``composite`` (eval:composite), ``report``; this module runs them.

Design choices, and why:

* Overlong examples are dropped, never cut: a truncated prompt loses the question or the answer. Counts are
  recorded (``eval.max_prompt_tokens``, ``adapters.max_seq_len``); paragraph_segmentation (prompts up to
  31k tokens) is the task this affects most.
* Every long loop honours a deadline (``--max-minutes``): adapter and gate training checkpoint, evaluation
  keeps each finished (system, task) score, and the next ``--resume`` continues. Process wall time is summed into
  ``device_seconds`` (the machine's start and the transfers are not visible from inside and not counted).

Getting the inputs onto a GPU machine that cannot download anything is described in the module docstring of
``scripts/reproduce_bigbench.py`` (``pack-data``, ``pack-base``, ``stash``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meteora_jax.errors import MeteoraInputError
from meteora_jax.study.composite import step_eval_composite
from meteora_jax.study.config import StudyConfig
from meteora_jax.study.evaluate import step_eval_meteora, step_eval_single
from meteora_jax.study.packs import step_base, step_data
from meteora_jax.study.report import step_report
from meteora_jax.study.state import Ctx, StudyState, default_tasks, step_names, write_json
from meteora_jax.study.training import step_adapters, step_convert, step_gates

# A step starts only with this many minutes left, so that a call does not die at its hard limit half-way
# through (base and convert are one piece) nor start work it cannot keep. Gate training stops at the deadline
# with a checkpoint, so it needs only load + compile (~70 s measured in float32 on the H200) + one checkpoint
# interval (200 steps, ~25 s ESTIMATED in bf16) + the finish reserve (training.GATES_FINISH_RESERVE_S).
MIN_MINUTES_TO_START = {"base": 2.0, "convert": 2.0, "gates": 2.5, "eval": 2.0, "report": 1.0}


# Programs that compile faster than this are not worth a cache entry; every program the study repeats is far
# slower (eval generation ~40-70 s each, gate training ~70 s, teacher-forced routing per length bucket).
CACHE_MIN_COMPILE_S = 0.5


def enable_compile_cache(work: Path, min_compile_s: float = CACHE_MIN_COMPILE_S) -> Path:
    """JAX's persistent compilation cache in ``<work>/xla_cache`` (plus XLA's GPU autotuning results), set
    before the first compile: a step resumed in a later call, or run again, loads its programs instead of
    recompiling them (eval: ~110 s of compiles per model). It helps only within one machine's life: the
    cache lives in the work dir, which goes with the machine (a fresh machine compiles everything again).
    """
    import jax

    path = work / "xla_cache"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def run_step(ctx: Ctx, name: str, *, sdist: str | None = None) -> dict | None:
    """Runs one step; returns its outputs, or None when it stopped early at the deadline."""
    if name == "data":
        return step_data(ctx, sdist)
    if name == "base":
        return step_base(ctx)
    if name.startswith("adapters:"):
        return step_adapters(ctx, name.split(":", 1)[1])
    if name == "convert":
        return step_convert(ctx)
    if name.startswith("gates:top"):
        return step_gates(ctx, int(name.removeprefix("gates:top")))
    if name == "eval:single":
        return step_eval_single(ctx)
    if name == "eval:meteora":
        return step_eval_meteora(ctx)
    if name == "eval:composite":
        return step_eval_composite(ctx)
    if name == "report":
        return step_report(ctx)
    raise MeteoraInputError(f"unknown step {name!r}")


def run_study(
    cfg: StudyConfig,
    *,
    steps: Sequence[str] = (),
    until: str | None = None,
    resume: bool = False,
    redo: bool = False,
    max_minutes: float | None = None,
    out_dir: str | os.PathLike | None = None,
    sdist: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    started: float | None = None,
    compile_cache: bool = False,
) -> StudyState:
    """Runs the planned steps in order (see the module docstring), skipping finished ones.

    ``steps``: exactly these; ``until``: every step up to and including it; neither: all. A work dir that
    already holds finished steps needs ``resume`` (or explicit ``steps``), so that a typo in ``--work-dir``
    never silently restarts nor silently continues a study. ``max_minutes`` bounds this process: no step
    starts in its last minute, and long steps checkpoint and stop at it. ``compile_cache``: JAX's persistent
    compilation cache in ``<work>/xla_cache`` (``enable_compile_cache``; the script turns it on).
    """
    started = time.time() if started is None else started
    work = cfg.work_path()
    work.mkdir(parents=True, exist_ok=True)
    if compile_cache:
        enable_compile_cache(work)
    state = StudyState(work)
    out = Path(out_dir or os.environ.get("OUT") or "benchmarks/results")
    deadline = None if max_minutes is None else started + 60.0 * max_minutes
    ctx = Ctx(cfg, work, state, deadline, out, progress, log, started)
    plan = step_names(cfg, ctx.tasks)
    cfg.meteora_top_ks(), cfg.oracle_layers()  # a bad knob fails now, not after the device minutes before it
    for s in [*steps, *([until] if until else [])]:
        if s not in plan:
            raise MeteoraInputError(f"unknown step {s!r}; the steps are: {', '.join(plan)}")
    if steps:
        plan = [s for s in plan if s in steps]
    elif until:
        plan = plan[: plan.index(until) + 1]
    if not steps and not resume and any(state.done(s) for s in plan):
        raise MeteoraInputError(
            f"{work} holds finished steps of an earlier run: pass --resume to continue it "
            "(finished steps are skipped), or choose another --work-dir."
        )
    state.data["config"] = dataclasses.asdict(cfg)
    run_log: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": []}
    try:
        for name in plan:
            if state.done(name) and not redo:
                log(f"[{name}] done earlier; skipped")
                continue
            need = MIN_MINUTES_TO_START.get(name.split(":")[0], 1.0)
            if ctx.time_left() < 60 * need:
                log(f"[{name}] not started: under {need} min of --max-minutes left; run again with --resume")
                break
            log(f"[{name}] start")
            t0 = time.time()
            st = state.step(name)
            st["runs"] += 1
            try:
                outputs = run_step(ctx, name, sdist=sdist)
            finally:
                st["seconds"] += time.time() - t0
                state.save()
            run_log["steps"].append(name)
            if outputs is None:
                log(
                    f"[{name}] stopped at the deadline after {time.time() - t0:.0f} s; run again with --resume"
                )
                break
            st.update(done=True, outputs=outputs)
            state.save()
            log(f"[{name}] done in {time.time() - t0:.0f} s")
    finally:
        seconds = time.time() - started
        state.data["device_seconds"] = state.data.get("device_seconds", 0.0) + seconds
        state.data["runs"].append({**run_log, "seconds": round(seconds, 1)})
        state.save()
        if os.environ.get("OUT"):
            write_json(Path(os.environ["OUT"]) / "study_state.json", out_state(work, state))
    return state


# $OUT/study_state.json stays under this (the device returns at most 8 files of 16 MiB; this one must not grow).
OUT_STATE_MAX_BYTES = 1_000_000


def out_state(work: Path, state: StudyState) -> dict:
    """``state.json`` + ``partial_results``: every finished eval score so far and each finished gate training's
    held-out summary, so that a call cut short (or a session that ends early) still brings its results back
    in the one file every call returns. Never raises: it runs in ``run_study``'s ``finally``."""
    try:
        partial = partial_results(work, state)
        if len(json.dumps(partial)) > OUT_STATE_MAX_BYTES:  # keep the headline numbers only
            partial = {"truncated": True, **_headline(partial)}
    except Exception as e:  # noqa: BLE001 (the state itself must still come back)
        partial = {"error": f"{type(e).__name__}: {e}"}
    return {**state.data, "partial_results": partial}


def partial_results(work: Path, state: StudyState) -> dict:
    """``eval``: ``<work>/eval/<name>.json``'s ``scores`` (without the per-example ``examples``) and
    ``routing``; ``gates``: ``gates:topK`` -> its held-out report without the per-gate lists, plus ``curve``:
    its training log (``metrics.jsonl``, one line per ``log_every`` steps), so that a run shows whether the
    gates were still learning when training stopped."""
    from meteora_jax.train.loop import METRICS_FILE, REPORT_FILE

    out: dict[str, Any] = {"eval": {}, "gates": {}}
    for path in sorted((work / "eval").glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entry = {"scores": _without_examples(res.get("scores", {}))}
        if "routing" in res:
            entry["routing"] = res["routing"]
        out["eval"][path.stem] = entry
    for name, st in sorted(state.data["steps"].items()):
        if name.startswith("gates:top") and st.get("done"):
            report = Path(st["outputs"]["model"]) / REPORT_FILE
            held = json.loads(report.read_text()).get("held_out", {}) if report.is_file() else {}
            out["gates"][name] = {k: v for k, v in held.items() if not k.endswith("_per_gate")}
            out["gates"][name]["curve"] = _training_curve(Path(st["outputs"]["model"]) / METRICS_FILE)
    return out


_CURVE_KEYS = ("step", "loss", "lm_loss", "gate_ce", "routing_acc", "tokens_per_s", "held_out_routing_acc")


def _training_curve(path: Path) -> list[dict]:
    """The logged training lines, their headline keys rounded to 4 significant digits ([] if no log)."""
    curve = []
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        curve.append({k: float(f"{rec[k]:.4g}") if k != "step" else rec[k] for k in _CURVE_KEYS if k in rec})
    return curve


def _without_examples(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_examples(v) for k, v in node.items() if k != "examples"}
    return node


def _headline(partial: dict) -> dict:
    """Scores only ((system, task) -> score) and overall accuracies: the fallback when the full form is too big."""

    def scores(node: Any) -> Any:
        if isinstance(node, dict) and "score" in node:
            return node["score"]
        if isinstance(node, dict) and "correct" in node:
            return {k: node[k] for k in ("correct", "attempted") if k in node}
        return {k: scores(v) for k, v in node.items()} if isinstance(node, dict) else None

    return {
        "eval": {
            n: {"scores": scores(e["scores"]), "routing": (e.get("routing") or {}).get("overall")}
            for n, e in partial["eval"].items()
        },
        "gates": {
            n: {k: v for k, v in g.items() if not k.endswith("_per_layer") and k != "curve"}
            for n, g in partial["gates"].items()
        },
    }


def status_table(cfg: StudyConfig) -> str:
    """One line per step: done or not, seconds so far."""
    state = StudyState(cfg.work_path())
    lines = [f"work dir {cfg.work_path()}  (device seconds so far: {state.data['device_seconds']:.0f})"]
    for name in step_names(cfg, sorted(cfg.data.tasks) if cfg.data.tasks else default_tasks()):
        st = state.data["steps"].get(name, {})
        mark = "done" if st.get("done") else ("partial" if st.get("runs") else "-")
        lines.append(f"  {name:22s} {mark:8s} {st.get('seconds', 0.0):7.0f} s")
    return "\n".join(lines)
