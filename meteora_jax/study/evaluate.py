"""The single-task evaluation steps: ``eval:single`` (base, oracle, LoRA-B, LoRA-F) and ``eval:meteora``
(MeteoRA top-1 / top-2 with no task label, plus teacher-forced routing accuracy), and the pieces the
composite step shares (test sets, batched greedy generation, scoring, loaded models).

Design choices, and why:

* Single-expert systems share ONE compiled program. base / oracle / LoRA-B / LoRA-F run on one 1-expert model
  whose expert slot is overwritten in place (from the converted 24-expert pool) before each system: the
  sampler's jit cache keys on the graph, not the weights, so 25 systems cost one compile per shape. "base"
  is that model with the expert's scaling set to 0 (its contribution is exactly zero). Forcing expert e in
  the 22-expert model instead would compile 22 programs (the forced index is static).
* Few shapes. The sampler pads prompts AND the new-token budget to ``eval.min_bucket`` (1024 >=
  ``eval.max_prompt_tokens``: every kept prompt falls in one bucket) and every batch is filled to
  ``eval.batch_size`` rows, so each model compiles ONE prefill and ONE decode program for all 22 tasks.
  With min_bucket 512 it was two of each (prompt buckets 512 and 1024): ~110-120 s of compiles per model
  were measured in the first two tasks; about half of that is saved (ESTIMATED). The KV cache is then 2048
  slots; the decode steps reading it cost well under a second per task.
* One gate training serves MeteoRA top-1 and top-2: ``eval.meteora_top_ks`` loads the trained gates with k
  experts per token (``meteora_gates`` records which gates each system used).
* Every finished (system, task) score is written to ``<work>/eval/<name>.json`` at once, so a run stopped at
  the deadline loses nothing and the next ``--resume`` continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from meteora_jax.study.config import BASELINES, StudyConfig
from meteora_jax.study.state import Ctx, write_json
from meteora_jax.study.training import encode_cfg


@dataclasses.dataclass
class TestSet:
    """One task's evaluation prompts: token ids (templated as in training), raw prompts and references."""

    ids: list[list[int]]
    prompts: list[str]
    refs: list[str]
    dropped_overlong: int
    max_new_tokens: int


def load_test_sets(ctx: Ctx, tokenizer) -> dict[str, TestSet]:  # noqa: ANN001
    from meteora_jax.data.tasks import Example, read_split
    from meteora_jax.train.data import encode_examples

    ev = ctx.cfg.eval
    test = read_split(ctx.state.outputs("data")["data_dir"], "test", tasks=ctx.tasks)
    sets = {}
    for task, exs in test.items():
        # Prompt ids exactly as training builds them: encode with an empty response, keep the prompt part.
        probe = {task: [Example(task, e.prompt, "") for e in exs]}
        enc = encode_examples(probe, tokenizer, encode_cfg(ctx.cfg), [task], max_len=1 << 20)
        keep = [i for i, n in enumerate(enc.prompt_len) if n <= ev.max_prompt_tokens]
        kept = keep[: ev.max_per_task] if ev.max_per_task else keep
        refs = [exs[i].response for i in kept]
        longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs), default=8)
        sets[task] = TestSet(
            ids=[enc.ids[i][: enc.prompt_len[i]].tolist() for i in kept],
            prompts=[exs[i].prompt for i in kept],
            refs=refs,
            dropped_overlong=len(exs) - len(keep),
            max_new_tokens=min(ev.max_new_tokens, 2 * longest + 8),
        )
    return sets


def generate_texts(
    sampler: Any, ids: list[list[int]], routing: Any, *, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers for every prompt, in full batches of ``batch_size`` (static shapes), longest first."""
    return generate_with_trace(
        sampler, ids, routing, batch_size=batch_size, max_new_tokens=max_new_tokens, trace_of=None
    )[0]


def generate_with_trace(
    sampler: Any,
    ids: list[list[int]],
    routing: Any,
    *,
    batch_size: int,
    max_new_tokens: int,
    trace_of: int | None,
    min_prompt_bucket: int | None = None,
) -> tuple[list[str], tuple[Any, int] | None]:
    """``generate_texts``, and with ``trace_of`` = i the routing of prompt i: (its batch's
    ``GenerationResult``, its row there). Only that batch records routing (a static flag: its own program)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    trace = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [ids[i] for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))  # filler rows: same shape, answers discarded
        record = trace_of in idx
        res = sampler.generate(
            batch,
            max_new_tokens=max_new_tokens,
            routing=routing,
            return_routing=record,
            min_prompt_bucket=min_prompt_bucket,
        )
        if record:
            trace = (res, idx.index(trace_of))
        for j, i in enumerate(idx):
            out[i] = res.texts[j]
    return out, trace


