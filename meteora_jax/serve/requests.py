"""OpenAI-style request bodies -> validated generation jobs, and results -> response bodies.

Pure functions of (body, ``PromptContext``): no HTTP and no JAX here, so every rule is testable on its own.
A request that breaks a rule raises ``RequestError`` with the HTTP status and a message naming the field.

What a request may set (the OpenAI fields, plus MeteoRA's routing ones, which OpenAI clients pass through
``extra_body``): ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``, ``top_p``,
``top_k`` (token sampling; -1 or 0 = off), ``seed``, ``stop``, ``stream``, ``routing_top_k``,
``gate_temperature``, ``force_expert``, ``no_experts``, ``return_routing``. OpenAI options this server
does not implement (log-probabilities, penalties, ``n`` > 1, ...) are refused when set to anything but
their no-op value, rather than silently ignored; unknown fields are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from meteora_jax.errors import MeteoraInputError
from meteora_jax.generate.sampling import SamplingParams
from meteora_jax.model.gate import RoutingOptions

# option -> its no-op values: anything else is refused (400) instead of being ignored
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, the message names the field and the fix."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that shapes a generation besides its prompt. Jobs share a batch only when these are equal
    (hashable), so batching never changes what a request gets."""

    max_new_tokens: int
    sampling: SamplingParams
    routing: RoutingOptions
    seed: int
    stop: tuple[str, ...]
    return_routing: bool
    stream: bool


@dataclasses.dataclass(frozen=True)
class PromptContext:
    """What parsing needs from the served model: its name, how prompts are encoded, and the limits."""

    model_name: str
    encode_text: Callable[[str], list[int]]  # a completion prompt -> token ids (the model's prompt format)
    encode_chat: Callable[[list[dict[str, str]]], list[int]]  # chat messages -> ids ending in the reply cue
    routing_options: Callable[..., RoutingOptions]  # MeteoraLlama.routing_options
    max_tokens_limit: int
    default_max_tokens: int = 128
    default_temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    prompts: list[list[int]]  # one job per prompt, all with the same settings
    settings: Settings
    chat: bool


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any) -> Any:  # noqa: ANN401
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python: refuse true/false where a number is meant, and numbers where a flag is
    if (kind is bool) != isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"{name!r} must be {names}, got {value!r}.")
    return value


