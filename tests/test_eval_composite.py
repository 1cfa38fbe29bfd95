"""Composite-n prompt building and scoring on hand-worked outputs, and both protocols on a tiny model."""

import json

import pytest

from meteora_jax.data.tasks import Example
from meteora_jax.eval.composite import build_sample, resolve_tasks, score_composite, split_answers


def test_split_answers():
    out = " yes\nAnswer 2: Paris\nAnswer 3:\nQuestion 1: next one"
    assert split_answers(out, 3) == ["yes", "Paris", None]
    assert split_answers(" a\nAnswer 2: b", 3) == ["a", "b", None]


def test_build_sample_and_score():
    q = [Example("strategyqa", "Is ice cold?", "Yes."), Example("winowhy", "Pick A or B", "A")]
    prompt = build_sample([(q, q)], q)
    assert prompt.count("Question 1:") == 2 and prompt.endswith("Answer 1:")
    scores = score_composite(["strategyqa", "winowhy"], [q, q], [" Yes.\nAnswer 2: A", " no"])
    assert scores["per_task"]["strategyqa"] == {"attempted": 1.0, "correct": 0.5}
    assert scores["per_task"]["winowhy"] == {"attempted": 0.5, "correct": 0.5}
    assert scores["sum_correct"] == 1.0


def test_substitutes_are_stated():
    avail = [
        "logical_deduction",
        "question_selection",
        "abstract_narrative_understanding",
        "goal_step_wikihow",
        "winowhy",
        "strategyqa",
        "disfl_qa",
        "news_commentary_de",
        "topical_chat",
        "linguistics_puzzles",
    ]
    tasks, subs = resolve_tasks(10, avail)
    assert subs == {"alpaca": "topical_chat"} and len(tasks) == 10


def test_turn_messages_grow_with_the_answers_and_keep_the_shots_first():
    from meteora_jax.eval.composite import turn_messages

    qs = [Example("strategyqa", "Is ice cold? ", "Yes."), Example("winowhy", "Pick A or B", "A")]
    shot = [Example("strategyqa", "Is fire hot?", "Yes, hot."), Example("winowhy", "Pick C or D", "D")]
    first = turn_messages([(shot, shot)], qs, [])
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant", "user"]
    assert first[1]["content"] == "Yes, hot." and first[-1]["content"] == "Is ice cold?"
    second = turn_messages([(shot, shot)], qs, [" no "])
    assert second[:4] == first[:4] and second[4:] == [
        {"role": "user", "content": "Is ice cold?"},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": "Pick A or B"},
    ]


def test_render_turns_plain_template_and_empty_answers_are_not_attempted():
    from meteora_jax.eval.composite import render_turns, score_answers

    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert render_turns(None, msgs, "Q: {prompt}\nA:") == "Q: q1\nA: a1\n\nQ: q2\nA:"
    q = [Example("strategyqa", "Is ice cold?", "Yes."), Example("winowhy", "Pick A or B", "A")]
    scores = score_answers(["strategyqa", "winowhy"], [q, q], [["Yes.", "  "], ["no", "A"]])
    assert scores["per_task"]["strategyqa"] == {"attempted": 1.0, "correct": 0.5}
    assert scores["per_task"]["winowhy"] == {"attempted": 0.5, "correct": 0.5}


def test_unknown_protocol_is_a_clear_error_before_any_work(tmp_path):
    from meteora_jax.errors import MeteoraInputError
    from meteora_jax.eval.composite import evaluate_composite

    with pytest.raises(MeteoraInputError, match="composite protocol 'numberd': choose one of"):
        evaluate_composite(None, None, str(tmp_path / "no_such_data"), 3, protocol="numberd")
    assert list(tmp_path.iterdir()) == []


def test_answer_in_turns_feeds_each_answer_into_the_next_round():
    from meteora_jax.eval.composite import answer_in_turns

    seen = []

    def generate(prompts, turn):
        seen.append((turn, prompts))
        return [f" {p}:{turn} " for p in prompts]

    answers = answer_in_turns(2, 3, lambda j, so_far: f"item{j}[{'|'.join(so_far)}]", generate)
    assert [t for t, _ in seen] == [0, 1, 2]
    assert seen[1][1] == ["item0[item0[]:0]", "item1[item1[]:0]"]  # round 1 sees round 0's stripped answer
    assert answers[1] == ["item1[]:0", "item1[item1[]:0]:1", "item1[item1[]:0|item1[item1[]:0]:1]:2"]


