"""`meteora-jax serve`: the OpenAI-style HTTP server on a tiny model, checked against ``mj.generate``.

Every answer the server gives is compared with ``mj.generate`` on the same token ids, run directly: alone,
batched with other requests, streamed, and as a chat turn (whose ids the test builds by hand from the
template, not through the server's renderer).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_generate_fixtures import tiny_model_dir

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.generate import GenerationResult
from meteora_jax.generate.sampling import SamplingParams
from meteora_jax.model.gate import RoutingOptions
from meteora_jax.serve import App, make_server
from meteora_jax.serve.batcher import Batcher, Job
from meteora_jax.serve.requests import RequestError, Settings
from meteora_jax.tokenizer import load_tokenizer

TEMPLATE = "[INST] {prompt} [/INST]\n"  # = PROMPT_TEMPLATES["meteora"], spelled out as the test's own copy


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(app, url, model, tokenizer): a server on a free port, prompts in MeteoRA's [INST] format."""
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("serve") / "model", seed=3)
    model = mj.load(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    app = App(model, tok, model_name="tiny", template="meteora", max_batch=4, batch_wait_s=0.0)
    server = make_server(app, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, server.url, model, tok
    server.shutdown()
    server.server_close()


def _ids(tok, prompt: str) -> list[int]:
    return [tok.bos_token_id] + list(
        tok(TEMPLATE.replace("{prompt}", prompt), add_special_tokens=False)["input_ids"]
    )


def _direct(model, tok, ids, **kw) -> GenerationResult:
    return mj.generate(model, [ids], tokenizer=tok, **kw)


def _post(url: str, path: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _events(url: str, path: str, body: dict) -> list:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "x"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = [ln.decode().strip() for ln in r.read().splitlines() if ln.strip()]
    assert all(ln.startswith("data: ") for ln in lines)
    return [ln[6:] if ln == "data: [DONE]" else json.loads(ln[6:]) for ln in lines]


def test_completion_is_generate(served):
    app, url, model, tok = served
    status, body = _post(url, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 6})
    assert status == 200, body
    want = _direct(model, tok, _ids(tok, "hello"), max_new_tokens=6)
    choice = body["choices"][0]
    assert choice["text"] == want.texts[0]
    assert choice["finish_reason"] == ("length" if want.finish_reasons[0] == "length" else "stop")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {
        "prompt_tokens": len(_ids(tok, "hello")),
        "completion_tokens": len(want.token_ids[0]),
        "total_tokens": len(_ids(tok, "hello")) + len(want.token_ids[0]),
    }


def _post_in_thread(url: str, path: str, body: dict, out: list, i: int) -> threading.Thread:
    def go() -> None:
        out[i] = _post(url, path, body)

    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_queued(app: App, n: int) -> None:
    deadline = time.monotonic() + 60
    while app.batcher.pending() < n:
        assert time.monotonic() < deadline, "requests never reached the queue"
        time.sleep(0.01)


def test_concurrent_greedy_requests_share_one_batch_and_answer_as_alone(served):
    app, url, model, tok = served
    prompts = ["a", "bcd efg", "the longest prompt of the three"]
    other = {"prompt": "a", "max_tokens": 5, "force_expert": "beta"}  # other settings: a batch of its own
    out = [None] * 4
    before = app.batcher.stats.batches
    with app.batcher.paused():
        threads = [
            _post_in_thread(url, "/v1/completions", {"prompt": p, "max_tokens": 5}, out, i)
            for i, p in enumerate(prompts)
        ]
        threads.append(_post_in_thread(url, "/v1/completions", other, out, 3))
        _wait_queued(app, 4)
    for t in threads:
        t.join()
    assert app.batcher.stats.batches - before == 2
    assert app.batcher.stats.largest == 3
    for i, p in enumerate(prompts):
        assert out[i][0] == 200, out[i]
        assert out[i][1]["choices"][0]["text"] == _direct(model, tok, _ids(tok, p), max_new_tokens=5).texts[0]
    forced = _direct(model, tok, _ids(tok, "a"), max_new_tokens=5, force_expert="beta").texts[0]
    assert out[3][1]["choices"][0]["text"] == forced


def test_sampled_requests_run_alone_and_are_reproducible(served):
    app, url, model, tok = served
    body = {"prompt": "xyz", "max_tokens": 8, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    out = [None] * 2
    before = app.batcher.stats.batches
    with app.batcher.paused():
        threads = [_post_in_thread(url, "/v1/completions", body, out, i) for i in range(2)]
        _wait_queued(app, 2)
    for t in threads:
        t.join()
    assert app.batcher.stats.batches - before == 2
    want = _direct(model, tok, _ids(tok, "xyz"), max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7).texts[
        0
    ]
    assert out[0][1]["choices"][0]["text"] == out[1][1]["choices"][0]["text"] == want


def test_prompt_list_and_token_ids(served):
    _, url, model, tok = served
    ids = _ids(tok, "q")
    status, body = _post(url, "/v1/completions", {"prompt": ["q", ids], "max_tokens": 4})
    assert status == 200, body
    want = _direct(model, tok, ids, max_new_tokens=4).texts[0]
    assert [c["text"] for c in body["choices"]] == [want, want]  # a token-id prompt is taken as is
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_stream_gives_the_same_text(served):
    _, url, model, tok = served
    events = _events(url, "/v1/completions", {"prompt": "stream me", "max_tokens": 12, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == _direct(model, tok, _ids(tok, "stream me"), max_new_tokens=12).texts[0]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_folds_the_system_turn_into_the_template(served):
    _, url, model, tok = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    status, body = _post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 6})
    assert status == 200, body
    want = _direct(model, tok, _ids(tok, "be brief\n\nhi there"), max_new_tokens=6).texts[0]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["object"] == "chat.completion"
    # a second turn: the first answer follows its [INST] block, then a blank line (render_turns' layout)
    turns = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "two"},
    ]
    status, body = _post(url, "/v1/chat/completions", {"messages": turns, "max_completion_tokens": 4})
    text = TEMPLATE.replace("{prompt}", "one") + " 1\n\n" + TEMPLATE.replace("{prompt}", "two")
    ids = [tok.bos_token_id] + list(tok(text, add_special_tokens=False)["input_ids"])
    assert body["choices"][0]["message"]["content"] == _direct(model, tok, ids, max_new_tokens=4).texts[0]
    events = _events(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "stream": True})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want


