"""``TrainConfig``: every knob of gate training, one frozen dataclass, loaded from YAML with overrides.

A config comes from three layers, later ones winning: the dataclass defaults, a YAML file under ``configs/``
(``--config``), and ``--set key=value`` pairs. Loading is strict: an unknown key or a value of the wrong type is
a ``MeteoraInputError`` that names the file (or ``--set``) and the key, because a typo silently falling back
to a default (``gate_los_weight: 10``) would train a different model than the user asked for.

Each field's one-line help lives in its ``metadata["help"]``; ``describe()`` prints them all.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

from meteora_jax.errors import MeteoraInputError

PROMPT_TEMPLATES = {
    # MeteoRA's own (the released training and evaluation code); the paper's models are Llama-2/3 chat.
    "meteora": "[INST] {prompt} [/INST]\n",
    "plain": "{prompt}\n",
}
# The tokenizer's own chat template; ``chat_no_system`` drops the system turn a template inserts by itself
# when none is given (train.data.render_chat says why).
CHAT_TEMPLATES = ("chat", "chat_no_system")


def is_prompt_template(name: str) -> bool:
    """A named template (``PROMPT_TEMPLATES``, ``CHAT_TEMPLATES``) or a format containing ``{prompt}``."""
    return name in PROMPT_TEMPLATES or name in CHAT_TEMPLATES or "{prompt}" in name


MODES = ("gate", "gate_and_experts")
SAMPLING = ("natural", "balanced")
OVERLONG = ("truncate", "error")


def _f(default: Any, help: str) -> Any:  # noqa: A002 (the field's help text)
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults: the config is frozen and hashable")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Gate training. Defaults follow MeteoRA's paper set-up (gate-only, lambda = 50) unless noted."""

    # -- schedule
    steps: int = _f(500, "optimizer steps in total (a resumed run continues up to this count)")
    batch_size: int = _f(8, "sequences per step, over all devices (must divide by the mesh's data axis)")
    learning_rate: float = _f(1e-3, "peak AdamW learning rate")
    expert_learning_rate: float = _f(
        0.0,
        "peak learning rate of the LoRA factors in gate_and_experts mode (0 = learning_rate; MeteoRA's "
        "released run used one rate, 5e-4, for both)",
    )
    warmup_steps: int = _f(20, "linear warm-up steps from 0 to learning_rate, then cosine decay")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of learning_rate")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    adam_b1: float = _f(0.9, "AdamW beta1")
    adam_b2: float = _f(0.999, "AdamW beta2")
    grad_clip_norm: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    seed: int = _f(0, "seed of data order and held-out split (the run is a pure function of it)")
    # -- objective
    mode: str = _f(
        "gate", "gate: train only gates (the paper); gate_and_experts: also LoRA A/B (released code)"
    )
    gate_loss_weight: float = _f(50.0, "lambda: weight of the gate cross-entropy against the task id")
    balance_loss_weight: float = _f(0.0, "weight of a Switch-style load-balancing loss (0 = off, MeteoRA)")
    response_only: bool = _f(False, "LM loss on response tokens only (MeteoRA: every token)")
    detach_gate_input: bool = _f(
        False,
        "stop gradients at each gate's input: a gate's loss trains that gate only, never the earlier layers "
        "or (gate_and_experts) the LoRA factors that wrote its input (MeteoRA: not stopped)",
    )
    top_k: int = _f(0, "experts per token while training (0 = the model's top_k)")
    routing: str = _f("", "routing order while training ('' = the model's; MeteoRA trains softmax_then_topk)")
    # -- data
    prompt_template: str = _f(
        "meteora",
        "meteora ('[INST] {prompt} [/INST]\\n'), chat (the tokenizer's template), chat_no_system (the same "
        "without the system turn it adds by itself), plain, or a '{prompt}' format",
    )
    add_bos: bool = _f(True, "prepend the tokenizer's BOS token (if it has one)")
    add_eos: bool = _f(
        True, "append EOS after the response (MeteoRA's original omits it; outputs then run on)"
    )
    max_seq_len: int = _f(512, "longest sequence in tokens (capped by the model's context)")
    length_buckets: tuple[int, ...] = _f(
        (32, 64, 128, 256, 512, 1024, 2048, 4096), "pad each batch up to the next bucket: one compile each"
    )
    overlong: str = _f("truncate", "a sequence longer than max_seq_len: truncate (counted) or error")
    sampling: str = _f("natural", "natural: every example once per epoch; balanced: tasks drawn uniformly")
    composite_fraction: float = _f(
        0.0,
        "share of training rows extended into a multi-task conversation: the row's example, then examples of "
        "other tasks as further turns, each token's gate target its own turn's task (teaches the gates to "
        "switch at turn boundaries, as composite prompts need; 0 = single-task rows only, as MeteoRA)",
    )
    composite_max_turns: int = _f(3, "most turns (tasks) in one conversation row of composite_fraction")
    held_out_fraction: float = _f(0.05, "held-out share of train.jsonl for tasks without a test.jsonl")
    eval_examples_per_task: int = _f(32, "held-out examples per task for routing accuracy (0 = all)")
    # -- run
    dtype: str = _f("", "compute dtype of the base and experts ('' = as saved); gates stay float32")
    mesh_data: int = _f(0, "devices on the mesh's data axis (0 = all devices not on the expert axis)")
    mesh_expert: int = _f(1, "devices on the mesh's expert axis (experts and gates are split over it)")
    checkpoint_every: int = _f(100, "Orbax checkpoint every N steps (and always at the end; 0 = end only)")
    keep_checkpoints: int = _f(2, "newest checkpoints kept")
    save_base_in_checkpoint: bool = _f(False, "checkpoints hold the full model, not just the trained state")
    log_every: int = _f(10, "write a metrics line every N steps")
    eval_every: int = _f(0, "held-out routing accuracy every N steps (0 = only at the end)")
    progress: bool = _f(True, "show a tqdm progress bar")
    work_dir: str = _f("", "checkpoints + metrics ('' = '<out>.train' beside the output directory)")

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> MeteoraInputError:
            return MeteoraInputError(f"train config: {key}: {msg}")

        if self.mode not in MODES:
            raise bad("mode", f"{self.mode!r} is not one of {list(MODES)}")
        if self.sampling not in SAMPLING:
            raise bad("sampling", f"{self.sampling!r} is not one of {list(SAMPLING)}")
        if self.overlong not in OVERLONG:
            raise bad("overlong", f"{self.overlong!r} is not one of {list(OVERLONG)}")
        if not 0.0 <= self.composite_fraction <= 1.0 or self.composite_max_turns < 2:
            raise bad(
                "composite_fraction/composite_max_turns",
                f"need composite_fraction in [0, 1] and composite_max_turns >= 2 (got {self.composite_fraction}, "
                f"{self.composite_max_turns})",
            )
        if self.expert_learning_rate < 0:
            raise bad("expert_learning_rate", f"{self.expert_learning_rate} must be >= 0 (0 = learning_rate)")
        if self.steps < 0 or self.batch_size < 1 or self.max_seq_len < 2:
            raise bad("steps/batch_size/max_seq_len", "need steps >= 0, batch_size >= 1, max_seq_len >= 2")
        if not is_prompt_template(self.prompt_template):
            raise bad(
                "prompt_template",
                f"{self.prompt_template!r} is neither meteora/chat/chat_no_system/plain nor a format containing "
                "{prompt}",
            )
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise bad("held_out_fraction", f"{self.held_out_fraction} must be in [0, 1)")
        if self.mesh_expert < 1 or self.mesh_data < 0:
            raise bad("mesh_expert/mesh_data", "need mesh_expert >= 1 and mesh_data >= 0")
        if self.routing not in ("", "topk_then_softmax", "softmax_then_topk"):
            raise bad("routing", f"{self.routing!r}: use '', topk_then_softmax or softmax_then_topk")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padding lengths in use: the configured buckets below ``max_seq_len``, then ``max_seq_len``."""
        return tuple(sorted({b for b in self.length_buckets if b < self.max_seq_len} | {self.max_seq_len}))

    @classmethod
    def tiny(cls, **overrides: Any) -> TrainConfig:
        """A few fast steps: shared by tests and the demo smoke test."""
        base = dict(steps=20, batch_size=8, max_seq_len=64, warmup_steps=2, log_every=1, progress=False)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["length_buckets"] = list(self.length_buckets)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def describe() -> str:
    """One line per field: name, default, help (``meteora-jax train-gate --help-config``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {f.name:<26} {f.default!r:<14} {f.metadata['help']}")
    return "\n".join(lines)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(value: Any, typ: Any, where: str, key: str) -> Any:
    """``value`` (from YAML) as ``typ``; bools are not ints and ints widen to floats, nothing else converts."""
    err = MeteoraInputError(f"{where}: {key}: {value!r} is not a valid {getattr(typ, '__name__', typ)}.")
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise err
        (elem, _) = typing.get_args(typ)
        return tuple(_coerce(v, elem, where, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise err
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise err
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise err from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise err
    if typ is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise err
    raise TypeError(f"unsupported config type {typ}")


def _check_keys(d: dict[str, Any], where: str) -> None:
    known = _field_types()
    for key in d:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise MeteoraInputError(
                f"{where}: unknown key {key!r}.{hint} Known keys: {', '.join(sorted(known))} "
                "(`meteora-jax train-gate --help-config` explains each)."
            )


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["steps=100", "mode=gate"]`` -> typed dict. Values are YAML scalars (``true``, ``1e-3``, ``[1, 2]``)."""
    import yaml

    out: dict[str, Any] = {}
    types_ = _field_types()
    for pair in pairs:
        if "=" not in pair:
            raise MeteoraInputError(f"--set {pair!r}: expected key=value (e.g. --set steps=200).")
        key, raw = pair.split("=", 1)
        key = key.strip()
        _check_keys({key: None}, "--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if types_[key] is str and not isinstance(value, str):
            value = raw  # `--set prompt_template=123` means the string
        out[key] = _coerce(value, types_[key], "--set", key)
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any
) -> TrainConfig:
    """Defaults <- YAML file ``path`` <- ``--set`` ``overrides`` <- ``kwargs`` (e.g. ``steps`` from ``--steps``)."""
    import yaml

    values: dict[str, Any] = {}
    types_ = _field_types()
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MeteoraInputError(
                f"{path}: no such config file (see configs/train_gate.yaml for an example)."
            )
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise MeteoraInputError(f"{path}: not valid YAML ({e}).") from e
        if not isinstance(raw, dict):
            raise MeteoraInputError(f"{path}: the top level must be a mapping of key: value.")
        _check_keys(raw, path)
        values.update({k: _coerce(v, types_[k], path, k) for k, v in raw.items()})
    values.update(parse_overrides(list(overrides)))
    _check_keys(kwargs, "arguments")
    values.update({k: v for k, v in kwargs.items() if v is not None})
    return TrainConfig(**values)