def headline_metric(task: str) -> str:
    from meteora_jax.eval.metrics import default_metric_for_task

    return default_metric_for_task(task)


def score(task: str, preds: list[str], ts: TestSet) -> dict:
    from meteora_jax.eval.metrics import score_task

    scores = score_task(task, preds, ts.refs, ts.prompts)
    return {
        "score": scores[headline_metric(task)],
        "metrics": scores,
        "n": len(preds),
        "per_example": per_example_scores(task, preds, ts, scores[headline_metric(task)]),
        "examples": [{"pred": p, "ref": r} for p, r in list(zip(preds, ts.refs))[:3]],
    }


def per_example_scores(task: str, preds: list[str], ts: TestSet, corpus_score: float) -> list[float] | None:
    """The headline metric of each test example alone, in test-set order (the same for every system, so two
    systems' lists pair up), or None when the metric is not a mean over examples (corpus BLEU): the list must
    average to ``corpus_score``."""
    from meteora_jax.eval.metrics import score_task

    metric = headline_metric(task)
    each = [
        float(score_task(task, [p], [r], [q], metrics=[metric])[metric])
        for p, r, q in zip(preds, ts.refs, ts.prompts)
    ]
    if not each or abs(float(np.mean(each)) - corpus_score) > 1e-6 * max(1.0, abs(corpus_score)):
        return None
    return [round(x, 4) for x in each]


class SingleExpertBench:
    """One 1-expert model whose expert slot is refilled from the converted pool (see the module docstring)."""

    def __init__(self, pool_dir: str, dtype: str, min_bucket: int):
        import meteora_jax as mj
        from meteora_jax.config import MoEConfig
        from meteora_jax.generate import Sampler
        from meteora_jax.model.params_io import build_model, flat_params
        from meteora_jax.tokenizer import load_tokenizer

        pool = mj.load(pool_dir, dtype=dtype)
        self.names = pool.expert_names
        flat = {k: np.asarray(v) for k, v in flat_params(pool).items()}
        self.experts = {
            k: v for k, v in flat.items() if k.endswith(("lora_a_edr", "lora_b_ero", "scaling_e"))
        }
        one = {}
        for k, v in flat.items():
            if k in self.experts:
                one[k] = v[:1]
            elif k.endswith("gate_de"):
                one[k] = v[:, :1]
            else:
                one[k] = v
        moe = MoEConfig(
            expert_names=("adapter",),  # one constant name: the graph (and so the compile) is shared
            target_modules=pool.moe_config.target_modules,
            rank=pool.moe_config.rank,
            top_k=1,
        )
        self.model = build_model(pool.config, moe, one, dtype=dtype, source=pool_dir)
        del pool, flat, one
        self.tokenizer = load_tokenizer(pool_dir)
        self.sampler = Sampler(self.model, self.tokenizer, min_bucket=min_bucket)
        self.routing = self.model.routing_options(force_expert=0)

    def use(self, expert: str | None) -> None:
        """Puts pool expert ``expert`` in the slot; None = the base model (scaling 0: no contribution)."""
        import jax.numpy as jnp
        from flax import nnx

        e = 0 if expert is None else self.names.index(expert)
        state = nnx.state(self.model, nnx.Param)
        flat = dict(nnx.to_flat_state(state))
        updates = []
        for path, var in flat.items():
            name = ".".join(str(p) for p in path)
            if name in self.experts:
                val = self.experts[name][e : e + 1]
                if expert is None and name.endswith("scaling_e"):
                    val = np.zeros_like(val)
                updates.append((path, var.replace(value=jnp.asarray(val, var[...].dtype))))
        nnx.update(self.model, nnx.from_flat_state(updates))
        self.sampler.refresh()


def load_eval(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"scores": {}}


Prepare = Callable[[str], tuple[Any, Any]]  # task -> (sampler, routing)


