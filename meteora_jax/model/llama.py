"""A LLaMA-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM2) in Flax NNX, every projection a MoE-LoRA layer.

Numerics follow transformers: RMSNorm and attention softmax in float32, RoPE in the HF ``rotate_half`` layout,
GQA by grouping query heads per KV head. The same forward serves three callers:

* ``model(input_ids)`` -> logits, routed by the gates (the public contract);
* training, which asks for every gate's logits (``return_routing=True``);
* the sampler, which passes a ``KVCache`` and gets the updated cache back.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.model import moe_lora
from meteora_jax.model.gate import RoutingOptions
from meteora_jax.model.kv_cache import KVCache, LayerCache
from meteora_jax.model.moe_lora import MoELoRALinear, pack_group, project_group
from meteora_jax.model.rope import apply_rope, inv_frequencies, rope_cos_sin
from meteora_jax.params import InferencePack
from pallas_kernels.grouped_lora.api import resolve_implementation

# ``forward(last_logits_only=True)`` of ONE sequence unembeds its last this-many positions (the last alone is
# returned). Why: with every GEMM on cuBLAS (the sampler's ``prefill_cublas``), XLA runs a [1, D] x [D, V] bf16
# product with a float32 output as a matrix-vector product and upcasts the whole unembedding to float32 first
# (Llama-3-8B: a 3.1 GB convert and a float32 GEMV, 1.2 ms in the H200's 2-layer trace, session 15); two rows
# make it a bf16 GEMM. H100, 32 layers, 4096 tokens, cuBLAS prefill: 128.0 -> 125.4 ms; with XLA's Triton
# GEMMs it made no difference (129.9 vs 129.5). Knob ``logit_rows``.
LAST_LOGITS_ROWS = 2
# Up to this many tokens, an o projection with experts reads the attention output through an optimization
# barrier: materialised once as [B, T, D]. Why: in the batch-1 decode program XLA otherwise made TWO convert +
# transpose kernels of it per layer (one for the gate's product, one for the Pallas decode kernel; two layouts of
# the same element order, ~1.2 us each on the H200) and more small fusions around them: 813 -> 749 kernels per
# step, the experts-off model's count. H100 (session 15), batch 1: 139.3 -> 141.8 tok/s (experts off 143.2).
# Knob ``attn_barrier``.
ATTENTION_OUT_BARRIER_MAX_TOKENS = 1
# 1: each layer hands its residual to the o and down projections (``project_group``'s ``residual_btd``), which
# fold it into their GEMMs' C where the dense path serves; 0: the layer adds it to their outputs. Why: with
# experts on, the base GEMM's C already held the expand, so ``x + o(...)`` stayed an elementwise add that XLA
# fused into its consumers and the residual stream was never written; at a 4096-token prefill the RMSNorms
# re-summed the embedding and every earlier o / down output (2-layer H100 trace, session 20: 0.157 vs 0.088 ms
# of norm kernels). 32 layers, same process (profile_prefill_h100_fold_*_s20.json): 4096 tokens 120.24 / 121.31
# ms against 120.66 / 122.89 with 0; 512 tokens 22.13 / 21.88 against 23.12 / 24.47. Same sums, another order of
# bf16 roundings. Knob ``residual_fold``.
RESIDUAL_IN_PROJECTION = 1


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.scale_d = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))

    def __call__(self, x_btd: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        x32 = x_btd.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale_d[...] * x32.astype(x_btd.dtype)


def _projection(
    name: str, cfg: ModelConfig, moe: MoEConfig, dtype: jnp.dtype, rngs: nnx.Rngs
) -> MoELoRALinear:
    d_in, d_out = cfg.projection_shape(name)
    return MoELoRALinear(
        name,
        d_in,
        d_out,
        use_bias=cfg.projection_has_bias(name),
        num_experts=moe.num_experts if name in moe.target_modules else 0,
        rank=moe.rank,
        dtype=dtype,
        implementation=moe.implementation,
        rngs=rngs,
    )


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention reads besides its hidden states; ``forward`` builds it once.

    ``cache_index``: where a cached step writes its keys (None without a cache). ``causal_from_zero``: the
    queries sit at slots 0..T-1, so fused kernels may add ``is_causal`` (see ``attention``).
    """

    cos_btd: Float[Array, "B T Dh"]
    sin_btd: Float[Array, "B T Dh"]
    mask_bts: Bool[Array, "B T S"]
    cache_index: Int[Array, ""] | None = None
    causal_from_zero: bool = False


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.attention_impl = "einsum"  # a static attribute: see MeteoraLlama.set_attention_implementation
        self.q_proj = _projection("q_proj", cfg, moe, dtype, rngs)
        self.k_proj = _projection("k_proj", cfg, moe, dtype, rngs)
        self.v_proj = _projection("v_proj", cfg, moe, dtype, rngs)
        self.o_proj = _projection("o_proj", cfg, moe, dtype, rngs)

    def __call__(
        self,
        x_btd: Float[Array, "B T D"],
        inputs: AttentionInputs,
        routing: RoutingOptions,
        aux: list | None,
        cache: LayerCache | None,
        residual_btd: Float[Array, "B T D"] | None = None,
    ) -> tuple[Float[Array, "B T D"], LayerCache | None]:
        """The attention block's output, plus ``residual_btd`` where given (``RESIDUAL_IN_PROJECTION``)."""
        b, t, _ = x_btd.shape
        cos_btd, sin_btd, cache_index = inputs.cos_btd, inputs.sin_btd, inputs.cache_index
        q_btd, k_btd, v_btd = project_group(
            (self.q_proj, self.k_proj, self.v_proj), x_btd, routing, aux, *_packs(self, "qkv")
        )
        q_btnh = q_btd.reshape(b, t, self.num_heads, self.head_dim)
        k_btkh = k_btd.reshape(b, t, self.num_kv_heads, self.head_dim)
        v_btkh = v_btd.reshape(b, t, self.num_kv_heads, self.head_dim)
        q_btnh = apply_rope(q_btnh, cos_btd, sin_btd)
        k_btkh = apply_rope(k_btkh, cos_btd, sin_btd)
        if cache is not None:
            # Left-padded batches share one write slot per step, so a single dynamic_update_slice suffices.
            k_full = jax.lax.dynamic_update_slice(
                cache.k, k_btkh.astype(cache.k.dtype), (0, cache_index, 0, 0)
            )
            v_full = jax.lax.dynamic_update_slice(
                cache.v, v_btkh.astype(cache.v.dtype), (0, cache_index, 0, 0)
            )
            cache = LayerCache(k=k_full, v=v_full)
            k_bskh, v_bskh = k_full.astype(x_btd.dtype), v_full.astype(x_btd.dtype)
        else:
            k_bskh, v_bskh = k_btkh, v_btkh
        out_btnh = attention(
            q_btnh,
            k_bskh,
            v_bskh,
            inputs.mask_bts,
            implementation=self.attention_impl,
            causal_from_zero=inputs.causal_from_zero,
        )
        out_btd = out_btnh.reshape(b, t, self.num_heads * self.head_dim)
        if (
            b * t <= ATTENTION_OUT_BARRIER_MAX_TOKENS
            and self.o_proj.num_experts > 0
            and not routing.no_experts
        ):
            out_btd = jax.lax.optimization_barrier(out_btd)
        (y_btd,) = project_group(
            (self.o_proj,), out_btd, routing, aux, *_packs(self, "o"), residual_btd=residual_btd
        )
        return y_btd, cache


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


