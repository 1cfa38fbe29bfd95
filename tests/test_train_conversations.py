"""Conversation rows (``composite_fraction``): the ``turns`` protocol's exact tokens, each token's own turn's task
as its gate target, a pure function of (seed, step), and an objective that scores gates per token."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_chat_templates import SMOLLM2, _tok

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.data.tasks import Example
from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval.composite import turns_prompt_ids
from meteora_jax.model.llama import MeteoraLlama
from meteora_jax.params import GateParam
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.conversations import conversation_groups, join_turns, turn_tail_text
from meteora_jax.train.data import PromptFormatter, encode_examples, make_batch
from meteora_jax.train.objective import objective

NAMES = ("alpha", "beta", "gamma")


def _encoded(template, per_task=3, max_len=4096):
    tok = _tok(SMOLLM2, "<s>")
    examples = {
        name: [Example(name, f"{name} question {i}?", f"{name} answer {i}") for i in range(per_task)]
        for name in NAMES
    }
    cfg = TrainConfig(prompt_template=template, composite_fraction=1.0)
    return tok, examples, encode_examples(examples, tok, cfg, NAMES, max_len=max_len)


@pytest.mark.parametrize("template", ["chat_no_system", "chat"])
def test_conversation_row_is_the_turns_protocols_conversation(template):
    # three examples of three tasks as one row: the token ids eval.composite's `turns` protocol builds for the
    # same questions with the same answers, then the last answer and EOS; every token's target is its turn's
    tok, examples, data = _encoded(template)
    group = (0, 4, 8)  # alpha 0, beta 1, gamma 2
    ids, task_t, resp_t = join_turns(data, group)
    q = [examples["alpha"][0], examples["beta"][1], examples["gamma"][2]]
    bos = PromptFormatter(tok, template).bos_ids()
    item = {"shots": [], "questions": q}
    want = turns_prompt_ids(tok, template, item, [q[0].response, q[1].response], bos)
    want += list(tok(q[2].response, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    assert ids.tolist() == want
    # turn k owns its user turn (from the previous answer's closing on) and its answer
    enc = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    bounds = [
        len(turns_prompt_ids(tok, template, item, [a.response for a in q[:k]], bos)) + enc(q[k].response)
        for k in (0, 1)
    ]
    assert task_t.tolist() == [0] * bounds[0] + [1] * (bounds[1] - bounds[0]) + [2] * (len(ids) - bounds[1])
    assert tok.decode(ids[resp_t == 1]) == "alpha answer 0beta answer 1gamma answer 2</s>"
    assert tok.decode(ids).count("<|im_start|>system") == (1 if template == "chat" else 0)


@pytest.mark.parametrize("template", ["chat_no_system", "chat", "meteora"])
def test_batched_encoding_is_the_per_example_encoding(template):
    # encode_examples tokenises each task's texts in one call (and renders chat_no_system's system head once);
    # the reference is one call per text, as PromptFormatter.ids and turn_tail_text give them
    tok, examples, data = _encoded(template, per_task=4)
    cfg = TrainConfig(prompt_template=template, composite_fraction=1.0)
    fmt, tail = PromptFormatter(tok, template), turn_tail_text(tok, template)
    enc = lambda text: list(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    flat = [ex for name in NAMES for ex in examples[name]]
    for i, ex in enumerate(flat):
        prompt = fmt.ids(ex.prompt, cfg.add_bos)
        assert data.ids[i].tolist() == prompt + enc(ex.response) + [tok.eos_token_id]
        assert data.prompt_len[i] == len(prompt)
        assert data.tail_ids[i].tolist() == enc(tail(ex.prompt))
    # a second tokenizer with another chat template gets its own system head, not the first one's
    other = _tok(SMOLLM2.replace("<|im_start|>", "<|im_begin|>"), "<s>")
    assert PromptFormatter(other, template)("q?") != fmt("q?") or template == "meteora"


def test_a_stale_cached_system_head_is_rendered_afresh():
    # a template whose head changes under the same template string (one that writes today's date) must not
    # leave a cached head that no longer prefixes the conversation: it is rendered again, not an error
    from meteora_jax.train import data as D

    tok = _tok(SMOLLM2, "<s>")
    want = D.render_chat(tok, [{"role": "user", "content": "q?"}], "chat_no_system")
    D._HEADS[tok] = (tok.chat_template, "a head from yesterday")
    assert D.render_chat(tok, [{"role": "user", "content": "q?"}], "chat_no_system") == want
    assert D._HEADS[tok][1] != "a head from yesterday"


def test_groups_are_distinct_tasks_that_fit_and_a_pure_function_of_the_step():
    _, _, data = _encoded("chat_no_system")
    idx = np.arange(len(data))
    kw = dict(seed=3, max_turns=3)
    assert conversation_groups(data, 5, idx, fraction=0.0, **kw) == [(int(i),) for i in idx]
    groups = conversation_groups(data, 5, idx, fraction=1.0, **kw)
    assert groups == conversation_groups(data, 5, idx, fraction=1.0, **kw)
    assert groups != conversation_groups(data, 6, idx, fraction=1.0, **kw)
    assert [g[0] for g in groups] == idx.tolist()
    assert {len(g) for g in groups} == {2, 3}
    for g in groups:
        assert len({int(data.task[j]) for j in g}) == len(g)
    # a row that would not fit max_len stays a single turn
    _, _, short = _encoded("chat_no_system", max_len=len(data.ids[0]) + 1)
    assert {len(g) for g in conversation_groups(short, 5, idx, fraction=1.0, **kw)} == {1}


def test_a_template_that_does_not_extend_its_first_turn_fails_clearly():
    tok = _tok("{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}", "<s>")
    with pytest.raises(MeteoraInputError, match="composite_fraction.*chat_no_system"):
        turn_tail_text(tok, "chat")("Q?")
    with pytest.raises(MeteoraInputError, match="composite_fraction"):
        TrainConfig(composite_fraction=1.5)


@pytest.mark.parametrize("response_only", [False, True])
def test_batch_and_objective_score_each_tokens_own_turn(rng, response_only):
    tok, _, data = _encoded("chat_no_system")
    groups = [(0, 4), (8,), (3, 8, 1)]
    batch = make_batch(
        data, [g[0] for g in groups], pad_id=0, buckets=(512,), response_only=response_only, groups=groups
    )
    assert batch.task_bl is not None and batch.task_b.tolist() == [0, 2, 1]
    for r, g in enumerate(groups):
        ids, task_t, resp_t = join_turns(data, g)
        n = len(ids)
        assert batch.tokens_bl[r, :n].tolist() == ids.tolist() and batch.mask_bl[r].sum() == n
        assert batch.task_bl[r, :n].tolist() == task_t.tolist()
        want_w = resp_t[1:] if response_only else np.ones(n - 1)
        assert (
            batch.lm_weight_bl[r, : n - 1].tolist() == want_w.tolist()
            and batch.lm_weight_bl[r, n - 1 :].sum() == 0
        )

    if response_only:
        return  # the objective reads the LM weights checked above; its gate part is the same either way
    model = MeteoraLlama(
        ModelConfig.tiny(vocab_size=len(tok)),
        MoEConfig(expert_names=NAMES, rank=4, top_k=2),
        rngs=nnx.Rngs(1),
    )
    # gates of ~0.02 give near-uniform routing, where every target scores about log 3: make them decisive
    nnx.update(model, jax.tree.map(lambda g: g * 100.0, nnx.state(model, GateParam)))
    arrays = batch.as_dict()
    routing = model.routing_options()
    _, m = objective(model, arrays, routing, gate_loss_weight=50.0)
    # float64 NumPy gate CE with the per-token targets
    out = model.forward(
        arrays["tokens_bl"], routing=routing, attention_mask=arrays["mask_bl"], return_routing=True
    )
    logits = np.stack(
        [np.asarray(r["gate_logits"], np.float64) for r in out.routing if r["gate_logits"] is not None]
    )
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    valid_t = arrays["mask_bl"].reshape(-1)

    def gate_ce(task_t):
        ce = -np.take_along_axis(logp, task_t[None, :, None], axis=-1)[..., 0]
        return (ce * valid_t).sum() / (logits.shape[0] * valid_t.sum())

    want = gate_ce(arrays["task_bl"].reshape(-1))
    assert float(m["gate_ce"]) == pytest.approx(want, rel=1e-5)
    # without task_bl the row's task is every token's target: a value the check above tells apart
    row = gate_ce(np.repeat(arrays["task_b"], arrays["tokens_bl"].shape[1]))
    assert abs(row - want) > 1e-3 * want
    arrays.pop("task_bl")
    assert float(objective(model, arrays, routing, gate_loss_weight=50.0)[1]["gate_ce"]) == pytest.approx(
        row, rel=1e-5
    )
    jax.clear_caches()


def test_train_gates_with_conversation_rows(tmp_path):
    # the loop end to end: conversation rows (most of them multi-turn here) train, log and evaluate
    import json
    import os

    from meteora_jax.testing.synthetic_tasks import make_tiny_meteora_dir, write_tasks
    from meteora_jax.tokenizer import load_tokenizer
    from meteora_jax.train.config import load_config
    from meteora_jax.train.data import batch_indices, load_task_data
    from meteora_jax.train.loop import train_gates

    tasks = ("upper", "reverse", "length")
    model = make_tiny_meteora_dir(tmp_path / "model", tasks, max_positions=128)
    data = write_tasks(tmp_path / "data", tasks, n_train=8, n_test=2)
    sets = ["steps=3", "batch_size=4", "max_seq_len=128", "length_buckets=[128]", "progress=false"]
    cfg = load_config(None, [*sets, "composite_fraction=1.0", "log_every=1"])
    td = load_task_data(data, load_tokenizer(model), cfg, tasks, context_len=128).train
    turns = [
        len(g)
        for s in range(3)
        for g in conversation_groups(td, s, batch_indices(td, s, cfg), seed=0, fraction=1.0, max_turns=3)
    ]
    assert min(turns) >= 2  # every row is a conversation: two turns of ~38 tokens fit 128
    result = train_gates(model, data, tmp_path / "out", cfg, log=lambda s: None)
    assert result.final_step == 3 and result.held_out
    lines = [json.loads(x) for x in open(os.path.join(result.work_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(np.isfinite(x["gate_ce"]) for x in lines)


def test_turn_spans_locate_each_turn_of_a_turns_conversation():
    # eval.composite.turn_spans on the `turns` conversation with one worked shot: each span holds its question
    # from `start` to `cue` and exactly its answer from `cue` to `end`; the last turn's answer is open
    from meteora_jax.eval.composite import turn_spans
    from meteora_jax.study.report import turn_routing_lines

    tok, examples, _ = _encoded("chat_no_system")
    shot = [examples[n][0] for n in NAMES]
    questions = [examples[n][1] for n in NAMES]
    item = {"shots": [(shot, shot)], "questions": questions}
    answers = [q.response for q in questions[:2]]
    ids = turns_prompt_ids(tok, "chat_no_system", item, answers, [])
    spans = turn_spans(tok, "chat_no_system", item, answers, [])
    assert [s["task"] for s in spans] == [*NAMES, *NAMES]
    for s, q in zip(spans, [*shot, *questions]):
        assert q.prompt in tok.decode(ids[s["start"] : s["cue"]])
        if s["end"] is not None:
            assert tok.decode(ids[s["cue"] : s["end"]]) == q.response
    assert spans[-1]["end"] is None and spans[-1]["cue"] == len(ids) and spans[0]["start"] == 0
    # the report's table: every (layer, token) of turn 2 routed to its task, nothing else
    top1 = np.full((2, len(ids) + 3), 0)
    top1[:, spans[1]["start"] : spans[1]["end"]] = 1
    lines = turn_routing_lines({"top1_lt": top1.tolist(), "experts": list(NAMES), "turns": spans})
    rows = [line.split(" | ") for line in lines if line.startswith(("| 2 |", "| 6 |"))]
    assert rows[0][3] == "100%" and rows[0][5].startswith("100%")
    assert rows[1][3] == "0%" and rows[1][4] == "3"  # turn 6, the open one: its answer is the 3 traced tokens
    assert turn_routing_lines(None) == [] and turn_routing_lines({"top1_lt": [], "experts": []}) == []
