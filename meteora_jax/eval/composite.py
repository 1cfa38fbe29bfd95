"""Composite-n: one prompt asks n questions from n different tasks; score each sub-question.

Following MeteoRA's headline experiment, a composite sample numbers n held-out questions, one per task, and
asks for the n answers in order; a 2-shot prefix (two composite samples with their answers, drawn from the
tasks' *train* splits) shows the format. The model must switch adapters mid-sequence with no task label.

Format (ours; the numbering makes answers easy to split and to attribute to a sub-question):

    Answer each question in order. Write "Answer i:" before the answer to question i.
    Question 1: <prompt of task 1>
    ...
    Question n: <prompt of task n>
    Answer 1: <response 1>      <- generated
    ...

Scoring per sub-question i: *attempted* when an ``Answer i:`` segment exists and is non-empty; *correct* when
the task's headline metric (``eval.metrics``, its cleaners included) scores that segment as right (>= 0.5 for
text metrics). Reported: attempted / correct rates per task and their sums over the n tasks (MeteoRA's
"sum of accuracies").

Two protocols (``PROTOCOLS``):

* ``numbered`` -- the format above, MeteoRA's: every question first, then one generation that must write all
  n numbered answers. Measured on SmolLM2-135M (benchmarks/RESULTS.md, study seed 0), every system -- MeteoRA,
  LoRA-B, LoRA-F -- wrote one answer (to the LAST question, nearest the reply) and then ended its turn, so
  all scored ~0: a 135M chat model does not follow the multi-answer format, and the comparison says nothing.
* ``turns`` -- the same n questions as one multi-turn chat: each question is a user turn, the model's own
  answer becomes the assistant turn before the next question, and the 2-shot prefix is ``shots`` earlier
  rounds of n (question, reference answer) turns from the train splits. The whole conversation is one
  sequence with no task label; every answer must be routed while the context holds the other tasks' turns.
  Each answer is one generation call (batched over samples), so the harness, not the model, moves on to the
  next question: attempted = a non-empty answer.

Sub-task lists (MeteoRA's; ``OFFLINE_SUBSTITUTES`` replaces tasks that the offline BIG-bench import does not
provide: alpaca -> topical_chat (open-ended text), news_commentary_de stays if present).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from meteora_jax.data.bigbench import COMPOSITE_TASKS
from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval.harness import greedy_texts
from meteora_jax.eval.metrics import default_metric_for_task, score_task
from meteora_jax.generate import get_sampler
from meteora_jax.model.llama import MeteoraLlama

# A task that is not available offline -> the nearest available one (stated in every report).
OFFLINE_SUBSTITUTES = {"alpaca": "topical_chat", "news_commentary_de": "news_commentary_es"}
INSTRUCTION = 'Answer each question in order. Write "Answer i:" before the answer to question i.'
PROTOCOLS = ("numbered", "turns")


def resolve_tasks(n: int, available: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    if n not in COMPOSITE_TASKS:
        raise MeteoraInputError(f"composite-{n} is not defined; choose one of {sorted(COMPOSITE_TASKS)}.")
    tasks, subs = [], {}
    for task in COMPOSITE_TASKS[n]:
        if task in available:
            tasks.append(task)
        elif OFFLINE_SUBSTITUTES.get(task) in available:
            subs[task] = OFFLINE_SUBSTITUTES[task]
            tasks.append(subs[task])
        else:
            raise MeteoraInputError(
                f"composite-{n} needs task {task!r} (or its substitute {OFFLINE_SUBSTITUTES.get(task)!r}) in the "
                f"data folder; it has {sorted(available)}."
            )
    return tasks, subs


def format_questions(prompts: Sequence[str]) -> str:
    return "\n".join([INSTRUCTION] + [f"Question {i + 1}: {p.strip()}" for i, p in enumerate(prompts)]) + "\n"


def format_answers(responses: Sequence[str]) -> str:
    return "\n".join(f"Answer {i + 1}: {r.strip()}" for i, r in enumerate(responses)) + "\n"


def build_sample(shots: Sequence[tuple[list, list]], questions: Sequence) -> str:
    """The full prompt: each shot's questions and answers, then the questions to answer and "Answer 1:"."""
    parts = [
        format_questions([e.prompt for e in qs]) + format_answers([e.response for e in ans])
        for qs, ans in shots
    ]
    parts.append(format_questions([e.prompt for e in questions]) + "Answer 1:")
    return "\n".join(parts)


def turn_messages(
    shots: Sequence[tuple[Sequence, Sequence]], questions: Sequence, answers: Sequence[str]
) -> list[dict[str, str]]:
    """The ``turns`` protocol's chat so far: every shot's (question, reference) turns, then the test
    questions with the answers given to them, then the next question (``questions[len(answers)]``)."""
    msgs: list[dict[str, str]] = []
    pairs = [(q.prompt, a.response) for qs, ans in shots for q, a in zip(qs, ans)]
    pairs += [(q.prompt, a) for q, a in zip(questions, answers)]
    for q, a in pairs:
        msgs += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
    msgs.append({"role": "user", "content": questions[len(answers)].prompt.strip()})
    return msgs


