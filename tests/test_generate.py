"""The sampler against an independent oracle (no cache, the whole sequence recomputed each step), plus its
sampling rules, stopping rules, routing records and input errors. Tiny float32 models; compiled shapes are
shared between tests (batch 2, prompt bucket 16, new-token bucket 16) to keep the suite fast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_generate_fixtures import char_tokenizer, tiny_model

import meteora_jax as mj
from meteora_jax.generate import Sampler, SamplingParams
from meteora_jax.generate.sampler import bucket, prefill_program
from meteora_jax.generate.sampling import filter_logits


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def _greedy_without_cache(model, prompt, steps, force_expert=None):
    """The oracle: no cache, no left padding; the whole sequence (right-padded to a fixed 32 columns, which
    causal attention never lets the real tokens see) is recomputed for every new token."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_logits(state, ids_bt, last):
        logits = nnx.merge(graphdef, state)(ids_bt, force_expert=force_expert)
        return logits[0, last]

    ids = list(prompt)
    for _ in range(steps):
        padded = jnp.asarray([ids + [0] * (32 - len(ids))])
        ids.append(int(jnp.argmax(next_logits(state, padded, len(ids) - 1))))
    return ids[len(prompt) :]


def test_cached_decode_matches_full_recompute(model):
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51]]  # different lengths: left padding matters
    result = mj.generate(model, prompts, max_new_tokens=8)
    for prompt, got in zip(prompts, result.token_ids):
        assert got == _greedy_without_cache(model, prompt, 8)
    assert result.finish_reasons == ["length", "length"]


def test_forced_expert_matches_full_recompute_and_records_routing(model):
    prompts = [[1, 60, 61, 62], [1, 70]]
    result = mj.generate(model, prompts, max_new_tokens=5, force_expert="beta", return_routing=True)
    for prompt, got in zip(prompts, result.token_ids):
        assert got == _greedy_without_cache(model, prompt, 5, force_expert="beta")
    trace = result.routing
    assert trace.projections == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ids = trace.expert_ids[1]  # [T, L, P, 1]: 2 prompt tokens + 5 generated, the last never fed back
    assert ids.shape == (7, 2, 7, 1)
    assert (ids[:-1] == 1).all() and (ids[-1] == -1).all()
    assert trace.top1_layer_token(1).shape == (2, 7)


def test_routed_prompt_routing_matches_forward(model):
    prompt = [1, 33, 34, 35, 36]
    result = mj.generate(model, [prompt], max_new_tokens=2, return_routing=True)
    graphdef, state = nnx.split(model)

    @jax.jit
    def routed_ids(state, ids_bt):
        out = nnx.merge(graphdef, state).forward(ids_bt, return_routing=True)
        return jnp.stack([e["expert_ids"] for e in out.routing])  # [L*P, T, k]

    want_tlp = np.asarray(routed_ids(state, jnp.asarray([prompt])))
    got = result.routing.expert_ids[0][: len(prompt)]  # [T, L, P, k]
    np.testing.assert_array_equal(got.reshape(len(prompt), -1, 2), np.transpose(want_tlp, (1, 0, 2)))


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=40)
    prompts = [[1, 40, 41], [1, 50, 51, 52]]
    a = mj.generate(model, prompts, seed=7, **kw).token_ids
    b = mj.generate(model, prompts, seed=7, **kw).token_ids
    c = mj.generate(model, prompts, seed=8, **kw).token_ids
    assert a == b
    assert a != c


def test_lengths_within_a_bucket_reuse_the_compiled_program(model):
    program = prefill_program()  # the one the sampler runs (``prefill_cublas`` picks it)
    mj.generate(model, [[1, 2, 3], [1, 4]], max_new_tokens=3)
    before = program._cache_size()
    mj.generate(model, [[1, 2, 3, 4, 5, 6], [1, 7, 8, 9]], max_new_tokens=6)
    assert program._cache_size() == before
    mj.generate(model, [[1, 2] * 10, [1, 4]], max_new_tokens=3)  # a 32-token prompt bucket: one more program
    assert program._cache_size() == before + 1
    assert bucket(1) == 16 and bucket(17) == 32 and bucket(3, 1) == 4