def _settings(body: dict, ctx: PromptContext, *, chat: bool) -> Settings:
    for name, no_op in _UNSUPPORTED.items():
        if body.get(name) not in no_op:
            raise RequestError(f"{name!r} is not supported by this server; leave it out.")
    fallback = (
        _field(body, "max_completion_tokens", int, ctx.default_max_tokens) if chat else ctx.default_max_tokens
    )
    max_tokens = _field(body, "max_tokens", int, fallback)
    if max_tokens < 1:
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}.")
    if max_tokens > ctx.max_tokens_limit:
        raise RequestError(
            f"'max_tokens' is {max_tokens}, over this server's limit of {ctx.max_tokens_limit} (--max-tokens-limit)."
        )
    top_k = _field(body, "top_k", int, 0)
    try:
        sampling = SamplingParams(
            temperature=float(_field(body, "temperature", (int, float), ctx.default_temperature)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=0 if top_k == -1 else top_k,
        )
        routing = ctx.routing_options(
            force_expert=_field(body, "force_expert", (str, int), None),
            top_k=_field(body, "routing_top_k", int, None),
            temperature=_field(body, "gate_temperature", (int, float), None),
            no_experts=_field(body, "no_experts", bool, False),
        )
    except MeteoraInputError as e:
        raise RequestError(str(e)) from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of them.")
    return Settings(
        max_new_tokens=max_tokens,
        sampling=sampling,
        routing=routing,
        seed=_field(body, "seed", int, 0),
        stop=tuple(stop),
        return_routing=_field(body, "return_routing", bool, False),
        stream=_field(body, "stream", bool, False),
    )


def _check_model(body: dict, ctx: PromptContext) -> None:
    name = body.get("model")
    if name not in (None, "", ctx.model_name):
        raise RequestError(
            f"model {name!r} is not served here; this server serves {ctx.model_name!r} (GET /v1/models).",
            status=404,
            kind="model_not_found",
        )


def _encode(fn: Callable, arg: Any, what: str) -> list[int]:  # noqa: ANN401
    try:
        ids = fn(arg)
    except MeteoraInputError as e:
        raise RequestError(f"{what}: {e}") from None
    if not ids:
        raise RequestError(f"{what} is empty; give it some text.")
    return ids


def parse_completion(body: object, ctx: PromptContext) -> ParsedRequest:
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or a list of those."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    _check_model(body, ctx)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("'prompt' is required: a string, a list of strings, or token ids.")
    ids = []
    for i, p in enumerate(prompt):
        what = f"prompt {i}" if len(prompt) > 1 else "the prompt"
        if isinstance(p, str):
            if not p.strip():
                raise RequestError(f"{what} is empty; give it some text.")
            ids.append(_encode(ctx.encode_text, p, what))
        elif isinstance(p, list) and p and all(_is_id(t) for t in p):
            ids.append([int(t) for t in p])
        else:
            raise RequestError(f"{what} must be a string or a non-empty list of token ids.")
    return ParsedRequest(ids, _settings(body, ctx, chat=False), chat=False)


def parse_chat(body: object, ctx: PromptContext) -> ParsedRequest:
    """``POST /v1/chat/completions``: ``messages`` of system / user / assistant turns ending in a user turn."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    _check_model(body, ctx)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError('\'messages\' is required: a list of {"role", "content"} objects.')
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object with role system, user or assistant.")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string (text only).")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise RequestError("the last message must be a user turn: the model answers it.")
    if not any(m["content"].strip() for m in clean if m["role"] == "user"):
        raise RequestError("the user turns are empty; give them some text.")
    ids = _encode(ctx.encode_chat, clean, "the conversation")
    return ParsedRequest([ids], _settings(body, ctx, chat=True), chat=True)


def _is_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


# ------------------------------------------------------------------------------------------------- responses
@dataclasses.dataclass(frozen=True)
class Choice:
    """One prompt's answer, as the batch worker hands it back."""

    text: str
    num_prompt_tokens: int
    num_tokens: int
    finish_reason: str  # the sampler's: eos / stop / length
    routing: dict | None = None  # {"expert_names", "top1": [T][L]} when return_routing


def openai_finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def response_body(choices: Sequence[Choice], *, chat: bool, model: str, request_id: str) -> dict:
    out_choices = []
    for i, c in enumerate(choices):
        row: dict[str, Any] = {"index": i, "finish_reason": openai_finish_reason(c.finish_reason)}
        if chat:
            row["message"] = {"role": "assistant", "content": c.text}
        else:
            row["text"] = c.text
            row["logprobs"] = None
        if c.routing is not None:
            row["routing"] = c.routing
        out_choices.append(row)
    prompt_tokens = sum(c.num_prompt_tokens for c in choices)
    completion_tokens = sum(c.num_tokens for c in choices)
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out_choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def stream_chunk(
    index: int,
    *,
    text: str | None,
    finish: Choice | None,
    chat: bool,
    model: str,
    request_id: str,
    role: bool = False,
) -> dict:
    """One server-sent event: a text delta, or (``finish``) the choice's last event with its finish reason, or
    (``role``, chat) the first event of a choice, which OpenAI's streams open with the assistant's role."""
    reason = openai_finish_reason(finish.finish_reason) if finish is not None else None
    if chat:
        delta = (
            {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        )
        row: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
    else:
        row = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    if finish is not None and finish.routing is not None:
        row["routing"] = finish.routing
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [row],
    }


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