def _eval_loop(ctx: Ctx, name: str, systems: list[tuple[str, Prepare, bool]]) -> dict | None:
    """Scores every (system, task) not yet in ``<work>/eval/<name>.json``; stops (None) at the deadline.

    ``systems``: (name, prepare, per_task); ``prepare(task)`` readies the model (once, or per task when
    ``per_task``: the oracle swaps in each task's adapter)."""
    from meteora_jax.tokenizer import load_tokenizer

    path = ctx.work / "eval" / f"{name}.json"
    results = load_eval(path)
    tok = load_tokenizer(ctx.state.outputs("convert")["pool"])
    sets = load_test_sets(ctx, tok)
    for system, prepare, per_task in systems:
        todo = [t for t in ctx.tasks if t not in results["scores"].get(system, {})]
        if not todo:
            continue
        sampler = routing = None
        for task in todo:
            if ctx.time_left() < 30:
                ctx.log(f"{name}: deadline; {system} stopped before {task} (finished scores are kept)")
                return None
            t0 = time.perf_counter()
            if sampler is None or per_task:
                sampler, routing = prepare(task)
            ts = sets[task]
            preds = generate_texts(
                sampler, ts.ids, routing, batch_size=ctx.cfg.eval.batch_size, max_new_tokens=ts.max_new_tokens
            )
            row = score(task, preds, ts)
            row["seconds"] = time.perf_counter() - t0
            row["dropped_overlong"] = ts.dropped_overlong
            results["scores"].setdefault(system, {})[task] = row
            write_json(path, results)
            ctx.log(f"{name}: {system:13s} {task:42s} {row['score']:6.1f}  ({row['seconds']:.1f} s)")
    return {"results": str(path)}


def step_eval_single(ctx: Ctx) -> dict | None:
    ev = ctx.cfg.eval
    bench: list[SingleExpertBench] = []

    def get() -> SingleExpertBench:
        if not bench:
            bench.append(single_bench(ctx.state.outputs("convert")["pool"], ev.dtype, ev.min_bucket))
        return bench[0]

    def system(expert: str | None) -> Prepare:
        def prepare(task: str) -> tuple[Any, Any]:
            b = get()
            b.use(task if expert == "oracle" else expert)
            return b.sampler, b.routing

        return prepare

    systems = [("base", system(None), False), ("oracle", system("oracle"), True)]
    systems += [(b, system(b), False) for b in BASELINES]
    return _eval_loop(ctx, "single", systems)


# Loaded models, kept for the process: the eval steps of one device call share them (a load costs seconds;
# compiled programs are shared anyway, jit caches on the graph).
_MODELS: dict[tuple, Any] = {}


def single_bench(pool_dir: str, dtype: str, min_bucket: int) -> SingleExpertBench:
    key = ("single", os.path.abspath(pool_dir), dtype, min_bucket)
    if key not in _MODELS:
        _MODELS[key] = SingleExpertBench(pool_dir, dtype, min_bucket)
    return _MODELS[key]


def _meteora_model(ctx: Ctx, top_k: int, copy: str = "") -> tuple[Any, Any]:
    """(sampler, routing) of the MeteoRA model ``meteora_gates(ctx.cfg, top_k)`` names, loaded once per
    process; ``copy`` names a separate instance for a system that rewrites its weights (same graph, so the
    compiled programs are shared)."""
    import meteora_jax as mj
    from meteora_jax.generate import Sampler
    from meteora_jax.tokenizer import load_tokenizer

    model_dir = ctx.state.outputs(meteora_gates(ctx.cfg, top_k)["gates"])["model"]
    key = ("meteora", os.path.abspath(model_dir), ctx.cfg.eval.dtype, ctx.cfg.eval.min_bucket, top_k, copy)
    if key not in _MODELS:
        model = mj.load(model_dir, dtype=ctx.cfg.eval.dtype, top_k=top_k)
        sampler = Sampler(model, load_tokenizer(model_dir), min_bucket=ctx.cfg.eval.min_bucket)
        _MODELS[key] = (sampler, model.routing_options())
    return _MODELS[key]


def meteora_system(ctx: Ctx, top_k: int) -> Prepare:
    """MeteoRA with ``top_k`` experts per token at inference, from the gates ``meteora_gates(ctx.cfg, top_k)``
    names (one gate training serves every k: ``top_k`` is a load-time routing setting)."""
    return lambda task="": _meteora_model(ctx, top_k)


