"""The original MeteoRA full checkpoint (NJUDeepEngine/meteora) -> base params, experts and trained gates.

What the original writes (``MoELoRA/layer.py``, ``peft_model.py``, ``utils.load_meteora_model``): the
``state_dict`` of its ``PeftModel`` around ``LlamaMeteorForCausalLM``, saved as one ``model.safetensors``.
Each adapted projection ``P`` (``model.layers.{i}.self_attn.{q,k,v,o}_proj`` / ``mlp.{gate,up,down}_proj``)
is a ``MoELinear`` holding

    P.base_layer.weight   [d_out, d_in]    the frozen base weight (``P.base_layer.bias`` if the base has one)
    P.lora_A.weight       [N*r, d_in]      rows e*r:(e+1)*r are expert e's lora_A.weight
    P.lora_B.weight       [d_out, N*r]     columns e*r:(e+1)*r are expert e's lora_B.weight
    P.moe_gate.weight     [N, d_in]        bias-free gate; row e scores expert e

all under the ``PeftModel`` prefix ``base_model.model.`` (accepted with or without it, as is a plain
``P.weight`` instead of ``P.base_layer.weight``); every other key is an ordinary HF LLaMA name. Experts are
stacked by ``torch.cat`` in the order the adapters were loaded, which is MeteoRA's ``METEORA_TASKS`` list:
alphabetical task order. The layout needs one rank r for all experts (``lora_idx * r`` slicing).

The scaling of expert e is its own adapter's ``lora_alpha / r`` (``alpha / sqrt(r)`` with rslora), set by
``update_layer`` from that adapter's ``adapter_config.json``; the checkpoint itself does not store it. So
it comes from ``adapter_dir/<task>/adapter_config.json`` (MeteoRA's own loader reads exactly those), else
from ``lora_alpha``, else LLaMA-Factory's default ``alpha = 2 r`` (scaling 2) with a warning.

Inference routing in the original is top-k of the gate logits, softmax of those / T (``topk_then_softmax``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np

from meteora_jax.config import PROJECTIONS, ModelConfig
from meteora_jax.convert import hf_llama, safetensors_io
from meteora_jax.convert.base import TOKENIZER_MARKERS, BaseCheckpoint, load_base
from meteora_jax.convert.peft_lora import CONFIG_FILE, read_adapter_config
from meteora_jax.convert.stack_experts import ATTN_PROJECTIONS, LoraAdapter, LoraModule
from meteora_jax.errors import MeteoraInputError
from meteora_jax.model.params_io import check_finite

PREFIX = "base_model.model."
# (regex on the key without PREFIX, role); the first match wins, anything else is an HF base name.
_MOE_KEY = re.compile(
    r"model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)\.(?P<role>lora_A|lora_B|moe_gate)\.weight"
)
_BASE_LAYER = re.compile(
    r"(?P<module>model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\.base_layer\.(?P<what>weight|bias)"
)


def _hf_name(key: str) -> str:
    key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    m = _BASE_LAYER.fullmatch(key)
    return f"{m.group('module')}.{m.group('what')}" if m else key


def _config_only(base: str) -> BaseCheckpoint:
    """Config + tokenizer of an HF directory without reading its weights (the checkpoint carries them)."""
    base = os.path.abspath(base)
    if not os.path.isdir(base):
        return load_base(base)  # a .gguf file, or the standard "no such path" error
    cfg = ModelConfig.from_hf_json(os.path.join(base, "config.json"))
    has_tok = any(os.path.isfile(os.path.join(base, n)) for n in TOKENIZER_MARKERS)
    return BaseCheckpoint(config=cfg, params={}, tokenizer_dir=base if has_tok else None, source=base)


def _scalings(names: Sequence[str], r: int, lora_alpha: float | None, adapter_dir: str | None) -> list[float]:
    if adapter_dir is not None:
        out = []
        for task in names:
            conf = read_adapter_config(os.path.join(adapter_dir, task))
            path = os.path.join(adapter_dir, task, CONFIG_FILE)
            if conf.get("rank_pattern") or conf.get("alpha_pattern"):
                raise MeteoraInputError(
                    f"{path}: fields 'rank_pattern'/'alpha_pattern' are set, but the original MeteoRA layout "
                    "stacks every expert with one rank and one scaling per adapter. Pass --lora-alpha instead, or "
                    "convert the PEFT adapters directly with --adapter NAME=PATH."
                )
            if conf.get("r") != r:
                raise MeteoraInputError(
                    f"{path}: field 'r' is {conf.get('r')!r} but the checkpoint stacks rank-{r} experts: this "
                    "adapter is not the one embedded in the checkpoint. Point --meteora-adapter-dir at the "
                    "adapters the checkpoint was trained with."
                )
            alpha = float(conf.get("lora_alpha", 8))
            out.append(alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r)
        return out
    if lora_alpha is None:
        warnings.warn(
            f"the MeteoRA checkpoint does not store the LoRA scaling; assuming LLaMA-Factory's default "
            f"lora_alpha = 2 r = {2 * r} (scaling 2.0). Pass --meteora-adapter-dir DIR (DIR/<task>/"
            "adapter_config.json) or --lora-alpha A if the adapters were trained otherwise.",
            stacklevel=3,
        )
        lora_alpha = 2.0 * r
    return [float(lora_alpha) / r] * len(names)


def load_meteora_checkpoint(
    path: str,
    base: str,
    names: Sequence[str],
    *,
    lora_alpha: float | None = None,
    adapter_dir: str | None = None,
) -> tuple[BaseCheckpoint, list[LoraAdapter], dict[tuple[int, str], np.ndarray]]:
    """(base checkpoint, experts in ``names`` order, gates [d_in, N] by (layer, projection)).

    ``names`` must already be in the checkpoint's order (alphabetical). Base weights come from the checkpoint
    when it holds them (they must then be complete), else from ``base``; ``base`` always gives the config and
    tokenizer.
    """
    path = os.path.abspath(path)
    infos, _ = safetensors_io.read_header(path)  # raises a clear error on a missing/truncated file
    n = len(names)
    groups: dict[tuple[int, str], dict[str, str]] = {}
    base_keys = []
    for key in infos:
        stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _MOE_KEY.fullmatch(stripped)
        if m is None:
            base_keys.append(key)
            continue
        proj = m.group("proj")
        if proj not in PROJECTIONS or (m.group("block") == "self_attn") != (proj in ATTN_PROJECTIONS):
            raise MeteoraInputError(
                f"{path}: tensor {key!r} adapts {proj!r}, not one of the 7 LLaMA projections; this is not a "
                "MeteoRA checkpoint of a LLaMA-family model."
            )
        groups.setdefault((int(m.group("layer")), proj), {})[m.group("role")] = key
    if not any("moe_gate" in roles for roles in groups.values()):
        raise MeteoraInputError(
            f"{path}: holds no '*.moe_gate.weight' tensors, so it is not an original MeteoRA checkpoint (a PEFT "
            "adapter's file?). Pass PEFT adapter directories as --adapter NAME=PATH instead."
        )

    base_ckpt = _config_only(base) if base_keys else load_base(base)
    cfg = base_ckpt.config
    rank = None
    for (layer, proj), roles in sorted(groups.items()):
        missing = [r for r in ("lora_A", "lora_B", "moe_gate") if r not in roles]
        if missing:
            raise MeteoraInputError(
                f"{path}: layer {layer} {proj} has {sorted(roles)} but lacks {missing}; the "
                "checkpoint is incomplete. Re-save the full MeteoRA model state dict."
            )
        if layer >= cfg.num_hidden_layers:
            raise MeteoraInputError(
                f"{path}: has experts for layer {layer}, but --base has {cfg.num_hidden_layers} layers. Pass the "
                "base model the checkpoint was trained on."
            )
        d_in, d_out = cfg.projection_shape(proj)
        gate_shape = infos[roles["moe_gate"]].shape
        if gate_shape != (n, d_in):
            raise MeteoraInputError(
                f"{path}: {roles['moe_gate']!r} has shape {gate_shape}, expected ({n}, {d_in}) for the {n} tasks "
                f"given (--tasks) and hidden size {d_in}. The checkpoint holds {gate_shape[0]} experts: pass "
                "exactly its task names, or the base model it was trained on."
            )
        rows, a_in = infos[roles["lora_A"]].shape
        b_out, cols = infos[roles["lora_B"]].shape
        if a_in != d_in or b_out != d_out or rows != cols or rows % n:
            raise MeteoraInputError(
                f"{path}: lora_A {(rows, a_in)} / lora_B {(b_out, cols)} of layer {layer} {proj} do not fit "
                f"N*r x {d_in} / {d_out} x N*r with N={n}. The checkpoint is for another base model or another "
                "number of tasks."
            )
        if rank is None:
            rank = rows // n
        elif rows // n != rank:
            raise MeteoraInputError(
                f"{path}: layer {layer} {proj} stacks rank {rows // n} experts, others rank {rank}; the original "
                "layout needs one rank. The file is not a MeteoRA checkpoint."
            )
    scalings = _scalings(names, rank, lora_alpha, adapter_dir)

    tensors = safetensors_io.read_file(path)
    if base_keys:
        hf = {_hf_name(k): tensors[k] for k in base_keys}
        base_ckpt = BaseCheckpoint(
            config=cfg,
            params=hf_llama.convert_state_dict(cfg, hf, source=path),
            tokenizer_dir=base_ckpt.tokenizer_dir,
            source=base_ckpt.source,
        )
    modules: list[dict[tuple[int, str], LoraModule]] = [{} for _ in names]
    gates: dict[tuple[int, str], np.ndarray] = {}
    for (layer, proj), roles in groups.items():
        a = tensors[roles["lora_A"]].astype(np.float32)
        b = tensors[roles["lora_B"]].astype(np.float32)
        g = tensors[roles["moe_gate"]].astype(np.float32)
        for role, arr in (("lora_A", a), ("lora_B", b), ("moe_gate", g)):
            check_finite(roles[role], arr, path)
        for e in range(n):
            rows = slice(e * rank, (e + 1) * rank)
            modules[e][(layer, proj)] = LoraModule(a[rows, :], b[:, rows], scalings[e])
        gates[(layer, proj)] = np.ascontiguousarray(g.T)  # torch Linear [N, d_in] -> gate_de [d_in, N]
    experts = [LoraAdapter(source=f"{path}#{name}", modules=m) for name, m in zip(names, modules)]
    return base_ckpt, experts, gates
