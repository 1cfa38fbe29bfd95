"""meteora-jax: MeteoRA (many LoRA adapters as token-routed experts) in JAX / Flax NNX.

import meteora_jax as mj
model = mj.load("DIR", dtype="float32")
logits = model(input_ids)                       # routed by the gates
logits = model(input_ids, force_expert="name")  # one adapter alone, weight 1
"""

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError
from meteora_jax.generate import generate
from meteora_jax.io import load, save
from meteora_jax.model.gate import RoutingOptions
from meteora_jax.model.llama import MeteoraLlama, ModelOutput
from meteora_jax.params import ExpertParam, GateParam

__all__ = [
    "ExpertParam",
    "GateParam",
    "MeteoraInputError",
    "MeteoraLlama",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "RoutingOptions",
    "generate",
    "load",
    "save",
]
