"""Per-task evaluation of MeteoRA beside its baselines, in one run, with MeteoRA's metrics.

Systems (each answers every selected task's held-out prompts with greedy decoding):

* ``meteora``       the gates route every token (no task label);
* ``base``          every expert off (``RoutingOptions.no_experts``): the base model alone;
* ``oracle``        each task answered by its own adapter forced (skipped for a task with no such expert);
* ``adapter:NAME``  every task answered by one adapter.

Scores come from ``eval.metrics.score_task`` (its cleaners, then every metric of the task; the first is the
headline). For ``meteora`` the report also holds routing accuracy, teacher-forced on the references
(``eval.routing``). ``write_report`` writes ``results.json``, ``results.md`` and a bar plot, each atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval.metrics import metrics_for_task, score_task
from meteora_jax.generate import get_sampler
from meteora_jax.generate.sampling import SamplingParams
from meteora_jax.io import write_text_atomic
from meteora_jax.model.llama import MeteoraLlama


@dataclasses.dataclass(frozen=True)
class System:
    """One column of the report. ``force_expert``: an expert name, or ``"<task>"`` for the oracle."""

    name: str
    force_expert: str | None = None
    no_experts: bool = False


def parse_systems(baselines: Sequence[str], expert_names: Sequence[str]) -> list[System]:
    systems = [System("meteora")]
    for b in baselines:
        if b == "base":
            systems.append(System("base", no_experts=True))
        elif b == "oracle":
            systems.append(System("oracle", force_expert="<task>"))
        elif b.startswith("adapter:"):
            name = b.split(":", 1)[1]
            if name not in expert_names:
                raise MeteoraInputError(
                    f"--baseline {b}: {name!r} is not an expert; experts: {list(expert_names)}."
                )
            systems.append(System(b, force_expert=name))
        else:
            raise MeteoraInputError(f"--baseline {b!r}: choose oracle, base or adapter:NAME.")
    return systems


def greedy_texts(
    sampler: object,
    prompts: Sequence,
    *,
    batch_size: int,
    max_new_tokens: int,
    routing: object,
    stop: Sequence[str] | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` in batches of ``batch_size``, in order (the harness's and
    composite-n's generation loop)."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        res = sampler.generate(
            list(prompts[start : start + batch_size]),
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(),
            routing=routing,
            stop=stop,
        )
        texts.extend(res.texts)
    return texts


def evaluate(
    model: MeteoraLlama,
    tokenizer: object,
    examples_by_task: dict[str, list],
    *,
    baselines: Sequence[str] = ("base", "oracle"),
    max_new_tokens: int = 64,
    batch_size: int = 8,
    routing_accuracy: bool = True,
    prompt_format: tuple[str | None, bool] = (None, True),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Scores every system on every task; returns the report (a JSON-ready dict). ``prompt_format``:
    (template, add_bos) as ``train.data.prompt_format_for`` gives it; template None = prompts as given."""
    from meteora_jax.eval import routing as routing_diag
    from meteora_jax.train.data import PromptFormatter

    systems = parse_systems(baselines, model.expert_names)
    sampler = get_sampler(model, tokenizer)
    sampler.refresh()
    report: dict = {
        "systems": [s.name for s in systems],
        "expert_names": model.expert_names,
        "max_new_tokens": max_new_tokens,
        "prompt_template": prompt_format[0],
        "tasks": {},
    }
    template, add_bos = prompt_format
    fmt = PromptFormatter(tokenizer, template) if template is not None else None
    for task, examples in examples_by_task.items():
        prompts = [ex.prompt for ex in examples]
        inputs = [fmt.ids(p, add_bos) for p in prompts] if fmt is not None else sampler.encode(prompts)
        refs = [ex.response for ex in examples]
        entry: dict = {"num_examples": len(examples), "metrics": list(metrics_for_task(task)), "scores": {}}
        for system in systems:
            force = task if system.force_expert == "<task>" else system.force_expert
            if system.force_expert == "<task>" and task not in model.expert_names:
                entry["scores"][system.name] = None  # no adapter of this task: no oracle
                continue
            options = model.routing_options(force_expert=force, no_experts=system.no_experts)
            t0 = time.perf_counter()
            preds = greedy_texts(
                sampler, inputs, batch_size=batch_size, max_new_tokens=max_new_tokens, routing=options
            )
            entry["scores"][system.name] = score_task(task, preds, refs, prompts)
            if system.name == "meteora":
                entry["predictions"] = preds[:5]  # a few, to eyeball
            if progress:
                progress(
                    f"{task}: {system.name} {time.perf_counter() - t0:.1f}s {entry['scores'][system.name]}"
                )
        if routing_accuracy and task in model.expert_names and model.expert_names:
            pairs = [
                (ids, list(tokenizer(ex.response, add_special_tokens=False)["input_ids"]))
                for ids, ex in zip(inputs, examples)
            ]
            top1 = routing_diag.teacher_forced_top1(model, pairs, batch_size=batch_size)
            entry["routing_accuracy"] = routing_diag.routing_accuracy(
                model, top1, model.expert_names.index(task)
            )
        report["tasks"][task] = entry
    return report


def headline(entry: dict, system: str) -> float | None:
    scores = entry["scores"].get(system)
    return None if scores is None else scores[entry["metrics"][0]]


def markdown_table(report: dict) -> str:
    systems = report["systems"]
    lines = [
        "| task | metric | n | " + " | ".join(systems) + " | routing acc. |",
        "|---|---|---|" + "---|" * len(systems) + "---|",
    ]
    for task, entry in report["tasks"].items():
        cells = []
        for s in systems:
            v = headline(entry, s)
            cells.append("-" if v is None else f"{v:.4f}")
        ra = (entry.get("routing_accuracy") or {}).get("overall")
        lines.append(
            f"| {task} | {entry['metrics'][0]} | {entry['num_examples']} | "
            + " | ".join(cells)
            + f" | {'-' if ra is None else f'{ra:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """``results.json``, ``results.md`` and ``task_scores.png`` in ``out_dir`` (each written atomically)."""
    from meteora_jax.eval.routing_plots import plot_task_accuracy_bars

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    write_text_atomic(paths["json"], json.dumps(report, indent=2))
    write_text_atomic(paths["markdown"], markdown_table(report))
    bars = {
        s: {t: v for t, e in report["tasks"].items() if (v := headline(e, s)) is not None}
        for s in report["systems"]
    }
    bars = {s: v for s, v in bars.items() if v}
    if bars:
        paths["plot"] = plot_task_accuracy_bars(
            bars, os.path.join(out_dir, "task_scores.png"), ylabel="headline"
        )
    return paths