def _write_composite_tasks(root, tasks, tagged: bool) -> None:  # noqa: ANN001
    """3 train and 3 test rows per task, all answered "yes"; ``tagged``: prompts start with the task's first
    3 letters."""
    for task in tasks:
        (root / task).mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": f"{task[:3] + ' ' if tagged else ''}q{i}", "response": "yes"} for i in range(3)]
        for split in ("train", "test"):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("protocol", ["turns", "numbered"])
def test_evaluate_composite_end_to_end(tmp_path, protocol):
    """Either protocol on a tiny model: n answers per sample, scored per sub-task. (A 1024-token context:
    the character tokenizer makes a numbered composite-3 prompt ~475 tokens.)"""
    from meteora_jax.data.bigbench import COMPOSITE_TASKS
    from meteora_jax.eval.composite import evaluate_composite
    from tests.test_generate_fixtures import char_tokenizer, tiny_model

    _write_composite_tasks(tmp_path / "data", COMPOSITE_TASKS[3], tagged=False)
    report = evaluate_composite(
        tiny_model(4, max_position_embeddings=1024),
        char_tokenizer(),
        str(tmp_path / "data"),
        3,
        num_samples=2,
        max_new_tokens_per_answer=2,
        protocol=protocol,
        prompt_format=("Q: {prompt}\nA:", True),
        systems=("meteora", "base"),
    )
    assert report["protocol"] == protocol and report["tasks"] == list(COMPOSITE_TASKS[3])
    for system in ("meteora", "base"):
        assert 0.0 <= report["systems"][system]["sum_correct"] <= 3.0
        assert set(report["systems"][system]["per_task"]) == set(COMPOSITE_TASKS[3])


@pytest.mark.parametrize("protocol", ["turns", "numbered"])
def test_composite_prompts_are_the_trained_format_token_ids(tmp_path, protocol, monkeypatch):
    """With the format a gate was trained on, every composite prompt is exactly training's token ids (BOS,
    then the templated text, no other special tokens); without one, the prompt text goes as given."""
    from meteora_jax.data.bigbench import COMPOSITE_TASKS
    from meteora_jax.eval import composite as C
    from meteora_jax.train.data import PromptFormatter
    from tests.test_generate_fixtures import char_tokenizer, tiny_model

    _write_composite_tasks(tmp_path / "data", COMPOSITE_TASKS[3], tagged=True)
    seen: list = []

    def fake_generate(sampler, prompts, **kw):  # noqa: ANN001, ANN202
        seen.extend(prompts)
        return ["yes"] * len(prompts)

    monkeypatch.setattr(C, "greedy_texts", fake_generate)
    tok, tpl = char_tokenizer(), "Q: {prompt} A:"  # the character vocabulary has no newline
    run = lambda fmt: C.evaluate_composite(  # noqa: E731
        tiny_model(4), tok, str(tmp_path / "data"), 3, num_samples=2, protocol=protocol, prompt_format=fmt
    )
    report = run((tpl, True))
    assert report["prompt_template"] == tpl
    first = seen[0]
    assert isinstance(first, list) and first[0] == tok.bos_token_id and first.count(tok.bos_token_id) == 1
    text = tok.decode(first[1:])
    # turns: 2 shot rounds of 3 answered questions, then the first test question; numbered: one user turn
    assert text.startswith("Q: ") and text.count("Q: ") == (7 if protocol == "turns" else 1)
    assert text.endswith(" A:Answer 1:" if protocol == "numbered" else " A:")  # numbered: the reply cue
    assert first == [tok.bos_token_id] + list(tok(text, add_special_tokens=False)["input_ids"])
    assert PromptFormatter(tok, tpl).bos_ids(True) == [tok.bos_token_id]
    seen.clear()
    run((tpl, False))
    assert tok.bos_token_id not in seen[0]
    seen.clear()
    if protocol == "numbered":
        run((None, True))
        assert isinstance(seen[0], str) and "Q: " not in seen[0]
