"""The study's configuration: frozen dataclasses (one help line per field), the YAML + ``--set`` loader
(strict: an unknown key or a mistyped value names the file and key), and the constants the steps share.

``gates`` is passed through to ``meteora_jax.train.config``'s own loader (``StudyConfig.gate_train_config``),
so gate training takes exactly the options ``meteora-jax train`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meteora_jax.data.bigbench import COMPOSITE_TASKS
from meteora_jax.errors import MeteoraInputError

PACK_A, PACK_B = ".study/pack_a", ".study/pack_b"
DATA_PACK_NAME = "bigbench22.tar.gz"
BASELINES = ("lora_b", "lora_f")
STUDY_GATE_KEYS = ("top_k", "attention")  # `gates` keys the study reads itself; the rest go to TrainConfig
GATE_ATTENTION = ("auto", "einsum", "xla", "cudnn")


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
    sdist: str = _f(
        "",
        "bigbench-1.0.0.tar.gz, a google/BIG-bench checkout or its GitHub .tar.gz ('' = the cache); used "
        "when no pack is present",
    )


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha")
    steps: int = _f(250, "steps of each expert adapter")
    batch_per_adapter: int = _f(16, "rows of each adapter per step")
    learning_rate: float = _f(1e-3, "peak AdamW learning rate")
    warmup_steps: int = _f(10, "linear warm-up steps, then linear decay to 0")
    max_seq_len: int = _f(512, "longer training sequences are dropped (counted)")
    pad_multiple: int = _f(64, "pad each batch's length up to a multiple of this (few shapes)")
    dtype: str = _f("bfloat16", "base weights + autocast on GPU (CPU always float32)")
    compile: bool = _f(False, "torch.compile the loss (worth it only for long runs)")
    checkpoint_every: int = _f(100, "checkpoint the stacked LoRA + optimizer every N steps")
    chunk_size: int = _f(11, "expert adapters trained together in one process (one step: adapters:A-B)")
    baseline_steps: int = _f(300, "steps of LoRA-B and LoRA-F")
    baseline_batch_per_adapter: int = _f(64, "rows of LoRA-B and of LoRA-F per step")
    lora_b_per_task: int = _f(1000, "LoRA-B's balanced sample: this many train examples of each task")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_per_task: int = _f(100, "test examples evaluated per task (0 = all kept)")
    max_prompt_tokens: int = _f(1024, "test prompts longer than this are dropped (counted)")
    max_new_tokens: int = _f(64, "generation cap per answer (per task: min(cap, 2 x longest reference + 8))")
    batch_size: int = _f(128, "prompts per generation batch (always full: static shapes)")
    min_bucket: int = _f(
        1024, "pad prompts/new tokens up to at least this (>= max_prompt_tokens: one compile per model)"
    )
    dtype: str = _f("float32", "dtype the JAX models are loaded in")
    routing_per_task: int = _f(50, "test examples per task for teacher-forced routing accuracy (0 = off)")
    meteora_top_ks: tuple[int, ...] = _f(
        (1, 2),
        "MeteoRA systems evaluated (meteora_top<k>), k = experts per token at inference; each uses the gates "
        "trained with this top_k, else those of the largest gates.top_k (routing is a run-time knob)",
    )
    oracle_layers: tuple[int, ...] = _f(
        (),
        "ablation systems meteora_top<k>_oracle_first<L>: MeteoRA (the main k) with its first L layers "
        "answered by the task's own adapter and its gates elsewhere (eval.ablation; ~2 device min each)",
    )


@dataclasses.dataclass(frozen=True)
class CompositeConfig:
    sizes: tuple[int, ...] = _f((3, 5, 10), "composite-n sizes")
    tasks_3: tuple[str, ...] = _f(COMPOSITE_TASKS[3], "MeteoRA's")
    tasks_5: tuple[str, ...] = _f(COMPOSITE_TASKS[5], "MeteoRA's")
    tasks_10: tuple[str, ...] = _f(
        (*COMPOSITE_TASKS[10][:7], "object_counting", "language_identification", "epistemic_reasoning"),
        "MeteoRA's 10 with its 2 non-BIG-bench tasks (news_commentary_de, alpaca) and linguistics_puzzles "
        "(ROUGE, never counted) replaced by 3 BIG-bench accuracy tasks",
    )
    protocol: str = _f(
        "turns",
        "numbered (MeteoRA's format: all questions, then one generation of n numbered answers) | turns "
        "(one multi-turn chat, one generated answer per turn); eval.composite.PROTOCOLS says why",
    )
    num_prompts: int = _f(30, "composite prompts per size")
    shots: int = _f(2, "worked composites before the questions (MeteoRA: 2)")
    max_sub_prompt_chars: int = _f(
        800, "test sub-questions longer than this are not used (keeps composite-10 < 8k)"
    )
    max_shot_prompt_chars: int = _f(
        800, "2-shot prefix questions (train split) longer than this are not used"
    )
    max_prompt_tokens: int = _f(7680, "composite prompts longer than this are dropped (context 8192)")
    batch_size: int = _f(16, "composite prompts per generation batch")
    tokens_per_answer: int = _f(40, "max_new_tokens = n x this")

    def __post_init__(self) -> None:
        from meteora_jax.eval.composite import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise MeteoraInputError(
                f"composite.protocol: {self.protocol!r} is not one of {list(PROTOCOLS)} (turns: one multi-turn "
                "chat, one answer per turn; numbered: MeteoRA's all-questions-then-all-answers format)."
            )


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    seed: int = _f(
        0, "seed of adapter init/data order, gate init and training (report it; rerun with another)"
    )
    prompt_template: str = _f(
        "chat", "template for adapters, gates and eval alike: chat | chat_no_system | meteora | plain"
    )
    work_dir: str = _f("runs/bigbench_small/seed{seed}", "where every step writes ({seed} is filled in)")
    stash_dir: str = _f("/tmp/meteora-study-stash", "where `stash` keeps carried files between device calls")
    base_hf: str = _f("", "use this HF checkpoint dir as the base instead of the SmolLM2 GGUF (tests)")
    data: DataConfig = DataConfig()
    adapters: AdapterConfig = AdapterConfig()
    gates: dict = _f(
        None,
        "meteora_jax.train.TrainConfig overrides for gate training (+ top_k: [2] (one training per k), "
        "attention: auto|einsum|xla|cudnn; auto = cudnn on a GPU where it compiles for the model, else xla; "
        "einsum on CPU)",
    )
    eval: EvalConfig = EvalConfig()
    composite: CompositeConfig = CompositeConfig()

    def work_path(self) -> Path:
        return Path(self.work_dir.replace("{seed}", str(self.seed)))

    def gate_top_ks(self) -> tuple[int, ...]:
        """``gates.top_k``: one gate training (step ``gates:top<k>``) per entry."""
        ks = tuple(int(k) for k in (self.gates or {}).get("top_k", (2,)))
        if not ks or min(ks) < 1:
            raise MeteoraInputError(f"gates.top_k: need one or more k >= 1 (got {list(ks)})")
        return ks

    def meteora_top_ks(self) -> tuple[int, ...]:
        """``eval.meteora_top_ks``: the evaluated MeteoRA systems' k, checked."""
        ks = self.eval.meteora_top_ks
        if not ks or min(ks) < 1:
            raise MeteoraInputError(f"eval.meteora_top_ks: need one or more k >= 1 (got {list(ks)})")
        return ks

    def trained_top_k(self, k: int) -> int:
        """The gates that system ``meteora_top<k>`` runs with: those trained with top_k k when trained, else
        those of the largest trained top_k (the gates are the same weights; k only picks how many experts
        each token mixes at inference)."""
        ks = self.gate_top_ks()
        return k if k in ks else max(ks)

    def oracle_layers(self) -> tuple[int, ...]:
        """``eval.oracle_layers``, checked (each L >= 1; the model's layer count is checked when it loads)."""
        ls = tuple(int(n) for n in self.eval.oracle_layers)
        if any(n < 1 for n in ls):
            raise MeteoraInputError(f"eval.oracle_layers: each L must be >= 1 (got {list(ls)})")
        return ls

    def main_top_k(self) -> int:
        """The k of the MeteoRA system the composite, the routing accuracy and the must-show table use: 2
        (the issue's headline system) when evaluated, else the largest evaluated k."""
        ks = self.meteora_top_ks()
        return 2 if 2 in ks else max(ks)

    def gate_attention(self) -> str:
        """``gates.attention``: the attention implementation gate training asks for (``auto`` by default)."""
        name = str((self.gates or {}).get("attention", "auto"))
        if name not in GATE_ATTENTION:
            raise MeteoraInputError(f"gates.attention: {name!r} is not one of {list(GATE_ATTENTION)}")
        return name

    def gate_train_config(self, top_k: int):  # noqa: ANN201 (a TrainConfig)
        """The gate-training config: ``gates`` overrides, typed and checked by train.config's own loader."""
        from meteora_jax.train.config import load_config

        over = {"prompt_template": self.prompt_template}
        over.update({k: v for k, v in (self.gates or {}).items() if k not in STUDY_GATE_KEYS})
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
    cfg = _build(StudyConfig, raw, str(path or "config"))
    # a misspelt gates.* key or bad value is an error now, not at the gates step ~10 device minutes in
    for k in cfg.gate_top_ks():
        cfg.gate_train_config(k)
    cfg.gate_attention()
    return cfg