def answer_in_turns(
    num_items: int,
    num_turns: int,
    prompt_for: Callable[[int, list[str]], Any],
    generate: Callable[[list, int], Sequence[str]],
) -> list[list[str]]:
    """The ``turns`` protocol's rounds: in round i, ``generate(prompts, i)`` answers question i of every
    item at once (``prompt_for(item, answers so far)`` builds each prompt); the stripped answer joins that
    item's conversation before round i + 1. Returns the answers, one list of ``num_turns`` per item."""
    answers: list[list[str]] = [[] for _ in range(num_items)]
    for i in range(num_turns):
        texts = generate([prompt_for(j, answers[j]) for j in range(num_items)], i)
        for j, text in enumerate(texts):
            answers[j].append(text.strip())
    return answers


def render_turns(tokenizer: object, messages: Sequence[dict[str, str]], template: str = "chat") -> str:
    """The text of a ``turns`` conversation ending where the model answers the last user turn. ``chat`` /
    ``chat_no_system``: the tokenizer's chat template (``train.data.render_chat``); any other template string
    with ``{prompt}``: each user turn through it, followed by its answer and a blank line (no template has
    turns of its own)."""
    from meteora_jax.train.config import CHAT_TEMPLATES, PROMPT_TEMPLATES
    from meteora_jax.train.data import render_chat

    if template in CHAT_TEMPLATES:
        return render_chat(tokenizer, messages, template)
    fmt = PROMPT_TEMPLATES.get(template, template)
    out = ""
    for m in messages:
        out += fmt.replace("{prompt}", m["content"]) if m["role"] == "user" else " " + m["content"] + "\n\n"
    return out


def turns_prompt_ids(tok, template: str, item: dict, answers: list[str], bos: list[int]) -> list[int]:  # noqa: ANN001
    """Token ids of the ``turns`` conversation of ``item`` with ``answers`` so far, ending in the reply cue."""
    text = render_turns(tok, turn_messages(item["shots"], item["questions"], answers), template)
    return bos + list(tok(text, add_special_tokens=False)["input_ids"])


def turn_spans(tok, template: str, item: dict, answers: list[str], bos: list[int]) -> list[dict]:  # noqa: ANN001
    """Where each question turn lies in ``turns_prompt_ids(tok, template, item, answers, bos)`` (then the answer
    being generated): per turn (the shots' and the test questions'), its task, ``start`` (the first token after
    the previous answer: the template's closing and the user turn), ``cue`` (the first answer token) and
    ``end`` (None for the last turn: its answer runs to the end). The answers are tokenised on their own, so
    a boundary can be off by a token where the tokenizer merges across it (never across a special token)."""
    msgs = turn_messages(item["shots"], item["questions"], answers)
    questions = [q for qs, _ in item["shots"] for q in qs] + list(item["questions"][: len(answers) + 1])
    spans, start = [], 0
    for j, q in enumerate(questions):
        cue = len(bos) + len(
            tok(render_turns(tok, msgs[: 2 * j + 1], template), add_special_tokens=False)["input_ids"]
        )
        answer = msgs[2 * j + 1]["content"] if 2 * j + 1 < len(msgs) else None
        end = None if answer is None else cue + len(tok(answer, add_special_tokens=False)["input_ids"])
        spans.append({"task": q.task, "start": start, "cue": cue, "end": end})
        start = end
    return spans


def composite_prompt_ids(tok, fmt, prompt: str, bos: list[int]) -> list[int]:  # noqa: ANN001
    """The composite sample as the user turn, with its trailing "Answer 1:" moved into the reply (a chat
    template would otherwise close the turn after it and the model would start a fresh answer)."""
    body, cue = prompt.removesuffix("Answer 1:"), "Answer 1:"
    return bos + list(tok(fmt(body.rstrip()) + cue, add_special_tokens=False)["input_ids"])


def split_answers(output: str, n: int) -> list[str | None]:
    """The n answers of a generation that continues after "Answer 1:"; None where an answer is missing."""
    text = "Answer 1:" + output
    found: dict[int, str] = {}
    marks = list(re.finditer(r"Answer (\d+):", text))
    for j, m in enumerate(marks):
        i = int(m.group(1))
        end = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        seg = text[m.end() : end]
        seg = seg.split("\nQuestion", 1)[0].strip()  # the model may start a new composite: not an answer
        if 1 <= i <= n and i not in found:
            found[i] = seg
    return [found.get(i + 1) or None for i in range(n)]


