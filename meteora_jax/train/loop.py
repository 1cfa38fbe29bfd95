"""``train_gates``: the whole run, from a model directory + task data to a trained model directory.

Order of work, chosen so that bad input never leaves anything behind: load the model, the tokenizer and
every data file, check tasks against experts and the mesh against the batch -- all before the first write.
Then, in ``work_dir`` (default ``<out>.train``): ``metrics.jsonl`` (one line per ``log_every`` steps) and
Orbax checkpoints (every ``checkpoint_every`` steps and at the end). Finally the trained model is written
to ``out`` atomically with ``meteora_jax.io`` (loadable by ``mj.load``), with the held-out routing report
and the metrics beside it. The work directory stays, so ``--resume`` works even after the end.

The same code runs on one CPU, simulated CPU devices, a GPU or a TPU slice: parameters are placed by their
logical axes on a ``(data, expert)`` mesh, batches are split over ``data`` and XLA partitions the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from meteora_jax import sharding
from meteora_jax.errors import MeteoraInputError
from meteora_jax.io import atomic_directory, load, read_model_config, write_model_dir, write_text_atomic
from meteora_jax.tokenizer import load_tokenizer
from meteora_jax.train import checkpoint as ckpt
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.conversations import conversation_groups
from meteora_jax.train.data import TaskData, batch_indices, eval_batches, load_task_data, make_batch
from meteora_jax.train.objective import gate_names
from meteora_jax.train.step import (
    TrainState,
    aggregate,
    init_state,
    make_eval_step,
    make_train_step,
    routing_for,
)

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "training_report.json"


@dataclasses.dataclass
class TrainResult:
    out_dir: str
    work_dir: str
    final_step: int
    held_out: dict[str, Any]
    notes: list[str]


def _check_out(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise MeteoraInputError(
            f"{out_dir}: output path already exists. Choose a new --out, or pass --overwrite to replace it."
        )


def _truncate_metrics(path: str, last_step: int) -> None:
    """On resume: drop lines logged after the checkpoint we restart from (they will be logged again)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is gone too
    write_text_atomic(path, "".join(keep))


def evaluate_held_out(
    state: TrainState,
    cfg: TrainConfig,
    data: TaskData,
    names: list[str],
    pad_id: int,
    eval_step: Callable,
    place: Callable,
) -> dict[str, Any]:
    if len(data.held_out) == 0:
        return {}
    metrics = [
        jax.device_get(eval_step(state.trainable, state.frozen, place(b.as_dict())))
        for b in eval_batches(data.held_out, cfg, pad_id=pad_id, batch_size=cfg.batch_size)
    ]
    return aggregate(metrics, names)


