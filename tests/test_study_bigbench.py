"""The BIG-bench study end to end at toy scale on CPU, and its multi-adapter trainer against real PEFT.

A synthetic BIG-bench-like sdist (3 tasks, the real member layout) goes through ``pack-data``; a tiny
SmolLM2-shaped HF checkpoint stands in for the GGUF base. The pipeline test runs every step (adapters,
convert, one gate training (top-2), the four single-expert systems, MeteoRA top-1 and top-2 from those
gates, composite-3, report) with a handful of
steps each, then checks resume, the report schema and the "must show" table. The trainer tests compare with
independent oracles: ``peft.PeftModel.from_pretrained`` on the exported directories, and the same adapter
trained alone (stacking must change nothing) or interrupted and resumed.
"""

import io
import json
import os
import random
import tarfile
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from meteora_jax.errors import MeteoraInputError  # noqa: E402
from meteora_jax.study import config as C  # noqa: E402
from meteora_jax.study import evaluate as E  # noqa: E402
from meteora_jax.study import packs as K  # noqa: E402
from meteora_jax.study import peft_train as P  # noqa: E402
from meteora_jax.study import pipeline as S  # noqa: E402
from meteora_jax.study import report as R  # noqa: E402
from meteora_jax.study import state as T  # noqa: E402
from meteora_jax.testing.tiny_hf import PAD_ID, make_tiny_hf_checkpoint  # noqa: E402

TASKS = ("length", "reverse", "upper")
_FN = {"length": lambda w: str(len(w)), "reverse": lambda w: w[::-1], "upper": str.upper}


def make_sdist(path):
    """Three generative tasks in the sdist's member layout (bigbench-1.0.0/bigbench/benchmark_tasks/...)."""
    rng = random.Random(0)
    with tarfile.open(path, "w:gz") as tf:
        for task in TASKS:
            words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(60)]
            data = {
                "name": task,
                "examples": [{"input": f"{task}: {w}", "target": [_FN[task](w)]} for w in words],
            }
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return str(path)


def toy_overrides(tmp):
    return [
        f"work_dir={tmp}/work",
        f"stash_dir={tmp}/stash",
        f"base_hf={tmp}/base",
        "prompt_template=plain",
        f"data.tasks=[{','.join(TASKS)}]",
        f"data.pack={tmp}/pack.tar.gz",
        "data.max_train=40",
        "data.max_test=8",
        "adapters.steps=4",
        "adapters.batch_per_adapter=2",
        "adapters.dtype=float32",
        "adapters.chunk_size=2",
        "adapters.baseline_steps=3",
        "adapters.baseline_batch_per_adapter=2",
        "adapters.lora_b_per_task=8",
        "adapters.max_seq_len=64",
        "adapters.pad_multiple=16",
        "adapters.checkpoint_every=2",
        "gates={top_k: [2], steps: 3, batch_size: 4, max_seq_len: 64, length_buckets: [64], "
        "eval_examples_per_task: 2, checkpoint_every: 0, log_every: 1, progress: false}",
        "eval.max_per_task=4",
        "eval.max_new_tokens=6",
        "eval.batch_size=4",
        "eval.min_bucket=256",  # one prompt bucket for single-task and composite prompts: shared compiles
        "eval.routing_per_task=4",  # 12 pairs = 3 full batches: one compile
        "eval.oracle_layers=[1]",  # the ablation system meteora_top2_oracle_first1
        "composite.sizes=[3]",
        f"composite.tasks_3=[{','.join(TASKS)}]",
        "composite.num_prompts=2",
        "composite.shots=1",
        "composite.batch_size=4",  # = eval.batch_size: the composite reuses the compiled programs
        "composite.tokens_per_answer=6",
        "composite.max_prompt_tokens=500",
    ]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "base", "smollm2")