def test_a_larger_prompt_bucket_changes_no_token(model):
    """``min_prompt_bucket`` (a conversation's turns share one program) only adds masked left padding."""
    from meteora_jax.generate import get_sampler

    prompts = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51]]
    sampler = get_sampler(model)
    want = sampler.generate(prompts, max_new_tokens=6).token_ids
    assert sampler.generate(prompts, max_new_tokens=6, min_prompt_bucket=100).token_ids == want
    assert want == [_greedy_without_cache(model, p, 6) for p in prompts]


def test_eos_and_stop_strings(model):
    tok = char_tokenizer()
    sampler = Sampler(model, tok)
    first = sampler.generate(["ab"], max_new_tokens=4)
    assert first.finish_reasons == ["length"]
    # Make the greedy continuation's second token an EOS: generation must end before it.
    sampler.eos_ids = [first.token_ids[0][1]]
    ended = sampler.generate(["ab"], max_new_tokens=4)
    assert ended.token_ids[0] == first.token_ids[0][:1] and ended.finish_reasons == ["eos"]
    # A stop string: the text is cut before it.
    text = first.texts[0]
    stop_at = next((j for j in range(1, len(text)) if text[j].strip()), None)
    if stop_at is not None:
        stopped = Sampler(model, tok).generate(["ab"], max_new_tokens=4, stop=[text[stop_at]])
        assert stopped.texts[0] == text[: text.index(text[stop_at])] and stopped.finish_reasons == ["stop"]


def test_streaming_reassembles_the_text(model):
    tok = char_tokenizer()
    pieces = []
    res = Sampler(model, tok).generate(["xy"], max_new_tokens=6, stream=lambda i, s: pieces.append(s))
    assert "".join(pieces) == res.texts[0]


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept_k = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(1.0, 1.0, 2)))) & (
        np.asarray(filter_logits(logits, SamplingParams(1.0, 1.0, 2))) > -1e30
    )
    assert kept_k.tolist() == [[True, True, False, False, False]]
    kept_p = np.asarray(filter_logits(logits, SamplingParams(1.0, 0.8, 0))) > -1e30
    assert kept_p.tolist() == [[True, True, True, False, False]]  # 0.5 + 0.2 < 0.8: the third is needed
    draws = jax.vmap(lambda k: jax.random.categorical(k, filter_logits(logits, SamplingParams(1.0, 0.6, 0))))(
        jax.random.split(jax.random.key(0), 200)
    )
    assert set(np.asarray(draws).ravel().tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompts=[""]), "empty"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1] * 300]), "context"),
        (dict(prompts=[[1, 2]], force_expert="nope"), "not an expert"),
        (dict(prompts=[[1, 2]], routing_top_k=4), "top_k=4"),
        (dict(prompts=[[1, 2]], temperature=-1.0), "temperature"),
        (dict(prompts=[[1, 2]], top_p=0.0), "top_p"),
        (dict(prompts=[[1, 999]]), "vocabulary"),
    ],
)
def test_bad_inputs(model, kwargs, match):
    prompts = kwargs.pop("prompts")
    tokenizer = char_tokenizer() if any(isinstance(p, str) for p in prompts) else None
    with pytest.raises(mj.MeteoraInputError, match=match):
        mj.generate(model, prompts, max_new_tokens=2, tokenizer=tokenizer, **kwargs)


def test_text_prompt_without_tokenizer_is_a_clear_error(model):
    fresh = tiny_model(seed=2)
    with pytest.raises(mj.MeteoraInputError, match="tokenizer"):
        mj.generate(fresh, ["hello"], max_new_tokens=2)


@pytest.mark.gpu
def test_prefill_options_stop_xla_merging_the_qkv_gemms():
    """On a GPU XLA's dot-merger joins GEMMs that share an operand (q / k / v) by concatenating their weights at
    every call; the prefill's options (``prefill_dot_merger`` = 0) must turn it off. Until session 19 they named
    a pass that does not exist and changed nothing."""
    from meteora_jax.generate import sampler

    def qkv(x, a, b, c):  # noqa: ANN001, ANN202
        return x @ a, x @ b, x @ c

    bf16 = jnp.bfloat16
    args = (jnp.ones((512, 1024), bf16), *(jnp.ones((1024, o), bf16) for o in (1024, 256, 256)))
    merged = jax.jit(qkv).lower(*args).compile().as_text()
    assert "concatenate" in merged  # XLA merges them by default: otherwise this test checks nothing
    options = {"xla_disable_hlo_passes": sampler.DOT_MERGER_PASS}
    assert "concatenate" not in jax.jit(qkv, compiler_options=options).lower(*args).compile().as_text()