def evaluate_composite(
    model: MeteoraLlama,
    tokenizer: object,
    data_dir: str,
    n: int,
    *,
    num_samples: int = 200,
    seed: int = 0,
    max_new_tokens_per_answer: int = 32,
    batch_size: int = 8,
    systems: Sequence[str] = ("meteora",),
    protocol: str = "numbered",
    prompt_format: tuple[str | None, bool] = (None, True),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Builds ``num_samples`` composite-n prompts (test questions, 2 train shots each) and scores them
    under ``protocol`` (``PROTOCOLS``).

    ``prompt_format``: (template, add_bos) as ``train.data.prompt_format_for`` gives it, i.e. the format the
    gates were trained on; the prompts are then built from exactly training's token ids (the study's own
    helpers). Template None (a model ``train-gate`` did not write): ``numbered`` prompts go as given, with
    the tokenizer's special tokens, and ``turns`` conversations use the tokenizer's chat template.
    """
    from meteora_jax.data.tasks import list_tasks, read_split
    from meteora_jax.train.data import PromptFormatter

    if protocol not in PROTOCOLS:
        raise MeteoraInputError(f"composite protocol {protocol!r}: choose one of {PROTOCOLS}.")

    tasks, subs = resolve_tasks(n, list_tasks(data_dir))
    test, train = read_split(data_dir, "test", tasks), read_split(data_dir, "train", tasks)
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        questions = [rng.choice(test[t]) for t in tasks]
        shots = []
        for _ in range(2):
            shot = [rng.choice(train[t]) for t in tasks]
            shots.append((shot, shot))
        samples.append((questions, build_sample(shots, questions), shots))
    sampler = get_sampler(model, tokenizer)
    sampler.refresh()
    report = {
        "n": n,
        "tasks": tasks,
        "substitutes": subs,
        "num_samples": num_samples,
        "protocol": protocol,
        "prompt_template": prompt_format[0],
        "systems": {},
    }
    questions = [s[0] for s in samples]
    template, add_bos = prompt_format
    fmt = PromptFormatter(tokenizer, template) if template is not None else None
    bos = fmt.bos_ids(add_bos) if fmt is not None else []

    def prompt_for(j: int, answers_j: list[str]) -> str | list[int]:
        if fmt is None:
            return render_turns(tokenizer, turn_messages(samples[j][2], samples[j][0], answers_j), "chat")
        item = {"shots": samples[j][2], "questions": samples[j][0]}
        return turns_prompt_ids(tokenizer, template, item, answers_j, bos)

    numbered_prompts = [
        s[1] if fmt is None else composite_prompt_ids(tokenizer, fmt, s[1], bos) for s in samples
    ]

    for system in systems:
        generate = functools.partial(
            greedy_texts,
            sampler,
            batch_size=batch_size,
            routing=model.routing_options(no_experts=(system == "base")),
        )
        if protocol == "turns":
            answers = answer_in_turns(
                len(samples),
                n,
                prompt_for,
                lambda p, _turn, generate=generate: generate(p, max_new_tokens=max_new_tokens_per_answer),
            )
            scores = score_answers(tasks, questions, answers)
        else:
            outputs = generate(
                numbered_prompts,
                max_new_tokens=max_new_tokens_per_answer * n,
                stop=["\nQuestion 1:", f"Answer {n + 1}:"],
            )
            scores = score_composite(tasks, questions, outputs)
        report["systems"][system] = scores
        if progress:
            progress(f"composite-{n} {system}: {scores['sum_correct']:.3f} correct (sum)")
    return report


def score_composite(tasks: Sequence[str], questions: Sequence[Sequence], outputs: Sequence[str]) -> dict:
    """``numbered``: splits each generation into its n answers, then ``score_answers``."""
    return score_answers(tasks, questions, [split_answers(out, len(tasks)) for out in outputs])


def score_answers(
    tasks: Sequence[str], questions: Sequence[Sequence], answers: Sequence[Sequence[str | None]]
) -> dict:
    """Attempted (a non-empty answer) and correct rates per task (over samples), and their sums over tasks."""
    n = len(tasks)
    attempted = [0] * n
    correct = [0.0] * n
    for qs, sample_answers in zip(questions, answers):
        for i, (task, ex, ans) in enumerate(zip(tasks, qs, sample_answers)):
            if ans is None or not ans.strip():
                continue
            attempted[i] += 1
            metric = ex.extra.get("metric") if isinstance(ex.extra.get("metric"), str) else None
            metric = metric or default_metric_for_task(task)
            score = score_task(task, [ans], [ex.response], [ex.prompt], metrics=[metric])[metric]
            correct[i] += float(score >= (50.0 if metric == "bleu" else 0.5))
    total = max(len(answers), 1)
    per_task = {
        t: {"attempted": attempted[i] / total, "correct": correct[i] / total} for i, t in enumerate(tasks)
    }
    return {
        "per_task": per_task,
        "sum_attempted": sum(v["attempted"] for v in per_task.values()),
        "sum_correct": sum(v["correct"] for v in per_task.values()),
    }
