"""Real PEFT LoRA adapters for tests and the demo, built offline on a local transformers checkpoint.

``make_peft_adapter`` wraps the model in ``peft.get_peft_model`` and saves with ``save_pretrained``, so the
files are exactly what PEFT writes (key names, ``adapter_config.json`` fields). PEFT initialises lora_B to
zero, which would make every adapter a no-op and every parity test vacuous, so A and B are overwritten with
seeded random values large enough to move the logits visibly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_torch_base(base_dir: str | os.PathLike):  # noqa: ANN201 (a transformers PreTrainedModel)
    """The transformers model of ``base_dir`` in float32, eager attention, local files only."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        os.fspath(base_dir), dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    )
    return model.eval()


def make_peft_adapter(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: Sequence[int] | int | None = None,
    save_bin: bool = False,
    scale: float = 0.1,
) -> str:
    """Saves a real PEFT LoRA adapter for ``base_dir`` into ``out_dir`` (random non-zero A and B); returns it."""
    import peft
    import torch

    model = load_torch_base(base_dir)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        layers_to_transform=list(layers_to_transform)
        if isinstance(layers_to_transform, (list, tuple))
        else layers_to_transform,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    pmodel = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    out_dir = os.fspath(out_dir)
    pmodel.save_pretrained(out_dir, safe_serialization=not save_bin)
    return out_dir
