"""Composite-n prompt building and scoring on hand-worked outputs (no model needed)."""

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
