"""MeteoRA's evaluation metrics and output cleaners, as plain functions on lists of strings.

Every metric has the signature ``metric(preds, refs, prompts=None) -> float`` and returns points in 0-100
(accuracy in percent, BLEU as sacrebleu prints it, ROUGE F-measure x 100). ``METRICS`` maps names to them;
``TASK_METRICS`` lists MeteoRA's metrics per task (its ``eval/eval.py``), first = the headline one that
``default_metric_for_task`` returns. ``score_task`` applies a task's cleaner and then its metrics.

Semantics, and where they differ from MeteoRA's ``eval/clean.py`` and ``eval/eval.py``:

* Cleaning (``clean_output``): drop an echo of the prompt, then lower-case and strip. MeteoRA removed every
  occurrence of the prompt anywhere in the output (``output.replace(prompt, "")``), or, when the prompt was
  not found, kept what follows the last ``[/INST]\\n``. We remove the prompt only where the output *starts*
  with it (an answer may legitimately quote part of the question) and also cut after the last ``[/INST]``.
  Our sampler returns only new tokens, so this matters mostly for outputs from other tools.
* ``exact_match``: cleaned prediction == reference, both lower-cased and stripped (MeteoRA did not strip the
  reference; BIG-bench targets are already stripped, so the result is the same on its data).
* ``fuzzy_match`` (MeteoRA's ``mode='fuzzy'``): the lower-cased reference is a substring of the cleaned
  prediction. Note it rewards listing every choice; MeteoRA used it anyway for many multiple-choice tasks.
* formal_fallacies_syllogisms_negation's cleaner maps any output containing "invalid" to ``invalid``, else
  containing "valid" to ``valid``, else ``illegal answer`` (as MeteoRA). MeteoRA defines cleaners for
  vitaminc and disfl_qa too but never registers them, so those tasks use the default cleaner here as well.
* gsm8k (``gsm8k_accuracy``): the prediction's number is the first number after "The answer is" if that
  phrase appears, else the last number; commas removed; the reference's number follows ``####`` (GSM8K's
  format), else it is extracted like a prediction. MeteoRA compared the two as strings ("18" != "18.0");
  we compare them as numbers.
* strategyqa (``yes_no_accuracy``): correct when "yes" (or "no") is in the first five characters of both the
  lower-cased reference and prediction, exactly MeteoRA's rule.
* BLEU: sacrebleu ``corpus_bleu`` with its defaults (13a tokenizer, case-sensitive). ROUGE: rouge-score's
  ROUGE-1/2/L F-measure, averaged over examples, no stemming. MeteoRA computed both on lower-cased
  predictions against original-case references (a case mismatch we do not copy: neither side is
  lower-cased for BLEU/ROUGE), dropped empty predictions before scoring (we score them: an empty answer
  is a wrong answer, and dropping it inflates the score), and used the ``rouge`` package rather than
  ``rouge-score`` (their ROUGE-L differs slightly: summary-level vs sentence-level LCS).
* A reference may be a list of strings (several correct answers): BLEU uses them all as references; the
  other metrics count the prediction correct if it is correct for any of them (ROUGE takes the best).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from meteora_jax.errors import MeteoraInputError

Ref = str | Sequence[str]
Metric = Callable[..., float]

ILLEGAL_ANSWER = "illegal answer"
INVALID_GSM8K = "[invalid]"
_INST_END = "[/INST]"
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_GSM8K_REF_RE = re.compile(r"#### (-?[0-9.,]+)")


def strip_prompt(output: str, prompt: str | None) -> str:
    """Remove an echo of ``prompt`` at the start of ``output``, and anything up to the last ``[/INST]``."""
    text = output
    if prompt and prompt.strip() and text.lstrip().startswith(prompt.strip()):
        text = text.lstrip()[len(prompt.strip()) :]
    idx = text.rfind(_INST_END)
    if idx != -1:
        text = text[idx + len(_INST_END) :]
    return text


def clean_default(output: str, prompt: str | None = None) -> str:
    """Prompt echo removed, lower-cased, surrounding whitespace stripped."""
    return strip_prompt(output, prompt).lower().strip()


def clean_formal_fallacies(output: str, prompt: str | None = None) -> str:
    """Only ``valid`` and ``invalid`` are answers; "invalid" wins when both words appear."""
    text = clean_default(output, prompt)
    if "invalid" in text:
        return "invalid"
    if "valid" in text:
        return "valid"
    return ILLEGAL_ANSWER


def extract_gsm8k_answer(output: str) -> str:
    """The number a GSM8K answer gives: first after "the answer is", else the last one; commas removed."""
    parts = output.lower().split("the answer is")
    flagged = len(parts) > 1
    numbers = _NUMBER_RE.findall((parts[1] if flagged else parts[-1]).replace(",", ""))
    if not numbers:
        return INVALID_GSM8K
    return (numbers[0] if flagged else numbers[-1]).rstrip(".")


def gsm8k_reference_answer(ref: str) -> str:
    """The number after ``####`` in a GSM8K reference solution (else extracted like a prediction)."""
    m = _GSM8K_REF_RE.search(ref)
    return m.group(1).replace(",", "").rstrip(".") if m else extract_gsm8k_answer(ref)


