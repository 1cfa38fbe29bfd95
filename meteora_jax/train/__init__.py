"""Gate training the MeteoRA way: objective, data, jitted step, resumable loop, add-adapter."""

from meteora_jax.train.config import TrainConfig, load_config
from meteora_jax.train.loop import TrainResult, train_gates

__all__ = ["TrainConfig", "TrainResult", "load_config", "train_gates"]
