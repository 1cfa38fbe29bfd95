"""Train a real PEFT LoRA adapter with torch on task data: the demo's "one adapter per task".

The sequences are exactly those gate training sees (``meteora_jax.train.data.encode_examples``: same
tokenizer, template, BOS/EOS), and the loss is the usual supervised fine-tuning one: next-token
cross-entropy on response tokens (EOS included). ``save_pretrained`` writes the standard PEFT files
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``meteora-jax convert`` reads.

Small and fast on purpose: full-batch-ish AdamW on CPU for a few hundred steps of a tiny model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from meteora_jax.testing.peft_adapters import DEFAULT_TARGETS, load_torch_base
from meteora_jax.train.data import EncodedSet, make_batch


def train_peft_lora(
    base_dir: str | os.PathLike,
    data: EncodedSet,
    out_dir: str | os.PathLike,
    *,
    pad_id: int,
    r: int = 8,
    alpha: float = 16.0,
    steps: int = 200,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> dict[str, float]:
    """Trains one LoRA adapter on ``data`` and saves it to ``out_dir``; returns first/last loss."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = load_torch_base(base_dir)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - 0.9 * s / steps))
    rng = np.random.default_rng(seed)
    buckets = (max(len(s) for s in data.ids),)
    losses = []
    for _ in range(steps):
        idx = rng.integers(len(data), size=batch_size)
        b = make_batch(data, idx, pad_id=pad_id, buckets=buckets, response_only=True)
        tokens = torch.from_numpy(b.tokens_bl.astype(np.int64))
        mask = torch.from_numpy(b.mask_bl.astype(np.int64))
        weight = torch.from_numpy(b.lm_weight_bl[:, :-1])
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        ).reshape(weight.shape)
        loss = (nll * weight).sum() / weight.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    model.save_pretrained(os.fspath(out_dir))
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}
