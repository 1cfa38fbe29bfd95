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


def step_gates(ctx: Ctx, top_k: int) -> dict | None:
    """Trains the top-k gates; None when ``ctx.deadline`` stopped it (checkpointed: ``--resume`` continues)."""
    import meteora_jax as mj
    from meteora_jax.train.loop import REPORT_FILE, train_gates

    init = ctx.state.outputs("convert")["meteora_init"]
    data_dir = ctx.state.outputs("data")["data_dir"]
    out = ctx.work / "models" / f"meteora_top{top_k}"
    tcfg = ctx.cfg.gate_train_config(top_k).replace(
        progress=ctx.progress, work_dir=str(ctx.work / "models" / f".gates_top{top_k}.train")
    )
    attention = ""
    if not (out / REPORT_FILE).is_file():
        model = mj.load(init, dtype=tcfg.dtype or None)
        attention = pick_attention(ctx.cfg.gate_attention(), model, max(tcfg.buckets), log=ctx.log)
        model.set_attention_implementation(attention)
        # the held-out evaluation and the model's write come after the last step: keep time for them
        deadline = None if ctx.deadline is None else ctx.deadline - GATES_FINISH_RESERVE_S
        res = train_gates(
            init,
            data_dir,
            str(out),
            tcfg,
            resume=True,
            overwrite=True,
            log=ctx.log,
            model=model,
            deadline=deadline,
        )
        if res.final_step < tcfg.steps:
            return None
    report = json.loads((out / REPORT_FILE).read_text())
    held = report.get("held_out", {})
    return {
        "model": str(out),
        "top_k": top_k,
        "attention": attention or None,
        "dtype": tcfg.dtype or "as saved",
        "routing_acc": held.get("routing_acc"),
        "routing_acc_response": held.get("routing_acc_response"),
        "routing_acc_contextual": held.get("routing_acc_contextual"),
        "gate_ce": held.get("gate_ce"),
        "held_out_tokens": held.get("tokens"),
    }


# Seconds kept back from ``--max-minutes`` for what follows the last training step (held-out routing over
# eval_examples_per_task x 22 sequences, the model's write): ESTIMATED, not measured separately on the H200.
GATES_FINISH_RESERVE_S = 45.0


def pick_attention(requested: str, model, seq_len: int, *, log=print) -> str:  # noqa: ANN001
    """The attention implementation for gate training: ``requested`` unless it is ``auto``.

    ``auto``: ``einsum`` (the reference) off GPU; on a GPU ``cudnn`` (fused flash attention) when the model
    computes in bf16/fp16 and a forward + backward of this model's attention shape compiles and matches
    ``xla`` there, else ``xla``. The probe is one small program (batch 2), compiled once per process.
    """
    import jax

    if requested != "auto":
        return requested
    if jax.default_backend() != "gpu":
        return "einsum"
    if model.dtype.itemsize != 2:
        log(f"attention: xla (cudnn needs bf16/fp16; the model computes in {model.dtype})")
        return "xla"
    try:
        err = _cudnn_mismatch(model.config, model.dtype, seq_len)
    except Exception as e:  # noqa: BLE001 (any lowering/compile/runtime failure means: not here)
        log(f"attention: xla (cudnn failed on this GPU: {type(e).__name__}: {str(e)[:200]})")
        return "xla"
    if err > 0.05:
        log(f"attention: xla (cudnn differs from xla by {err:.3f}, relative)")
        return "xla"
    log(f"attention: cudnn (matches xla to {err:.4f}, relative)")
    return "cudnn"


def _cudnn_mismatch(cfg, dtype, seq_len: int) -> float:  # noqa: ANN001
    """Largest relative difference between cudnn and xla attention (outputs and q/k/v gradients) on random
    inputs of the model's head layout, with a causal + right-padding mask as training batches have."""
    import jax
    import jax.numpy as jnp

    from meteora_jax.model.llama import attention

    b, t, n, kv, h = 2, seq_len, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kq, kk, kvv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, n, h), dtype)
    k = jax.random.normal(kk, (b, t, kv, h), dtype)
    v = jax.random.normal(kvv, (b, t, kv, h), dtype)
    cot = jax.random.normal(kc, (b, t, n, h), jnp.float32)
    valid_bs = jnp.arange(t)[None, :] < jnp.array([t, t // 2])[:, None]
    mask_bts = jnp.tril(jnp.ones((t, t), bool))[None] & valid_bs[:, None, :]

    def run(impl: str) -> tuple:
        def loss(q, k, v):  # noqa: ANN001, ANN202
            out = attention(q, k, v, mask_bts, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * cot), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return (out, *grads)

    worst = 0.0
    for a, ref in zip(run("cudnn"), run("xla")):
        a, ref = jnp.asarray(a, jnp.float32), jnp.asarray(ref, jnp.float32)
        worst = max(worst, float(jnp.max(jnp.abs(a - ref)) / (jnp.max(jnp.abs(ref)) + 1e-6)))
    return worst
