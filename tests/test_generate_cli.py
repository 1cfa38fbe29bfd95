"""`meteora-jax generate` end to end on a tiny model directory: JSONL out, and one-paragraph errors (exit 2)."""

import json

import pytest
from test_generate_fixtures import tiny_model_dir

from meteora_jax.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", seed=3)


def test_prompts_file_to_jsonl(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n\n{"prompt": "a longer prompt"}\n')
    out = tmp_path / "out.jsonl"
    rc = main(
        ["generate", "--model", model_dir, "--prompts", str(prompts), "--out", str(out)]
        + ["--max-new-tokens", "4", "--return-routing", "--force-expert", "beta"]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "a longer prompt"]
    assert all(r["num_tokens"] <= 4 and isinstance(r["text"], str) for r in rows)
    assert rows[0]["expert_names"] == ["alpha", "beta", "gamma"]
    assert {e for tok in rows[0]["routing_top1"][:-1] for e in tok} == {1}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--prompt", "hi", "--top-k", "4"], "top_k=4"),
        (["--prompt", "hi", "--force-expert", "delta"], "not an expert"),
        (["--prompt", "   "], "empty"),
        (
            ["--prompt", "", "--prompt-template", "plain"],
            "--prompt is empty",
        ),  # a template adds text of its own
        (["--prompt", "x" * 400], "context"),
        (["--prompt", "hi", "--lora-impl", "cuda_magic"], "unknown grouped_lora implementation"),
    ],
)
def test_bad_input_exits_2(model_dir, extra, match, capsys):
    assert main(["generate", "--model", model_dir, *extra]) == 2
    assert match in capsys.readouterr().err


def test_model_dir_without_tokenizer(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "notok", with_tokenizer=False)
    assert main(["generate", "--model", d, "--prompt", "hi"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_missing_model_dir_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_lora_impl_picks_the_kernel_backend_at_run_time(model_dir, tmp_path):
    """``--lora-impl reference`` (plain JAX, float32) answers with the automatic backend's greedy text."""
    outs = {}
    for impl in ("auto", "reference"):
        out = tmp_path / f"{impl}.jsonl"
        extra = [] if impl == "auto" else ["--lora-impl", impl]
        args = ["generate", "--model", model_dir, "--prompt", "a longer prompt", "--out", str(out)]
        assert main([*args, "--max-new-tokens", "6", *extra]) == 0
        outs[impl] = json.loads(out.read_text())["text"]
    assert outs["reference"] == outs["auto"]


def test_attention_choices_are_the_models():
    from meteora_jax.generate.options import ATTENTION_CHOICES
    from meteora_jax.model.llama import ATTENTION_IMPLEMENTATIONS

    assert ATTENTION_CHOICES == ATTENTION_IMPLEMENTATIONS


@pytest.fixture
def restore_knobs():
    from meteora_jax import knobs

    saved = knobs.current()
    yield knobs
    knobs.set_knobs(saved)
    import jax

    jax.clear_caches()  # programs traced under these knobs must not serve later tests


def test_knobs_at_run_time(model_dir, tmp_path, capsys, monkeypatch, restore_knobs):
    """``--knob`` and ``METEORA_JAX_KNOBS`` set the trace-time knobs for the run (the packed path and
    transposed gates give the same greedy text); a bad one is a clear error, exit 2."""
    from meteora_jax.model import moe_lora

    knobs = restore_knobs
    served = []
    packed_forward = moe_lora.packed_forward

    def spy(*args):  # noqa: ANN002, ANN202
        out = packed_forward(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(moe_lora, "packed_forward", spy)
    base = ["generate", "--model", model_dir, "--prompt", "a longer prompt", "--max-new-tokens", "6"]
    assert (
        main([*base, "--out", str(tmp_path / "a.jsonl"), "--knob", "packed=inf", "--knob", "gate_rows=0"])
        == 0
    )
    assert not any(served)
    packed = ["--knob", "packed=2", "--knob", "gate_rows=1"]
    assert main([*base, "--out", str(tmp_path / "b.jsonl"), *packed]) == 0
    assert knobs.current()["packed"] == 2 and knobs.current()["gate_rows"] == 1
    assert any(served)  # the prompt's prefill went through the packs
    read = lambda name: json.loads((tmp_path / name).read_text())["text"]  # noqa: E731
    assert read("b.jsonl") == read("a.jsonl")
    monkeypatch.setenv("METEORA_JAX_KNOBS", "group_route=inf, argmax_topk=2")
    assert main([*base, "--out", str(tmp_path / "c.jsonl")]) == 0
    assert knobs.current()["group_route"] > 10**9 and knobs.current()["argmax_topk"] == 2
    assert read("c.jsonl") == read("a.jsonl")
    capsys.readouterr()
    assert main([*base, "--knob", "warp_speed=9"]) == 2
    assert "unknown knob 'warp_speed'" in capsys.readouterr().err
    monkeypatch.setenv("METEORA_JAX_KNOBS", "packed=two")
    assert main([*base]) == 2
    assert "$METEORA_JAX_KNOBS: knob packed='two'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("num_tokens", "template", "chat_template", "hinted"),
    [
        (0, None, "{{ x }}", True),
        (3, None, "{{ x }}", False),
        (0, "chat", "{{ x }}", False),
        (0, None, None, False),
    ],
)
def test_hint_when_a_raw_prompt_ends_at_once(num_tokens, template, chat_template, hinted, capsys):
    """An empty answer from a chat model given a raw prompt names the fix; nothing is said otherwise."""
    from types import SimpleNamespace

    from meteora_jax.generate.cli import _hint_if_ended_at_once

    rows = [{"num_tokens": num_tokens, "finish_reason": "eos"}, {"num_tokens": 4, "finish_reason": "length"}]
    _hint_if_ended_at_once(rows, SimpleNamespace(chat_template=chat_template), template)
    err = capsys.readouterr().err
    assert ("1 of 2 prompts ended at once" in err and "--prompt-template chat" in err) == hinted
    assert bool(err) == hinted


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "hi"}', '{"prompt": "  "}'], ":2: the prompt is empty"),
        (['{"prompt": "hi"}', "not json"], ":2: not a JSON line"),
        (['{"text": "hi"}'], ':1: each line must be an object with a string "prompt"'),
        (["", "  "], "no prompts in the file"),
    ],
)
def test_bad_prompts_file_names_the_line(model_dir, tmp_path, lines, match, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["generate", "--model", model_dir, "--prompts", str(path), "--prompt-template", "plain"]) == 2
    assert match in capsys.readouterr().err
