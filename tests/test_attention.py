"""Attention in blocks of query rows equals a float64 NumPy reference; so does the fused path told that a
prefill starts at slot 0 (``causal_from_zero``); the prefill unembeds the last position only (its compiled
program holds no [B*P, V] logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_generate_fixtures import tiny_model

from meteora_jax.generate import sampler as S
from meteora_jax.model.llama import attention


def _reference(q, k, v, mask):  # noqa: ANN001, ANN202
    """float64 grouped-query attention: query head i reads kv head i // (N // K)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    rep = n // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    s = np.where(np.asarray(mask)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _qkv(rng, b, t, s, n, kv, h):  # noqa: ANN001, ANN202
    return (
        rng.standard_normal((b, t, n, h), np.float32),
        rng.standard_normal((b, s, kv, h), np.float32),
        rng.standard_normal((b, s, kv, h), np.float32),
    )


def test_blocked_attention_matches_float64_reference(rng):
    b, t, s, n, kv, h = 2, 16, 24, 6, 2, 8
    q, k, v = _qkv(rng, b, t, s, n, kv, h)
    # a cache-style mask: queries sit at slots 4..19 of 24, row 1 left-padded by 3
    slots = np.arange(s)
    mask = slots[None, None, :] <= (4 + np.arange(t))[None, :, None]
    mask = np.broadcast_to(mask, (b, t, s)).copy()
    mask[1, :, :3] = False
    want = _reference(q, k, v, mask)
    for block in (4, 8, 1024):  # 4 and 8: blocked; 1024: one block (T below it)
        got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), query_block=block)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"block {block}")


def test_causal_from_zero_changes_no_prefill_number(rng):
    # queries at slots 0..T-1 of a longer cache, row 1 left-padded by 5: the prefill's mask. ``xla`` is the
    # fused entry point that runs on a CPU; on a GPU ``cudnn`` takes the same arguments.
    b, t, s, n, kv, h = 2, 12, 20, 4, 2, 8
    q, k, v = _qkv(rng, b, t, s, n, kv, h)
    slots = np.arange(s)
    mask = np.broadcast_to(slots[None, None, :] <= np.arange(t)[None, :, None], (b, t, s)).copy()
    mask[1, :, :5] = False
    mask[1, :5, 0] = True  # padded query rows see one (padded) key, as the model's own mask leaves them
    want = _reference(q, k, v, mask)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    for flag in (False, True):
        got = attention(*args, implementation="xla", causal_from_zero=flag)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"causal {flag}")


def test_fused_attention_sampler_matches_einsum():
    """The sampler's prefill marks its fresh cache (``is_causal`` on); its decode steps must not: the greedy
    tokens and per-step logits of the ``xla`` path equal the einsum reference's for left-padded prompts."""
    from meteora_jax.generate import get_sampler

    prompts = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51], [1, 60, 61, 62, 63]]
    want = get_sampler(tiny_model(0)).generate(prompts, max_new_tokens=8)
    fused = tiny_model(0)
    fused.set_attention_implementation("xla")
    got = get_sampler(fused).generate(prompts, max_new_tokens=8)
    assert got.token_ids == want.token_ids


def test_prefill_unembeds_only_the_last_position():
    model = tiny_model(0)
    ids = jnp.asarray(np.random.default_rng(3).integers(3, model.config.vocab_size, (2, 9)), jnp.int32)
    full = model.forward(ids).logits
    last = model.forward(ids, last_logits_only=True).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-5, atol=1e-5)

    b, p, v = 2, 64, model.config.vocab_size
    graphdef, state = nnx.split(model)
    args = (graphdef, state, jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32), jax.random.key(0))
    program = S.prefill_program()  # the one the sampler runs
    hlo = program.lower(
        *args,
        jnp.int32(0),
        jnp.asarray([1], jnp.int32),
        routing=model.routing_options(),
        params=S.GREEDY,
        return_routing=False,
        new_bucket=16,
    ).as_text()
    assert f"tensor<{b}x1x{v}xf32>" in hlo  # the last position's logits ...
    for rows in (f"{p}x{v}x", f"{b * p}x{v}x"):  # ... and no [B, P, V] or [B*P, V] ones
        assert rows not in hlo, rows


@pytest.mark.parametrize("rows", [0, 1, 2, 5])
def test_one_prompt_unembeds_its_last_rows_and_returns_the_last(rows):
    """One sequence: ``last_logits_only`` unembeds up to ``LAST_LOGITS_ROWS`` final positions (a GEMM, not a
    GEMV, for cuBLAS) and returns the last one's logits alone, equal to the full forward's; 0 counts as 1."""
    from meteora_jax.knobs import knobs_set

    model = tiny_model(0)
    ids = jnp.asarray(np.random.default_rng(4).integers(3, model.config.vocab_size, (1, 4)), jnp.int32)
    full = jax.jit(lambda i: model.forward(i).logits)(ids)  # jitted: eager dispatch took ~3x as long
    with knobs_set({"logit_rows": rows}):  # a trace-time knob: read while the program is traced
        lowered = jax.jit(lambda i: model.forward(i, last_logits_only=True).logits).lower(ids)
    text, last = lowered.as_text(), lowered.compile()(ids)
    assert last.shape == (1, 1, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-5, atol=1e-5)
    unembedded = min(max(rows, 1), ids.shape[1])
    assert f"tensor<1x{unembedded}x{model.config.vocab_size}xf32>" in text