def test_routing_knobs_per_request(served):
    _, url, model, tok = served
    body = {"prompt": "route", "max_tokens": 3, "force_expert": "beta", "return_routing": True}
    status, out = _post(url, "/v1/completions", body)
    assert status == 200, out
    routing = out["choices"][0]["routing"]
    assert routing["expert_names"] == ["alpha", "beta", "gamma"]
    assert routing["num_prompt_tokens"] == len(_ids(tok, "route"))
    assert {e for token in routing["top1"][:-1] for e in token} == {1}
    base = _post(url, "/v1/completions", {"prompt": "route", "max_tokens": 3, "no_experts": True})[1]
    assert (
        base["choices"][0]["text"]
        == _direct(model, tok, _ids(tok, "route"), max_new_tokens=3, no_experts=True).texts[0]
    )


def test_models_and_health(served):
    _, url, _, _ = served
    with urllib.request.urlopen(url + "/v1/models") as r:
        body = json.loads(r.read())
    assert body["data"][0]["id"] == "tiny"
    assert body["data"][0]["experts"] == ["alpha", "beta", "gamma"]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


@pytest.mark.parametrize(
    ("path", "body", "status", "match"),
    [
        ("/v1/completions", None, 400, "not JSON"),
        ("/v1/completions", [1, 2], 400, "JSON object"),
        ("/v1/completions", {}, 400, "'prompt' is required"),
        ("/v1/completions", {"prompt": "   "}, 400, "empty"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "'max_tokens' must be int"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "over this server's limit"),
        ("/v1/completions", {"prompt": "hi", "stream": 1}, 400, "'stream' must be bool"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0"),
        ("/v1/completions", {"prompt": "hi", "routing_top_k": 4}, 400, "top_k=4"),
        ("/v1/completions", {"prompt": "hi", "force_expert": "delta"}, 400, "not an expert"),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "'stop'"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, "'logprobs' is not supported"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "'n' is not supported"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "serves 'tiny'"),
        ("/v1/completions", {"prompt": "x" * 400}, 400, "context"),
        ("/v1/completions", {"prompt": [1, 5000]}, 400, "vocabulary"),
        ("/v1/chat/completions", {"messages": []}, 400, "'messages' is required"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role system, user"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 3}]},
            400,
            "content must be a string",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
        ("/v1/nope", {}, 404, "no such endpoint"),
    ],
)
def test_bad_requests_get_a_clear_error(served, path, body, status, match):
    _, url, _, _ = served
    got, out = _post(url, path, body, raw=b"{not json" if body is None else None)
    assert got == status, out
    assert match in out["error"]["message"]


def test_oversized_body_is_refused_before_reading(served):
    _, url, _, _ = served
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "MiB" in json.loads(r.read())["error"]["message"]


def test_a_failed_batch_is_a_500_and_the_server_lives_on(served, monkeypatch):
    app, url, _, _ = served
    real = app.sampler.generate
    calls = []

    def fail_once(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(*a, **kw)

    monkeypatch.setattr(app.sampler, "generate", fail_once)
    status, body = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 500 and "device lost" in body["error"]["message"]
    assert _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_the_openai_client_works_unchanged(served):
    """The real ``openai`` client: models, chat (MeteoRA's knobs in ``extra_body``), streaming, completions,
    and a refused option surfacing as its BadRequestError."""
    openai = pytest.importorskip("openai")
    _, url, model, tok = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, extra_body={"force_expert": 2}
    )
    want = _direct(model, tok, _ids(tok, "hi there"), max_new_tokens=5, force_expert=2)
    assert r.choices[0].message.content == want.texts[0]
    assert r.usage.completion_tokens == len(want.token_ids[0])
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == _direct(model, tok, _ids(tok, "hi there"), max_new_tokens=5).texts[0]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=4)
    assert r.choices[0].text == _direct(model, tok, _ids(tok, "abc"), max_new_tokens=4).texts[0]
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny", prompt="abc", max_tokens=4, presence_penalty=0.5)


