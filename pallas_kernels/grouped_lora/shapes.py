"""Named problem shapes shared by tests and the benchmark, with the routings that stress kernels.

``ci`` cases are small enough for interpret mode on two CPU cores; ``bench`` cases are the Llama-3-8B
projections of issue 3. ``make_inputs`` draws every tensor from one key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

ROUTINGS = ("uniform", "skewed", "one_expert", "empty_experts")
LLAMA3_8B_PROJECTIONS = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    d_in: int
    d_out: int
    num_experts: int
    rank: int
    top_k: int
    routing: str = "uniform"
    dtype: str = "float32"
    tags: tuple[str, ...] = ("ci",)


def routing_ids(key: jax.Array, num_tokens: int, num_experts: int, top_k: int, routing: str) -> jax.Array:
    """[T, k] int32 expert ids, distinct within a token."""
    if routing == "one_expert":  # every token picks the same k experts: one group holds all rows per slot
        return jnp.broadcast_to(jnp.arange(top_k, dtype=jnp.int32) + num_experts // 2, (num_tokens, top_k))
    logits_e = jnp.zeros((num_experts,))
    if routing == "skewed":  # Zipf-like: expert e drawn with weight 1 / (e + 1)^1.2
        logits_e = -1.2 * jnp.log1p(jnp.arange(num_experts, dtype=jnp.float32))
    elif routing == "empty_experts":  # only every third expert is ever chosen
        logits_e = jnp.where(jnp.arange(num_experts) % 3 == 0, 0.0, -jnp.inf)
        if top_k > (num_experts + 2) // 3:
            raise ValueError("empty_experts needs top_k <= ceil(E / 3)")
    elif routing != "uniform":
        raise ValueError(f"unknown routing {routing!r}")
    gumbel_te = jax.random.gumbel(key, (num_tokens, num_experts))
    _, ids_tk = jax.lax.top_k(logits_e + gumbel_te, top_k)  # Gumbel top-k: k draws without replacement
    return ids_tk.astype(jnp.int32)


def make_inputs(case: Case, key: jax.Array) -> dict[str, jax.Array]:
    """x, w, lora_a, lora_b, expert_ids, expert_weights, scaling for ``case``; LoRA sized so y ~ x."""
    dtype = jnp.dtype(case.dtype)
    ks = jax.random.split(key, 7)
    t, d, o, e, r, k = case.num_tokens, case.d_in, case.d_out, case.num_experts, case.rank, case.top_k
    return {
        "x": jax.random.normal(ks[0], (t, d), jnp.float32).astype(dtype),
        "w": (jax.random.normal(ks[1], (d, o), jnp.float32) / np.sqrt(d)).astype(dtype),
        "lora_a": (jax.random.normal(ks[2], (e, d, r), jnp.float32) / np.sqrt(d)).astype(dtype),
        "lora_b": (jax.random.normal(ks[3], (e, r, o), jnp.float32) / np.sqrt(r)).astype(dtype),
        "expert_ids": routing_ids(ks[4], t, e, k, case.routing),
        "expert_weights": jax.nn.softmax(jax.random.normal(ks[5], (t, k)), axis=-1),
        "scaling": jax.random.uniform(ks[6], (e,), minval=0.5, maxval=2.0),
    }


CI_CASES = (
    Case("uniform_small", 24, 32, 48, 4, 8, 2),
    Case("skewed_t_not_block_multiple", 37, 64, 32, 8, 4, 2, "skewed"),
    Case("empty_experts", 20, 32, 16, 9, 16, 2, "empty_experts"),
    Case("one_expert", 19, 32, 32, 6, 8, 1, "one_expert"),
    Case("one_expert_top2", 16, 16, 32, 6, 8, 2, "one_expert"),
    Case("rank1", 17, 32, 16, 5, 1, 2),
    Case("rank64_top1", 9, 16, 32, 3, 64, 1),
    Case("many_experts", 40, 16, 16, 1024, 4, 1, "skewed"),
    Case("decode_one_token", 1, 32, 32, 28, 8, 2),
    Case("bf16_uniform", 33, 64, 64, 8, 8, 2, dtype="bfloat16"),
    Case("bf16_skewed_many", 50, 32, 32, 128, 16, 1, "skewed", dtype="bfloat16"),
)


def bench_cases() -> tuple[Case, ...]:
    """The rows issue 3 asks for: E=28 r=8 k=2 uniform everywhere, then larger E / r skewed."""
    cases = []
    for d_in, d_out in LLAMA3_8B_PROJECTIONS:
        for t in (1, 16, 64, 512, 4096, 16384):
            name = f"{d_in}x{d_out}_T{t}_E28_r8_k2_uniform"
            cases.append(Case(name, t, d_in, d_out, 28, 8, 2, "uniform", "bfloat16", ("bench",)))
    for t in (64, 4096):
        for e in (128, 1024):
            for r in (16, 64):
                name = f"4096x4096_T{t}_E{e}_r{r}_k1_skewed"
                cases.append(Case(name, t, 4096, 4096, e, r, 1, "skewed", "bfloat16", ("bench",)))
    return tuple(cases)
