"""An OpenAI-compatible HTTP server for one MeteoRA model (standard library only).

``App`` holds the model's ``Sampler``, how prompts are encoded, and the ``Batcher``; ``make_server`` binds it
to an address. Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``"stream": true`` answers as server-sent events, ending in ``data: [DONE]``).
Prompts are formatted as ``generate`` formats them: the prompt template that ``train-gate`` recorded in the
model directory (``--prompt-template``), so the gates see the format they were trained on.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meteora_jax.errors import MeteoraInputError
from meteora_jax.generate.sampler import Sampler
from meteora_jax.model.llama import MeteoraLlama
from meteora_jax.serve.batcher import Batcher, Job
from meteora_jax.serve.requests import (
    Choice,
    ParsedRequest,
    PromptContext,
    RequestError,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    response_body,
    stream_chunk,
)

MAX_BODY_BYTES = 8 << 20


class App:
    """The served model. ``template`` / ``add_bos``: as ``train.data.prompt_format_for`` returns them."""

    def __init__(
        self,
        model: MeteoraLlama,
        tokenizer: object,
        *,
        model_name: str,
        template: str | None = None,
        add_bos: bool = True,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        max_tokens_limit: int | None = None,
        default_max_tokens: int = 128,
        default_temperature: float = 0.0,
    ):
        from meteora_jax.train.data import PromptFormatter

        self.model = model
        self.tokenizer = tokenizer
        self.sampler = Sampler(model, tokenizer)
        self.fmt = PromptFormatter(tokenizer, template) if template is not None else None
        self.add_bos = add_bos
        self._tok_lock = threading.Lock()
        context = model.config.max_position_embeddings
        self.ctx = PromptContext(
            model_name=model_name,
            encode_text=self._encode_text,
            encode_chat=self._encode_chat,
            routing_options=model.routing_options,
            max_tokens_limit=min(max_tokens_limit or context, context),
            default_max_tokens=default_max_tokens,
            default_temperature=default_temperature,
        )
        self.batcher = Batcher(self._run_batch, max_batch=max_batch, wait_s=batch_wait_s)

    # ------------------------------------------------------------------ prompts -> ids (handler threads)
    def _encode_text(self, prompt: str) -> list[int]:
        with self._tok_lock:
            if self.fmt is not None:
                return self.fmt.ids(prompt, self.add_bos)
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from meteora_jax.eval.composite import render_turns
        from meteora_jax.train.config import CHAT_TEMPLATES

        template = self.fmt.template if self.fmt is not None else None
        has_chat = bool(getattr(self.tokenizer, "chat_template", None))
        if template is None:
            if not has_chat:
                raise MeteoraInputError(
                    "this model records no prompt template and its tokenizer has no chat template, so a "
                    "conversation has no format; use /v1/completions, or start the server with --prompt-template"
                )
            template = "chat"
        if template == "chat_no_system" and any(m["role"] == "system" for m in messages):
            template = "chat"  # the caller's own system turn takes the place of the template's default one
        if template not in CHAT_TEMPLATES:
            messages = _fold_system_turns(messages)  # a {prompt} format has no system turn: prefix the user's
        with self._tok_lock:
            text = render_turns(self.tokenizer, messages, template)
            bos = (
                self.fmt.bos_ids(self.add_bos)
                if self.fmt is not None and template not in CHAT_TEMPLATES
                else []
            )
            return bos + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def parse(self, path: str, body: object) -> ParsedRequest:
        parsed = (parse_chat if path == "/v1/chat/completions" else parse_completion)(body, self.ctx)
        for i, ids in enumerate(parsed.prompts):
            try:
                self.sampler.encode([ids])  # vocabulary and context checks, before the job can join a batch
            except MeteoraInputError as e:
                which = f"prompt {i}" if len(parsed.prompts) > 1 else "the prompt"
                raise RequestError(str(e).replace("prompt 0", which, 1)) from None
        return parsed

    # ------------------------------------------------------------------ the worker
    def _run_batch(self, jobs: list[Job]) -> None:
        s = jobs[0].settings
        stream = (lambda row, text: jobs[row].events.put(("delta", text))) if s.stream else None
        result = self.sampler.generate(
            [job.prompt_ids for job in jobs],
            max_new_tokens=s.max_new_tokens,
            sampling=s.sampling,
            routing=s.routing,
            seed=s.seed,
            stop=list(s.stop),
            return_routing=s.return_routing,
            stream=stream,
        )
        for i, job in enumerate(jobs):
            routing = None
            if result.routing is not None:
                routing = {
                    "expert_names": list(result.routing.expert_names),
                    "num_prompt_tokens": result.routing.num_prompt_tokens[i],
                    "top1": result.routing.top1_layer_token(i).T.tolist(),  # [token][layer]
                }
            job.events.put(
                (
                    "done",
                    Choice(
                        text=result.texts[i],
                        num_prompt_tokens=len(job.prompt_ids),
                        num_tokens=len(result.token_ids[i]),
                        finish_reason=result.finish_reasons[i],
                        routing=routing,
                    ),
                )
            )

    def models_body(self) -> dict:
        cfg = self.model.moe_config
        return {
            "object": "list",
            "data": [
                {
                    "id": self.ctx.model_name,
                    "object": "model",
                    "owned_by": "meteora-jax",
                    "experts": list(self.model.expert_names),
                    "routing_top_k": cfg.top_k,
                    "gate_temperature": cfg.temperature,
                    "max_context": self.model.config.max_position_embeddings,
                }
            ],
        }

    def warmup(self) -> None:
        """Compiles the smallest prompt / new-token bucket once, so the first request does not wait for it."""
        self.sampler.generate([[self.sampler.pad_id or 1]], max_new_tokens=2)

    def close(self) -> None:
        self.batcher.close()


def _fold_system_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    out, pending = [], []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
        elif m["role"] == "user" and pending:
            out.append({"role": "user", "content": "\n\n".join([*pending, m["content"]])})
            pending = []
        else:
            out.append(m)
    return out


class _Handler(BaseHTTPRequestHandler):
    server_version = "meteora-jax"
    server: MeteoraServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401 (the base class's names)
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, error_body(str(e), e.kind))

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, self.server.app.models_body())
        else:
            self._send_error(RequestError(f"no such endpoint: GET {path}.", 404, "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(
                    f"no such endpoint: POST {path}; use /v1/completions or /v1/chat/completions.",
                    404,
                    "not_found",
                )
            parsed = self.server.app.parse(path, self._read_json())
        except RequestError as e:
            self._send_error(e)
            return
        jobs = [Job(ids, parsed.settings) for ids in parsed.prompts]
        for job in jobs:
            self.server.app.batcher.submit(job)
        request_id = new_id(parsed.chat)
        name = self.server.app.ctx.model_name
        if parsed.settings.stream:
            self._stream(jobs, parsed.chat, name, request_id)
            return
        choices = []
        for job in jobs:
            kind, value = job.events.get()  # "done" or "error": a batch without streaming sends no deltas
            if kind == "error":
                self._send_failure(value)
                return
            choices.append(value)
        self._send_json(200, response_body(choices, chat=parsed.chat, model=name, request_id=request_id))

    def _read_json(self) -> object:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a Content-Length header is required.", 411)
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is over {MAX_BODY_BYTES >> 20} MiB.", 413)
        try:
            return json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not JSON ({e}).") from None

    def _send_failure(self, e: BaseException) -> None:
        if isinstance(e, MeteoraInputError):
            self._send_error(RequestError(str(e)))
        else:
            self._send_json(500, error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))

    def _stream(self, jobs: list[Job], chat: bool, name: str, request_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        chunk = functools.partial(stream_chunk, chat=chat, model=name, request_id=request_id)

        def event(obj: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            for index, job in enumerate(jobs):
                if chat:
                    event(chunk(index, text=None, finish=None, role=True))
                while True:
                    kind, value = job.events.get()
                    if kind == "delta":
                        event(chunk(index, text=value, finish=None))
                        continue
                    if kind == "error":
                        status = 400 if isinstance(value, MeteoraInputError) else 500
                        event(error_body(f"generation failed ({status}): {value}", "server_error"))
                    else:
                        event(chunk(index, text=None, finish=value))
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; its jobs finish with their batch and nobody reads them


class MeteoraServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App, *, quiet: bool = False):
        self.app = app
        self.quiet = quiet
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = False) -> MeteoraServer:
    """A server for ``app`` bound to (host, port); port 0 picks a free one (see ``.url``). Call
    ``serve_forever()`` (e.g. in a thread), then ``shutdown()`` and ``server_close()``."""
    try:
        return MeteoraServer((host, port), app, quiet=quiet)
    except OSError as e:
        app.close()
        raise MeteoraInputError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port."
        ) from None


def model_name_for(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir)) or "meteora"
