"""The sampler: one jitted prefill, then a jitted decode loop over a static-shape KV cache.

Shapes are bucketed so that a new prompt rarely compiles anything: the batch is padded to a power of two, the
prompt length to a power of two (>= ``min_bucket``), and ``max_new_tokens`` to a power of two; the KV cache holds
``prompt_bucket + new_bucket`` slots. Prompts are left-padded, so every row writes its next token into the same
cache slot and the last prompt position is the same column for all rows; padding is masked through the
``[B, S]`` slot mask and positions count real tokens only (as transformers' ``generate`` does).

Decoding runs inside ``lax.while_loop``: one compiled program emits many tokens and stops early once every row
has finished. The loop runs up to a *dynamic* step limit, so the host can run it in chunks (to stream text or
to check stop strings, which need the tokenizer) without recompiling. Routing knobs (top-k, gate temperature,
a forced expert, experts off) are a static ``RoutingOptions``: each distinct setting compiles once.

With ``return_routing`` every forward also records the experts chosen for each token at each MoE projection:
``[B, T, L, P, k]`` for the prompt and, in the loop, for each generated token as it is fed back in (the last
generated token is never fed back, so its row is -1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Int

from meteora_jax.errors import MeteoraInputError
from meteora_jax.generate.sampling import SamplingParams, sample_next
from meteora_jax.generate.static_graph import StaticGraph, merge
from meteora_jax.generate.static_graph import split as split_static
from meteora_jax.model.gate import RoutingOptions
from meteora_jax.model.kv_cache import KVCache
from meteora_jax.model.llama import MeteoraLlama

Prompt = str | Sequence[int]
GREEDY = SamplingParams()


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): the static length a size-n input is padded to."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries; stays on device between chunks."""

    cache: KVCache
    mask_bs: Int[Array, "B S"]  # 1 = a real token in that cache slot
    pos_b: Int[Array, " B"]  # RoPE position of the next token fed in
    out_bn: Int[Array, "B N"]  # generated tokens (pad after a row finished)
    done_b: Bool[Array, " B"]
    step: Int[Array, ""]  # tokens generated so far; out_bn[:, step - 1] is fed next
    key: jax.Array
    routing_bnlpk: Int[Array, "B N L P K"] | None