def train_gates(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    model: Any = None,
    extra_config: dict | None = None,
    stop_after: int | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Trains the gates of ``model_dir`` on ``data_dir`` and writes the trained model to ``out_dir``.

    ``model`` may be passed already loaded (add-adapter builds one); ``stop_after`` ends the process's work
    at that step without writing ``out_dir`` (tests of interrupted runs). ``deadline`` (epoch seconds): the
    first step that ends after it is checkpointed and the run returns without writing ``out_dir``
    (``final_step < cfg.steps``); ``resume=True`` continues from there, exactly as if never stopped.
    """
    model_dir, data_dir = os.fspath(model_dir), os.fspath(data_dir)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out(out_dir, overwrite)
    work_dir = os.path.abspath(cfg.work_dir or f"{out_dir}.train")
    ckpt_dir = os.path.join(work_dir, "checkpoints")
    if not resume and ckpt.latest_step(ckpt_dir) is not None:
        raise MeteoraInputError(
            f"{work_dir} holds checkpoints of an earlier run: pass --resume to continue it, or remove it."
        )

    # -- everything read and checked before the first write
    if model is None:
        model = load(model_dir, dtype=cfg.dtype or None)
    if model.moe_config.num_experts == 0:
        raise MeteoraInputError(f"{model_dir}: the model has no experts, so there are no gates to train.")
    tokenizer = load_tokenizer(model_dir)
    names = gate_names(model)
    data = load_task_data(
        data_dir, tokenizer, cfg, model.expert_names, context_len=model.config.max_position_embeddings
    )
    if len(data.train) == 0:
        raise MeteoraInputError(f"{data_dir}: no training examples.")
    mesh = sharding.make_mesh(cfg.mesh_data or None, cfg.mesh_expert)
    if cfg.batch_size % mesh.shape["data"]:
        raise MeteoraInputError(
            f"batch_size {cfg.batch_size} does not split over the mesh's data axis of {mesh.shape['data']} "
            "devices; pick a multiple (--set batch_size=...) or set mesh_data."
        )
    pad_id = int(tokenizer.pad_token_id)
    notes = list(data.notes)
    for n in notes:
        log(f"note: {n}")

    with jax.set_mesh(mesh):
        sharding.shard_model(model, mesh)
        state = init_state(model, cfg)
        state.trainable = sharding.shard_state(state.trainable, mesh)
        state.opt = sharding.shard_state(state.opt, mesh)
        batch_sh = sharding.batch_sharding(mesh)

        def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            return {k: jax.device_put(v, batch_sh) for k, v in batch.items()}

        start = 0
        os.makedirs(work_dir, exist_ok=True)
        metrics_path = os.path.join(work_dir, METRICS_FILE)
        if resume and ckpt.latest_step(ckpt_dir) is not None:
            start, trees, _ = ckpt.restore_checkpoint(ckpt_dir, _trees(state), cfg)
            state.trainable, state.opt = trees["trainable"], trees["opt"]
            _truncate_metrics(metrics_path, start)
            log(f"resumed from step {start} ({ckpt_dir})")
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)

        routing = routing_for(model, cfg)
        train_step = make_train_step(state, cfg, routing)
        eval_step = make_eval_step(state, cfg, routing)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        reached = _run(
            state,
            cfg,
            data,
            pad_id,
            place,
            train_step,
            eval_step,
            names,
            start,
            end,
            ckpt_dir,
            metrics_path,
            deadline=deadline,
        )
        if reached < cfg.steps:
            if reached < end:
                log(f"deadline reached at step {reached}/{cfg.steps}: checkpoint saved in {ckpt_dir}")
            return TrainResult(out_dir, work_dir, reached, {}, notes)
        if start < cfg.steps or ckpt.latest_step(ckpt_dir) != cfg.steps:
            ckpt.save_checkpoint(ckpt_dir, cfg.steps, _trees(state), cfg)
        held = evaluate_held_out(state, cfg, data, names, pad_id, eval_step, place)
        final_model = state.model()
        if jax.process_count() > 1:
            # multi-host: every process holds a shard; gather, and let process 0 alone write
            from flax import nnx
            from jax.experimental import multihost_utils

            nnx.update(final_model, multihost_utils.process_allgather(nnx.state(final_model), tiled=True))
            if jax.process_index() != 0:
                return TrainResult(out_dir, work_dir, cfg.steps, held, notes)

    # -- the trained model, written atomically
    report = {
        "steps": cfg.steps,
        "held_out": held,
        "notes": notes,
        "config": cfg.to_dict(),
        "source_model": os.path.abspath(model_dir),
        "data": os.path.abspath(data_dir),
    }
    # where the experts came from (`export-adapter` names the base from it) stays with the trained model
    source_meta = read_model_config(model_dir)
    carried = {k: source_meta[k] for k in ("converted_from",) if k in source_meta}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_model_dir(
            final_model,
            tmp,
            # the prompt format travels with the model: `eval` / `generate` apply it (--prompt-template auto)
            extra_config={
                **carried,
                "training": {
                    "steps": cfg.steps,
                    "mode": cfg.mode,
                    "prompt_template": cfg.prompt_template,
                    "add_bos": cfg.add_bos,
                },
                **(extra_config or {}),
            },
            tokenizer_dir=model_dir,
        )
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
        if os.path.isfile(metrics_path):
            shutil.copy2(metrics_path, os.path.join(tmp, METRICS_FILE))
    if held:
        log(
            f"held-out routing accuracy: all tokens {held['routing_acc']:.3f}, response tokens "
            f"{held['routing_acc_response']:.3f} (gates with context: {held['routing_acc_response_contextual']:.3f}); "
            f"gate CE {held['gate_ce']:.4f}"
        )
    log(f"wrote {out_dir}")
    return TrainResult(out_dir, work_dir, cfg.steps, held, notes)


def _trees(state: Any) -> dict:
    """What a checkpoint holds: the trainable (gate) params and the optimizer state."""
    return {"trainable": state.trainable, "opt": state.opt}


def _run(
    state: TrainState,
    cfg: TrainConfig,
    data: TaskData,
    pad_id: int,
    place: Callable,
    train_step: Callable,
    eval_step: Callable,
    names: list[str],
    start: int,
    end: int,
    ckpt_dir: str,
    metrics_path: str,
    *,
    deadline: float | None = None,
) -> int:
    """Steps ``start..end``; returns the last step done (< end only when ``deadline`` stopped the loop, after
    a checkpoint of that step)."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps, initial=start, disable=not cfg.progress, desc="train-gate", dynamic_ncols=True
    )
    t0, tokens, in_flight = time.perf_counter(), 0, None
    with open(metrics_path, "a") as mf:
        for step in range(start, end):
            idx = batch_indices(data.train, step, cfg)
            groups = None
            if cfg.composite_fraction > 0:
                groups = conversation_groups(
                    data.train,
                    step,
                    idx,
                    seed=cfg.seed,
                    fraction=cfg.composite_fraction,
                    max_turns=cfg.composite_max_turns,
                )
            batch = make_batch(
                data.train,
                idx,
                pad_id=pad_id,
                buckets=cfg.buckets,
                response_only=cfg.response_only,
                groups=groups,
            )
            tokens += int(batch.mask_bl.sum())
            state.trainable, state.opt, m = train_step(
                state.trainable, state.opt, state.frozen, place(batch.as_dict())
            )
            done = step + 1
            if done % max(cfg.log_every, 1) == 0 or done == end:
                m = jax.device_get(m)
                dt = time.perf_counter() - t0
                line = {
                    "step": done,
                    "loss": float(m["loss"]),
                    "lm_loss": float(m["lm_loss"]),
                    "gate_ce": float(m["gate_ce"]),
                    "balance": float(m["balance"]),
                    "routing_acc": float(m["routing_acc"]),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens_per_s": tokens / max(dt, 1e-9),
                }
                if cfg.eval_every and done % cfg.eval_every == 0:
                    held = evaluate_held_out(state, cfg, data, names, pad_id, eval_step, place)
                    if held:
                        line["held_out_routing_acc"] = held["routing_acc"]
                mf.write(json.dumps(line) + "\n")
                mf.flush()
                bar.set_postfix(
                    loss=f"{line['loss']:.3f}",
                    gate_ce=f"{line['gate_ce']:.3f}",
                    acc=f"{line['routing_acc']:.2f}",
                )
                t0, tokens = time.perf_counter(), 0
            bar.update(1)
            saved = bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps)
            if saved:
                ckpt.save_checkpoint(ckpt_dir, done, _trees(state), cfg)
            if deadline is not None and done < end:
                # keep one step in flight: the clock then measures work done, not work queued by async dispatch
                jax.block_until_ready(in_flight)
                in_flight = m
                if time.time() >= deadline:
                    if not saved:
                        ckpt.save_checkpoint(ckpt_dir, done, _trees(state), cfg)
                    bar.close()
                    return done
    bar.close()
    return end
