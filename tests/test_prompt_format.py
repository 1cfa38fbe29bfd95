"""The prompt format travels with a trained model: ``train-gate`` records it, ``eval`` / ``generate`` apply it
(``--prompt-template auto``), so a gate is asked in the format it was trained on."""

import json
import os

import pytest

from meteora_jax import cli
from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval import harness
from meteora_jax.testing.synthetic_tasks import make_tiny_meteora_dir, write_tasks
from meteora_jax.tokenizer import load_tokenizer
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.data import PromptFormatter, prompt_format_for, trained_prompt_format
from meteora_jax.train.loop import train_gates

TASKS = ("upper", "reverse")
TEMPLATE = "Q: {prompt}\nA:"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    model = make_tiny_meteora_dir(root / "model", TASKS, max_positions=64)
    meta_path = os.path.join(model, "meteora_config.json")
    meta = json.loads(open(meta_path).read())
    meta["converted_from"] = {"base": "/somewhere/base"}  # as `convert` writes it
    open(meta_path, "w").write(json.dumps(meta))
    data = write_tasks(root / "data", TASKS, n_train=8, n_test=2)
    out = root / "trained"
    train_gates(model, data, out, TrainConfig.tiny(steps=2, prompt_template=TEMPLATE, add_bos=False))
    return model, data, str(out)


def test_train_gate_records_the_format_and_auto_reads_it(dirs):
    model, _, trained = dirs
    assert trained_prompt_format(trained) == (TEMPLATE, False)
    assert trained_prompt_format(model) == (None, True)  # a convert output: prompts as given
    # the trained model keeps where its experts came from (export-adapter names the base from it)
    assert json.loads(open(os.path.join(trained, "meteora_config.json")).read())["converted_from"] == {
        "base": "/somewhere/base"
    }
    assert prompt_format_for(trained, "auto") == (TEMPLATE, False)
    assert prompt_format_for(trained, "none") == (None, True)
    assert prompt_format_for(trained, "plain") == ("plain", False)
    with pytest.raises(MeteoraInputError, match="--prompt-template 'nope'"):
        prompt_format_for(trained, "nope")


def test_eval_asks_in_the_trained_format(dirs, tmp_path, monkeypatch):
    _, data, trained = dirs
    seen = []
    real = harness.greedy_texts

    def spy(sampler, prompts, **kw):
        seen.append([list(p) for p in prompts])
        return real(sampler, prompts, **kw)

    monkeypatch.setattr(harness, "greedy_texts", spy)
    argv = ["eval", "--model", trained, "--data", data, "--limit", "1", "--max-new-tokens", "2"]
    assert cli.main(argv + ["--baseline", "base", "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["prompt_template"] == TEMPLATE
    assert report["tasks"]["reverse"]["num_examples"] == 1
    tok = load_tokenizer(trained)
    first = json.loads(open(f"{data}/reverse/test.jsonl").readline())["prompt"]
    assert [PromptFormatter(tok, TEMPLATE).ids(first, add_bos=False)] in seen  # exactly training's ids


def test_generate_rejects_an_unknown_template(dirs, capsys):
    _, _, trained = dirs
    assert cli.main(["generate", "--model", trained, "--prompt", "hi", "--prompt-template", "nope"]) == 2
    assert "--prompt-template 'nope'" in capsys.readouterr().err
