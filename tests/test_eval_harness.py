"""`meteora-jax eval` on a tiny model: every system scored per task, oracle = forced adapter, base = no experts,
routing accuracy teacher-forced, JSON + Markdown + PNG written; and the routing diagnostics on hand cases."""

import json

import numpy as np
import pytest
from test_generate_fixtures import tiny_model_dir

from meteora_jax.cli import main
from meteora_jax.eval.routing import switch_points, token_experts


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model_dir(root / "model", seed=4)
    for task in ("alpha", "winowhy"):
        (root / "data" / task).mkdir(parents=True)
        rows = [{"prompt": f"Q{i}: {task}?", "response": "yes" if i % 2 else "no"} for i in range(3)]
        (root / "data" / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, str(root / "data"), root


def test_eval_cli_writes_report(dirs):
    model, data, root = dirs
    out = root / "out"
    argv = [
        "eval",
        "--model",
        model,
        "--data",
        data,
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv + ["--baseline", "base", "--baseline", "oracle"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["systems"] == ["meteora", "base", "oracle"]
    alpha, wino = report["tasks"]["alpha"], report["tasks"]["winowhy"]
    assert alpha["num_examples"] == 2 and wino["metrics"] == ["exact_match"]
    assert wino["scores"]["oracle"] is None  # no expert named winowhy: no oracle for it
    assert set(alpha["scores"]["base"]) == {"exact_match"}
    ra = alpha["routing_accuracy"]
    assert 0.0 <= ra["overall"] <= 1.0 and len(ra["per_layer"]) == 2 and len(ra["per_projection"]) == 7
    assert "| alpha | exact_match | 2 |" in (out / "results.md").read_text()
    assert (out / "task_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_errors(dirs, capsys):
    model, data, _ = dirs
    assert main(["eval", "--model", model, "--data", data, "--tasks", "nope"]) == 2
    assert "Unknown task" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--data", data, "--baseline", "adapter:zeta"]) == 2
    assert "not an expert" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--data", data, "--lora-impl", "cuda_magic"]) == 2
    assert "unknown grouped_lora implementation" in capsys.readouterr().err


def test_switch_points_and_token_experts():
    assert switch_points(np.array([0, 0, 0, 1, 0, 0, 2, 2, 2, 2])) == [(0, 0), (6, 2)]
    top1_tlp = np.array([[[1, 1], [1, 0]], [[2, 2], [2, 2]], [[-1, -1], [-1, -1]]])
    assert token_experts(top1_tlp).tolist() == [1, 2, -1]


def test_teacher_forced_top1_with_prompt_matches_unpadded_forwards(dirs):
    """Batched, right-padded routing equals one unpadded forward per pair; ``include_prompt`` only prepends the
    prompt's rows (the response rows are the default result)."""
    import jax.numpy as jnp

    import meteora_jax as mj
    from meteora_jax.eval.routing import teacher_forced_top1

    model = mj.load(dirs[0], dtype="float32")
    gen = np.random.default_rng(7)
    vocab = model.config.vocab_size
    pairs = [
        (gen.integers(3, vocab, n).tolist(), gen.integers(3, vocab, m).tolist())
        for n, m in [(5, 3), (9, 1), (2, 6)]
    ]
    full = teacher_forced_top1(model, pairs, batch_size=2, include_prompt=True)
    resp = teacher_forced_top1(model, pairs, batch_size=2)
    layers = model.config.num_hidden_layers
    for (p, r), f, tail in zip(pairs, full, resp):
        out = model.forward(jnp.asarray([p + r]), return_routing=True)
        want = np.stack([np.asarray(e["expert_ids"][:, 0]) for e in out.routing], axis=-1)
        assert f.shape == (len(p) + len(r), layers, len(out.routing) // layers)
        np.testing.assert_array_equal(f.reshape(len(p) + len(r), -1), want)
        np.testing.assert_array_equal(f[len(p) :], tail)


def test_common_prefix_len():
    from meteora_jax.study.evaluate import common_prefix_len

    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 2
    assert common_prefix_len([[9], [1]]) == 0 and common_prefix_len([]) == 0
