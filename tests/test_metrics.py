"""Metrics: hand-worked cases, and BLEU / ROUGE against the libraries' own documented examples."""

import pytest

from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval import metrics as M


def test_exact_match_lowercases_strips_and_removes_prompt_echo():
    prompt = "Q: Is the sky blue?\nA:"
    preds = ["  YES \n", prompt + " yes", "[INST] Q: Is the sky blue?\nA: [/INST]\nYes", "yes, it is"]
    refs = ["yes"] * 4
    # 3 of 4: the last one says more than the answer.
    assert M.exact_match(preds, refs, [prompt] * 4) == pytest.approx(75.0)
    # Without prompts the echoed one is wrong, the [/INST]-templated one is still cut.
    assert M.exact_match(preds, refs) == pytest.approx(50.0)


def test_prompt_echo_removed_only_at_the_start():
    # MeteoRA replaced the prompt anywhere; an answer quoting the question must survive.
    assert M.strip_prompt("the answer: blue", "blue") == "the answer: blue"
    assert M.clean_default("Name a colour. Blue", "Name a colour.") == "blue"


def test_fuzzy_match_is_substring_of_lowercased_prediction():
    preds = ["The answer is Seeing is believing.", "haste", ""]
    refs = ["seeing is believing", "Haste makes waste", "x"]
    assert M.fuzzy_match(preds, refs) == pytest.approx(100 / 3)


def test_multiple_references_any_counts():
    assert M.exact_match(["2"], [["two", "2"]]) == 100.0
    assert M.exact_match(["3"], [["two", "2"]]) == 0.0


def test_formal_fallacies_cleaner_and_score():
    assert M.clean_output("formal_fallacies_syllogisms_negation", "The argument is INVALID.") == "invalid"
    assert M.clean_output("formal_fallacies_syllogisms_negation", "valid") == "valid"
    assert M.clean_output("formal_fallacies_syllogisms_negation", "no idea") == M.ILLEGAL_ANSWER
    scores = M.score_task(
        "formal_fallacies_syllogisms_negation",
        ["It is invalid, clearly", "valid.", "maybe"],
        ["invalid", "valid", "valid"],
    )
    assert scores == {"exact_match": pytest.approx(200 / 3)}


def test_formal_fallacies_prompt_echo_does_not_decide_the_answer():
    prompt = "Is the argument valid or invalid?"
    # The echoed prompt contains "invalid"; only the generated part may count.
    assert M.clean_output("formal_fallacies_syllogisms_negation", prompt + " valid", prompt) == "valid"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("She has 3 + 4 = 7 apples. The answer is 7.", "7"),
        ("The answer is 1,234 dollars, not 5", "1234"),  # first number after the trigger
        ("First 12, then 15, so 18.", "18"),  # no trigger: last number
        ("It is -3.5.", "-3.5"),
        ("no number here", M.INVALID_GSM8K),
    ],
)
def test_gsm8k_extraction(output, expected):
    assert M.extract_gsm8k_answer(output) == expected


def test_gsm8k_accuracy_compares_numbers():
    refs = ["Natalia sold 48/2 = 24 clips.\n#### 72", "#### 1,000", "#### 5"]
    preds = ["So the answer is 72.", "That makes 1000.0", "The answer is 6"]
    assert M.gsm8k_accuracy(preds, refs) == pytest.approx(200 / 3)
    assert M.gsm8k_reference_answer("#### 1,000") == "1000"


def test_strategyqa_yes_no():
    preds = ["Yes. Because ...", "no, since", "Maybe"]
    refs = ["Yes. The reason ...", "No. Cats ...", "No. ..."]
    assert M.yes_no_accuracy(preds, refs) == pytest.approx(200 / 3)


def test_bleu_matches_sacrebleu_readme_example():
    # sacrebleu README: two reference streams; documented result "BLEU = 48.53 82.4/50.0/45.5/37.5".
    refs_a = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    refs_b = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [[a, b] for a, b in zip(refs_a, refs_b)]
    assert M.bleu(hyps, refs) == pytest.approx(48.53, abs=0.005)
    assert M.bleu(hyps, refs_a) != pytest.approx(48.53, abs=0.5)  # one stream only: a different score
    assert M.bleu(refs_a, refs_a) == pytest.approx(100.0)


def test_bleu_counts_empty_predictions():
    # MeteoRA dropped empty outputs first (scoring 100 here); an empty answer must cost.
    assert M.bleu(["The dog bit the man.", ""], ["The dog bit the man.", "It was not unexpected."]) < 100.0


def test_rouge_matches_rouge_score_readme_example():
    # rouge-score README: target 'The quick brown fox jumps over the lazy dog', prediction
    # 'The quick brown dog jumps on the log.', use_stemmer=True. By hand: unigram overlap
    # {the x2, quick, brown, jump, dog} = 6 of 8 predicted / 9 reference tokens -> F1 = 12/17;
    # LCS "the quick brown jump the" = 5 -> F = 2*(5/8)*(5/9)/(5/8+5/9) = 10/17.
    target = "The quick brown fox jumps over the lazy dog"
    pred = "The quick brown dog jumps on the log."
    scores = M.rouge_scores([pred], [target], use_stemmer=True)
    assert scores["rouge1"] == pytest.approx(100 * 12 / 17)
    assert scores["rougeL"] == pytest.approx(100 * 10 / 17)
    # Bigrams: pred {the quick, quick brown, brown dog, dog jump, jump on, on the, the log} (7),
    # target has 8; shared: the quick, quick brown -> F = 2*(2/7)*(2/8)/(2/7+2/8) = 8/30.
    assert scores["rouge2"] == pytest.approx(100 * 8 / 30)


def test_rouge_registry_functions_average_over_examples():
    preds = ["a b c", "x y"]
    refs = ["a b c", "p q"]
    assert M.rouge1(preds, refs) == pytest.approx(50.0)
    assert M.rougeL(preds, refs) == pytest.approx(50.0)
    assert M.rouge2(preds, refs) == pytest.approx(50.0)


def test_registry_and_task_defaults():
    for name, fn in M.METRICS.items():
        assert 0.0 <= fn(["yes"], ["yes"]) <= 100.0, name
    for task, names in M.TASK_METRICS.items():
        assert all(n in M.METRICS for n in names), task
    assert M.default_metric_for_task("formal_fallacies_syllogisms_negation") == "exact_match"
    assert M.default_metric_for_task("logical_deduction") == "fuzzy_match"
    assert M.default_metric_for_task("gsm8k") == "gsm8k_accuracy"
    assert M.default_metric_for_task("news_commentary_de") == "bleu"
    assert M.default_metric_for_task("my_new_task") == "exact_match"
    with pytest.raises(MeteoraInputError, match="Unknown metric"):
        M.get_metric("accuracy")


def test_bad_input():
    with pytest.raises(MeteoraInputError, match="pair up"):
        M.exact_match(["a"], ["a", "b"])
    with pytest.raises(MeteoraInputError, match="empty"):
        M.exact_match([], [])
    with pytest.raises(TypeError):
        M.exact_match("abc", "abc")
