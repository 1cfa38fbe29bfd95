"""Shared helpers for the grouped MoE-LoRA kernel tests: seeding, error metric, loss and gradients."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_lora import api, shapes

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
GRAD_ARGS = ("x", "lora_a", "lora_b", "expert_weights")


def key_for(name: str) -> jax.Array:
    """A key seeded from the test's own name: fresh inputs per test, reproducible per test."""
    return jax.random.key(zlib.crc32(name.encode()))


def rel_err(got, want) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    assert np.all(np.isfinite(got)), "non-finite values in result"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def inputs_for(case: shapes.Case, name: str) -> dict:
    inp = shapes.make_inputs(case, key_for(name))
    dy = jax.random.normal(key_for(name + "/dy"), (case.num_tokens, case.d_out), jnp.float32)
    return {**inp, "dy": dy}


def run(inp: dict, implementation, *, fused: bool = False, wrt: tuple[str, ...] = GRAD_ARGS):
    """Output and gradients (w.r.t. ``wrt``) of <y, dy> for one implementation, under jit."""

    def loss(diff):
        args = {**inp, **diff}
        common = (args["lora_a"], args["lora_b"], args["expert_ids"], args["expert_weights"])
        if fused:
            y = api.grouped_lora_fused(
                args["x"], args["w"], *common, scaling=args["scaling"], implementation=implementation
            )
        else:
            y = api.grouped_lora(args["x"], *common, scaling=args["scaling"], implementation=implementation)
        return jnp.sum(y.astype(jnp.float32) * inp["dy"]), y

    diff = {name: inp[name] for name in wrt}
    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff)
    return y, grads


@functools.lru_cache(maxsize=64)
def reference_result(case: shapes.Case, name: str, fused: bool):
    """The reference's output and gradients, computed once per (case, seed name, fused) for all backends."""
    return run(inputs_for(case, name), "reference", fused=fused)


def assert_matches_reference(case: shapes.Case, implementation, *, fused: bool) -> None:
    """``implementation``'s output and every gradient in ``GRAD_ARGS`` are within ``TOLERANCE`` of ``reference``'s,
    on the case's inputs seeded from its name."""
    got_y, got_g = run(inputs_for(case, case.name), implementation, fused=fused)
    want_y, want_g = reference_result(case, case.name, fused)
    tol = TOLERANCE[case.dtype]
    assert rel_err(got_y, want_y) <= tol, "output"
    for name in GRAD_ARGS:
        assert rel_err(got_g[name], want_g[name]) <= tol, name


def gate_only_jaxpr(inp: dict, implementation) -> str:
    """The jaxpr of a gradient w.r.t. the routing weights alone (the gate-training step)."""

    def loss(expert_weights, x):
        y = api.grouped_lora(
            x,
            inp["lora_a"],
            inp["lora_b"],
            inp["expert_ids"],
            expert_weights,
            scaling=inp["scaling"],
            implementation=implementation,
        )
        return jnp.sum(y.astype(jnp.float32) * inp["dy"])

    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(inp["expert_weights"], inp["x"]))


def llama_projection_inputs(num_tokens: int, dtype, seed: int, d_in: int = 4096, d_out: int = 1024) -> tuple:
    """(x, w, lora_a, lora_b, ids, weights, scaling) at a Llama-3-8B k/v projection's shape with 28 rank-8
    experts, top-2 distinct experts per token, for the GPU-marked tests."""
    rng = np.random.default_rng(seed)
    e, r, k = 28, 8, 2
    x = jnp.asarray(rng.standard_normal((num_tokens, d_in)), dtype)
    w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype)
    a = jnp.asarray(rng.standard_normal((e, d_in, r)) / np.sqrt(d_in), dtype)
    b = jnp.asarray(rng.standard_normal((e, r, d_out)), dtype)
    ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(num_tokens)]), jnp.int32)
    weights = jnp.asarray(rng.dirichlet(np.ones(k), num_tokens), dtype)
    return x, w, a, b, ids, weights, jnp.full((e,), 2.0)
