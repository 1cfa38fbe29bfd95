"""Deterministic synthetic text tasks in MeteoRA's layout, and a tiny MeteoRA model directory for tests.

Each task maps a short random lowercase word (3-6 letters) to a string transform of it, behind a short
instruction whose words are the task's own (as real task prompts are), while the response styles differ:

    upper:   "shout it loud: cat"       -> "CAT"      reverse: "mirror backwards: cat" -> "tac"
    spell:   "dash between letters: cat" -> "c-a-t"   length:  "count letters: cat"    -> "3"
    double:  "twice: cat"               -> "catcat"   vowels:  "vowels only: cat"      -> "a"

The default four start with distinct letters, so that even a prompt's first token names its task.

``write_tasks(out, tasks, n_train, n_test, seed)`` writes ``out/<task>/{train,test}.jsonl`` with the data
module's atomic writer; the same (task, seed) always gives the same lines.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

from meteora_jax.data.tasks import write_jsonl_atomic

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "upper": ("shout it loud", str.upper),
    "reverse": ("mirror backwards", lambda w: w[::-1]),
    "spell": ("dash between letters", lambda w: "-".join(w)),
    "length": ("count letters", lambda w: str(len(w))),
    "double": ("twice", lambda w: w + w),
    "vowels": ("vowels only", lambda w: "".join(c for c in w if c in "aeiou") or "none"),
}
DEFAULT_TASKS = ("upper", "reverse", "spell", "length")


def example(task: str, rng: random.Random) -> dict[str, str]:
    instruction, fn = TASKS[task]
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    return {"prompt": f"{instruction}: {word}", "response": fn(word)}


def write_tasks(
    out_dir: str | os.PathLike,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    n_train: int = 256,
    n_test: int = 32,
    seed: int = 0,
) -> str:
    """Writes ``out_dir/<task>/train.jsonl`` and ``test.jsonl``; returns ``out_dir``."""
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")  # str seeds are stable across runs and Python versions
        rows = [example(task, rng) for _ in range(n_train + n_test)]
        write_jsonl_atomic(os.path.join(out_dir, task, "train.jsonl"), rows[:n_train])
        write_jsonl_atomic(os.path.join(out_dir, task, "test.jsonl"), rows[n_train:])
    return os.fspath(out_dir)


def make_tiny_meteora_dir(
    out_dir: str | os.PathLike,
    expert_names: Sequence[str] = DEFAULT_TASKS,
    *,
    seed: int = 0,
    top_k: int = 2,
    num_layers: int = 2,
    max_positions: int = 256,
) -> str:
    """A random tiny MeteoRA model directory (byte-level tokenizer, random base and experts), for tests."""
    import tempfile

    from flax import nnx

    from meteora_jax.config import ModelConfig, MoEConfig
    from meteora_jax.io import save
    from meteora_jax.model.llama import MeteoraLlama
    from meteora_jax.testing.tiny_hf import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, make_tokenizer

    cfg = ModelConfig.tiny(
        vocab_size=VOCAB_SIZE,
        num_hidden_layers=num_layers,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
        pad_token_id=PAD_ID,
    )
    moe = MoEConfig(expert_names=tuple(expert_names), rank=4, top_k=min(top_k, len(expert_names)))
    model = MeteoraLlama(cfg, moe, rngs=nnx.Rngs(seed))
    with tempfile.TemporaryDirectory() as tok_dir:
        make_tokenizer().save_pretrained(tok_dir)
        return save(model, out_dir, tokenizer_dir=tok_dir)
