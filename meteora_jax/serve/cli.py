"""``meteora-jax serve``: answer OpenAI-style HTTP requests with a converted model until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

from meteora_jax.generate.options import add_model_options, apply_model_options
from meteora_jax.train.data import PROMPT_TEMPLATE_HELP

DESCRIPTION = """\
Serve a model over HTTP with the OpenAI API, so that OpenAI clients, curl and evaluation tools can use it:
  GET  /health, /v1/models (the experts and routing defaults too)
  POST /v1/completions       {"prompt": "...", "max_tokens": 64}
  POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}]}
"stream": true answers as server-sent events. MeteoRA's routing is settable per request (OpenAI clients: in
extra_body): "routing_top_k", "gate_temperature", "force_expert" (one adapter alone), "no_experts" (the base
model), "return_routing" (each token's top-1 expert per layer). Concurrent greedy requests with the same
settings are answered in one batch (--max-batch, --batch-wait-ms); sampled ones run alone, so an answer never
depends on what else the server is doing. Each new (batch, prompt length, answer length) bucket compiles once;
--warmup compiles the smallest before the server starts listening. Listens on 127.0.0.1 unless --host says
otherwise: there is no authentication, so do not expose it to a network you do not trust. Ctrl-C or SIGTERM
stops it.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="Serve a model over HTTP (OpenAI-compatible completions and chat).",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="a model directory written by `meteora-jax convert` / train-gate"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free one; the URL is printed)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients use (default: the dir's name)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="most requests answered in one batch")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request waits for others to join its batch",
    )
    p.add_argument(
        "--max-tokens", type=int, default=128, help="answer length when a request gives no max_tokens"
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="refuse requests asking for more (default: the context)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="token sampling temperature when a request gives none (default 0: greedy, unlike OpenAI's 1)",
    )
    p.add_argument("--prompt-template", default="auto", help=PROMPT_TEMPLATE_HELP)
    p.add_argument("--warmup", action="store_true", help="compile the smallest bucket before listening")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import meteora_jax as mj
    from meteora_jax.errors import MeteoraInputError
    from meteora_jax.serve.server import App, make_server, model_name_for
    from meteora_jax.tokenizer import load_tokenizer
    from meteora_jax.train.data import prompt_format_for

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-tokens", args.max_tokens, 1)):
        if value < low:
            raise MeteoraInputError(f"{flag} must be >= {low}, got {value}.")
    if args.batch_wait_ms < 0:
        raise MeteoraInputError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}.")
    if args.temperature < 0:
        raise MeteoraInputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    tokenizer = load_tokenizer(args.model)  # before the weights: a missing tokenizer fails fast
    template, add_bos = prompt_format_for(args.model, args.prompt_template)
    model = mj.load(args.model, dtype=args.dtype)
    apply_model_options(model, args)
    app = App(
        model,
        tokenizer,
        model_name=args.served_model_name or model_name_for(args.model),
        template=template,
        add_bos=add_bos,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.max_tokens,
        default_temperature=args.temperature,
    )
    if args.warmup:
        print("compiling the smallest bucket ...", file=sys.stderr)
        app.warmup()
    server = make_server(app, args.host, args.port, quiet=args.quiet)
    # SIGTERM (kill, process managers, `docker stop`) stops the server the way Ctrl-C does, with exit status 0.
    signal.signal(signal.SIGTERM, _interrupt)
    print(
        f"serving {app.ctx.model_name!r} ({len(model.expert_names)} experts) at {server.url}/v1 "
        "(completions, chat/completions); Ctrl-C or SIGTERM stops",
        file=sys.stderr,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
