"""Generation: ``mj.generate(model, prompts, ...)``, the ``Sampler`` behind it, and the sampling rules.

A ``Sampler`` compiles per (batch, prompt-length, new-token) bucket and per routing/sampling setting; the
module-level ``generate`` keeps one sampler per model so that repeated calls reuse its compiled programs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import jax

from meteora_jax.errors import MeteoraInputError
from meteora_jax.generate.sampler import GenerationResult, Prompt, RoutingTrace, Sampler
from meteora_jax.generate.sampling import SamplingParams
from meteora_jax.model.llama import MeteoraLlama

__all__ = ["GenerationResult", "RoutingTrace", "Sampler", "SamplingParams", "generate"]

_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_for(model: MeteoraLlama) -> object:
    model_dir = getattr(model, "model_dir", None)
    if model_dir is None:
        raise MeteoraInputError(
            "text prompts need a tokenizer: pass tokenizer=, or load the model with mj.load(DIR) from a "
            "directory that holds its tokenizer files."
        )
    from meteora_jax.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


def get_sampler(
    model: MeteoraLlama, tokenizer: object | None = None, mesh: jax.sharding.Mesh | None = None
) -> Sampler:
    """The cached sampler of ``model`` (rebuilt when the tokenizer or mesh changes)."""
    sampler = _SAMPLERS.get(model)
    if (
        sampler is None
        or (tokenizer is not None and sampler.tokenizer is not tokenizer)
        or sampler.mesh is not mesh
    ):
        sampler = Sampler(model, tokenizer, mesh=mesh)
        _SAMPLERS[model] = sampler
    return sampler


def generate(
    model: MeteoraLlama,
    prompts: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int = 128,
    tokenizer: object | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    routing_top_k: int | None = None,
    gate_temperature: float | None = None,
    force_expert: str | int | None = None,
    no_experts: bool = False,
    stop: Sequence[str] | None = None,
    return_routing: bool = False,
    stream: Callable[[int, str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerationResult:
    """Generates a continuation of each prompt (a string, or a list of token ids).

    ``temperature``/``top_p``/``top_k`` shape the token sampling (temperature 0 = greedy); ``routing_top_k`` and
    ``gate_temperature`` override the model's routing defaults; ``force_expert`` answers with one adapter alone;
    ``no_experts`` runs the plain base model. The sampler's state is refreshed from ``model`` on every call, so
    changed weights are picked up.
    """
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and all(isinstance(x, int) for x in prompts)
    ):
        prompts = [prompts]
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        tokenizer = getattr(_SAMPLERS.get(model), "tokenizer", None) or _tokenizer_for(model)
    routing = model.routing_options(
        force_expert=force_expert, top_k=routing_top_k, temperature=gate_temperature, no_experts=no_experts
    )
    sampler = get_sampler(model, tokenizer, mesh)
    sampler.refresh()
    return sampler.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k),
        routing=routing,
        seed=seed,
        stop=stop,
        return_routing=return_routing,
        stream=stream,
    )
