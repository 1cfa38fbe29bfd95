"""A PEFT LoRA adapter directory -> a ``LoraAdapter`` (one expert), with PEFT's exact semantics.

Input: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
``torch.load(weights_only=True)``; nothing is ever unpickled beyond tensors). The reader works in four steps,
each of which can refuse the adapter with a message naming the file, the field and the fix:

1. **Config.** Only plain LoRA is representable as a MeteoRA expert: ``peft_type`` must be LORA; DoRA,
   trained biases (``bias``, ``lora_bias``), ``modules_to_save``, trainable tokens, layer replication and
   the other forward-changing variants are refused (``REFUSED_FIELDS``).
2. **Targets.** Which (layer, projection) pairs the adapter touches is decided exactly as PEFT decides it,
   on the module names of a transformers LLaMA-family model (``model.layers.{i}.self_attn.q_proj``, ...):
   ``target_modules`` as a list (exact name or ``.suffix`` match, then ``layers_to_transform`` /
   ``layers_pattern``), as a regex string (``re.fullmatch``, no layer filter) or ``"all-linear"`` (the 7
   projections; ``lm_head`` excluded as PEFT does); ``exclude_modules`` likewise. See
   ``peft.tuners.tuners_utils.check_target_module_exists``.
3. **Tensors, header only.** Keys ``[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`` are parsed;
   every key must belong to a targeted projection, every targeted projection needs both A and B, and every
   shape must be [r, d_in] / [d_out, r] for the base's sizes and the rank PEFT would have built
   (``rank_pattern``). All of this is checked on the safetensors header, before any tensor is read.
4. **Values.** Tensors are read, checked finite, and scaled per module: ``alpha / r`` or, with
   ``use_rslora``, ``alpha / sqrt(r)``, where ``r`` and ``alpha`` come from ``rank_pattern`` /
   ``alpha_pattern`` matched as PEFT's ``get_pattern_key`` does (``re.match(rf"(.*\\.)?({key})$", name)``,
   first matching key in insertion order).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from meteora_jax.config import PROJECTIONS, ModelConfig
from meteora_jax.convert import safetensors_io, torch_bin
from meteora_jax.convert.stack_experts import ATTN_PROJECTIONS, LoraAdapter, LoraModule
from meteora_jax.errors import MeteoraInputError
from meteora_jax.model.params_io import check_finite

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
ALL_LINEAR = "all-linear"
_RETRAIN = (
    "Train a plain LoRA adapter (peft.LoraConfig with only r, lora_alpha, target_modules among q/k/v/o/gate/up/"
    "down_proj, optionally use_rslora / rank_pattern / alpha_pattern / layers_to_transform) and pass that."
)

# field -> (is it set in a way we cannot represent?, why)
REFUSED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_dora": (
        bool,
        "DoRA rescales the adapted weight by a learned magnitude vector, which a MeteoRA "
        "expert (a plain x @ A @ B delta) cannot express",
    ),
    "bias": (
        lambda v: v not in (None, "none"),
        "the adapter trains bias terms of the base model, which MeteoRA's experts do not carry",
    ),
    "lora_bias": (bool, "the adapter trains a bias on lora_B, which MeteoRA's experts do not carry"),
    "modules_to_save": (
        bool,
        "the adapter fully fine-tunes extra modules (modules_to_save), which would "
        "replace base weights shared by every expert",
    ),
    "trainable_token_indices": (bool, "the adapter trains embedding rows, which are shared by every expert"),
    "layer_replication": (bool, "the adapter duplicates decoder layers, changing the base model"),
    "target_parameters": (
        bool,
        "the adapter targets raw parameters (target_parameters), not the 7 projections",
    ),
    "use_qalora": (bool, "QA-LoRA pools the input before lora_A, a different forward"),
    "alora_invocation_tokens": (bool, "activated LoRA switches itself on by tokens, a different forward"),
    "use_bdlora": (bool, "block-diagonal LoRA is a different forward"),
    "arrow_config": (bool, "Arrow routing mixes LoRAs its own way"),
    "monteclora_config": (bool, "MonteCLoRA samples its adapters, a different forward"),
    "velora_config": (bool, "VeLoRA changes the forward"),
    "kasa_config": (bool, "KaSA changes the forward"),
}

_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B|embedding_A|embedding_B|magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?\.weight"
)
_PROJ_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)")
# Other module names of a transformers LLaMA-family model, so that target matching sees what PEFT sees.
_OTHER_MODULES = ("lm_head", "model.embed_tokens", "model.norm", "model.rotary_emb")
_OTHER_LAYER_MODULES = ("self_attn", "mlp", "mlp.act_fn", "input_layernorm", "post_attention_layernorm")


def hf_module_name(layer: int, projection: str) -> str:
    block = "self_attn" if projection in ATTN_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{block}.{projection}"


def _all_module_names(cfg: ModelConfig) -> list[str]:
    names = list(_OTHER_MODULES)
    for i in range(cfg.num_hidden_layers):
        names.append(f"model.layers.{i}")
        names += [f"model.layers.{i}.{m}" for m in _OTHER_LAYER_MODULES]
        names += [hf_module_name(i, p) for p in PROJECTIONS]
    return names


# ------------------------------------------------------------------------------------------ PEFT's matching
def target_module_matches(conf: dict[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a LoRA config dict and one module name."""
    exclude = conf.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = conf.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layer_indexes = conf.get("layers_to_transform")
    using_indexes = layer_indexes is not None and (
        len(layer_indexes) != 0 if isinstance(layer_indexes, list) else True
    )
    if not (using_indexes and found):
        return found
    pattern = conf.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layer_indexes if isinstance(layer_indexes, int) else idx in layer_indexes


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` + ``.get``: the first pattern whose regex ends the module name wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


# ----------------------------------------------------------------------------------------------- the reader
def read_adapter_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise MeteoraInputError(
            f"{directory}: no such adapter directory. Pass --adapter NAME=PATH with PATH the directory written "
            "by `peft_model.save_pretrained(dir)` (adapter_config.json + adapter_model.safetensors)."
        )
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(directory, "config.json")):
            hint = " It holds config.json: it looks like a full model; pass it as --base, not as --adapter."
        raise MeteoraInputError(
            f"{path}: missing. {directory} is not a PEFT adapter directory; save the adapter with "
            f"`peft_model.save_pretrained(dir)`.{hint}"
        )
    try:
        with open(path) as f:
            conf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MeteoraInputError(
            f"{path}: not valid JSON ({e}). Re-save the adapter with save_pretrained."
        ) from e
    if not isinstance(conf, dict):
        raise MeteoraInputError(f"{path}: not a JSON object. Re-save the adapter with save_pretrained.")
    return conf


def _check_config(conf: dict[str, Any], path: str) -> None:
    peft_type = conf.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise MeteoraInputError(
            f"{path}: field 'peft_type' is {peft_type!r}; only LoRA adapters (peft_type \"LORA\") can become "
            f"MeteoRA experts. {_RETRAIN}"
        )
    for field, (is_set, why) in REFUSED_FIELDS.items():
        value = conf.get(field)
        if value is not None and is_set(value):
            raise MeteoraInputError(f"{path}: field {field!r} is {value!r}: {why}. {_RETRAIN}")
    r = conf.get("r")
    if not isinstance(r, int) or r <= 0:
        raise MeteoraInputError(
            f"{path}: field 'r' must be a positive integer, got {r!r}. Re-save the adapter."
        )
    if not isinstance(conf.get("lora_alpha"), (int, float)):
        raise MeteoraInputError(
            f"{path}: field 'lora_alpha' must be a number, got {conf.get('lora_alpha')!r}. Re-save the adapter."
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(conf.get(field) or {}, dict):
            raise MeteoraInputError(f"{path}: field {field!r} must be an object {{pattern: value}}.")


def _targets(conf: dict[str, Any], cfg: ModelConfig, path: str) -> set[tuple[int, str]]:
    conf = dict(conf)
    targets = conf.get("target_modules")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # PEFT expands "all-linear" to the full names of every nn.Linear except the output head.
        conf["target_modules"] = [
            hf_module_name(i, p) for i in range(cfg.num_hidden_layers) for p in PROJECTIONS
        ]
    if targets is None or (not isinstance(targets, str) and not targets):
        raise MeteoraInputError(
            f"{path}: field 'target_modules' is empty. Save an adapter that targets some of "
            f"{list(PROJECTIONS)}."
        )
    try:
        matched = {name for name in _all_module_names(cfg) if target_module_matches(conf, name)}
    except re.error as e:
        raise MeteoraInputError(
            f"{path}: a pattern in the config is not a valid regex ({e}); fix the field."
        ) from e
    hits = {
        (i, p) for i in range(cfg.num_hidden_layers) for p in PROJECTIONS if hf_module_name(i, p) in matched
    }
    others = sorted(
        n for n in matched if not _PROJ_MODULE.fullmatch(n) or n.rsplit(".", 1)[-1] not in PROJECTIONS
    )
    if others:
        raise MeteoraInputError(
            f"{path}: field 'target_modules' ({targets!r}) also selects {others[:4]}, which are not among the "
            f"7 projections {list(PROJECTIONS)} that MeteoRA experts adapt. Retrain with target_modules limited "
            "to those projections."
        )
    if not hits:
        raise MeteoraInputError(
            f"{path}: field 'target_modules' ({targets!r}) matches none of the LLaMA-family projections "
            f"{list(PROJECTIONS)}: this adapter was trained for another architecture (e.g. GPT-2's c_attn). "
            "Use an adapter trained on the same base model as --base."
        )
    if not isinstance(targets, str):
        unused = [
            t for t in targets if not any(target_module_matches({"target_modules": [t]}, n) for n in matched)
        ]
        if unused:
            warnings.warn(
                f"{path}: target_modules {unused} match nothing in a LLaMA-family model; PEFT ignores "
                "them too.",
                stacklevel=3,
            )
    return hits


def _rank_alpha(conf: dict[str, Any], key: str) -> tuple[int, float]:
    r = int(pattern_value(conf.get("rank_pattern") or {}, key, conf["r"]))
    alpha = float(pattern_value(conf.get("alpha_pattern") or {}, key, conf["lora_alpha"]))
    return r, alpha


def _parse_keys(
    shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, path: str
) -> dict[tuple[int, str], dict[str, str]]:
    """Tensor key -> (layer, projection, A|B); anything else is refused."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in sorted(shapes):
        m = _KEY.fullmatch(key)
        if m is None:
            raise MeteoraInputError(
                f"{path}: tensor {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' / "
                "'<module>.lora_B.weight'). The file holds more than a plain LoRA adapter (a merged model, "
                f"modules_to_save, DoRA?). {_RETRAIN}"
            )
        if m.group("ab") not in ("A", "B"):
            raise MeteoraInputError(
                f"{path}: tensor {key!r} ({m.group('ab')}) is not part of a plain LoRA on a linear projection. "
                f"{_RETRAIN}"
            )
        pm = _PROJ_MODULE.fullmatch(m.group("module"))
        proj = pm.group("proj") if pm else None
        if (
            pm is None
            or proj not in PROJECTIONS
            or (pm.group("block") == "self_attn") != (proj in ATTN_PROJECTIONS)
        ):
            raise MeteoraInputError(
                f"{path}: tensor {key!r} adapts module {m.group('module')!r}, which is not one of the 7 projections "
                f"of a LLaMA-family model ({list(PROJECTIONS)}): the adapter was trained for another architecture "
                "or adapts lm_head / embeddings. Use an adapter trained on --base's architecture that targets only "
                "those projections."
            )
        layer = int(pm.group("layer"))
        if layer >= cfg.num_hidden_layers:
            raise MeteoraInputError(
                f"{path}: tensor {key!r} is for layer {layer}, but the base model has {cfg.num_hidden_layers} "
                "layers: the adapter was trained on another (deeper) model. Use an adapter trained on --base."
            )
        slot = found.setdefault((layer, proj), {})
        if m.group("ab") in slot:
            raise MeteoraInputError(
                f"{path}: tensors {slot[m.group('ab')]!r} and {key!r} are both lora_{m.group('ab')} of "
                f"{m.group('module')}: the file holds several adapters. Save one adapter per directory."
            )
        slot[m.group("ab")] = key
    return found


def _read_shapes(
    directory: str,
) -> tuple[str, dict[str, tuple[int, ...]], Callable[[], dict[str, np.ndarray]]]:
    """(weights path, {key: shape}, a loader of the values): the shapes come without reading any tensor."""
    st = os.path.join(directory, SAFETENSORS_FILE)
    binf = os.path.join(directory, BIN_FILE)
    if os.path.isfile(st):
        infos, _ = safetensors_io.read_header(st)
        return st, {k: v.shape for k, v in infos.items()}, lambda: safetensors_io.read_file(st)
    if os.path.isfile(binf):
        tensors = torch_bin.read_state_dict(binf, float32=True)
        return binf, {k: v.shape for k, v in tensors.items()}, lambda: tensors
    raise MeteoraInputError(
        f"{directory}: holds neither {SAFETENSORS_FILE} nor {BIN_FILE}. The adapter weights are missing; save "
        "them with `peft_model.save_pretrained(dir)`."
    )


def _check_base_name(conf: dict[str, Any], path: str, base_source: str | None) -> None:
    declared = conf.get("base_model_name_or_path")
    if not declared or not base_source:
        return
    same = os.path.exists(declared) and os.path.realpath(declared) in (
        os.path.realpath(base_source),
        # a GGUF base: transformers loads it as (directory, gguf_file=...), and PEFT records the directory
        os.path.dirname(os.path.realpath(base_source)) if os.path.isfile(base_source) else None,
    )
    if not same and os.path.basename(os.path.normpath(declared)) != os.path.basename(
        os.path.normpath(base_source)
    ):
        warnings.warn(
            f"{path}: base_model_name_or_path is {declared!r} but --base is {base_source!r}; converting anyway "
            "(the shapes fit), but the expert may behave differently on another base model.",
            stacklevel=3,
        )


def load_peft_adapter(
    directory: str | os.PathLike, cfg: ModelConfig, *, base_source: str | None = None
) -> LoraAdapter:
    """One PEFT LoRA adapter directory as a ``LoraAdapter`` for the base model ``cfg`` (see module doc)."""
    directory = os.path.abspath(os.fspath(directory))
    conf = read_adapter_config(directory)
    conf_path = os.path.join(directory, CONFIG_FILE)
    _check_config(conf, conf_path)
    targets = _targets(conf, cfg, conf_path)
    weights_path, shapes, read_values = _read_shapes(directory)
    keys = _parse_keys(shapes, cfg, weights_path)

    untargeted = sorted(set(keys) - targets)
    if untargeted:
        layer, proj = untargeted[0]
        raise MeteoraInputError(
            f"{weights_path}: holds LoRA weights for {hf_module_name(layer, proj)}, which {conf_path} "
            f"(target_modules / layers_to_transform / exclude_modules) does not target. The config and weights "
            "come from different adapters; save them together with `peft_model.save_pretrained(dir)`."
        )
    for layer, proj in sorted(targets):
        slot = keys.get((layer, proj), {})
        for ab in ("A", "B"):
            if ab not in slot:
                raise MeteoraInputError(
                    f"{weights_path}: tensor '{hf_module_name(layer, proj)}.lora_{ab}.weight' is missing, but "
                    f"{conf_path} targets that module. The file is incomplete or was edited; re-save the adapter "
                    "with `peft_model.save_pretrained(dir)`."
                )
        d_in, d_out = cfg.projection_shape(proj)
        r, _ = _rank_alpha(conf, hf_module_name(layer, proj))
        for ab, want in (("A", (r, d_in)), ("B", (d_out, r))):
            got = tuple(shapes[slot[ab]])
            if got != want:
                raise MeteoraInputError(
                    f"{weights_path}: tensor {slot[ab]!r} has shape {got}, but a rank-{r} LoRA on {proj} of the "
                    f"base model needs {want} (hidden_size={cfg.hidden_size}, intermediate_size="
                    f"{cfg.intermediate_size}, q/kv dims={cfg.q_dim}/{cfg.kv_dim}; r from 'r'/'rank_pattern'). "
                    "The adapter was trained for another base model; use one trained on --base."
                )
    _check_base_name(conf, conf_path, base_source)  # after the shape checks: its warning says they passed

    values = read_values()
    modules: dict[tuple[int, str], LoraModule] = {}
    for layer, proj in sorted(targets):
        slot = keys[(layer, proj)]
        a_rd, b_or = np.asarray(values[slot["A"]]), np.asarray(values[slot["B"]])
        check_finite(slot["A"], a_rd, weights_path)
        check_finite(slot["B"], b_or, weights_path)
        r, alpha = _rank_alpha(conf, hf_module_name(layer, proj))
        scaling = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        modules[(layer, proj)] = LoraModule(a_rd.astype(np.float32), b_or.astype(np.float32), float(scaling))
    return LoraAdapter(source=directory, modules=modules)