# ------------------------------------------------------------------------------------- the batcher alone
def _settings(**kw) -> Settings:
    base = dict(
        max_new_tokens=4,
        sampling=SamplingParams(),
        routing=RoutingOptions(),
        seed=0,
        stop=(),
        return_routing=False,
        stream=False,
    )
    return Settings(**{**base, **kw})


def test_batcher_groups_equal_settings_up_to_max_batch_in_order():
    seen = []
    b = Batcher(lambda jobs: seen.append([j.prompt_ids[0] for j in jobs]), max_batch=2, wait_s=0.0)
    other = _settings(max_new_tokens=5)
    with b.paused():
        for i, s in enumerate([_settings(), other, _settings(), _settings(), other]):
            b.submit(Job([i], s))
        assert b.pending() == 5
    b.close(timeout=10)
    assert seen == [[0, 2], [1, 4], [3]]
    assert (b.stats.batches, b.stats.jobs, b.stats.largest) == (3, 5, 2)


def test_batcher_reports_a_failure_to_every_job_of_the_batch():
    def boom(jobs):  # noqa: ANN001, ANN202
        raise ValueError("bad")

    b = Batcher(boom, max_batch=4, wait_s=0.0)
    jobs = [Job([i], _settings()) for i in range(2)]
    with b.paused():
        for j in jobs:
            b.submit(j)
    for j in jobs:
        kind, value = j.events.get(timeout=10)
        assert kind == "error" and str(value) == "bad"
    b.close(timeout=10)
    with pytest.raises(RuntimeError, match="shutting down"):
        b.submit(Job([0], _settings()))


# ------------------------------------------------------------------------------------- the command
def test_serve_command_bad_input(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    d = tiny_model_dir(tmp_path / "notok", with_tokenizer=False)
    assert main(["serve", "--model", d]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


# The CLI as `python -m meteora_jax.cli` runs it, with SIGINT handled (and unblocked) as at a terminal first: a
# shell starts a background command (`make test &`) with SIGINT ignored, and the server would inherit that.
_CLI_WITH_CTRL_C = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM]); "
    "from meteora_jax.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_command_end_to_end(tmp_path, stop):
    """The real command in its own process: it prints its URL, answers, and stops cleanly on Ctrl-C or SIGTERM
    (exit 0, "stopping")."""
    d = tiny_model_dir(tmp_path / "model", seed=3)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-c",
        _CLI_WITH_CTRL_C,
        "serve",
        "--model",
        d,
        "--port",
        "0",
        "--quiet",
        "--warmup",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if " at http://" in line:
                url = line.split(" at ")[1].split("/v1")[0]
        status, body = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "model": "model"})
        assert status == 200 and isinstance(body["choices"][0]["text"], str)
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=10)  # stderr is closed: the reader has queued every line
        rest = [lines.get_nowait() for _ in range(lines.qsize())]
        assert any(line.strip() == "stopping" for line in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _app_without_template(tmp_path, chat_template: str | None) -> tuple[App, object, object]:
    d = tiny_model_dir(tmp_path / "model", seed=5)
    tok = load_tokenizer(d)
    tok.chat_template = chat_template
    model = mj.load(d, dtype="float32")
    return App(model, tok, model_name="t", template=None, batch_wait_s=0.0), model, tok


def test_no_recorded_template_takes_prompts_as_given_and_chats_with_the_tokenizers_template(tmp_path):
    """A plain `convert` output records no prompt template: completions go in as given (with the tokenizer's
    special tokens, as `mj.generate` on a string does) and chat uses the tokenizer's own chat template."""
    app, model, tok = _app_without_template(tmp_path, CHAT_TEMPLATE)
    server = make_server(app, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = _post(server.url, "/v1/completions", {"prompt": "plain text", "max_tokens": 5})[1]
        assert (
            out["choices"][0]["text"]
            == mj.generate(model, "plain text", tokenizer=tok, max_new_tokens=5).texts[0]
        )
        messages = [{"role": "user", "content": "hey"}]
        out = _post(server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 5})[1]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        assert out["choices"][0]["message"]["content"] == _direct(model, tok, ids, max_new_tokens=5).texts[0]
    finally:
        server.shutdown()
        server.server_close()


def test_chat_without_any_template_is_refused(tmp_path):
    app, _, _ = _app_without_template(tmp_path, None)
    try:
        with pytest.raises(RequestError, match="no chat template"):
            app.parse("/v1/chat/completions", {"messages": [{"role": "user", "content": "hey"}]})
    finally:
        app.close()
