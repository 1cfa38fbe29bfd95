"""The model's parameters as a flat ``{dotted.name: array}`` dict, and a strict model builder from one.

Flat names are the NNX state paths, e.g. ``layers.3.attn.q_proj.lora_a_edr``. Converters produce such a dict;
``build_model`` consumes it with strict accounting: every expected name present with its exact shape, no
extra names, no NaN/Inf. That is the one place where a checkpoint meets the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.config import ModelConfig, MoEConfig
from meteora_jax.errors import MeteoraInputError
from meteora_jax.model.llama import MeteoraLlama
from meteora_jax.model.rope import inv_frequencies


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Every ``nnx.Param`` (base, expert and gate) by dotted name; derived buffers are not included."""
    state = nnx.state(model, nnx.Param)
    return {_path_name(path): var.value for path, var in nnx.to_flat_state(state)}


class ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` where only shapes matter (``abstract_model``): ``params()`` is always one key.

    A real ``nnx.Rngs`` bumps a counter variable at every draw. Under ``eval_shape`` that counter is a tracer,
    and Flax's ``set_value`` asks it for ``.sharding``, which makes JAX build an error message it never shows
    by walking the whole trace so far: quadratic in the draws. For SmolLM2-135M with experts (841 draws) the
    abstract model took ~10 s of every ``mj.load``."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_model(cfg: ModelConfig, moe: MoEConfig, dtype: str | jnp.dtype = jnp.float32) -> MeteoraLlama:
    """The model's structure, shapes and dtypes, with no values (``jax.ShapeDtypeStruct`` leaves)."""
    return nnx.eval_shape(lambda: MeteoraLlama(cfg, moe, dtype=dtype, rngs=ShapeOnlyRngs()))


def expected_shapes(cfg: ModelConfig, moe: MoEConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_params(abstract_model(cfg, moe)).items()}


def non_finite_count(arr: np.ndarray) -> int:
    """How many NaN / Inf values a floating (bf16 included) tensor holds; 0 for other dtypes."""
    a = np.asarray(arr)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
        return 0
    return int((~np.isfinite(a.astype(np.float32))).sum())


def check_finite(name: str, arr: np.ndarray, source: str) -> None:
    bad = non_finite_count(arr)
    if bad:
        raise MeteoraInputError(
            f"{source}: tensor {name!r} holds {bad} NaN/Inf value(s). The checkpoint is corrupt or was saved "
            "after a diverged run; re-export it from a healthy model."
        )


def build_model(
    cfg: ModelConfig,
    moe: MoEConfig,
    flat: Mapping[str, np.ndarray],
    *,
    dtype: str | jnp.dtype = jnp.float32,
    source: str = "checkpoint",
) -> MeteoraLlama:
    """A model whose every parameter comes from ``flat`` (cast to ``dtype``; gates and scalings stay float32)."""
    dtype = jnp.dtype(dtype)
    model = abstract_model(cfg, moe, dtype)
    state = nnx.state(model, nnx.Param)
    flat_state = list(nnx.to_flat_state(state))
    expected = {_path_name(p): v for p, v in flat_state}
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise MeteoraInputError(
            f"{source}: parameters do not match the model built from its config "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(extra)}: {extra[:5]}). "
            "The weights and the config come from different models, or the file is incomplete; "
            "re-run `meteora-jax convert` from the original base checkpoint and adapters."
        )
    values = {}
    for name, var in expected.items():
        arr = flat[name]
        if tuple(arr.shape) != tuple(var.value.shape):
            raise MeteoraInputError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, the model expects "
                f"{tuple(var.value.shape)}. The weights and config.json disagree; use the config that came "
                "with these weights."
            )
        check_finite(name, arr, source)
        values[name] = jnp.asarray(np.asarray(arr), dtype=var.value.dtype)
    new_state = nnx.from_flat_state([(p, v.replace(value=values[_path_name(p)])) for p, v in flat_state])
    nnx.update(model, new_state)
    # eval_shape leaves the derived (non-Param) buffers abstract: compute them for real.
    model.inv_freq.value = jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    return model