# Query rows per block of the einsum path's scores: prompts longer than this are attended block by block
# (``lax.map``), so a prefill holds [B, N, QUERY_BLOCK, S] float32 scores instead of [B, N, T, S]. An 8k-token
# composite prompt at batch 8 needs 20 GB for the whole [B, 9, 8192, 9216] block, and its softmax more: it ran
# the H200 out of memory (benchmarks/RESULTS.md, BIG-bench seed 1). Each query row is independent, so the
# blocks give the same numbers.
QUERY_BLOCK = 1024


def attention(
    q_btnh: Float[Array, "B T N H"],
    k_bskh: Float[Array, "B S K H"],
    v_bskh: Float[Array, "B S K H"],
    mask_bts: Bool[Array, "B T S"],
    implementation: str = "einsum",
    query_block: int = QUERY_BLOCK,
    causal_from_zero: bool = False,
) -> Float[Array, "B T N H"]:
    """Grouped-query attention; scores and softmax in float32 as transformers does.

    ``einsum``: the reference below, in blocks of ``query_block`` query rows when T is a larger multiple of
    it. ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` with that implementation (cuDNN's fused flash
    attention on GPU; bf16/fp16 only).

    ``causal_from_zero``: the queries sit at slots 0..T-1 (no cache, or a prefill into an empty one), so
    ``mask_bts`` lies inside the top-left causal triangle and ``is_causal`` may be added to it without
    changing a number. cuDNN then skips the key tiles above the diagonal, half of a long prefill's attention
    work: with the mask alone it computed them all (4096-token Llama-3-8B prefill: 33 ms of attention, 133
    TFLOP/s, benchmarks/RESULTS.md). The mask still applies (left padding); a cached step must not set it.
    """
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            mask=mask_bts[:, None, :, :],
            is_causal=causal_from_zero,
            implementation=implementation,
        )
    b, t, n, h = q_btnh.shape
    if t > query_block and t % query_block == 0:
        blocks = t // query_block
        q_jbqnh = jnp.moveaxis(q_btnh.reshape(b, blocks, query_block, n, h), 1, 0)
        mask_jbqs = jnp.moveaxis(mask_bts.reshape(b, blocks, query_block, -1), 1, 0)
        out_jbqnh = jax.lax.map(
            lambda qm: _einsum_attention(qm[0], k_bskh, v_bskh, qm[1]), (q_jbqnh, mask_jbqs)
        )
        return jnp.moveaxis(out_jbqnh, 0, 1).reshape(b, t, n, h)
    return _einsum_attention(q_btnh, k_bskh, v_bskh, mask_bts)