# ------------------------------------------------------------------------------------------------ config
def test_config_is_strict_and_typed(tmp_path):
    cfg = C.load_study_config(
        C.Path("configs/bigbench_small.yaml"), ["adapters.steps=7", "eval.dtype=bfloat16"], seed=3
    )
    assert cfg.adapters.steps == 7 and cfg.eval.dtype == "bfloat16" and cfg.seed == 3
    assert str(cfg.work_path()).endswith("seed3")
    assert cfg.gate_train_config(1).top_k == 1 and cfg.gate_train_config(2).gate_loss_weight == 50.0
    with pytest.raises(MeteoraInputError, match="adapters.*unknown key"):
        C.load_study_config(None, ["adapters.stepz=3"])
    with pytest.raises(MeteoraInputError, match="adapters.steps"):
        C.load_study_config(None, ["adapters.steps=many"])
    with pytest.raises(MeteoraInputError, match="composite.protocol: 'numberd' is not one of"):
        C.load_study_config(None, ["composite.protocol=numberd"])
    assert C.load_study_config(None, ["composite.protocol=numbered"]).composite.protocol == "numbered"
    with pytest.raises(MeteoraInputError, match="gates"):
        C.load_study_config(None, ["gates={stepz: 3}"])  # at load, not at the gates step
    with pytest.raises(MeteoraInputError, match="gates.*detach_gate_inputs"):
        C.load_study_config(None, ["gates.detach_gate_inputs=true"])
    with pytest.raises(MeteoraInputError, match="gates.attention"):
        C.load_study_config(None, ["gates.attention=flash"])
    assert C.load_study_config(None, ["gates.detach_gate_input=true"]).gate_train_config(2).detach_gate_input
    names = T.step_names(C.load_study_config(None), T.default_tasks())
    assert names[:4] == ["data", "base", "adapters:0-10", "adapters:11-21"] and names[-1] == "report"


def test_one_gate_training_serves_top1_and_top2():
    """gates.top_k [2]: one gates step; meteora_top1 runs the top-2-trained gates with k=1."""
    cfg = C.load_study_config(C.Path("configs/bigbench_small.yaml"))
    names = T.step_names(cfg, T.default_tasks())
    assert [n for n in names if n.startswith("gates:")] == ["gates:top2"]
    assert cfg.meteora_top_ks() == (1, 2) and cfg.main_top_k() == 2
    assert E.meteora_gates(cfg, 1) == {"gates": "gates:top2", "trained_top_k": 2, "eval_top_k": 1}
    assert E.meteora_gates(cfg, 2) == {"gates": "gates:top2", "trained_top_k": 2, "eval_top_k": 2}
    both = C.load_study_config(None, ["gates={top_k: [1, 2]}"])
    assert [n for n in T.step_names(both, ["a"]) if n.startswith("gates:")] == ["gates:top1", "gates:top2"]
    assert E.meteora_gates(both, 1)["gates"] == "gates:top1"
    with pytest.raises(MeteoraInputError, match="eval.meteora_top_ks"):
        C.load_study_config(None, ["eval.meteora_top_ks=[]"]).meteora_top_ks()
    with pytest.raises(MeteoraInputError, match="gates.top_k"):
        C.load_study_config(None, ["gates={top_k: [0]}"]).gate_top_ks()


def test_eval_shapes_fall_in_one_bucket():
    """The real config: every kept prompt and every task's new-token budget pad to the same bucket, each
    task is one batch; teacher-forced routing batches all have one length bucket and one row count."""
    from meteora_jax.generate.sampler import bucket

    ev = C.load_study_config(C.Path("configs/bigbench_small.yaml")).eval
    assert {bucket(n, ev.min_bucket) for n in range(1, ev.max_prompt_tokens + 1)} == {ev.min_bucket}
    assert {bucket(n, ev.min_bucket) for n in range(1, ev.max_new_tokens + 1)} == {ev.min_bucket}
    assert ev.max_per_task <= ev.batch_size
    rng = random.Random(0)
    lengths = [rng.randint(20, 1100) for _ in range(1093)]
    order = E.one_bucket_order(lengths, ev.batch_size)
    assert set(order) == set(range(len(lengths))) and len(order) % ev.batch_size == 0
    chunks = [order[i : i + ev.batch_size] for i in range(0, len(order), ev.batch_size)]
    assert {bucket(max(lengths[i] for i in c), 16) for c in chunks} == {bucket(max(lengths), 16)}


@pytest.mark.parametrize("min_bucket, programs", [(32, 3), (128, 1)])
def test_eval_compiles_once_per_model(tmp_path, min_bucket, programs):
    """Tasks with prompts of 5..120 tokens: min_bucket >= the longest prompt compiles ONE prefill and ONE
    decode program for all of them (a smaller min_bucket: one per power-of-two prompt bucket)."""
    import meteora_jax as mj
    from meteora_jax.generate import Sampler
    from meteora_jax.generate import sampler as gen
    from meteora_jax.testing.synthetic_tasks import make_tiny_meteora_dir
    from meteora_jax.testing.tiny_hf import make_tokenizer

    model = mj.load(make_tiny_meteora_dir(tmp_path / f"m{min_bucket}", max_positions=512), top_k=2)
    sampler = Sampler(model, make_tokenizer(), min_bucket=min_bucket)
    rng = random.Random(min_bucket)
    before = gen.prefill_program()._cache_size(), gen._decode._cache_size()
    for longest in (5, 30, 60, 120):  # four "tasks", each with its own prompt lengths and answer budget
        ids = [[rng.randint(3, 60) for _ in range(rng.randint(1, longest))] for _ in range(3)] + [
            [7] * longest
        ]
        texts = E.generate_texts(sampler, ids, None, batch_size=4, max_new_tokens=3 + longest % 7)
        assert len(texts) == 4
    after = gen.prefill_program()._cache_size(), gen._decode._cache_size()
    assert (after[0] - before[0], after[1] - before[1]) == (programs, programs)


