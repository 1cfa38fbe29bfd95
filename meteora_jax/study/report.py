"""The ``report`` step: ``bigbench_small.json`` (the issue's schema), a details JSON, a RESULTS.md section,
plots, and the issue's "must show" table (claim, measured, threshold, pass, shortfall).

Missing figures are None in the JSON and "-" in the tables, never silently 0.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from meteora_jax.io import write_text_atomic
from meteora_jax.study.config import BASELINES
from meteora_jax.study.evaluate import headline_metric, load_eval, meteora_gates
from meteora_jax.study.state import Ctx, write_json

RESULT_NAME = "bigbench_small"
SYSTEMS = ("base", "oracle", "lora_b", "lora_f", "meteora_top1", "meteora_top2")


def build_report(ctx: Ctx) -> dict:
    """The issue's JSON: ``{"tasks", "composite", "routing_accuracy", "device_minutes", "seed"}``, scores in
    points (0-100); routing accuracy in percent too. Missing figures are None (never silently 0)."""
    single = load_eval(ctx.work / "eval" / "single.json")["scores"]
    meteora = load_eval(ctx.work / "eval" / "meteora.json")["scores"]
    composite = load_eval(composite_path(ctx))["scores"]
    scores = {**single, **meteora}
    tasks = {}
    for t in ctx.tasks:
        row: dict[str, Any] = {"metric": headline_metric(t)}
        for s in SYSTEMS:
            row[s] = scores.get(s, {}).get(t, {}).get("score")
        tasks[t] = row
    comp = {}
    for n in ctx.cfg.composite.sizes:
        c = composite.get(str(n), {})
        get = lambda name, key, c=c: c.get(name, {}).get(key)  # noqa: E731
        comp[str(n)] = {
            "meteora_correct": get("meteora", "correct"),
            "meteora_attempted": get("meteora", "attempted"),
            "lora_b_correct": get("lora_b", "correct"),
            "lora_b_attempted": get("lora_b", "attempted"),
            "lora_f_correct": get("lora_f", "correct"),
        }
    # Teacher-forced on the test references (the harness's definition) when measured; else the gate
    # training's held-out figure (same test prompts, every token and gate).
    gates = meteora_gates(ctx.cfg, ctx.cfg.main_top_k())["gates"]
    routing = load_eval(ctx.work / "eval" / "meteora.json").get("routing", {})
    acc = routing.get("overall")
    if acc is None:
        acc = ctx.state.data["steps"].get(gates, {}).get("outputs", {}).get("routing_acc")
    return {
        "tasks": tasks,
        "composite": comp,
        "composite_protocol": ctx.cfg.composite.protocol,
        "routing_accuracy": None if acc is None else 100.0 * acc,
        # supplementary, not the must-show: per layer (mean over projections), and per prompt (the expert
        # most often top-1 over all its response tokens, layers and projections == the task's)
        "routing_accuracy_per_layer": [100.0 * x for x in routing.get("per_layer", [])],
        "routing_accuracy_per_projection": {
            p: 100.0 * x for p, x in routing.get("per_projection", {}).items()
        },
        "routing_accuracy_prompt_majority": None
        if routing.get("prompt_majority") is None
        else 100.0 * routing["prompt_majority"],
        # supplementary: the same gates on the PROMPT's tokens (shared template prefix / task text / last token)
        "routing_accuracy_prompt_tokens": routing.get("prompt_tokens"),
        "ablations": ablations(meteora, single.get("oracle", {}), ctx.tasks),
        # supplementary: top-2 minus oracle on the same test examples, with a bootstrap interval (noise scale)
        "top2_minus_oracle_paired": paired_differences(
            meteora.get("meteora_top2", {}), single.get("oracle", {}), ctx.tasks, seed=ctx.cfg.seed
        ),
        "device_minutes": round((ctx.state.data["device_seconds"] + time.time() - ctx.started) / 60.0, 2),
        "seed": ctx.cfg.seed,
    }


def paired_differences(
    system: dict, oracle: dict, tasks: list[str], *, seed: int = 0, resamples: int = 10_000
) -> dict[str, dict | None]:
    """Per task: the mean of (system - oracle) over the same test examples, in points, and a 95% percentile
    bootstrap interval of it (examples resampled in pairs). None where either side has no per-example scores.

    The must show compares two scores of ~50 examples each against a 1-point bar; this says how far apart two
    systems can land by chance on those examples, pairing out what they share (each example's difficulty)."""
    rng = np.random.default_rng([seed, 6])
    out: dict[str, dict | None] = {}
    for t in tasks:
        a = system.get(t, {}).get("per_example")
        b = oracle.get(t, {}).get("per_example")
        if not a or not b or len(a) != len(b):
            out[t] = None
            continue
        d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
        means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out[t] = {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "n": len(d)}
    return out


def _paired_line(report: dict) -> list[str]:
    paired = {t: p for t, p in (report.get("top2_minus_oracle_paired") or {}).items() if p}
    if not paired:
        return []
    n = len(paired)
    with_zero = sum(p["ci95"][0] <= 0.0 <= p["ci95"][1] for p in paired.values())
    above = sum(p["ci95"][0] >= -1.0 for p in paired.values())
    worse = sorted(t for t, p in paired.items() if p["ci95"][1] < 0.0)
    return [
        "",
        f"MeteoRA top-2 minus the oracle on the same test examples (supplementary; 95% bootstrap interval over "
        f"examples, {n} tasks with per-example scores): the interval includes 0 on {with_zero}/{n} tasks, lies "
        f"wholly above -1 point on {above}/{n}, and wholly below 0 (worse than the oracle beyond this noise) on "
        f"{len(worse)}/{n}" + (f": {', '.join(worse)}." if worse else "."),
    ]


def composite_path(ctx: Ctx) -> Path:
    from meteora_jax.study.composite import composite_file

    return ctx.work / "eval" / composite_file(ctx.cfg.composite.protocol)


def must_show(report: dict) -> list[dict]:
    """The issue's "Must show" checks: (claim, measured, threshold, pass, shortfall)."""
    rows = []
    tasks = report["tasks"]
    n = len(tasks)
    need = -(-20 * n // 22)  # 20 of 22, scaled to the number of tasks run
    scored = [t for t, r in tasks.items() if None not in (r["meteora_top2"], r["oracle"])]
    close = [t for t in scored if tasks[t]["meteora_top2"] >= tasks[t]["oracle"] - 1.0]
    rows.append(
        {
            "claim": "MeteoRA top-2 within 1 point of the oracle",
            "measured": "missing"
            if not scored
            else f"{len(close)}/{n} tasks" + ("" if len(scored) == n else f" ({len(scored)} scored)"),
            "threshold": f">= {need}/{n}",
            "pass": len(close) >= need,
            "shortfall": "not evaluated"
            if not scored
            else (None if len(close) >= need else f"{need - len(close)} task(s) short"),
        }
    )
    for k, c in report["composite"].items():
        mc, bc, ma, ba = (
            c["meteora_correct"],
            c["lora_b_correct"],
            c["meteora_attempted"],
            c["lora_b_attempted"],
        )
        if None in (mc, bc, ma, ba):
            rows.append(
                {
                    "claim": f"composite-{k}",
                    "measured": "missing",
                    "threshold": "",
                    "pass": False,
                    "shortfall": "not evaluated",
                }
            )
            continue
        # 0 vs 0 has no ratio (seed 0's `numbered` composites): say so rather than print x-inf as a pass margin
        ratio = mc / bc if bc else (float("inf") if mc else None)
        ok = ratio is not None and ratio >= 1.35 and ma > ba
        shown = "no ratio: neither answered any correctly" if ratio is None else f"x{ratio:.2f}"
        short = "no correct answers" if ratio is None else f"ratio short by {max(1.35 - ratio, 0):.2f}"
        rows.append(
            {
                "claim": f"composite-{k}: MeteoRA correct >= 1.35x LoRA-B, attempts higher",
                "measured": f"{mc:.2f} vs {bc:.2f} ({shown}); attempts {ma:.2f} vs {ba:.2f}",
                "threshold": "x1.35, attempts >",
                "pass": ok,
                "shortfall": None
                if ok
                else short + ("" if ma > ba else f", attempts short by {ba - ma:.2f}"),
            }
        )
    acc = report["routing_accuracy"]
    rows.append(
        {
            "claim": "routing accuracy on single-task test prompts",
            "measured": "missing" if acc is None else f"{acc:.1f}%",
            "threshold": ">= 95%",
            "pass": acc is not None and acc >= 95.0,
            "shortfall": None
            if acc is not None and acc >= 95.0
            else ("not measured" if acc is None else f"{95.0 - acc:.1f} points short"),
        }
    )
    return rows


def _routing_detail(report: dict) -> str:
    layers = report.get("routing_accuracy_per_layer") or []
    out = ""
    if layers:
        out += f" By layer: {layers[0]:.0f}% at layer 0, {layers[len(layers) // 2]:.0f}% at layer {len(layers) // 2}, "
        out += f"{layers[-1]:.0f}% at layer {len(layers) - 1}."
    projections = report.get("routing_accuracy_per_projection") or {}
    if projections:
        out += " By projection: " + ", ".join(f"{p} {x:.1f}%" for p, x in projections.items()) + "."
    if report.get("routing_accuracy_prompt_majority") is not None:
        out += (
            f" Per prompt (the expert most often top-1 over its response tokens, layers and projections): "
            f"{report['routing_accuracy_prompt_majority']:.1f}% of test prompts."
        )
    prompt = report.get("routing_accuracy_prompt_tokens") or {}
    parts = [(k, prompt.get(k) or {}) for k in ("shared_prefix", "task_text", "last_prompt_token")]
    if all(p.get("overall") is not None for _, p in parts):
        (_, pre), (_, text), (_, last) = parts
        out += (
            f" Prompt tokens (not in the must-show; the oracle runs its adapter on them too): the "
            f"{prompt['shared_prefix_tokens']} template tokens every prompt starts with {100 * pre['overall']:.1f}%, "
            f"the task text {100 * text['overall']:.1f}%, the last prompt token (it predicts the answer's first "
            f"token) {100 * last['overall']:.1f}% (layer 0: {100 * last['per_layer'][0]:.0f}%)."
        )
    return out


def ablations(meteora: dict, oracle: dict, tasks: list[str]) -> dict:
    """Supplementary systems of ``eval/meteora.json`` beyond SYSTEMS (``meteora_top<k>_oracle_first<L>``):
    mean score and tasks within 1 point of the oracle, beside the plain MeteoRA system they modify."""
    out = {}
    for name in sorted(meteora):
        if name in SYSTEMS:
            continue
        base = name.split("_oracle_first")[0]
        rows = {}
        for system in (base, name):
            got = {t: meteora.get(system, {}).get(t, {}).get("score") for t in tasks}
            done = [t for t in tasks if got[t] is not None and oracle.get(t, {}).get("score") is not None]
            rows[system] = {
                "tasks": len(done),
                "mean": float(np.mean([got[t] for t in done])) if done else None,
                "within_1_of_oracle": sum(got[t] >= oracle[t]["score"] - 1.0 for t in done),
            }
        out[name] = {"system": rows[name], "plain": rows[base], "plain_name": base}
    return out


def _ablation_lines(report: dict) -> list[str]:
    abl = report.get("ablations") or {}
    if not abl:
        return []
    lines = [
        "",
        "Ablation (not a must-show): the first L layers answered by the task's own adapter (every expert slot "
        "holds it, gates zeroed: `meteora_jax/eval/ablation.py`), the trained gates elsewhere.",
        "",
        "| system | tasks | mean score | within 1 point of the oracle | plain MeteoRA: mean / within 1 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, a in abl.items():
        s, p = a["system"], a["plain"]
        lines.append(
            f"| {name} | {s['tasks']} | {_fmt(s['mean'])} | {s['within_1_of_oracle']} | "
            f"{_fmt(p['mean'])} / {p['within_1_of_oracle']} |"
        )
    return lines


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def markdown_section(report: dict, checks: list[dict], ctx: Ctx, images: dict[str, str]) -> str:
    lines = [
        f"## BIG-bench, small scale: SmolLM2-135M + {len(report['tasks'])} tasks (seed {report['seed']})",
        "",
    ]
    lines.append(
        f"Measured {time.strftime('%Y-%m-%d')} on {_device_name()} with `python scripts/reproduce_bigbench.py`; "
        f"{report['device_minutes']:.1f} device minutes of process wall time (machine starts and transfers "
        "not included). Scores in points (0-100), greedy decoding, each task's headline metric."
    )
    lines += [
        "",
        "| task | metric | base | oracle | LoRA-B | LoRA-F | MeteoRA top-1 | MeteoRA top-2 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, r in report["tasks"].items():
        lines.append(f"| {t} | {r['metric']} | " + " | ".join(_fmt(r[s]) for s in SYSTEMS) + " |")
    lines += ["", meteora_provenance(ctx), *_ablation_lines(report), *_paired_line(report)]
    protocol = report.get("composite_protocol", "numbered")
    lines += [
        "",
        f"Composite-n, protocol `{protocol}` (`meteora_jax/eval/composite.py` describes both): "
        + (
            "the n questions as one multi-turn chat, one generated answer per turn, no task label."
            if protocol == "turns"
            else "all n questions, then one generation that must write n numbered answers (MeteoRA's format)."
        )
        + " Correct and attempted are sums over the n sub-questions, per prompt.",
        "",
        "| composite | MeteoRA correct / attempted | LoRA-B correct / attempted | LoRA-F correct |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, c in report["composite"].items():
        lines.append(
            f"| composite-{k} | {_fmt(c['meteora_correct'])} / {_fmt(c['meteora_attempted'])} | "
            f"{_fmt(c['lora_b_correct'])} / {_fmt(c['lora_b_attempted'])} | {_fmt(c['lora_f_correct'])} |"
        )
    lines += turn_routing_lines(load_eval(composite_path(ctx)).get("routing_plot"))
    lines += [
        "",
        f"Routing accuracy (top-1 gate == task, every gate and token of the test prompts): "
        f"{_fmt(report['routing_accuracy'])}%." + _routing_detail(report),
        "",
        "| must show | measured | threshold | pass | short by |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        lines.append(
            f"| {c['claim']} | {c['measured']} | {c['threshold']} | {'yes' if c['pass'] else 'NO'} | "
            f"{c['shortfall'] or ''} |"
        )
    lines += ["", "| step | seconds |", "| --- | ---: |"]
    for name, st in ctx.state.data["steps"].items():
        lines.append(f"| {name} | {st['seconds']:.0f} |")
    for title, name in images.items():
        lines += ["", f"![{title}](results/{name})"]
    return "\n".join(lines) + "\n"


def turn_routing_lines(trace: dict | None) -> list[str]:
    """Markdown: the routing trace's conversation (composite ``turns``) turn by turn: the share of (layer,
    token) pairs whose traced top-1 (the layer's most frequent over its projections) is the turn's own task,
    on the user turn and on the answer. Whether the gates switch experts between turns shows here."""
    if not trace or not trace.get("turns"):
        return []
    top1_lt = np.asarray(trace["top1_lt"])
    experts = list(trace["experts"])
    lines = [
        "",
        "Routing by turn in the traced composite conversation (worked shots, then the test questions): the "
        "share of (layer, token) pairs whose top-1 expert (the layer's most frequent) is the turn's own task.",
        "",
        "| turn | task | user tokens | to its task | answer tokens | to its task |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for i, span in enumerate(trace["turns"]):
        e = experts.index(span["task"]) if span["task"] in experts else -1
        end = top1_lt.shape[1] if span["end"] is None else min(span["end"], top1_lt.shape[1])
        parts = [top1_lt[:, span["start"] : span["cue"]], top1_lt[:, span["cue"] : end]]
        cells = []
        for part in parts:
            share = f"{100 * float(np.mean(part == e)):.0f}%" if part.size else "-"
            cells += [str(part.shape[1]), share]
        lines.append(f"| {i + 1} | {span['task']} | " + " | ".join(cells) + " |")
    return lines


def meteora_provenance(ctx: Ctx) -> str:
    """One sentence per seed on how the MeteoRA columns were obtained (which trained gates, which k)."""
    systems = load_eval(ctx.work / "eval" / "meteora.json").get("systems") or {
        f"meteora_top{k}": meteora_gates(ctx.cfg, k) for k in ctx.cfg.meteora_top_ks()
    }
    parts = [
        f"{name.replace('meteora_top', 'MeteoRA top-')} = the gates trained with top_k {g['trained_top_k']}, "
        f"run with k={g['eval_top_k']}"
        for name, g in sorted(systems.items())
    ]
    trained = sorted({g["trained_top_k"] for g in systems.values()})
    why = ""
    if len(trained) < len(systems):
        why = (
            f" One gate training per seed (top_k {', '.join(map(str, trained))}); k is a run-time routing "
            "setting. With the gate-loss weight lambda=50 the gates' cross-entropy dominates their training, "
            "and under k=1 the LM loss sends them no gradient at all (the one expert's weight is 1), so a "
            "separately trained top-1 gate set would differ little; it would cost ~5 device minutes a seed."
        )
    return "MeteoRA columns: " + "; ".join(parts) + "." + why


def _device_name() -> str:
    try:
        import jax

        d = jax.devices()[0]
        return f"{d.platform.upper()} {getattr(d, 'device_kind', '')}".strip()
    except Exception:  # noqa: BLE001 (a report must not fail on a cosmetic lookup)
        return "unknown device"


def step_report(ctx: Ctx) -> dict:
    from meteora_jax.eval.routing_plots import plot_routing_heatmap, plot_task_accuracy_bars

    suffix = "" if ctx.cfg.seed == 0 else f"_seed{ctx.cfg.seed}"
    stem = f"{RESULT_NAME}{suffix}"
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(ctx)
    checks = must_show(report)
    images = {}
    per_system = {s: {t: r[s] for t, r in report["tasks"].items() if r[s] is not None} for s in SYSTEMS}
    per_system = {s: v for s, v in per_system.items() if v}
    if per_system:
        plot_task_accuracy_bars(per_system, out / f"{stem}_tasks.png", title="per-task score (points)")
        images["per-task scores"] = f"{stem}_tasks.png"
    comp = {
        name: {
            f"composite-{k}": c[f"{name}_correct"]
            for k, c in report["composite"].items()
            if c[f"{name}_correct"] is not None
        }
        for name in ("meteora", *BASELINES)
    }
    comp = {k: v for k, v in comp.items() if v}
    if comp:
        plot_task_accuracy_bars(
            comp,
            out / f"{stem}_composite.png",
            title="composite-n: correct answers per prompt",
            ylabel="correct answers",
        )
        images["composite-n"] = f"{stem}_composite.png"
    trace = load_eval(composite_path(ctx)).get("routing_plot")
    if trace:
        window = 160  # the questions' end and the answers: a whole 2k-token prompt would be unreadable
        top1 = np.asarray(trace["top1_lt"])[:, -window:]
        plot_routing_heatmap(
            top1,
            trace["tokens"][-window:],
            trace["experts"],
            out / f"{stem}_routing.png",
            title="MeteoRA top-2: top-1 expert per layer and token (composite prompt, end)",
        )
        images["routing"] = f"{stem}_routing.png"
    write_json(out / f"{stem}.json", report)
    details = {
        "must_show": checks,
        "single": load_eval(ctx.work / "eval" / "single.json"),
        "meteora": load_eval(ctx.work / "eval" / "meteora.json"),  # "systems": which gates, which k
        "composite": load_eval(composite_path(ctx)),
        "steps": {
            k: {"seconds": v["seconds"], "runs": v["runs"]} for k, v in ctx.state.data["steps"].items()
        },
        "config": dataclasses.asdict(ctx.cfg),
    }
    write_json(out / f"{stem}_details.json", details)
    md = markdown_section(report, checks, ctx, images)
    write_text_atomic(out / f"{stem}_section.md", md)
    ctx.log(_checks_table(checks))
    return {"json": str(out / f"{stem}.json"), "section": str(out / f"{stem}_section.md"), "images": images}


def _checks_table(checks: list[dict]) -> str:
    w = max(len(c["claim"]) for c in checks)
    rows = [f"{'must show':<{w}}  {'measured':<44}  pass  short by"]
    for c in checks:
        rows.append(
            f"{c['claim']:<{w}}  {c['measured']:<44}  {'yes ' if c['pass'] else 'NO  '}  {c['shortfall'] or ''}"
        )
    return "\n".join(rows)