def _einsum_attention(
    q_btnh: Float[Array, "B T N H"],
    k_bskh: Float[Array, "B S K H"],
    v_bskh: Float[Array, "B S K H"],
    mask_bts: Bool[Array, "B T S"],
) -> Float[Array, "B T N H"]:
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh, preferred_element_type=jnp.float32)
    return out.astype(q_btnh.dtype).reshape(b, t, n, h)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate_proj = _projection("gate_proj", cfg, moe, dtype, rngs)
        self.up_proj = _projection("up_proj", cfg, moe, dtype, rngs)
        self.down_proj = _projection("down_proj", cfg, moe, dtype, rngs)

    def __call__(
        self,
        x_btd: Float[Array, "B T D"],
        routing: RoutingOptions,
        aux: list | None,
        residual_btd: Float[Array, "B T D"] | None = None,
    ) -> jax.Array:
        """The MLP's output, plus ``residual_btd`` where given (``RESIDUAL_IN_PROJECTION``)."""
        gate_btm, up_btm = project_group(
            (self.gate_proj, self.up_proj), x_btd, routing, aux, *_packs(self, "gate_up")
        )
        h_btm = jax.nn.silu(gate_btm) * up_btm
        (y_btd,) = project_group(
            (self.down_proj,), h_btm, routing, aux, *_packs(self, "down"), residual_btd=residual_btd
        )
        return y_btd


_PACK_KINDS = ("pack", "gates", "gates_nd")


def _packs(owner: nnx.Module, group: str) -> tuple[Array | None, ...]:
    """The packs ``MeteoraLlama.attach_packs`` put on ``owner`` for ``group``, as ``project_group``'s
    ``(pack_dn, gates_dn, gates_nd)`` (attributes ``{group}_pack`` etc.); None for each it did not."""
    found = (getattr(owner, f"{group}_{kind}", None) for kind in _PACK_KINDS)
    return tuple(None if v is None else v[...] for v in found)


