"""The ``eval:composite`` step: composite-3/5/10 prompts (several tasks' questions in one sequence, with no
task label), MeteoRA top-2 vs LoRA-B vs LoRA-F, and one routing trace for the report's heatmap.

``composite.protocol`` picks the format (``eval.composite.PROTOCOLS``): ``numbered`` is MeteoRA's (all
questions, then one generation of n numbered answers; results in ``eval/composite.json``), ``turns`` one
multi-turn chat with one generated answer per turn (``eval/composite_turns.json``). ``turns`` generates each
size's n answers in n calls whose prompts grow; all of them are padded to the bucket of the size's longest
possible final prompt, so one prefill + one decode program serves the whole size.

Compiled programs: one prefill + one decode per (composite size, graph), two graphs (MeteoRA, the 1-expert
bench that LoRA-B and LoRA-F share); the new-token budget of every size falls in ``eval.min_bucket``. The
heatmap's trace is recorded while MeteoRA answers the first size's batch (that batch's program records
routing), not by a separate batch-1 generation with its own two programs. The sizes keep their own prompt
buckets (2k/4k/8k tokens): padding every size to the 8k bucket would also pad the new-token budget (the
sampler pads both to its minimum bucket) to 8k, and the float32 einsum attention scores of a 16 x 8k x 16k
prefill (~77 GB per intermediate) could exhaust the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval.composite import composite_prompt_ids, turn_spans, turns_prompt_ids
from meteora_jax.study.config import BASELINES, CompositeConfig
from meteora_jax.study.evaluate import (
    generate_with_trace,
    headline_metric,
    load_eval,
    meteora_system,
    single_bench,
)
from meteora_jax.study.state import Ctx, write_json

ACCURACY_METRICS = ("exact_match", "fuzzy_match", "yes_no_accuracy", "gsm8k_accuracy")


def composite_tasks(cfg: CompositeConfig, n: int) -> tuple[str, ...]:
    tasks = getattr(cfg, f"tasks_{n}", None)
    if tasks is None or len(tasks) != n:
        raise MeteoraInputError(f"composite.tasks_{n}: need exactly {n} task names (got {tasks}).")
    return tasks


def build_composite(data_dir: str, tasks: Sequence[str], cfg: CompositeConfig, seed: int) -> list[dict]:
    """Composite-n prompts in the project's format (``eval.composite.build_sample``): ``shots`` worked
    composites from the train splits, then n test questions, one per task, ending in "Answer 1:"."""
    import random

    from meteora_jax.data.tasks import read_split
    from meteora_jax.eval.composite import build_sample

    train = read_split(data_dir, "train", tasks=list(tasks))
    test = read_split(data_dir, "test", tasks=list(tasks))
    rng = random.Random(f"{seed}/composite/{len(tasks)}")
    limit = {"train": cfg.max_shot_prompt_chars, "test": cfg.max_sub_prompt_chars}
    short = {
        name: {t: [e for e in split[t] if len(e.prompt) <= limit[name]] for t in tasks}
        for name, split in (("train", train), ("test", test))
    }
    pools = {t: rng.sample(short["test"][t], len(short["test"][t])) for t in tasks}
    count = min(cfg.num_prompts, *(len(p) for p in pools.values()))
    items = []
    for i in range(count):
        shots = []
        for _ in range(cfg.shots):
            shot = [rng.choice(short["train"][t]) for t in tasks]
            shots.append((shot, shot))
        questions = [pools[t][i] for t in tasks]
        items.append({"prompt": build_sample(shots, questions), "questions": questions, "shots": shots})
    return items


def turns_length_bound(tok, template: str, item: dict, bos: list[int], tokens_per_answer: int) -> int:  # noqa: ANN001
    """An upper bound on the last turn's prompt length: the conversation with every answer empty, plus
    ``tokens_per_answer`` + 8 per earlier answer (a decoded answer may re-encode a few tokens longer)."""
    n = len(item["questions"])
    return len(turns_prompt_ids(tok, template, item, [""] * (n - 1), bos)) + (n - 1) * (tokens_per_answer + 8)


def step_eval_composite(ctx: Ctx) -> dict | None:
    from meteora_jax.eval.composite import score_answers, score_composite
    from meteora_jax.tokenizer import load_tokenizer
    from meteora_jax.train.data import PromptFormatter

    cc = ctx.cfg.composite
    for n in cc.sizes:
        for t in composite_tasks(cc, n):
            if t not in ctx.tasks or headline_metric(t) not in ACCURACY_METRICS:
                raise MeteoraInputError(
                    f"composite.tasks_{n}: {t!r} is not a study task with an accuracy metric."
                )
    turns = cc.protocol == "turns"
    path = ctx.work / "eval" / composite_file(cc.protocol)
    results = load_eval(path)
    data_dir = ctx.state.outputs("data")["data_dir"]
    pool = ctx.state.outputs("convert")["pool"]
    tok = load_tokenizer(pool)
    fmt = PromptFormatter(tok, ctx.cfg.prompt_template)
    bos = fmt.bos_ids()
    cache: dict[str, Any] = {}

    def system(name: str) -> tuple[Any, Any]:
        if name == "meteora":
            if "meteora" not in cache:
                cache["meteora"] = meteora_system(ctx, ctx.cfg.main_top_k())()
            return cache["meteora"]
        if "single" not in cache:
            cache["single"] = single_bench(pool, ctx.cfg.eval.dtype, ctx.cfg.eval.min_bucket)
        cache["single"].use(name)
        return cache["single"].sampler, cache["single"].routing

    first_ids: list[int] = []
    for n in cc.sizes:
        tasks = composite_tasks(cc, n)
        items = build_composite(data_dir, tasks, cc, ctx.cfg.seed)
        if turns:
            lengths = [
                turns_length_bound(tok, ctx.cfg.prompt_template, it, bos, cc.tokens_per_answer)
                for it in items
            ]
            ids = [turns_prompt_ids(tok, ctx.cfg.prompt_template, it, [], bos) for it in items]
        else:
            ids = [composite_prompt_ids(tok, fmt, it["prompt"], bos) for it in items]
            lengths = [len(x) for x in ids]
        keep = [i for i, n_tok in enumerate(lengths) if n_tok <= cc.max_prompt_tokens]
        dropped = len(items) - len(keep)
        items, ids = [items[i] for i in keep], [ids[i] for i in keep]
        prompt_bucket = max((lengths[i] for i in keep), default=0)
        if not items:
            raise MeteoraInputError(f"composite-{n}: no prompt fits composite.max_prompt_tokens.")
        first_ids = first_ids or ids[0]
        for name in ("meteora", *BASELINES):
            if name in results["scores"].get(str(n), {}):
                continue
            if ctx.time_left() < unit_seconds_estimate(results["scores"], name, n):
                return None  # checkpointed: the next call (--resume) starts this (size, system) afresh
            t0 = time.perf_counter()
            sampler, routing = system(name)
            want_trace = name == "meteora" and n == cc.sizes[0] and "routing_plot" not in results
            if turns:
                answers, trace = _answer_turns(
                    sampler, routing, tok, ctx.cfg.prompt_template, items, bos, cc, prompt_bucket, want_trace
                )
                texts = ["\n".join(a) for a in answers]
                row = score_answers(tasks, [it["questions"] for it in items], answers)
            else:
                texts, trace = generate_with_trace(
                    sampler,
                    ids,
                    routing,
                    batch_size=cc.batch_size,
                    max_new_tokens=n * cc.tokens_per_answer,
                    trace_of=0 if want_trace else None,
                )
                row = score_composite(tasks, [it["questions"] for it in items], texts)
            if trace is not None:
                results["routing_plot"] = _trace_plot(tok, *trace)
                if turns:  # item 0's last turn: its conversation's turns, for routing by turn in the report
                    results["routing_plot"]["turns"] = turn_spans(
                        tok, ctx.cfg.prompt_template, items[0], answers[0][: n - 1], bos
                    )
            row.update(
                protocol=cc.protocol,
                correct=row["sum_correct"],
                attempted=row["sum_attempted"],
                prompts=len(items),
                seconds=time.perf_counter() - t0,
                dropped_overlong=dropped,
                examples=[
                    {"pred": t, "refs": [q.response for q in it["questions"]]}
                    for t, it in zip(texts[:2], items)
                ],
            )
            results["scores"].setdefault(str(n), {})[name] = row
            write_json(path, results)
            ctx.log(f"composite-{n}: {name:8s} correct {row['correct']:.2f} attempted {row['attempted']:.2f}")
    if "routing_plot" not in results and first_ids and not turns:  # resumed after the first size's batch
        results["routing_plot"] = _routing_trace(
            system("meteora")[0], tok, first_ids, cc.sizes[0] * cc.tokens_per_answer
        )
        write_json(path, results)
    return {"results": str(path)}


def unit_seconds_estimate(scores: dict, name: str, n: int) -> float:
    """Seconds to hold in reserve before starting ``name``'s composite-``n`` (one unit of this step): 1.5x the
    fastest per-question rate ``name`` showed at a smaller size (which includes its compiles, so the rate
    falls with size), plus 30 s for a new prompt bucket's compile; 30 s when it has not run yet. A unit
    started too late would outrun --max-minutes and the call's hard limit, losing the call's results."""
    rates = [
        row["seconds"] / int(size)
        for size, rows in scores.items()
        if int(size) < n and (row := rows.get(name)) and row.get("seconds")
    ]
    return 30.0 + (1.5 * n * min(rates) if rates else 0.0)


def composite_file(protocol: str) -> str:
    return "composite.json" if protocol == "numbered" else f"composite_{protocol}.json"


def _answer_turns(sampler, routing, tok, template, items, bos, cc, prompt_bucket, want_trace):  # noqa: ANN001, ANN202
    """The ``turns`` protocol: answer question i of every item (batched), append it, ask question i + 1.
    Returns the answers per item and, with ``want_trace``, the routing of item 0's last turn (whose prompt
    holds the whole conversation) for the heatmap."""
    from meteora_jax.eval.composite import answer_in_turns

    n = len(items[0]["questions"])
    traces: list[dict] = []

    def generate(ids: list, turn: int) -> list[str]:
        texts, tr = generate_with_trace(
            sampler,
            ids,
            routing,
            batch_size=cc.batch_size,
            max_new_tokens=cc.tokens_per_answer,
            trace_of=0 if (want_trace and turn == n - 1) else None,
            min_prompt_bucket=prompt_bucket,
        )
        traces.extend([tr] if tr is not None else [])
        return texts

    prompt_for = lambda j, answers_j: turns_prompt_ids(tok, template, items[j], answers_j, bos)  # noqa: E731
    answers = answer_in_turns(len(items), n, prompt_for, generate)
    return answers, (traces[-1] if traces else None)


def _routing_trace(sampler, tok, ids: list[int], max_new_tokens: int) -> dict:  # noqa: ANN001
    """Top-1 expert per (layer, token) of MeteoRA on one composite prompt and its answer (for the heatmap)."""
    res = sampler.generate([ids], max_new_tokens=max_new_tokens, return_routing=True)
    return _trace_plot(tok, res, 0)


def _trace_plot(tok, res, row: int) -> dict:  # noqa: ANN001
    top1_lt = res.routing.top1_layer_token(row)
    all_ids = res.prompt_token_ids[row] + res.token_ids[row]
    return {
        "top1_lt": top1_lt.tolist(),
        "tokens": tok.convert_ids_to_tokens(all_ids[: top1_lt.shape[1]]),
        "experts": res.routing.expert_names,
        "prompt_tokens": len(res.prompt_token_ids[row]),
    }