def test_prefill_knobs_pick_the_compiler_options_and_change_no_token(model, monkeypatch):
    """On a GPU, ``prefill_cublas`` / ``prefill_dot_merger`` compile the prefill with XLA's Triton GEMMs / its
    dot_merger pass off (per-program options, one jit per option set); elsewhere the plain program runs. The
    tokens are the plain program's (the GPU is faked here: the option programs compile for this CPU)."""
    from meteora_jax.generate import sampler
    from meteora_jax.knobs import knobs_set

    prompts = [[1, 5, 6, 7], [3, 3]]
    assert sampler._on_gpu() or (sampler.prefill_program() is sampler._prefill)
    want = mj.generate(model, prompts, max_new_tokens=4).token_ids
    monkeypatch.setattr(sampler, "_on_gpu", lambda: True)
    cases = [
        ({"prefill_cublas": 0, "prefill_dot_merger": 1}, {}),
        ({"prefill_cublas": 1, "prefill_dot_merger": 1}, {"xla_gpu_enable_triton_gemm": False}),
        (
            {"prefill_cublas": 1, "prefill_dot_merger": 0},
            {"xla_gpu_enable_triton_gemm": False, "xla_disable_hlo_passes": "dot-merger"},
        ),
    ]
    programs = []
    for values, options in cases:
        with knobs_set(values):
            assert sampler.prefill_compiler_options() == options
            program = sampler.prefill_program()
            assert (program is sampler._prefill) == (not options)
            before = program._cache_size()
            assert mj.generate(model, prompts, max_new_tokens=4).token_ids == want
            assert program._cache_size() == before + 1  # this program ran (and compiled once)
            assert sampler.prefill_program() is program
            programs.append(program)
    assert len({id(p) for p in programs}) == 3
    assert sampler.PREFILL_CUBLAS_GEMMS == 1 and sampler.PREFILL_DOT_MERGER == 0


def test_attention_barrier_knob_changes_no_token(model):
    """``attn_barrier``: up to that many tokens the o projection reads the attention output through an
    optimization barrier (one materialised copy for the gate and the kernel); the tokens are unchanged, and
    the barrier is in a forward's program only where the knob reaches its token count."""
    from meteora_jax.knobs import knobs_set
    from meteora_jax.model import llama

    prompts = [[1, 5, 6, 7], [3, 3]]
    want = mj.generate(model, prompts, max_new_tokens=4).token_ids
    ids = jnp.asarray([[1, 5, 6]], jnp.int32)
    texts = {}
    for limit in (0, 1, 3):
        with knobs_set({"attn_barrier": limit}):
            assert mj.generate(model, prompts, max_new_tokens=4).token_ids == want
            texts[limit] = jax.jit(lambda i: model.forward(i).logits).lower(ids).as_text()
    assert llama.ATTENTION_OUT_BARRIER_MAX_TOKENS == 1
    assert "optimization_barrier" not in texts[0] and "optimization_barrier" not in texts[1]
    assert texts[3].count("optimization_barrier") == model.config.num_hidden_layers


def test_sampler_hashes_its_graph_once(model, monkeypatch):
    """jit hashes static arguments at every call: the sampler hands it a ``StaticGraph`` whose hash was
    computed once, so a warm generate walks the model's ``GraphDef`` zero times (it walked it at every prefill
    and decode call before, ~3 ms for a 32-layer model on the CPU host)."""
    from meteora_jax.generate.static_graph import StaticGraph, merge, split

    sampler = Sampler(model)
    prompts = [[1, 5, 6, 7], [3, 3]]
    want = sampler.generate(prompts, max_new_tokens=4).token_ids  # compiles
    assert isinstance(sampler.graphdef, StaticGraph)
    graph_type = type(sampler.graphdef.graphdef)
    hashes = []
    original = graph_type.__hash__
    monkeypatch.setattr(graph_type, "__hash__", lambda self: hashes.append(1) or original(self))
    assert sampler.generate(prompts, max_new_tokens=4).token_ids == want
    assert hashes == []
    monkeypatch.undo()
    again, state = split(model)
    assert (
        again == sampler.graphdef and hash(again) == hash(sampler.graphdef) and again is not sampler.graphdef
    )
    assert merge(again, state).config == model.config