def oracle_layers_system(ctx: Ctx, top_k: int, layers: int) -> Prepare:
    """The ablation ``meteora_top<k>_oracle_first<L>`` (``eval.ablation.FirstLayersForced``) on its own copy
    of the MeteoRA model, since its weights change per task."""

    def prepare(task: str) -> tuple[Any, Any]:
        from meteora_jax.eval.ablation import FirstLayersForced

        sampler, routing = _meteora_model(ctx, top_k, copy=f"oracle_first{layers}")
        # kept beside that copy for the process: it snapshots the trained weights once, before any use()
        key = ("first_layers_forced", id(sampler.model), layers)
        if key not in _MODELS:
            _MODELS[key] = FirstLayersForced(sampler.model, layers)
        _MODELS[key].use(task)
        sampler.refresh()
        return sampler, routing

    return prepare


def meteora_gates(cfg: StudyConfig, top_k: int) -> dict:
    """How system ``meteora_top<top_k>`` was obtained: its gate-training step, the top_k those gates were
    trained with, and the k it runs with (written into ``eval/meteora.json`` and the report)."""
    trained = cfg.trained_top_k(top_k)
    return {"gates": f"gates:top{trained}", "trained_top_k": trained, "eval_top_k": top_k}


def step_eval_meteora(ctx: Ctx) -> dict | None:
    ks = ctx.cfg.meteora_top_ks()
    path = ctx.work / "eval" / "meteora.json"
    results = load_eval(path)
    results["systems"] = {f"meteora_top{k}": meteora_gates(ctx.cfg, k) for k in ks}
    write_json(path, results)
    systems = [(f"meteora_top{k}", meteora_system(ctx, k), False) for k in ks]
    main_k = ctx.cfg.main_top_k()
    systems += [
        (f"meteora_top{main_k}_oracle_first{n}", oracle_layers_system(ctx, main_k, n), True)
        for n in ctx.cfg.oracle_layers()
    ]
    out = _eval_loop(ctx, "meteora", systems)
    if out is None:
        return None
    results = load_eval(path)
    if "routing" not in results and ctx.cfg.eval.routing_per_task:
        if ctx.time_left() < 60:
            return None
        results["routing"] = teacher_forced_routing(ctx, ctx.cfg.main_top_k())
        write_json(path, results)
    return out