def _stack_routing(aux: list[dict] | None, num_layers: int, b: int, t: int) -> Int[Array, "B T L P K"] | None:
    """The model's per-projection routing records -> one [B, T, L, P, k] array of expert ids."""
    if not aux:
        return None
    ids_ntk = jnp.stack([entry["expert_ids"] for entry in aux])  # [L*P, B*T, k]
    n, _, k = ids_ntk.shape
    ids_lpbtk = ids_ntk.reshape(num_layers, n // num_layers, b, t, k)
    return jnp.transpose(ids_lpbtk, (2, 3, 0, 1, 4))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def inference_packs(graphdef: nnx.GraphDef | StaticGraph, state: nnx.State) -> dict[str, jax.Array]:
    """``MeteoraLlama.inference_packs`` of a model state, made once and passed to ``_prefill`` / ``_decode``
    (their ``packs``). The pack knobs (``moe_lora``) are read when this traces: after changing one, clear
    jit's caches."""
    return merge(graphdef, state).inference_packs()


def _attach(model: MeteoraLlama, packs: dict[str, jax.Array] | None) -> None:
    """The given packs, or (None) packs made inside this program."""
    if packs is None:
        model.pack_for_inference()
    else:
        model.attach_packs(packs)


def _prefill_impl(
    graphdef: nnx.GraphDef | StaticGraph,
    state: nnx.State,
    ids_bp: Int[Array, "B P"],
    valid_bp: Int[Array, "B P"],
    key: jax.Array,
    pad_id: Int[Array, ""],
    eos_ids: Int[Array, " E"],
    *,
    routing: RoutingOptions,
    params: SamplingParams,
    return_routing: bool,
    new_bucket: int,
    packs: dict[str, jax.Array] | None = None,
) -> tuple[DecodeState, Int[Array, "B P L Q K"] | None]:
    model = merge(graphdef, state)
    _attach(model, packs)
    b, p = ids_bp.shape
    cache = model.init_cache(b, p + new_bucket)
    mask_bs = jnp.zeros((b, p + new_bucket), jnp.int32).at[:, :p].set(valid_bp)
    positions_bp = jnp.maximum(jnp.cumsum(valid_bp, axis=1) - 1, 0)
    out = model.forward(
        ids_bp,
        routing=routing,
        attention_mask=mask_bs,
        positions=positions_bp,
        cache=cache,
        return_routing=return_routing,
        last_logits_only=True,
        fresh_cache=True,  # init_cache above: index 0
    )
    first_b = sample_next(out.logits[:, -1], jax.random.fold_in(key, 0), params)
    prompt_routing = _stack_routing(out.routing, model.config.num_hidden_layers, b, p)
    routing_bn = None
    if prompt_routing is not None:
        routing_bn = jnp.full((b, new_bucket) + prompt_routing.shape[2:], -1, jnp.int32)
    state_out = DecodeState(
        cache=out.cache,
        mask_bs=mask_bs,
        pos_b=jnp.sum(valid_bp, axis=1).astype(jnp.int32),
        out_bn=jnp.full((b, new_bucket), pad_id, jnp.int32).at[:, 0].set(first_b),
        done_b=jnp.isin(first_b, eos_ids),
        step=jnp.ones((), jnp.int32),
        key=key,
        routing_bnlpk=routing_bn,
    )
    return state_out, prompt_routing


_PREFILL_STATICS = ("graphdef", "routing", "params", "return_routing", "new_bucket")
# 1: on a GPU, the prefill program is compiled with every GEMM on cuBLAS (``xla_gpu_enable_triton_gemm`` off for
# that program alone; decode keeps XLA's default, with which its 64-row GEMMs were 14% faster on the H200). Why: with
# Triton GEMMs on, XLA runs each dense expand as its own GEMM and adds its [T, d_out] output inside a consumer
# fusion (session 14's prefill HLO); with cuBLAS alone its GEMM rewriter folds that add into the base GEMM as
# cuBLAS's ``C`` input (the residual adds of o / down too, experts or not). Measured on an H100 (session 15, 32
# layers, 4096 tokens, with ``llama.LAST_LOGITS_ROWS`` = 2): experts on 129.5 -> 125.4 ms, experts off 112.5 ->
# 109.5 ms. Knob ``prefill_cublas``.
PREFILL_CUBLAS_GEMMS = 1
# 0: on a GPU, the prefill program is compiled without XLA's dot-merger pass (``DotMerger``, whose pass name is
# "dot-merger"). Why it may help: that pass merges the q / k / v GEMMs (they read the same x) into one, which
# concatenates their weights at every prefill (``wrapped_concatenate``, 27-32 us a layer on the H200 / H100) and,
# with cuBLAS GEMMs, makes XLA copy the merged output's three slices out to fold each expand into them
# (``wrapped_slice*``, ~33 us a layer; session 15's 2-layer HLO). Without it each of q / k / v is its own GEMM
# with its expand as ``C``; the narrow k / v GEMMs may run less efficiently. Until session 19 this disabled
# "dot_merger", a name no pass has, so it changed nothing: session 18's A/B (123.94 -> 122.31 ms, ...) was noise,
# and session 19's 512-token profile still showed the concatenation. With the real name (H100, 32 layers, 4096
# tokens, same process; benchmarks/results/profile_prefill_h100_dot_merger_t4096_s19.json): experts off 111.09 ->
# 109.95 / 110.29 ms, experts on 128.21 -> 125.74 / 126.67 ms. Knob ``prefill_dot_merger``.
PREFILL_DOT_MERGER = 0
DOT_MERGER_PASS = "dot-merger"  # ``DotMerger::name()`` in XLA
_prefill = jax.jit(_prefill_impl, static_argnames=_PREFILL_STATICS)
# compiler options (sorted items) -> the prefill jitted with them; made on first use
_prefill_programs: dict[tuple[tuple[str, object], ...], Callable[..., tuple[DecodeState, Array | None]]] = {}


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def prefill_compiler_options() -> dict[str, object]:
    """The XLA options the prefill knobs ask for on a GPU; none elsewhere, where they mean nothing."""
    if not _on_gpu():
        return {}
    options: dict[str, object] = {}
    if PREFILL_CUBLAS_GEMMS:
        options["xla_gpu_enable_triton_gemm"] = False
    if not PREFILL_DOT_MERGER:
        options["xla_disable_hlo_passes"] = DOT_MERGER_PASS
    return options


def prefill_program() -> Callable[..., tuple[DecodeState, Array | None]]:
    """The jitted prefill for ``prefill_compiler_options()`` (same arguments as ``_prefill_impl``): the plain
    program without options, else one jit per option set, kept for the process."""
    options = prefill_compiler_options()
    if not options:
        return _prefill
    key = tuple(sorted(options.items()))
    if key not in _prefill_programs:
        _prefill_programs[key] = jax.jit(
            _prefill_impl, static_argnames=_PREFILL_STATICS, compiler_options=options
        )
    return _prefill_programs[key]


@functools.partial(
    jax.jit, static_argnames=("graphdef", "routing", "params", "return_routing"), donate_argnames=("carry",)
)
def _decode(
    graphdef: nnx.GraphDef | StaticGraph,
    state: nnx.State,
    carry: DecodeState,
    stop_step: Int[Array, ""],
    pad_id: Int[Array, ""],
    eos_ids: Int[Array, " E"],
    *,
    routing: RoutingOptions,
    params: SamplingParams,
    return_routing: bool,
    packs: dict[str, jax.Array] | None = None,
) -> DecodeState:
    model = merge(graphdef, state)
    _attach(model, packs)  # here, outside the loop
    num_layers = model.config.num_hidden_layers

    def cond(c: DecodeState) -> jax.Array:
        return (c.step < stop_step) & ~jnp.all(c.done_b)

    def body(c: DecodeState) -> DecodeState:
        b = c.out_bn.shape[0]
        tok_b1 = jax.lax.dynamic_slice_in_dim(c.out_bn, c.step - 1, 1, axis=1)
        ones_b1 = jnp.ones((b, 1), jnp.int32)
        mask_bs = jax.lax.dynamic_update_slice(c.mask_bs, ones_b1, (0, c.cache.index))
        out = model.forward(
            tok_b1,
            routing=routing,
            attention_mask=mask_bs,
            positions=c.pos_b[:, None],
            cache=c.cache,
            return_routing=return_routing,
        )
        nxt_b = sample_next(out.logits[:, 0], jax.random.fold_in(c.key, c.step), params)
        nxt_b = jnp.where(c.done_b, pad_id, nxt_b)
        out_bn = jax.lax.dynamic_update_slice(c.out_bn, nxt_b[:, None], (0, c.step))
        routing_bnlpk = c.routing_bnlpk
        if routing_bnlpk is not None:
            ids_b1lpk = _stack_routing(out.routing, num_layers, b, 1)
            routing_bnlpk = jax.lax.dynamic_update_slice(routing_bnlpk, ids_b1lpk, (0, c.step - 1, 0, 0, 0))
        return DecodeState(
            cache=out.cache,
            mask_bs=mask_bs,
            pos_b=c.pos_b + 1,
            out_bn=out_bn,
            done_b=c.done_b | jnp.isin(nxt_b, eos_ids),
            step=c.step + 1,
            key=c.key,
            routing_bnlpk=routing_bnlpk,
        )

    return jax.lax.while_loop(cond, body, carry)


@dataclasses.dataclass
class RoutingTrace:
    """Experts chosen per token: ``expert_ids[i]`` is [T_i, L, P, k] for prompt i (its prompt tokens, then its
    generated tokens; -1 where nothing was routed). ``projections`` names the P MoE projections of a layer."""

    expert_ids: list[np.ndarray]
    num_prompt_tokens: list[int]
    projections: tuple[str, ...]
    expert_names: list[str]

    def top1_layer_token(self, i: int, projection: str | None = None) -> np.ndarray:
        """[L, T] top-1 expert per layer and token of prompt ``i``: of one projection, or (None) the most
        frequent top-1 over the layer's projections -- the input of ``plot_routing_heatmap``."""
        top1_tlp = self.expert_ids[i][..., 0]
        if projection is not None:
            return top1_tlp[:, :, self.projections.index(projection)].T
        t, layers, _ = top1_tlp.shape
        out_lt = np.full((layers, t), -1, np.int32)
        for ti in range(t):
            for li in range(layers):
                vals = top1_tlp[ti, li][top1_tlp[ti, li] >= 0]
                if vals.size:
                    out_lt[li, ti] = np.bincount(vals).argmax()
        return out_lt


@dataclasses.dataclass
class GenerationResult:
    """``token_ids[i]``: the generated ids of prompt i (EOS and anything after it left out); ``texts[i]``: their
    decoding, cut before a stop string (None without a tokenizer); ``finish_reasons[i]`` in eos/stop/length."""

    texts: list[str] | None
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    finish_reasons: list[str]
    routing: RoutingTrace | None = None


def moe_projections(model: MeteoraLlama) -> tuple[str, ...]:
    """The projections of one layer that carry experts, in forward order (the P axis of routing arrays)."""
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets = model.moe_config.target_modules if model.moe_config.num_experts else ()
    return tuple(p for p in order if p in targets)


def eos_token_ids(model: MeteoraLlama, tokenizer: object | None) -> list[int]:
    ids = set(model.config.eos_token_ids)
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return sorted(ids)


class Sampler:
    """Generation for one model (and, for text prompts, its tokenizer).

    ``mesh``: run under this device mesh (the model already placed with ``sharding.shard_model``).
    """

    def __init__(
        self,
        model: MeteoraLlama,
        tokenizer: object | None = None,
        *,
        min_bucket: int = 16,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.min_bucket = min_bucket
        self.mesh = mesh
        self.refresh()
        self.pad_id = int(getattr(tokenizer, "pad_token_id", None) or model.config.pad_token_id or 0)
        self.eos_ids = eos_token_ids(model, tokenizer)

    def refresh(self) -> None:
        """Re-reads the model's weights and static settings (e.g. after training or an attention switch)."""
        self.graphdef, self.state = split_static(self.model)  # hashed once: jit hashes static args per call
        self._packs = None  # made at the next generate, from this state

    def packs(self) -> dict[str, jax.Array] | None:
        """The inference packs of the current state, made once (None under a mesh: none are made there)."""
        if self.mesh is not None:
            return None
        if self._packs is None:
            self._packs = inference_packs(self.graphdef, self.state)
        return self._packs

    # ----------------------------------------------------------------- inputs
    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str) or not prompts:
            raise MeteoraInputError("prompts must be a non-empty list of strings (or of token-id lists).")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise MeteoraInputError("text prompts need a tokenizer; pass tokenizer= or token ids.")
                if not p.strip():
                    raise MeteoraInputError(f"prompt {i} is empty; give every prompt some text.")
                ids = list(self.tokenizer(p, add_special_tokens=True)["input_ids"])
            else:
                ids = [int(x) for x in p]
            if not ids:
                raise MeteoraInputError(f"prompt {i} is empty; give every prompt some text.")
            vocab = self.model.config.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise MeteoraInputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}).")
            out.append(ids)
        context = self.model.config.max_position_embeddings
        longest = max(len(ids) for ids in out)
        if longest >= context:
            i = max(range(len(out)), key=lambda j: len(out[j]))
            raise MeteoraInputError(
                f"prompt {i} has {longest} tokens, but the model's context is {context} tokens and generation "
                "needs room for at least one new token; shorten the prompt."
            )
        return out

    # ----------------------------------------------------------------- the loop
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = GREEDY,
        routing: RoutingOptions | None = None,
        seed: int = 0,
        stop: Sequence[str] | None = None,
        return_routing: bool = False,
        stream: Callable[[int, str], None] | None = None,
        chunk_steps: int | None = None,
        min_prompt_bucket: int | None = None,
    ) -> GenerationResult:
        """Generates for every prompt at once. ``stream(row, text_delta)`` is called as text appears.

        ``min_prompt_bucket`` pads the prompts of this call to at least that many tokens (a power of two is
        used as is), so calls whose prompts grow (a multi-turn conversation) can share one compiled program;
        the new-token bucket is unaffected."""
        if max_new_tokens < 1:
            raise MeteoraInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        stop = [s for s in (stop or []) if s]
        if (stop or stream) and self.tokenizer is None:
            raise MeteoraInputError("stop strings and streaming need a tokenizer.")
        routing = routing if routing is not None else self.model.routing_options()
        prompt_ids = self.encode(prompts)
        n_real = len(prompt_ids)
        context = self.model.config.max_position_embeddings
        longest = max(len(ids) for ids in prompt_ids)
        max_new_tokens = min(max_new_tokens, context - longest)

        b, p, n = bucket(n_real, 1), bucket(longest, self.min_bucket), bucket(max_new_tokens, self.min_bucket)
        if min_prompt_bucket is not None:
            p = max(p, bucket(min_prompt_bucket, self.min_bucket))
        ids_bp = np.full((b, p), self.pad_id, np.int32)
        valid_bp = np.zeros((b, p), np.int32)
        for i, ids in enumerate(prompt_ids):
            ids_bp[i, p - len(ids) :] = ids
            valid_bp[i, p - len(ids) :] = 1
        valid_bp[n_real:, -1] = 1  # filler rows get one real (pad) token: no row attends to nothing

        pad = jnp.asarray(self.pad_id, jnp.int32)
        eos = jnp.asarray(self.eos_ids or [-1], jnp.int32)
        statics = dict(routing=routing, params=sampling, return_routing=return_routing, packs=self.packs())
        with _mesh_context(self.mesh):
            carry, prompt_routing = prefill_program()(
                self.graphdef,
                self.state,
                jnp.asarray(ids_bp),
                jnp.asarray(valid_bp),
                jax.random.key(seed),
                pad,
                eos,
                new_bucket=n,
                **statics,
            )
            if chunk_steps is None:
                chunk_steps = 8 if stream else (16 if stop else max_new_tokens)
            texts_so_far = [""] * n_real
            stopped = [False] * n_real
            steps_done = 1
            while True:
                if stream or stop:
                    self._emit(carry, steps_done, prompt_ids, texts_so_far, stopped, stop, stream)
                    if any(stopped):
                        done = np.asarray(carry.done_b).copy()
                        done[:n_real] |= np.asarray(stopped)
                        carry = dataclasses.replace(carry, done_b=jnp.asarray(done))
                if steps_done >= max_new_tokens or bool(np.all(np.asarray(carry.done_b)[:n_real])):
                    break
                target = min(steps_done + chunk_steps, max_new_tokens)
                carry = _decode(
                    self.graphdef, self.state, carry, jnp.asarray(target, jnp.int32), pad, eos, **statics
                )
                steps_done = int(carry.step)
        return self._result(carry, prompt_ids, prompt_routing, stop, stopped, p)

    def _row_tokens(self, out_n: np.ndarray, steps: int) -> tuple[list[int], bool]:
        toks = out_n[:steps].tolist()
        for j, t in enumerate(toks):
            if t in self.eos_ids:
                return toks[:j], True
        return toks, False

    def _emit(self, carry, steps, prompt_ids, texts_so_far, stopped, stop, stream) -> None:  # noqa: ANN001
        out_bn = np.asarray(carry.out_bn)
        for i in range(len(prompt_ids)):
            if stopped[i]:
                continue
            toks, _ = self._row_tokens(out_bn[i], steps)
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            cut = _first_stop(text, stop)
            if cut is not None:
                text, stopped[i] = text[:cut], True
            elif not _complete_text(text):
                continue  # a multi-byte character is half decoded: wait for its other tokens
            if stream and len(text) > len(texts_so_far[i]) and text.startswith(texts_so_far[i]):
                stream(i, text[len(texts_so_far[i]) :])
            texts_so_far[i] = text

    def _result(self, carry, prompt_ids, prompt_routing, stop, stopped, p) -> GenerationResult:  # noqa: ANN001
        out_bn = np.asarray(carry.out_bn)
        steps = int(carry.step)
        token_ids, reasons, texts = [], [], [] if self.tokenizer is not None else None
        for i in range(len(prompt_ids)):
            toks, hit_eos = self._row_tokens(out_bn[i], steps)
            reason = "eos" if hit_eos else "length"
            if texts is not None:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                cut = _first_stop(text, stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                texts.append(text)
            token_ids.append(toks)
            reasons.append(reason)
        trace = None
        if prompt_routing is not None:
            pr = np.asarray(prompt_routing)
            gen = np.asarray(carry.routing_bnlpk)
            per_row = []
            for i, ids in enumerate(prompt_ids):
                per_row.append(np.concatenate([pr[i, p - len(ids) :], gen[i, : len(token_ids[i])]], axis=0))
            trace = RoutingTrace(
                expert_ids=per_row,
                num_prompt_tokens=[len(ids) for ids in prompt_ids],
                projections=moe_projections(self.model),
                expert_names=self.model.expert_names,
            )
        return GenerationResult(texts, token_ids, [list(x) for x in prompt_ids], reasons, trace)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


def _complete_text(text: str) -> bool:
    return not text.endswith("\ufffd")


class _mesh_context:  # noqa: N801 (used like a function)
    """``jax.set_mesh(mesh)`` when a mesh is given (older jax: ``jax.sharding.use_mesh``), else nothing."""

    def __init__(self, mesh: jax.sharding.Mesh | None):
        self.mesh = mesh
        self.ctx = None

    def __enter__(self) -> None:
        if self.mesh is not None:
            setter = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
            self.ctx = setter(self.mesh)
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