def test_gate_attention_choice(monkeypatch):
    """auto: einsum off GPU; on a GPU cudnn only where its forward + backward matches xla, else xla."""
    import jax
    import jax.numpy as jnp

    from meteora_jax.model import llama
    from meteora_jax.study import training as G

    cfg = C.load_study_config(None, ["gates={attention: xla}"])
    assert cfg.gate_attention() == "xla" and "attention" not in cfg.gate_train_config(1).to_dict()
    assert C.load_study_config(None).gate_attention() == "auto"
    with pytest.raises(MeteoraInputError, match="gates.attention"):
        C.load_study_config(None, ["gates={attention: flash}"]).gate_attention()
    heads = type("Cfg", (), {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    model = type("Model", (), {"config": heads, "dtype": jnp.dtype(jnp.bfloat16)})
    logs = []
    assert G.pick_attention("auto", model, 64, log=logs.append) == "einsum"  # this CPU
    assert G.pick_attention("xla", model, 64, log=logs.append) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert G.pick_attention("auto", model, 64, log=logs.append) == "xla"  # cuDNN absent: its error falls back
    assert "cudnn failed" in logs[-1]
    # the probe itself, with the reference einsum standing in for cudnn: bf16 agreement -> cudnn
    real = llama.attention
    monkeypatch.setattr(
        llama,
        "attention",
        lambda *a, implementation: real(
            *a, implementation="einsum" if implementation == "cudnn" else implementation
        ),
    )
    assert G.pick_attention("auto", model, 64, log=logs.append) == "cudnn", logs[-1]
    model.dtype = jnp.dtype(jnp.float32)
    assert G.pick_attention("auto", model, 64, log=logs.append) == "xla"


def test_compile_cache_keeps_programs_in_the_work_dir(tmp_path):
    """In a fresh process (the cache is process-global): a compiled program lands in <work>/xla_cache."""
    import subprocess
    import sys

    code = (
        "import sys, jax, jax.numpy as jnp; from pathlib import Path; from meteora_jax.study import pipeline; "
        "pipeline.enable_compile_cache(Path(sys.argv[1]), min_compile_s=0.0); "
        "print(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum())"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, capture_output=True)
    assert any((tmp_path / "xla_cache").iterdir())


def test_out_state_carries_partial_results(tmp_path, monkeypatch):
    """Every call's $OUT/study_state.json carries the finished scores (no per-example lists) and held-out gate
    summaries, so a call cut short still brings them back; a failing read never hides the state."""
    work = tmp_path / "work"
    row = {"score": 40.0, "n": 3, "examples": [{"pred": "x" * 100, "ref": "y"}], "seconds": 1.0}
    T.write_json(work / "eval" / "single.json", {"scores": {"base": {"upper": row}}})
    routing = {"overall": 0.9, "per_task": {"upper": 0.9}}
    T.write_json(
        work / "eval" / "meteora.json", {"scores": {"meteora_top2": {"upper": row}}, "routing": routing}
    )
    comp = {"3": {"meteora": {"correct": 1.0, "attempted": 2.0, "examples": [1]}}}
    T.write_json(work / "eval" / "composite.json", {"scores": comp, "routing_plot": {"top1_lt": [[0] * 50]}})
    held = {"routing_acc": 0.5, "routing_acc_per_layer": {"0": 0.5}, "routing_acc_per_gate": {"g": 0.5}}
    T.write_json(work / "models" / "meteora_top2" / "training_report.json", {"held_out": held})
    log = [{"step": 50, "loss": 3.123456, "gate_ce": 0.5, "grad_norm": 1.0}, {"step": 100, "gate_ce": 0.25}]
    (work / "models" / "meteora_top2" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(x) for x in log) + "\n{cut sho"
    )
    state = T.StudyState(work)
    state.step("gates:top2").update(done=True, outputs={"model": str(work / "models" / "meteora_top2")})
    state.step("gates:top1")  # not finished: not reported

    got = S.out_state(work, state)
    assert got["steps"] == state.data["steps"]
    part = got["partial_results"]
    assert part["eval"]["single"] == {"scores": {"base": {"upper": {"score": 40.0, "n": 3, "seconds": 1.0}}}}
    assert part["eval"]["meteora"]["routing"] == routing
    assert part["eval"]["composite"] == {"scores": {"3": {"meteora": {"correct": 1.0, "attempted": 2.0}}}}
    # the training log comes back as a curve: headline keys, rounded; a torn last line is skipped
    curve = [{"step": 50, "loss": 3.123, "gate_ce": 0.5}, {"step": 100, "gate_ce": 0.25}]
    assert part["gates"] == {
        "gates:top2": {"routing_acc": 0.5, "routing_acc_per_layer": {"0": 0.5}, "curve": curve}
    }

    monkeypatch.setattr(S, "OUT_STATE_MAX_BYTES", 10)
    small = S.out_state(work, state)["partial_results"]
    assert small["truncated"] and small["eval"]["single"]["scores"] == {"base": {"upper": 40.0}}
    assert small["gates"] == {"gates:top2": {"routing_acc": 0.5}}
    (work / "models" / "meteora_top2" / "training_report.json").write_text("{not json")
    assert "error" in S.out_state(work, state)["partial_results"]

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    cfg = C.load_study_config(None, [f"work_dir={tmp_path}/w2", f"data.tasks=[{','.join(TASKS)}]"])
    S.run_study(cfg, steps=["report"], max_minutes=0.01, progress=False, log=lambda s: None)
    assert "partial_results" in json.loads((out / "study_state.json").read_text())


# ------------------------------------------------------------------------------------------------ trainer
def _toy_datas(names, n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: P.AdapterData(
            ids=[rng.integers(3, 250, size=rng.integers(10, 40)).astype(np.int32) for _ in range(n)],
            prompt_len=rng.integers(3, 9, size=n),
        )
        for name in names
    }


def test_stacked_lora_export_loads_in_peft_with_same_logits(tiny_base, tmp_path):
    cfg = P.PeftTrainConfig(dtype="float32")
    names = ["a", "b", "c"]
    model = P.load_base_for_training(tiny_base, "float32", "cpu")
    wrappers = P.attach_stacked_lora(model, names, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B is zero after init: give every slot a visible, distinct delta
        for w in wrappers.values():
            w.lora_b_kor.copy_(0.1 * torch.randn(w.lora_b_kor.shape, generator=gen))
    assert len(wrappers) == 2 * 7
    tok = torch.randint(3, 250, (3 * 2, 17), generator=gen)  # adapter-major: 2 rows per adapter
    with torch.no_grad():
        ours = model(input_ids=tok).logits
    for k, name in enumerate(names):
        out = P.export_peft_adapter(wrappers, k, str(tmp_path / name), cfg, base_dir=tiny_base)
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert saved["r"] == 8 and saved["lora_alpha"] == 16 and len(saved["target_modules"]) == 7
        base = P.load_base_for_training(tiny_base, "float32", "cpu")
        ref_model = peft.PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            ref = ref_model(input_ids=tok[2 * k : 2 * k + 2]).logits
        np.testing.assert_allclose(ours[2 * k : 2 * k + 2].numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def _exported(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_stacking_and_resume_change_nothing(tiny_base, tmp_path, monkeypatch):
    cfg = P.PeftTrainConfig(steps=5, batch_per_adapter=3, dtype="float32", pad_multiple=8, checkpoint_every=2)
    datas = _toy_datas(["a", "b"])
    stats = P.train_adapters(tiny_base, datas, tmp_path / "together", cfg, pad_id=PAD_ID, progress=False)
    assert set(stats) == {"a", "b"} and stats["a"]["adapters_per_process"] == 2
    P.train_adapters(tiny_base, {"a": datas["a"]}, tmp_path / "alone", cfg, pad_id=PAD_ID, progress=False)
    # interrupted after 3 steps (a fake clock that passes the deadline), then resumed from the checkpoint
    clock = iter(range(100))
    monkeypatch.setattr(P.time, "time", lambda: float(next(clock)))
    work = tmp_path / "ckpt"
    cut = P.train_adapters(
        tiny_base,
        {"a": datas["a"]},
        tmp_path / "resumed",
        cfg,
        pad_id=PAD_ID,
        progress=False,
        deadline=2.5,
        work_dir=work,
    )
    assert cut == {} and (work / P.CKPT_FILE).is_file() and not (tmp_path / "resumed" / "a").exists()
    monkeypatch.undo()
    P.train_adapters(
        tiny_base, {"a": datas["a"]}, tmp_path / "resumed", cfg, pad_id=PAD_ID, progress=False, work_dir=work
    )
    together, alone, resumed = (_exported(tmp_path / d / "a") for d in ("together", "alone", "resumed"))
    assert together.keys() == alone.keys() == resumed.keys()
    moved = 0.0
    for key in together:
        np.testing.assert_allclose(together[key], alone[key], rtol=1e-4, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(resumed[key], alone[key], rtol=1e-4, atol=1e-6, err_msg=key)
        if "lora_B" in key:
            moved += float(np.abs(alone[key]).sum())
    assert moved > 0  # B left zero: the adapter trained


# ------------------------------------------------------------------------------------------------ packs
def test_wheel_split_join_and_stash(tmp_path, monkeypatch):
    wheel = tmp_path / "cache" / K.SMOLLM2_WHEEL_NAME
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(K.SMOLLM2_GGUF_MEMBER, os.urandom(5000))
    monkeypatch.setattr("meteora_jax.testing.tiny_hf.cache_dir", lambda: str(wheel.parent))
    monkeypatch.setattr(K, "_download_wheels", lambda dst: _fake_wheel(dst / "gguf-0.0-py3-none-any.whl"))
    manifest = K.pack_base(tmp_path / "repo")
    a, b = tmp_path / "repo" / K.PACK_A, tmp_path / "repo" / K.PACK_B
    assert [p["name"] for p in manifest["parts"]] == [
        f"{K.SMOLLM2_WHEEL_NAME}.part0",
        f"{K.SMOLLM2_WHEEL_NAME}.part1",
    ]
    # device call 1 carries pack_a only, call 2 pack_b only: the stash joins them
    os.rename(b, tmp_path / "b_elsewhere")
    stash = tmp_path / "stash"
    assert f"{K.SMOLLM2_WHEEL_NAME}.part0" in K.stash(tmp_path / "repo", stash)
    assert (stash / "site" / "fakepkg" / "__init__.py").is_file()
    with pytest.raises(MeteoraInputError, match="part1 not found"):
        K._join_wheel([stash], tmp_path / "joined.whl")
    os.rename(a, tmp_path / "a_elsewhere")
    os.rename(tmp_path / "b_elsewhere", b)
    K.stash(tmp_path / "repo", stash)
    joined = K._join_wheel([stash], tmp_path / "joined.whl")
    assert joined.read_bytes() == wheel.read_bytes()
    (stash / f"{K.SMOLLM2_WHEEL_NAME}.part1").write_bytes(b"tampered")
    with pytest.raises(MeteoraInputError, match="sha256"):
        K._join_wheel([stash], tmp_path / "joined2.whl")


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fakepkg/__init__.py", "X = 1\n")


# ------------------------------------------------------------------------------------------------ report
def test_must_show_thresholds_and_shortfalls():
    tasks = {
        f"t{i}": {"metric": "exact_match", "oracle": 50.0, "meteora_top2": 50.0 - (2.0 if i < 3 else 0.5)}
        for i in range(22)
    }
    comp = {
        "3": {
            "meteora_correct": 1.4,
            "meteora_attempted": 3.0,
            "lora_b_correct": 1.0,
            "lora_b_attempted": 2.0,
            "lora_f_correct": 0.9,
        }
    }
    rows = R.must_show({"tasks": tasks, "composite": comp, "routing_accuracy": 94.0})
    assert [r["pass"] for r in rows] == [False, True, False]
    assert rows[0]["measured"] == "19/22 tasks" and rows[0]["shortfall"] == "1 task(s) short"
    assert rows[2]["shortfall"] == "1.0 points short"
    # nothing scored is "missing", not "0/22"; 0 vs 0 correct has no ratio (and does not pass)
    none = {t: {**r, "meteora_top2": None} for t, r in tasks.items()}
    zero = {"3": {**comp["3"], "meteora_correct": 0.0, "lora_b_correct": 0.0}}
    rows = R.must_show({"tasks": none, "composite": zero, "routing_accuracy": None})
    assert rows[0]["measured"] == "missing" and rows[0]["shortfall"] == "not evaluated"
    assert (
        not rows[1]["pass"]
        and "no ratio" in rows[1]["measured"]
        and rows[1]["shortfall"] == "no correct answers"
    )


def test_composite_unit_reserve_scales_with_size():
    # session 8's composite timings: each system's fastest per-question rate at a smaller size, x1.5, + 30 s
    from meteora_jax.study.composite import unit_seconds_estimate

    scores = {
        "3": {"meteora": {"seconds": 112.4}, "lora_b": {"seconds": 36.2}},
        "5": {"meteora": {"seconds": 48.4}, "lora_b": {}},
    }
    assert unit_seconds_estimate(scores, "meteora", 10) == pytest.approx(30 + 1.5 * 10 * 48.4 / 5)
    assert unit_seconds_estimate(scores, "lora_b", 10) == pytest.approx(30 + 1.5 * 10 * 36.2 / 3)
    assert unit_seconds_estimate(scores, "meteora", 3) == 30.0  # nothing smaller has run: the bare reserve
    assert unit_seconds_estimate(scores, "lora_f", 10) == 30.0


def test_per_example_scores_average_to_the_task_score():
    # exact match (a mean over examples): each example alone, in test order; a corpus-level figure the list
    # cannot average to (as corpus BLEU would be) gives None rather than a list that misleads
    prompts, refs = ["q1", "q2", "q3", "q4"], ["a", "b", "c", "d"]
    ts = E.TestSet(ids=[[1]] * 4, prompts=prompts, refs=refs, dropped_overlong=0, max_new_tokens=4)
    preds = ["a", "x", "C", "d"]
    got = E.score("cs_algorithms", preds, ts)
    assert got["per_example"] == [100.0, 0.0, 100.0, 100.0] and got["score"] == 75.0
    assert E.per_example_scores("cs_algorithms", preds, ts, corpus_score=70.0) is None


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(7)
    tasks = ["same", "shifted", "noisy", "missing"]
    oracle = {t: {"per_example": list(rng.choice([0.0, 100.0], size=400))} for t in tasks[:3]}
    system = {
        "same": {"per_example": oracle["same"]["per_example"]},
        "shifted": {"per_example": [x + 10.0 for x in oracle["shifted"]["per_example"]]},
        "noisy": {"per_example": list(rng.choice([0.0, 100.0], size=400))},
    }
    got = R.paired_differences(system, oracle, tasks, seed=0, resamples=4000)
    assert got["missing"] is None
    assert got["same"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 400}
    assert np.allclose(got["shifted"]["ci95"], [10.0, 10.0]) and np.isclose(got["shifted"]["mean"], 10.0)
    # independent check: the normal approximation, mean +- 1.96 sd / sqrt(n) of the paired differences
    d = np.asarray(system["noisy"]["per_example"]) - np.asarray(oracle["noisy"]["per_example"])
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    lo, hi = got["noisy"]["ci95"]
    assert abs((hi - lo) / 2 - half) < 0.1 * half and abs((hi + lo) / 2 - d.mean()) < 0.1 * half
    two = {"same": got["same"], "shifted": got["shifted"], "missing": None}
    line = " ".join(R._paired_line({"top2_minus_oracle_paired": two}))
    assert "2 tasks with per-example scores" in line and "includes 0 on 1/2 tasks" in line
    assert "wholly above -1 point on 2/2" in line and "beyond this noise) on 0/2." in line
    worse = {"t": {"mean": -5.0, "ci95": [-8.0, -2.0], "n": 50}}
    assert "on 1/1: t." in " ".join(R._paired_line({"top2_minus_oracle_paired": worse}))


def test_turns_protocol_feeds_each_answer_back_under_one_prompt_bucket(tiny_base):
    """``turns``: question i + 1 is asked after the model's own answer i, in one conversation, and every call
    of a size pads to the same prompt bucket (one compiled program), which bounds every real prompt."""
    from types import SimpleNamespace

    from meteora_jax.data.tasks import Example
    from meteora_jax.study import composite as CO
    from meteora_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_base)
    calls = []

    class Recorder:
        def generate(self, batch, **kw):  # noqa: ANN001, ANN202
            calls.append((batch, kw))
            return SimpleNamespace(texts=[f" answer{len(calls)} " for _ in batch])

    def ex(task, i):  # noqa: ANN001, ANN202
        return Example(task, f"{task} question {i}?", f"{task} reference {i}")

    tasks = ["upper", "lower", "digits"]
    items = [
        {"questions": [ex(t, i) for t in tasks], "shots": [([ex(t, 9) for t in tasks],) * 2]}
        for i in range(3)
    ]
    cc = C.CompositeConfig(batch_size=2, tokens_per_answer=5)
    # the tiny tokenizer has no chat template: "meteora" ([INST] ... [/INST]) goes through the same code
    bound = max(CO.turns_length_bound(tok, "meteora", it, [], cc.tokens_per_answer) for it in items)
    answers, trace = CO._answer_turns(
        Recorder(), None, tok, "meteora", items, [], cc, bound, want_trace=False
    )
    assert trace is None and len(calls) == 3 * 2  # 3 questions x 2 batches (3 items, batch 2)
    assert answers[0] == ["answer1", "answer3", "answer5"] and answers[2] == ["answer2", "answer4", "answer6"]
    assert {kw["min_prompt_bucket"] for _, kw in calls} == {bound}
    assert max(len(ids) for batch, _ in calls for ids in batch) <= bound
    # the last round (2 calls): each item's conversation holds the shots, then ITS two earlier answers, then
    # its third question, and no later answer
    for batch, _ in calls[-2:]:
        for ids in batch:
            text = tok.decode(ids)
            i = next(k for k in range(3) if f"upper question {k}?" in text)
            a1, a2, a3 = answers[i]
            assert (
                text.index("reference 9")
                < text.index(a1)
                < text.index(a2)
                < text.index(f"digits question {i}")
            )
            assert a3 not in text


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tiny_base, tmp_path):
    import shutil

    shutil.copytree(tiny_base, tmp_path / "base")
    overrides = toy_overrides(tmp_path)
    cfg = C.load_study_config(None, overrides)
    pack = K.pack_data(
        tmp_path / "pack.tar.gz", cfg, sdist=make_sdist(tmp_path / "sdist.tar.gz"), progress=False
    )
    assert pack.stat().st_size < 100_000
    logs = []
    out = tmp_path / "out"
    state = S.run_study(cfg, until="convert", out_dir=out, progress=False, log=logs.append)
    assert state.done("adapters:0-1") and state.done("adapters:2-2") and state.done("adapters:baselines")
    summary = state.outputs("data")["tasks"]
    assert summary["upper"]["train"]["kept"] == 40 and summary["upper"]["test"]["kept"] == 8
    for name in (*TASKS, "lora_b", "lora_f"):
        assert (tmp_path / "work" / "adapters" / name / "adapter_model.safetensors").is_file()
    with pytest.raises(MeteoraInputError, match="--resume"):
        S.run_study(cfg, out_dir=out, progress=False, log=logs.append)
    logs.clear()
    state = S.run_study(cfg, resume=True, out_dir=out, progress=False, log=logs.append)
    assert any("[adapters:0-1] done earlier; skipped" in line for line in logs)
    assert all(state.done(n) for n in T.step_names(cfg, TASKS))
    report = json.loads((out / "bigbench_small.json").read_text())
    assert set(report) == {
        "tasks",
        "composite",
        "routing_accuracy",
        "routing_accuracy_per_layer",
        "routing_accuracy_per_projection",
        "routing_accuracy_prompt_majority",
        "routing_accuracy_prompt_tokens",
        "ablations",
        "top2_minus_oracle_paired",
        "composite_protocol",
        "device_minutes",
        "seed",
    }
    assert set(report["tasks"]) == set(TASKS)
    for row in report["tasks"].values():
        assert set(row) == {"metric", "base", "oracle", "lora_b", "lora_f", "meteora_top1", "meteora_top2"}
        # one gate training (top-2): meteora_top1 is those gates run with k=1, and both are reported
        assert all(isinstance(row[s], float) and 0.0 <= row[s] <= 100.0 for s in R.SYSTEMS)
    assert set(report["composite"]) == {"3"} and report["composite_protocol"] == "turns"
    turns = json.loads((tmp_path / "work" / "eval" / "composite_turns.json").read_text())
    assert turns["scores"]["3"]["meteora"]["protocol"] == "turns"
    assert set(report["composite"]["3"]) == {
        "meteora_correct",
        "meteora_attempted",
        "lora_b_correct",
        "lora_b_attempted",
        "lora_f_correct",
    }
    assert 0.0 <= report["routing_accuracy"] <= 100.0 and report["device_minutes"] > 0 and report["seed"] == 0
    assert [n for n in T.step_names(cfg, TASKS) if n.startswith("gates:")] == ["gates:top2"]
    meteora = json.loads((tmp_path / "work" / "eval" / "meteora.json").read_text())
    assert meteora["systems"]["meteora_top1"] == {"gates": "gates:top2", "trained_top_k": 2, "eval_top_k": 1}
    assert meteora["routing"]["top_k"] == 2
    assert set(meteora["scores"]["meteora_top2_oracle_first1"]) == set(TASKS)
    abl = report["ablations"]["meteora_top2_oracle_first1"]
    assert abl["plain_name"] == "meteora_top2" and abl["system"]["tasks"] == abl["plain"]["tasks"] == len(
        TASKS
    )
    # per layer: one figure per layer whose mean (equal token counts per layer) is the overall figure
    per_layer = report["routing_accuracy_per_layer"]
    num_layers = json.loads((tmp_path / "base" / "config.json").read_text())["num_hidden_layers"]
    assert len(per_layer) == num_layers and np.isclose(np.mean(per_layer), report["routing_accuracy"])
    # per projection, likewise: one figure per MoE projection (in forward order), the per-(layer, projection)
    # grid averaging to both
    per_proj = report["routing_accuracy_per_projection"]
    grid = np.asarray(meteora["routing"]["per_layer_projection"])
    assert list(per_proj)[:3] == ["q_proj", "k_proj", "v_proj"] and grid.shape == (num_layers, len(per_proj))
    np.testing.assert_allclose(100 * grid.mean(axis=0), list(per_proj.values()), rtol=1e-9)
    np.testing.assert_allclose(100 * grid.mean(axis=1), per_layer, rtol=1e-9)
    assert np.isclose(np.mean(list(per_proj.values())), report["routing_accuracy"])
    assert 0.0 <= report["routing_accuracy_prompt_majority"] <= 100.0
    prompt = report["routing_accuracy_prompt_tokens"]
    assert prompt["shared_prefix_tokens"] > 0  # the chat template's system turn + user header
    for part in ("shared_prefix", "task_text", "last_prompt_token"):
        assert 0.0 <= prompt[part]["overall"] <= 1.0 and len(prompt[part]["per_layer"]) == num_layers
    assert prompt["last_prompt_token"]["tokens"] == meteora["routing"]["pairs"]
    section = (out / "bigbench_small_section.md").read_text()
    assert "| must show |" in section and "bigbench_small_tasks.png" in section
    assert "By projection: q_proj " in section
    # per-example scores pair MeteoRA top-2 with the oracle on the same test examples
    paired = report["top2_minus_oracle_paired"]
    assert set(paired) == set(TASKS) and all(
        p["ci95"][0] <= p["mean"] <= p["ci95"][1] and p["n"] > 0 for p in paired.values()
    )
    assert "MeteoRA top-2 minus the oracle on the same test examples" in section
    assert "| meteora_top2_oracle_first1 | 3 |" in section
    assert "MeteoRA top-1 = the gates trained with top_k 2, run with k=1" in section
    # the traced composite conversation turn by turn (turns protocol): 1 shot + 3 questions of 3 tasks
    assert "Routing by turn" in section and "| 6 | " in section and "| 7 | " not in section
    assert {p.name for p in out.glob("*.png")} == {
        "bigbench_small_tasks.png",
        "bigbench_small_composite.png",
        "bigbench_small_routing.png",
    }
    # the base system is the pool model with the expert's contribution zeroed: it must differ from oracle
    # predictions only through the adapter, and the single-expert bench must really swap experts
    bench = E.SingleExpertBench(state.outputs("convert")["pool"], "float32", 64)
    bench.use("upper")
    a = np.asarray(bench.model.layers[0].attn.q_proj.lora_a_edr[...])
    bench.use("reverse")
    assert not np.allclose(a, np.asarray(bench.model.layers[0].attn.q_proj.lora_a_edr[...]))
    bench.use(None)
    assert float(np.abs(np.asarray(bench.model.layers[0].attn.q_proj.scaling_e[...])).sum()) == 0.0
    # a finished study: --resume runs nothing; --step report --redo rewrites the report
    logs.clear()
    S.run_study(cfg, steps=["report"], redo=True, out_dir=out, progress=False, log=logs.append)
    assert any("[report] done" in line for line in logs)


def test_oracle_layers_knob_is_checked():
    assert C.load_study_config(None).oracle_layers() == ()
    assert C.load_study_config(None, ["eval.oracle_layers=[4, 12]"]).oracle_layers() == (4, 12)
    with pytest.raises(MeteoraInputError, match="oracle_layers"):
        C.load_study_config(None, ["eval.oracle_layers=[0]"]).oracle_layers()