def _pack_groups(layer: DecoderLayer) -> list[tuple[nnx.Module, str, tuple[MoELoRALinear, ...]]]:
    """(owner module, group name, projections) of each group of a layer whose projections read one input."""
    a, m = layer.attn, layer.mlp
    return [
        (a, "qkv", (a.q_proj, a.k_proj, a.v_proj)),
        (a, "o", (a.o_proj,)),
        (m, "gate_up", (m.gate_proj, m.up_proj)),
        (m, "down", (m.down_proj,)),
    ]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, moe, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, moe, dtype, rngs)

    def __call__(
        self,
        x_btd: Float[Array, "B T D"],
        inputs: AttentionInputs,
        routing: RoutingOptions,
        aux: list | None,
        cache: LayerCache | None,
    ) -> tuple[Float[Array, "B T D"], LayerCache | None]:
        if RESIDUAL_IN_PROJECTION:
            x_btd, cache = self.attn(self.input_norm(x_btd), inputs, routing, aux, cache, x_btd)
            return self.mlp(self.post_attn_norm(x_btd), routing, aux, x_btd), cache
        h_btd, cache = self.attn(self.input_norm(x_btd), inputs, routing, aux, cache)
        x_btd = x_btd + h_btd
        x_btd = x_btd + self.mlp(self.post_attn_norm(x_btd), routing, aux)
        return x_btd, cache


@dataclasses.dataclass
class ModelOutput:
    """``routing``: one entry per MoE projection call, in forward order, each a dict with ``layer``, ``name``,
    ``gate_logits`` [B*T, E] (None when an expert is forced) and ``expert_ids`` [B*T, k]."""

    logits: Float[Array, "B T V"]
    cache: KVCache | None = None
    routing: list[dict] | None = None


