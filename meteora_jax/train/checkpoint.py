"""Orbax checkpoints of a gate-training run, and exact resumption.

A checkpoint at step ``s`` holds what the rest of the run depends on and nothing else:

* ``state``: the trained variables (gates; + LoRA factors in gate_and_experts mode) and the optimizer state
  (AdamW moments, the step count that drives the schedule), as pure nested dicts of arrays. The frozen
  base is re-read from the model directory (``save_base_in_checkpoint`` adds it for self-contained runs);
* ``meta`` (JSON): the step, the data position (the batch of step ``s`` is a pure function of (seed, s), so
  the position *is* the step), the seed, and the config, checked on resume so that a changed schedule or
  data order cannot silently break "resume == uninterrupted".

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
(SIGKILL included) leaves the previous checkpoint as the latest; saves are synchronous for that reason.
Restoring goes through abstract arrays carrying the current shardings, so a run may resume on another mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from meteora_jax.errors import MeteoraInputError
from meteora_jax.train.config import TrainConfig

# config keys that may differ between a run and its resumption without changing any result
OPERATIONAL_KEYS = frozenset(
    {
        "progress",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "work_dir",
        "mesh_data",
        "mesh_expert",
    }
)


def _manager(directory: str, cfg: TrainConfig):  # noqa: ANN202
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(cfg.keep_checkpoints, 1), create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _to_pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def latest_step(directory: str) -> int | None:
    if not os.path.isdir(directory):
        return None
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
        return mngr.latest_step()


def save_checkpoint(
    directory: str, step: int, trees: dict[str, nnx.State], cfg: TrainConfig, extra_meta: dict | None = None
) -> None:
    """Writes checkpoint ``step`` (``trees``: name -> nnx.State, e.g. trainable / opt)."""
    import orbax.checkpoint as ocp

    meta = {
        "step": step,
        "data_position": step,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        **(extra_meta or {}),
    }
    state = {k: _to_pure(v) for k, v in trees.items()}
    with _manager(directory, cfg) as mngr:
        mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )
        mngr.wait_until_finished()


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, directory: str) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in OPERATIONAL_KEYS and saved.get(k) != now[k])
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise MeteoraInputError(
            f"{directory}: cannot resume: the config differs from the checkpointed run ({pairs}), which would "
            "change the result. Resume with the same config, or start over in a new --out."
        )


def restore_checkpoint(
    directory: str, trees: dict[str, nnx.State], cfg: TrainConfig
) -> tuple[int, dict[str, nnx.State], dict[str, Any]]:
    """(step, restored trees, meta) of the newest checkpoint; ``trees`` gives structure, dtypes, shardings."""
    import orbax.checkpoint as ocp

    with _manager(directory, cfg) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise MeteoraInputError(f"{directory}: no complete checkpoint to resume from.")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_compatible(meta.get("config", {}), cfg, directory)
        pure = {k: _to_pure(v) for k, v in trees.items()}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), pure
        )
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
            "state"
        ]
    out = {}
    for k, tree in trees.items():
        nnx.replace_by_pure_dict(tree, restored[k])
        out[k] = tree
    return int(step), out, meta
