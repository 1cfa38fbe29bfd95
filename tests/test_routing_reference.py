"""The routed forward vs a float64 NumPy MoE-LoRA reference of the whole model.

The reference is written from the math, not from the model's code: embedding lookup, RMSNorm, RoPE in the
rotate-half layout, grouped-query causal attention, SwiGLU MLP, and in every adapted projection the gate
logits x @ G / T, a per-token top-k, and the weighted sum of scaled LoRA deltas. The model comes out of
``convert`` (Qwen2 base: GQA + q/k/v biases; three real PEFT adapters with mixed ranks and partial targets),
with its fresh gates replaced by larger random ones so that routing is decisive and differs per token.
"""

import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.convert.convert import convert
from meteora_jax.model.params_io import build_model, flat_params
from meteora_jax.testing.peft_adapters import make_peft_adapter
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint

pytest.importorskip("peft")

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
TOL = 1e-5


@pytest.fixture(scope="module")
def flat_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    base = make_tiny_hf_checkpoint(root / "base", "qwen2", seed=11)
    adapters = [
        ("a", make_peft_adapter(base, root / "a", seed=1, r=4, alpha=8)),
        (
            "b",
            make_peft_adapter(
                base, root / "b", seed=2, r=8, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]
            ),
        ),
        (
            "c",
            make_peft_adapter(
                base, root / "c", seed=3, r=2, alpha=6, use_rslora=True, layers_to_transform=[0]
            ),
        ),
    ]
    model = mj.load(convert(base, adapters, str(root / "m"), progress=False))
    flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
    rng = np.random.default_rng(0)
    for k in flat:
        if k.endswith("gate_de"):
            flat[k] = (rng.standard_normal(flat[k].shape) / np.sqrt(flat[k].shape[0]) * 3).astype(np.float32)
    model = build_model(model.config, model.moe_config, flat, dtype="float32")
    return {k: v.astype(np.float64) for k, v in flat.items()}, model


def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x_tnh, pos_t, theta):
    h = x_tnh.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = pos_t[:, None] * inv[None, :]  # [T, H/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x_tnh[..., : h // 2], x_tnh[..., h // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Reference:
    """float64 forward of one sequence; records every projection's chosen experts."""

    def __init__(self, p, cfg, top_k, temperature, mode):
        self.p, self.cfg, self.k, self.t, self.mode = p, cfg, top_k, temperature, mode
        self.min_gap = np.inf  # smallest k-th vs (k+1)-th logit gap: routing must be decisive for the test

    def proj(self, prefix, x_td):
        p = self.p
        y = x_td @ p[f"{prefix}.kernel_io"]
        if f"{prefix}.bias_o" in p:
            y = y + p[f"{prefix}.bias_o"]
        if f"{prefix}.gate_de" not in p:
            return y
        logits = x_td @ p[f"{prefix}.gate_de"] / self.t  # [T, E]
        order = np.argsort(-logits, axis=-1, kind="stable")
        if self.k < logits.shape[1]:
            srt = np.take_along_axis(logits, order, axis=-1)
            self.min_gap = min(self.min_gap, float((srt[:, self.k - 1] - srt[:, self.k]).min()))
        for tok in range(x_td.shape[0]):
            chosen = order[tok, : self.k]
            if self.mode == "topk_then_softmax":
                z = logits[tok, chosen]
                w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            else:
                probs = np.exp(logits[tok] - logits[tok].max())
                probs /= probs.sum()
                w = probs[chosen] / probs[chosen].sum()
            for e, we in zip(chosen, w):
                a, b, s = (
                    p[f"{prefix}.lora_a_edr"][e],
                    p[f"{prefix}.lora_b_ero"][e],
                    p[f"{prefix}.scaling_e"][e],
                )
                y[tok] += we * s * (x_td[tok] @ a) @ b
        return y

    def __call__(self, ids_t):
        cfg, p = self.cfg, self.p
        n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        t = len(ids_t)
        pos = np.arange(t, dtype=np.float64)
        x = p["embed_vd"][ids_t]
        for i in range(cfg.num_hidden_layers):
            pre = f"layers.{i}"
            h = _rms(x, p[f"{pre}.input_norm.scale_d"], cfg.rms_norm_eps)
            q = _rope(self.proj(f"{pre}.attn.q_proj", h).reshape(t, n, hd), pos, cfg.rope_theta)
            k = _rope(self.proj(f"{pre}.attn.k_proj", h).reshape(t, kv, hd), pos, cfg.rope_theta)
            v = self.proj(f"{pre}.attn.v_proj", h).reshape(t, kv, hd)
            out = np.zeros((t, n, hd))
            for head in range(n):
                g = head // (n // kv)  # query heads share KV heads in consecutive groups
                s = q[:, head] @ k[:, g].T / np.sqrt(hd)
                s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
            x = x + self.proj(f"{pre}.attn.o_proj", out.reshape(t, n * hd))
            h = _rms(x, p[f"{pre}.post_attn_norm.scale_d"], cfg.rms_norm_eps)
            gate = self.proj(f"{pre}.mlp.gate_proj", h)
            up = self.proj(f"{pre}.mlp.up_proj", h)
            x = x + self.proj(f"{pre}.mlp.down_proj", gate / (1 + np.exp(-gate)) * up)
        x = _rms(x, p["final_norm.scale_d"], cfg.rms_norm_eps)
        return x @ p.get("unembed_vd", p["embed_vd"]).T


@pytest.mark.parametrize(
    "mode,top_k,temperature",
    [
        ("topk_then_softmax", 1, 0.7),
        ("topk_then_softmax", 2, 0.7),
        ("topk_then_softmax", 3, 2.5),
        ("softmax_then_topk", 1, 2.5),
        ("softmax_then_topk", 2, 2.5),
        ("softmax_then_topk", 3, 0.7),
    ],
)
def test_routed_forward_matches_float64_reference(flat_and_model, mode, top_k, temperature):
    p64, model = flat_and_model
    ids = np.random.default_rng(top_k).integers(3, 260, size=(2, 9))
    routing = model.routing_options(top_k=top_k, temperature=temperature, mode=mode)
    got = np.asarray(model.forward(ids, routing=routing).logits)
    ref_fn = Reference(p64, model.config, top_k, temperature, mode)
    ref = np.stack([ref_fn(row) for row in ids])
    assert ref_fn.min_gap > 1e-4 or top_k == 3  # decisive routing (k = E has no k+1-th expert)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"[routing] {mode} k={top_k} T={temperature}: max|diff|/max|ref| = {rel:.2e}")  # shown with -s
    assert rel <= TOL, f"max|diff|/max|ref| = {rel:.2e}"


def test_routing_is_not_trivial(flat_and_model):
    """Different tokens pick different experts, and routed logits differ from every single expert's."""
    _, model = flat_and_model
    ids = np.random.default_rng(5).integers(3, 260, size=(1, 12))
    out = model.forward(ids, routing=model.routing_options(top_k=1), return_routing=True)
    first = [np.asarray(r["expert_ids"])[:, 0] for r in out.routing]
    assert any(len(set(f.tolist())) > 1 for f in first)
    routed = np.asarray(out.logits)
    for e in range(3):
        assert np.abs(routed - np.asarray(model(ids, force_expert=e))).max() > 1e-3