class MeteoraLlama(nnx.Module):
    """The whole model. ``expert_names`` lists experts in gate order."""

    def __init__(
        self,
        cfg: ModelConfig,
        moe: MoEConfig | None = None,
        *,
        dtype: str | jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        moe = moe if moe is not None else MoEConfig(expert_names=())
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = jnp.dtype(dtype)
        self.config, self.moe_config, self.dtype = cfg, moe, dtype
        # What `implementation=None` (or the configured name) resolves to on this platform, for the record;
        # the saved config keeps the user's choice so that a model moved to another platform re-resolves.
        self.kernel_implementation = resolve_implementation(
            moe.implementation, expert_columns=len(moe.expert_names) * moe.rank
        )
        self.embed_vd = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype),
            logical_axes=("vocab", "embed"),
        )
        self.layers = nnx.List([DecoderLayer(cfg, moe, dtype, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.unembed_vd = None
        else:
            self.unembed_vd = nnx.Param(
                nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype),
                logical_axes=("vocab", "embed"),
            )
        self.inv_freq = nnx.Variable(
            jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)), logical_axes=(None,)
        )

    @property
    def expert_names(self) -> list[str]:
        return list(self.moe_config.expert_names)

    def routing_options(
        self,
        *,
        force_expert: str | int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
        mode: str | None = None,
        no_experts: bool = False,
    ) -> RoutingOptions:
        """Run-time routing knobs with the config's values as defaults; validates names and ranges."""
        from meteora_jax.errors import MeteoraInputError

        names = self.expert_names
        idx = None
        if force_expert is not None:
            if isinstance(force_expert, str):
                if force_expert not in names:
                    raise MeteoraInputError(
                        f"force_expert={force_expert!r} is not an expert; experts: {names}."
                    )
                idx = names.index(force_expert)
            else:
                idx = int(force_expert)
                if not 0 <= idx < len(names):
                    raise MeteoraInputError(
                        f"force_expert={idx} out of range: the model has {len(names)} experts."
                    )
        k = self.moe_config.top_k if top_k is None else int(top_k)
        if names and not 1 <= k <= len(names):
            raise MeteoraInputError(f"top_k={k} must be between 1 and the number of experts ({len(names)}).")
        temp = self.moe_config.temperature if temperature is None else float(temperature)
        if temp <= 0:
            raise MeteoraInputError(f"temperature must be > 0, got {temp}.")
        return RoutingOptions(
            top_k=min(k, max(len(names), 1)),
            temperature=temp,
            mode=mode or self.moe_config.routing,
            force_expert=idx,
            no_experts=no_experts,
        )

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        *,
        force_expert: str | int | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
        no_experts: bool = False,
        attention_mask: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T V"]:
        routing = self.routing_options(
            force_expert=force_expert, top_k=top_k, temperature=temperature, no_experts=no_experts
        )
        return self.forward(input_ids, routing=routing, attention_mask=attention_mask).logits

    def forward(
        self,
        input_ids: Int[Array, "B T"],
        *,
        routing: RoutingOptions | None = None,
        attention_mask: Int[Array, "B S"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        return_routing: bool = False,
        last_logits_only: bool = False,
        fresh_cache: bool = False,
    ) -> ModelOutput:
        """The full forward.

        ``last_logits_only``: logits of the last position alone ([B, 1, V]), as a prefill needs. XLA does not
        push the caller's ``[:, -1]`` slice through the unembedding, so otherwise the prefill computes (and
        writes, in float32) every position's logits: for Llama-3-8B at 4096 tokens, 4.3 TFLOP and 2.1 GB per
        row that are thrown away.

        Without a cache, ``attention_mask`` [B, T] (1 = real token) masks padding and sets positions
        (cumulative count, as transformers' ``generate`` does with left padding). With a cache,
        ``attention_mask`` covers all ``cache.max_len`` slots, the new tokens are written at
        ``cache.index`` and ``positions`` must be given. ``fresh_cache``: the caller promises ``cache.index``
        is 0 (a prefill into a new cache), which lets the fused attention kernels skip the key tiles above
        the causal diagonal (``attention``'s ``causal_from_zero``; without a cache that always holds).
        """
        routing = routing if routing is not None else self.routing_options()
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if cache is None:
            valid_bs = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
            if positions is None:
                positions = (
                    jnp.broadcast_to(jnp.arange(t), (b, t))
                    if attention_mask is None
                    else jnp.maximum(jnp.cumsum(valid_bs, axis=1) - 1, 0)
                )
            q_slot_t = jnp.arange(t)
            k_slot_s = jnp.arange(t)
            cache_index = None
        else:
            if attention_mask is None or positions is None:
                raise ValueError("a cached forward needs attention_mask over the cache slots and positions")
            valid_bs = jnp.asarray(attention_mask) > 0
            q_slot_t = cache.index + jnp.arange(t)
            k_slot_s = jnp.arange(cache.max_len)
            cache_index = cache.index
        causal_ts = k_slot_s[None, :] <= q_slot_t[:, None]
        if self.config.sliding_window is not None:
            causal_ts &= k_slot_s[None, :] > q_slot_t[:, None] - self.config.sliding_window
        mask_bts = causal_ts[None] & valid_bs[:, None, :]
        cos_btd, sin_btd = rope_cos_sin(positions, self.inv_freq[...])
        inputs = AttentionInputs(
            cos_btd, sin_btd, mask_bts, cache_index, causal_from_zero=cache is None or fresh_cache
        )

        x_btd = jnp.take(self.embed_vd[...], input_ids, axis=0)
        aux: list | None = [] if return_routing else None
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_aux: list | None = [] if return_routing else None
            layer_cache = cache.layers[i] if cache is not None else None
            x_btd, layer_cache = layer(x_btd, inputs, routing, layer_aux, layer_cache)
            new_layers.append(layer_cache)
            if aux is not None:
                aux.extend({"layer": i, **entry} for entry in layer_aux)
        if last_logits_only:
            # A lone row (one prompt) would make the unembedding a matrix-vector product (see LAST_LOGITS_ROWS)
            x_btd = x_btd[:, -(max(1, min(t, LAST_LOGITS_ROWS)) if b == 1 else 1) :]
        x_btd = self.final_norm(x_btd)
        unembed_vd = self.embed_vd[...] if self.unembed_vd is None else self.unembed_vd[...]
        logits = jnp.einsum("btd,vd->btv", x_btd, unembed_vd, preferred_element_type=jnp.float32)
        if last_logits_only:
            logits = logits[:, -1:]
        new_cache = None
        if cache is not None:
            new_cache = KVCache(layers=tuple(new_layers), index=cache.index + t)
        return ModelOutput(logits=logits, cache=new_cache, routing=aux)

    def inference_packs(self) -> dict[str, Array]:
        """Each group's inference packs by ``"{layer}.{attn|mlp}.{attribute}"``: ``moe_lora.pack_group`` while
        ``moe_lora.PACKED_MIN_TOKENS`` is on, and with ``moe_lora.PACK_GATES`` the concatenated gates of each
        group of two or more routed projections (with ``moe_lora.GATE_PACK_ROWS``: transposed, for every group
        with experts). Empty under a device mesh, where A is sharded by expert and the relayout would move it
        between devices. The knobs are read here, at trace time."""
        packs: dict[str, Array] = {}
        if not jax.sharding.get_abstract_mesh().empty:
            return packs
        for i, layer in enumerate(self.layers):
            for owner, name, group in _pack_groups(layer):
                prefix = f"{i}.{'attn' if owner is layer.attn else 'mlp'}.{name}"
                pack = pack_group(group) if moe_lora.PACKED_MIN_TOKENS != sys.maxsize else None
                if pack is not None:
                    packs[f"{prefix}_pack"] = pack
                routed = sum(p.num_experts > 0 for p in group)
                if moe_lora.PACK_GATES and moe_lora.GATE_PACK_ROWS and routed:
                    packs[f"{prefix}_gates_nd"] = moe_lora.concat_gates(group).T
                if moe_lora.PACK_GATES and routed > 1:
                    packs[f"{prefix}_gates"] = moe_lora.concat_gates(group)
        return packs

    def attach_packs(self, packs: dict[str, Array]) -> None:
        """Attaches ``inference_packs()`` (made here or passed in) as ``InferencePack`` attributes.

        Only for a model merged inside a jitted inference function, as the sampler's ``_prefill`` and
        ``_decode`` do: the packs are copies, so on a model that trains they would go stale and pass no
        gradient. The sampler makes them once per model state (``sampler.inference_packs``) and passes them in
        as arguments, which also fixes their layout in memory (row-major, as a jit argument is): inside one
        program XLA could make a transposed pack a bitcast of the gates and undo ``GATE_PACK_ROWS``.
        """
        for key, value in packs.items():
            layer, owner, attr = key.split(".")
            setattr(getattr(self.layers[int(layer)], owner), attr, InferencePack(value))

    def pack_for_inference(self) -> None:
        """``attach_packs(inference_packs())``: packs made inside the caller's program (see both)."""
        self.attach_packs(self.inference_packs())

    def set_attention_implementation(self, name: str) -> None:
        """Selects the attention backend at run time (one of ``ATTENTION_IMPLEMENTATIONS``).

        It is a static attribute of each ``Attention`` module, so jitted callers recompile once per choice.
        """
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {name!r}; one of {ATTENTION_IMPLEMENTATIONS}")
        for layer in self.layers:
            layer.attn.attention_impl = name

    def set_lora_implementation(self, name: str | None) -> None:
        """Selects the grouped-LoRA backend at run time (``None`` = automatic; see ``pallas_kernels``).

        A static attribute of each MoE projection, like the attention choice: jitted callers recompile once.
        """
        self.kernel_implementation = resolve_implementation(
            name, expert_columns=len(self.moe_config.expert_names) * self.moe_config.rank
        )  # validates the name first
        for _, module in nnx.iter_modules(self):
            if isinstance(module, MoELoRALinear):
                module.implementation = name

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
        return KVCache.zeros(
            num_layers=self.config.num_hidden_layers,
            batch=batch,
            max_len=max_len,
            num_kv_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim,
            dtype=dtype or self.dtype,
        )
