"""The steps that make the study's models: ``adapters:A-B`` and ``adapters:baselines`` (K PEFT LoRAs trained
at once, ``peft_train``), ``convert`` (the MeteoRA model and the single-expert pool) and ``gates:topK``
(gate training, ``meteora_jax.train.train_gates``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from meteora_jax.errors import MeteoraInputError
from meteora_jax.study.config import BASELINES, StudyConfig
from meteora_jax.study.state import Ctx, step_names


# ================================================================================================= adapters
def encode_cfg(cfg: StudyConfig, max_seq_len: int = 1 << 20):  # noqa: ANN201 (a TrainConfig)
    from meteora_jax.train.config import TrainConfig

    return TrainConfig(prompt_template=cfg.prompt_template, max_seq_len=max_seq_len, overlong="truncate")


def encode_for_adapters(ctx: Ctx, tokenizer, examples: dict[str, list]) -> tuple[Any, int]:  # noqa: ANN001
    """One ``AdapterData`` of ``{task: examples}`` (tokenised exactly as gate training does), dropping
    sequences over ``adapters.max_seq_len``; returns (data, dropped)."""
    from meteora_jax.study.peft_train import AdapterData
    from meteora_jax.train.data import encode_examples

    names = list(examples)
    enc = encode_examples(examples, tokenizer, encode_cfg(ctx.cfg), names, max_len=1 << 20)
    keep = [i for i, s in enumerate(enc.ids) if len(s) <= ctx.cfg.adapters.max_seq_len]
    if not keep:
        raise MeteoraInputError(f"{names}: every training sequence is longer than adapters.max_seq_len.")
    return AdapterData([enc.ids[i] for i in keep], enc.prompt_len[keep]), len(enc.ids) - len(keep)


def _peft_cfg(ctx: Ctx, *, baselines: bool):  # noqa: ANN202
    from meteora_jax.study.peft_train import PeftTrainConfig

    a = ctx.cfg.adapters
    return PeftTrainConfig(
        r=a.r,
        alpha=a.alpha,
        steps=a.baseline_steps if baselines else a.steps,
        batch_per_adapter=a.baseline_batch_per_adapter if baselines else a.batch_per_adapter,
        learning_rate=a.learning_rate,
        warmup_steps=a.warmup_steps,
        max_seq_len=a.max_seq_len,
        pad_multiple=a.pad_multiple,
        dtype=a.dtype,
        compile=a.compile,
        checkpoint_every=a.checkpoint_every,
        seed=ctx.cfg.seed,
    )


def step_adapters(ctx: Ctx, which: str) -> dict | None:
    from meteora_jax.data.tasks import read_split
    from meteora_jax.study.peft_train import train_adapters
    from meteora_jax.tokenizer import load_tokenizer

    base = ctx.state.outputs("base")["base_hf"]
    data_dir = ctx.state.outputs("data")["data_dir"]
    tok = load_tokenizer(base)
    train = read_split(data_dir, "train", tasks=ctx.tasks)
    if which == "baselines":
        rng = np.random.default_rng([ctx.cfg.seed, 7])
        balanced = {
            t: [exs[i] for i in sorted(rng.permutation(len(exs))[: ctx.cfg.adapters.lora_b_per_task])]
            for t, exs in train.items()
        }
        sets = {"lora_b": balanced, "lora_f": train}
    else:
        lo, hi = (int(x) for x in which.split("-"))
        sets = {t: {t: train[t]} for t in ctx.tasks[lo : hi + 1]}
    adapters_dir = ctx.work / "adapters"
    todo = {n: s for n, s in sets.items() if not (adapters_dir / n / "adapter_config.json").is_file()}
    outputs = {n: str(adapters_dir / n) for n in sets}
    if not todo:
        return {"adapters": outputs}
    datas, dropped = {}, {}
    for name, examples in todo.items():
        datas[name], dropped[name] = encode_for_adapters(ctx, tok, examples)
    stats = train_adapters(
        base,
        datas,
        adapters_dir,
        _peft_cfg(ctx, baselines=which == "baselines"),
        pad_id=int(tok.pad_token_id),
        work_dir=ctx.work / "adapters" / f".train-{which}",
        deadline=ctx.deadline,
        progress=ctx.progress,
        log=ctx.log,
    )
    if not stats:
        return None  # deadline: checkpointed, resume continues
    for n in stats:
        stats[n]["dropped_overlong"] = dropped[n]
    return {"adapters": outputs, "stats": stats}


# ================================================================================================= convert + gates
def step_convert(ctx: Ctx) -> dict:
    from meteora_jax.convert.convert import convert

    base = ctx.state.outputs("base")["base_hf"]
    adapters = {}
    for name in step_names(ctx.cfg, ctx.tasks):
        if name.startswith("adapters:"):
            adapters.update(ctx.state.outputs(name)["adapters"])
    models = ctx.work / "models"
    init, pool = models / "meteora_init", models / "pool"
    if not (init / "config.json").is_file():
        convert(
            base,
            [(t, adapters[t]) for t in ctx.tasks],
            str(init),
            top_k=2,
            seed=ctx.cfg.seed,
            overwrite=True,
            progress=ctx.progress,
        )
    if not (pool / "config.json").is_file():
        names = [*ctx.tasks, *BASELINES]
        convert(
            base,
            [(n, adapters[n]) for n in names],
            str(pool),
            top_k=1,
            seed=ctx.cfg.seed,
            overwrite=True,
            progress=ctx.progress,
        )
    return {"meteora_init": str(init), "pool": str(pool)}


def step_gates(ctx: Ctx, top_k: int) -> dict:
    from meteora_jax.train.loop import REPORT_FILE, train_gates

    init = ctx.state.outputs("convert")["meteora_init"]
    data_dir = ctx.state.outputs("data")["data_dir"]
    out = ctx.work / "models" / f"meteora_top{top_k}"
    tcfg = ctx.cfg.gate_train_config(top_k).replace(
        progress=ctx.progress, work_dir=str(ctx.work / "models" / f".gates_top{top_k}.train")
    )
    if not (out / REPORT_FILE).is_file():
        train_gates(init, data_dir, str(out), tcfg, resume=True, overwrite=True, log=ctx.log)
    report = json.loads((out / REPORT_FILE).read_text())
    held = report.get("held_out", {})
    return {
        "model": str(out),
        "top_k": top_k,
        "routing_acc": held.get("routing_acc"),
        "routing_acc_contextual": held.get("routing_acc_contextual"),
        "held_out_tokens": held.get("tokens"),
    }
