"""Bad input to gate training: each a clear MeteoraInputError before anything is written."""

import json
import os

import pytest

from meteora_jax import cli
from meteora_jax.errors import MeteoraInputError
from meteora_jax.testing.synthetic_tasks import make_tiny_meteora_dir, write_tasks
from meteora_jax.tokenizer import load_tokenizer
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.data import load_task_data
from meteora_jax.train.loop import train_gates

TASKS = ("upper", "reverse")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_meteora_dir(tmp_path_factory.mktemp("m") / "model", TASKS, max_positions=64)


def _data(tmp_path):
    return write_tasks(tmp_path / "data", TASKS, n_train=8, n_test=2)


def _expect_nothing_written(tmp_path, fn, match):
    out = tmp_path / "out"
    with pytest.raises(MeteoraInputError, match=match):
        fn(out)
    assert not out.exists() and not (tmp_path / "out.train").exists()


def test_empty_task_folder(tmp_path, model_dir):
    data = _data(tmp_path)
    os.makedirs(os.path.join(data, "aaa_empty"))
    _expect_nothing_written(
        tmp_path,
        lambda out: train_gates(model_dir, data, out, TrainConfig.tiny()),
        r"aaa_empty holds no \.jsonl",
    )


def test_task_without_expert(tmp_path, model_dir):
    data = write_tasks(tmp_path / "data", (*TASKS, "spell"), n_train=8, n_test=2)
    _expect_nothing_written(
        tmp_path,
        lambda out: train_gates(model_dir, data, out, TrainConfig.tiny()),
        r"\['spell'\] match no expert",
    )


def test_malformed_jsonl_line_names_file_and_line(tmp_path, model_dir):
    data = _data(tmp_path)
    path = os.path.join(data, "reverse", "train.jsonl")
    lines = open(path).read().splitlines()
    lines[2] = '{"prompt": "x", "response": '
    open(path, "w").write("\n".join(lines) + "\n")
    _expect_nothing_written(
        tmp_path,
        lambda out: train_gates(model_dir, data, out, TrainConfig.tiny()),
        r"reverse/train\.jsonl, line 3 is not valid JSON",
    )


def test_overlong_sequence_refused_or_truncated_with_count(tmp_path, model_dir):
    data = _data(tmp_path)
    with open(os.path.join(data, "upper", "train.jsonl"), "a") as f:
        f.write(json.dumps({"prompt": "y" * 100, "response": "Y" * 100}) + "\n")
    _expect_nothing_written(
        tmp_path,
        lambda out: train_gates(model_dir, data, out, TrainConfig.tiny(overlong="error", max_seq_len=512)),
        r"upper: example 9 is 2\d\d tokens, longer than the context of 64",
    )
    tok = load_tokenizer(model_dir)
    td = load_task_data(data, tok, TrainConfig.tiny(max_seq_len=512), TASKS, context_len=64)
    assert td.train.truncated == 1 and max(len(s) for s in td.train.ids) == 64
    assert any("truncated 1 training" in n for n in td.notes)


def test_unknown_config_key_via_cli(tmp_path, model_dir, capsys):
    data = _data(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(
        ["train-gate", "--model", model_dir, "--data", data, "--out", str(out), "--set", "gate_los=1"]
    )
    assert rc == 2
    assert "unknown key 'gate_los'" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.train").exists()
