"""``meteora-jax generate``: answer one prompt (``--prompt``) or a JSONL file of them (``--prompts``).

Thin: parse, load, call ``mj.generate``, print or write. With one prompt and stdout a terminal, text streams as
it is produced. ``--out`` gets one JSON line per prompt, written to a temp file and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from meteora_jax.errors import MeteoraInputError
from meteora_jax.generate.options import add_model_options, apply_model_options
from meteora_jax.train.data import PROMPT_TEMPLATE_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="Generate text with a converted model.")
    p.add_argument("--model", required=True, help="a model directory written by `meteora-jax convert`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help='a JSONL file, one {"prompt": "..."} object per line')
    p.add_argument("--out", help="write one JSON line per prompt here (default: print the texts)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="token sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument(
        "--top-k-sampling", type=int, default=0, help="sample from the k likeliest tokens (0 = off)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="experts per token (routing); default: the model's"
    )
    p.add_argument("--gate-temperature", type=float, default=None, help="gate softmax temperature T")
    p.add_argument("--force-expert", default=None, help="answer with this expert (adapter) alone")
    p.add_argument("--no-experts", action="store_true", help="the plain base model (all experts off)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompts")
    p.add_argument("--return-routing", action="store_true", help="add per-token, per-layer top-1 experts")
    p.add_argument("--prompt-template", default="auto", help=PROMPT_TEMPLATE_HELP)
    add_model_options(p)
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise MeteoraInputError(f"{path}: no such prompts file.")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MeteoraInputError(f"{path}:{lineno}: not a JSON line ({e}).") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise MeteoraInputError(
                    f'{path}:{lineno}: each line must be an object with a string "prompt".'
                )
            if not obj["prompt"].strip():
                raise MeteoraInputError(f"{path}:{lineno}: the prompt is empty; give every prompt some text.")
            prompts.append(obj["prompt"])
    if not prompts:
        raise MeteoraInputError(f"{path}: no prompts in the file.")
    return prompts


def _routing_rows(result, i: int) -> list[list[int]]:  # noqa: ANN001
    """[T][L] top-1 expert per token and layer (most frequent over the layer's projections)."""
    return result.routing.top1_layer_token(i).T.tolist()


def _hint_if_ended_at_once(rows: list[dict], tokenizer, template: str | None) -> None:  # noqa: ANN001
    """An instruct model given a raw prompt often answers with EOS at once: say why the text is empty."""
    ended = sum(row["num_tokens"] == 0 and row["finish_reason"] == "eos" for row in rows)
    if ended and template is None and getattr(tokenizer, "chat_template", None):
        print(
            f"meteora-jax generate: {ended} of {len(rows)} prompts ended at once (end-of-sequence as the first "
            "token). The prompts went in as given, and this model has a chat template: try "
            "--prompt-template chat.",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    import meteora_jax as mj
    from meteora_jax.tokenizer import load_tokenizer
    from meteora_jax.train.data import PromptFormatter, prompt_format_for

    if args.prompt is not None and not args.prompt.strip():  # before a template wraps it in text of its own
        raise MeteoraInputError("--prompt is empty; give it some text.")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    tokenizer = load_tokenizer(args.model)  # before the weights: a missing tokenizer fails fast
    template, add_bos = prompt_format_for(args.model, args.prompt_template)
    fmt = PromptFormatter(tokenizer, template) if template is not None else None
    model = mj.load(args.model, dtype=args.dtype)
    apply_model_options(model, args)
    streaming = args.prompt is not None and args.out is None and sys.stdout.isatty()
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        tokenizer=tokenizer,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k_sampling,
        seed=args.seed,
        routing_top_k=args.top_k,
        gate_temperature=args.gate_temperature,
        force_expert=args.force_expert,
        no_experts=args.no_experts,
        stop=args.stop,
        return_routing=args.return_routing,
    )
    if streaming:
        kwargs["stream"] = lambda _row, text: (sys.stdout.write(text), sys.stdout.flush())
    rows = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        inputs = [fmt.ids(p, add_bos) for p in batch] if fmt is not None else batch
        result = mj.generate(model, inputs, **kwargs)
        for i, prompt in enumerate(batch):
            row = {
                "prompt": prompt,
                "text": result.texts[i],
                "finish_reason": result.finish_reasons[i],
                "num_tokens": len(result.token_ids[i]),
            }
            if result.routing is not None:
                row["expert_names"] = result.routing.expert_names
                row["routing_top1"] = _routing_rows(result, i)
            rows.append(row)
            if streaming:
                print()
            elif args.out is None:
                print(json.dumps(row) if args.return_routing or len(prompts) > 1 else row["text"])
    _hint_if_ended_at_once(rows, tokenizer, template)
    if args.out:
        from meteora_jax.io import write_text_atomic

        write_text_atomic(args.out, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} generations to {args.out}", file=sys.stderr)
    return 0
