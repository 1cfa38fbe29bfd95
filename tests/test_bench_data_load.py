"""``scripts/bench_data_load.py``: batched vs per-example tokenisation of a study work dir, checked token for
token; a work dir without its data and base steps is a clear error and writes nothing."""

from __future__ import annotations

import json

import pytest
from script_loader import load_script

from meteora_jax.errors import MeteoraInputError


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_data_load")


def test_missing_work_dir_is_a_clear_error_and_writes_nothing(bench, tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(MeteoraInputError, match=f"{tmp_path / 'nowhere'}.*--until base"):
        bench.main(["--work-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_both_paths_give_the_same_tokens(bench, tmp_path):
    from test_chat_templates import SMOLLM2, _tok

    from meteora_jax.testing.synthetic_tasks import write_tasks

    # a tokenizer with SmolLM2's chat template (the study's chat_no_system renders through it)
    _tok(SMOLLM2, "<s>").save_pretrained(tmp_path / "work" / "base" / "hf")
    write_tasks(tmp_path / "work" / "data", ("upper", "reverse"), n_train=6, n_test=2)
    out = tmp_path / "data_load.json"
    assert bench.main(["--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["identical"] is True and res["examples"] == 12 and res["composite_fraction"] > 0
    assert res["prompt_template"] == "chat_no_system"