def clean_gsm8k(output: str, prompt: str | None = None) -> str:
    """A GSM8K output reduced to its numeric answer (the prompt echo is removed first)."""
    return extract_gsm8k_answer(strip_prompt(output, prompt))


CLEANERS: dict[str, Callable[[str, str | None], str]] = {
    "formal_fallacies_syllogisms_negation": clean_formal_fallacies,
    "gsm8k": clean_gsm8k,
}


def clean_output(task: str, output: str, prompt: str | None = None) -> str:
    """Apply ``task``'s cleaner (MeteoRA's ``clean_output``); tasks without one get ``clean_default``."""
    return CLEANERS.get(task, clean_default)(output, prompt)


def _check(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None) -> list[str | None]:
    if isinstance(preds, str) or isinstance(refs, str):
        raise TypeError("preds and refs must be sequences of strings, not a single string")
    if len(preds) != len(refs):
        raise MeteoraInputError(f"{len(preds)} predictions but {len(refs)} references; they must pair up.")
    if not preds:
        raise MeteoraInputError("No predictions to score (the evaluation set is empty).")
    if prompts is None:
        return [None] * len(preds)
    if len(prompts) != len(preds):
        raise MeteoraInputError(f"{len(prompts)} prompts for {len(preds)} predictions; they must pair up.")
    return list(prompts)


def _alternatives(ref: Ref) -> list[str]:
    alts = [ref] if isinstance(ref, str) else list(ref)
    if not alts:
        raise MeteoraInputError("A reference is an empty list; give at least one correct answer.")
    return alts


def _accuracy(
    preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None, hit: Callable
) -> float:
    prompts_ = _check(preds, refs, prompts)
    correct = sum(
        any(hit(clean_default(p, q), r.lower().strip()) for r in _alternatives(ref))
        for p, ref, q in zip(preds, refs, prompts_)
    )
    return 100.0 * correct / len(preds)


