"""Shared fixtures for the generation and eval tests: a tiny model directory with a character tokenizer.

No test lives here; the helpers are imported by ``test_generate*.py`` and ``test_eval_*.py``.
"""

from __future__ import annotations

import os

from meteora_jax import MeteoraLlama, ModelConfig, MoEConfig, save

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)]


def char_tokenizer():
    """A 99-token character-level tokenizer (ids 0-3 special): every printable ASCII character is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


EXPERTS = ("alpha", "beta", "gamma")


def tiny_model(seed: int = 0, experts: tuple[str, ...] = EXPERTS, **cfg) -> MeteoraLlama:
    from flax import nnx

    cfg = {"vocab_size": len(SPECIALS) + len(CHARS), **cfg}
    config = ModelConfig.tiny(eos_token_ids=(2,), pad_token_id=0, bos_token_id=1, **cfg)
    return MeteoraLlama(config, MoEConfig(expert_names=experts, top_k=2), rngs=nnx.Rngs(seed))


def tiny_model_dir(path: str | os.PathLike, seed: int = 0, with_tokenizer: bool = True) -> str:
    model = tiny_model(seed)
    out = save(model, path)
    if with_tokenizer:
        char_tokenizer().save_pretrained(out)
    return out
