"""Frozen configs: the base model (read from an HF ``config.json``) and the MoE-LoRA layer.

``ModelConfig.from_hf_dict`` accepts both the transformers v4 form (``rope_theta``, ``rope_scaling``,
``torch_dtype``) and the v5 form (``rope_parameters``, ``dtype``). Everything derived is a
``cached_property`` so that the stored fields stay the single source of truth.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from meteora_jax.errors import MeteoraInputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTING_MODES = ("topk_then_softmax", "softmax_then_topk")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` in {"default", "linear", "llama3"}."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder: Llama 2/3.x, Mistral, Qwen2, SmolLM2."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 always, Llama when configured)
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    @functools.cached_property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @functools.cached_property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of one of the 7 adaptable projections."""
        d, m = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, m),
            "up_proj": (d, m),
            "down_proj": (m, d),
        }[name]

    def projection_has_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.attention_bias
        if name == "o_proj":
            return self.o_bias
        return self.mlp_bias

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Reads an HF config dict (transformers v4 or v5 layout)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MeteoraInputError(
                f"{source}: model_type {model_type!r} is not a LLaMA-family architecture this tool supports "
                f"({', '.join(SUPPORTED_MODEL_TYPES)}). Point --base at a Llama, Mistral, Qwen2 or SmolLM2 "
                "checkpoint."
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in cfg:
                raise MeteoraInputError(
                    f"{source}: required field {key!r} is missing. The file is not a complete transformers "
                    "config.json; re-export it with `model.config.save_pretrained(dir)`."
                )
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # v5 moves rope_theta and rope_scaling into one `rope_parameters` dict.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_scaling_raw = cfg.get("rope_scaling") or {}
        if rope_params and not rope_scaling_raw:
            rope_scaling_raw = rope_params
        rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope_scaling_raw.get("rope_type", rope_scaling_raw.get("type", "default")) or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise MeteoraInputError(
                f"{source}: rope scaling type {rope_type!r} is not supported (default, linear, llama3 are)."
            )
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope_scaling_raw.get("factor", 1.0) or 1.0),
            low_freq_factor=float(rope_scaling_raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_scaling_raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope_scaling_raw.get("original_max_position_embeddings", 8192)
            ),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if model_type == "qwen2":
            attention_bias = True
        else:
            attention_bias = bool(cfg.get("attention_bias", False))
        sliding = None
        if model_type == "mistral" and cfg.get("sliding_window"):
            sliding = int(cfg["sliding_window"])
        if model_type == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            sliding = int(cfg["sliding_window"])
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=bool(cfg.get("attention_bias", False)) and model_type == "llama",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MeteoraInputError(
                f"{path}: no such file. A base checkpoint directory must hold config.json."
            )
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise MeteoraInputError(f"{path}: not valid JSON ({e}). Re-export the config.") from e
        return cls.from_hf_dict(cfg, source=path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def llama3_8b(cls, **overrides: Any) -> ModelConfig:
        """Llama-3(.1)-8B's shapes (random-weight benchmarks)."""
        base = dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
            max_position_embeddings=131072,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def smollm2_135m(cls, **overrides: Any) -> ModelConfig:
        """SmolLM2-135M's shapes (a Llama with tied embeddings)."""
        base = dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A few-thousand-parameter Llama shared by tests and the demo."""
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
        )
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """How the experts are embedded and routed.

    Attributes:
      expert_names: one name per expert, in expert order (the gates' output order).
      target_modules: which of the 7 projections carry experts and a gate.
      rank: r_max; experts of lower rank are zero-padded up to it.
      top_k: experts per token (k >= 1).
      temperature: gate softmax temperature T.
      routing: "topk_then_softmax" (MeteoRA's inference default) or "softmax_then_topk" (its training path).
      implementation: the grouped-LoRA backend (None = automatic, resolved per platform at run time).
    """

    expert_names: tuple[str, ...] = ()
    target_modules: tuple[str, ...] = PROJECTIONS
    rank: int = 8
    top_k: int = 2
    temperature: float = 1.0
    routing: str = "topk_then_softmax"
    implementation: str | None = None

    def __post_init__(self) -> None:
        if len(set(self.expert_names)) != len(self.expert_names):
            dup = sorted({n for n in self.expert_names if self.expert_names.count(n) > 1})
            raise MeteoraInputError(f"duplicate expert names {dup}: give each --adapter a distinct NAME.")
        bad = [t for t in self.target_modules if t not in PROJECTIONS]
        if bad:
            raise MeteoraInputError(f"unknown target modules {bad}; choose from {list(PROJECTIONS)}.")
        if self.routing not in ROUTING_MODES:
            raise MeteoraInputError(f"routing {self.routing!r} unknown; choose from {list(ROUTING_MODES)}.")
        if self.top_k < 1:
            raise MeteoraInputError(f"top_k must be >= 1, got {self.top_k}.")
        if self.expert_names and self.top_k > len(self.expert_names):
            raise MeteoraInputError(
                f"top_k={self.top_k} is larger than the number of experts ({len(self.expert_names)}); "
                f"pass --top-k between 1 and {len(self.expert_names)}."
            )
        if self.temperature <= 0:
            raise MeteoraInputError(f"temperature must be > 0, got {self.temperature}.")
        if self.implementation is not None:
            from pallas_kernels.grouped_lora.api import resolve_implementation

            try:
                resolve_implementation(self.implementation)
            except ValueError as e:
                raise MeteoraInputError(
                    f"{e}. Leave it unset to pick the fastest backend automatically."
                ) from e

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["expert_names"] = list(self.expert_names)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        d = dict(d)
        d["expert_names"] = tuple(d.get("expert_names", ()))
        d["target_modules"] = tuple(d.get("target_modules", PROJECTIONS))
        return cls(**d)