def exact_match(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """% of predictions equal to the reference after cleaning (lower-case, strip, prompt echo removed)."""
    return _accuracy(preds, refs, prompts, lambda p, r: p == r)


def fuzzy_match(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """% of predictions that contain the reference (both lower-cased; MeteoRA's "fuzzy" accuracy)."""
    return _accuracy(preds, refs, prompts, lambda p, r: r in p)


def yes_no_accuracy(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """strategyqa: "yes" (or "no") within the first 5 characters of both prediction and reference."""

    def hit(p: str, r: str) -> bool:
        return ("yes" in r[:5] and "yes" in p[:5]) or ("no" in r[:5] and "no" in p[:5])

    return _accuracy(preds, refs, prompts, hit)


def _same_number(a: str, b: str) -> bool:
    if INVALID_GSM8K in (a, b):
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def gsm8k_accuracy(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """% of predictions whose numeric answer equals the reference's (``#### N``), compared as numbers."""
    prompts_ = _check(preds, refs, prompts)
    correct = sum(
        any(_same_number(clean_gsm8k(p, q), gsm8k_reference_answer(r)) for r in _alternatives(ref))
        for p, ref, q in zip(preds, refs, prompts_)
    )
    return 100.0 * correct / len(preds)


def bleu(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """sacrebleu corpus BLEU (default 13a tokenisation, case-sensitive), prompt echo removed."""
    import sacrebleu

    prompts_ = _check(preds, refs, prompts)
    hyps = [strip_prompt(p, q).strip() for p, q in zip(preds, prompts_)]
    alts = [_alternatives(r) for r in refs]
    # sacrebleu wants reference *streams*: stream k holds the k-th reference of every sentence; sentences
    # with fewer references pad with None, which sacrebleu skips.
    n_streams = max(len(a) for a in alts)
    streams = [[a[k] if k < len(a) else None for a in alts] for k in range(n_streams)]
    return float(sacrebleu.corpus_bleu(hyps, streams).score)


@lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool) -> object:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)


def rouge_scores(
    preds: Sequence[str],
    refs: Sequence[Ref],
    prompts: Sequence[str] | None = None,
    *,
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 (rouge-score), best over a prediction's references."""
    prompts_ = _check(preds, refs, prompts)
    scorer = _rouge_scorer(use_stemmer)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, ref, q in zip(preds, refs, prompts_):
        hyp = strip_prompt(p, q).strip()
        per_ref = [scorer.score(r, hyp) for r in _alternatives(ref)]  # score(target, prediction)
        for key in totals:
            totals[key] += max(s[key].fmeasure for s in per_ref)
    return {key: 100.0 * v / len(preds) for key, v in totals.items()}


def rouge1(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """Mean ROUGE-1 F x 100."""
    return rouge_scores(preds, refs, prompts)["rouge1"]


def rouge2(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:
    """Mean ROUGE-2 F x 100."""
    return rouge_scores(preds, refs, prompts)["rouge2"]


def rougeL(preds: Sequence[str], refs: Sequence[Ref], prompts: Sequence[str] | None = None) -> float:  # noqa: N802
    """Mean ROUGE-L F x 100 (sentence-level LCS)."""
    return rouge_scores(preds, refs, prompts)["rougeL"]


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "fuzzy_match": fuzzy_match,
    "yes_no_accuracy": yes_no_accuracy,
    "gsm8k_accuracy": gsm8k_accuracy,
    "bleu": bleu,
    "rouge1": rouge1,
    "rouge2": rouge2,
    "rougeL": rougeL,
}

_EXACT, _FUZZY, _TEXT = ("exact_match",), ("fuzzy_match",), ("rougeL", "rouge1", "rouge2", "bleu")
# MeteoRA's EVAL_FN (eval/eval.py); the first entry is the headline metric of the task.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "abstract_narrative_understanding": _FUZZY,
    "alpaca": _TEXT,
    "cnn_dailymail": _TEXT,
    "contextual_parametric_knowledge_conflicts": _FUZZY,
    "cs_algorithms": _EXACT,
    "disfl_qa": _FUZZY,
    "elementary_math_qa": _EXACT,
    "epistemic_reasoning": _EXACT,
    "formal_fallacies_syllogisms_negation": _EXACT,
    "goal_step_wikihow": _FUZZY,
    "gsm8k": ("gsm8k_accuracy",),
    "language_identification": _FUZZY,
    "linguistics_puzzles": _TEXT,
    "logical_deduction": _FUZZY,
    "news_commentary_de": ("bleu",),
    "news_commentary_es": ("bleu",),
    "news_commentary_it": ("bleu",),
    "object_counting": _FUZZY,
    "paragraph_segmentation": _EXACT,
    "play_dialog_same_or_different": _FUZZY,
    "question_selection": _FUZZY,
    "reasoning_about_colored_objects": _FUZZY,
    "strategyqa": ("yes_no_accuracy", "bleu", "rouge1", "rouge2", "rougeL"),
    "topical_chat": _TEXT,
    "tracking_shuffled_objects": _EXACT,
    "unit_conversion": _EXACT,
    "vitaminc_fact_verification": _FUZZY,
    "winowhy": _EXACT,
}


def metrics_for_task(task: str, default: str = "exact_match") -> tuple[str, ...]:
    """MeteoRA's metrics for ``task``; ``(default,)`` for a task it did not have."""
    return TASK_METRICS.get(task, (default,))


def default_metric_for_task(task: str, default: str = "exact_match") -> str:
    """The headline metric of ``task`` (an example's ``"metric"`` key, where present, should win)."""
    return metrics_for_task(task, default)[0]


def get_metric(name: str) -> Metric:
    """The metric function registered as ``name``."""
    if name not in METRICS:
        raise MeteoraInputError(f"Unknown metric {name!r}; the metrics are {sorted(METRICS)}.")
    return METRICS[name]


def score_task(
    task: str,
    preds: Sequence[str],
    refs: Sequence[Ref],
    prompts: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Clean the predictions with ``task``'s cleaner where it has one, then compute each metric.

    Task cleaners that change the answer's form (formal_fallacies, gsm8k) are applied before the metric;
    the generic cleaning (prompt echo, case, whitespace) happens inside each metric.
    """
    names = list(metrics) if metrics is not None else list(metrics_for_task(task))
    fns = {name: get_metric(name) for name in names}
    prompts_ = _check(preds, refs, prompts)
    if task in CLEANERS and task != "gsm8k":  # gsm8k_accuracy extracts the number itself
        preds = [clean_output(task, p, q) for p, q in zip(preds, prompts_)]
        prompts = None
    return {name: fn(preds, refs, prompts) for name, fn in fns.items()}