def teacher_forced_routing(ctx: Ctx, top_k: int) -> dict:
    """Routing accuracy the harness's way (``eval.routing``): prompt + reference through one forward, share of
    response tokens whose top-1 expert, at every MoE projection, is the task's.

    ONE compiled program: ``teacher_forced_top1`` pads each batch of ``eval.batch_size`` pairs to the length
    bucket of its longest pair (and its row count to a power of two), so the pairs are dealt longest-first
    round-robin over the batches (every batch then holds one of the longest pairs: the same length bucket)
    and the list is filled up to whole batches with repeats (discarded). Padding is masked; the forward
    compute it adds is seconds, each extra compile of the 22-expert forward ~15-20 s (ESTIMATED)."""
    from meteora_jax.eval.routing import teacher_forced_top1
    from meteora_jax.generate.sampler import moe_projections

    sampler, _ = meteora_system(ctx, top_k)()
    model, tok = sampler.model, sampler.tokenizer
    sets = load_test_sets(ctx, tok)
    pairs, owner = [], []
    for task in ctx.tasks:
        ts = sets[task]
        for ids, ref in list(zip(ts.ids, ts.refs))[: ctx.cfg.eval.routing_per_task]:
            resp = list(tok(ref, add_special_tokens=False)["input_ids"])
            if resp:
                pairs.append((ids, resp))
                owner.append(task)
    order = one_bucket_order([len(p) + len(r) for p, r in pairs], ctx.cfg.eval.batch_size)
    top1 = teacher_forced_top1(
        model, [pairs[i] for i in order], batch_size=ctx.cfg.eval.batch_size, include_prompt=True
    )
    # per task: one [T_resp, L, P] hit array (top-1 == the task's expert) and one prompt-level hit per example;
    # prompt level = the expert most often top-1 over all its response tokens, layers and projections
    hits: dict[str, list[np.ndarray]] = {t: [] for t in ctx.tasks}
    majority: dict[str, list[bool]] = {t: [] for t in ctx.tasks}
    prompt_hits: dict[str, list[np.ndarray]] = {"shared_prefix": [], "task_text": [], "last_prompt_token": []}
    prefix = common_prefix_len([p for p, _ in pairs])
    seen = set()
    for i, full_tlp in zip(order, top1):
        if i in seen:  # a filler repeat
            continue
        seen.add(i)
        expert = model.expert_names.index(owner[i])
        lp = len(pairs[i][0])
        top1_tlp = full_tlp[lp:]
        hits[owner[i]].append(top1_tlp == expert)
        majority[owner[i]].append(bool(np.bincount(top1_tlp.ravel()).argmax() == expert))
        prompt_hits["shared_prefix"].append(full_tlp[:prefix] == expert)
        prompt_hits["task_text"].append(full_tlp[prefix : lp - 1] == expert)
        prompt_hits["last_prompt_token"].append(full_tlp[lp - 1 : lp] == expert)
    all_hits = [h for hs in hits.values() for h in hs]
    all_tlp = np.concatenate(all_hits) if all_hits else np.zeros((0, 0, 0), bool)
    return {
        "overall": float(all_tlp.mean()) if all_tlp.size else 0.0,
        "per_task": {t: float(np.concatenate(hs).mean()) if hs else None for t, hs in hits.items()},
        "per_layer": [float(x) for x in all_tlp.mean(axis=(0, 2))] if all_tlp.size else [],
        # which projections' gates miss: their inputs differ (q/k/v and gate/up read the normed residual, o the
        # attention output, down the MLP's activation), so a layer's figure can hide one weak projection
        "per_projection": {p: float(all_tlp[:, :, j].mean()) for j, p in enumerate(moe_projections(model))}
        if all_tlp.size
        else {},
        "per_layer_projection": [[float(x) for x in row] for row in all_tlp.mean(axis=0)]
        if all_tlp.size
        else [],
        "prompt_majority": float(np.mean([m for ms in majority.values() for m in ms])) if all_hits else 0.0,
        "prompt_majority_per_task": {t: float(np.mean(ms)) if ms else None for t, ms in majority.items()},
        "prompt_tokens": prompt_token_routing(prompt_hits, prefix),
        "top_k": top_k,
        "pairs": len(pairs),
    }


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares (the chat template's system turn and user header):
    tokens whose routing cannot depend on the task, since a causal model has seen no task text yet."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    for j in range(n):
        if any(s[j] != seqs[0][j] for s in seqs):
            return j
    return n


def prompt_token_routing(parts: dict[str, list[np.ndarray]], prefix: int) -> dict:
    """Supplementary routing figures over PROMPT tokens (the must-show counts response tokens only): the
    oracle runs its task's adapter on every prompt token too, so misrouted prompt tokens change the KV cache
    MeteoRA answers from. ``shared_prefix``: the template tokens before any task text; ``task_text``: the rest
    but the last; ``last_prompt_token``: the token whose hidden state predicts the answer's first token."""
    out: dict[str, Any] = {"shared_prefix_tokens": prefix}
    for name, hs in parts.items():
        hs = [h for h in hs if h.size]
        tlp = np.concatenate(hs) if hs else np.zeros((0, 0, 0), bool)
        out[name] = {
            "overall": float(tlp.mean()) if tlp.size else None,
            "per_layer": [float(x) for x in tlp.mean(axis=(0, 2))] if tlp.size else [],
            "tokens": int(tlp.shape[0]),
        }
    return out


def one_bucket_order(lengths: list[int], batch_size: int) -> list[int]:
    """Indices into ``lengths`` such that consecutive chunks of ``batch_size`` all have the same longest
    length bucket and are all full: the n longest are dealt one per chunk (n = number of chunks), the rest
    fill the chunks round-robin, and short chunks are topped up with repeats of the longest (to discard)."""
    if not lengths:
        return []
    chunks = -(-len(lengths) // batch_size)
    by_len = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = [[i] for i in by_len[:chunks]]
    for j, i in enumerate(by_len[chunks:]):
        rows[j % chunks].append(i)
    for r in rows:
        r += [by_len[0]] * (batch_size - len(r))
    return [i for r in rows for i in r]
