"""Train K LoRA adapters at once in ONE torch model, then export each as a standard PEFT directory.

Why. Eager HF + PEFT training of SmolLM2-135M is launch-bound (~0.33 s a step at batch 16 on an H200, the
issue measured), so 22 adapters one after another cost ~37 device minutes, almost all of it kernel launches.
Here every target ``nn.Linear`` of the frozen base is wrapped by a ``StackedLoRALinear`` that holds the
A/B matrices of K adapters stacked on a leading axis; one forward serves a batch laid out adapter-major,

    rows [k * n, (k + 1) * n) belong to adapter k   (x_btd viewed as x_kmd, m = n * T)
    y = x @ W^T + s * bmm(bmm(x_kmd, A_kir^T), B_kor^T)

so a step costs about the launches of ONE adapter's step and trains K. Per adapter the maths is exactly the
single-adapter recipe (PEFT's ``LoraLayer`` with dropout 0):

* init: A ~ PEFT's kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0; seeded per adapter
  *name*, so an adapter's init does not depend on which others share its process;
* loss: each adapter's own mean next-token NLL over its response tokens (EOS included), summed over adapters
  (gradients do not mix: the adapters share no parameter);
* AdamW and the LR schedule are elementwise, so stacking changes nothing; gradient clipping is per adapter
  (each adapter's own global norm, as if it trained alone).

Speed knobs: bf16 base weights under autocast (LoRA masters stay float32), logits computed only at the
supervised positions (a full [B, T, 49152] float32 logits tensor would dominate memory), sequences padded to
a multiple of ``pad_multiple`` (few distinct shapes, so ``compile=True`` rarely recompiles), and optional
``torch.compile``.

Resumable: the batch of step s for adapter k is a pure function of (seed, adapter name, s); every
``checkpoint_every`` steps the stacked LoRA tensors + optimizer state are saved (atomically), and a
``deadline`` (epoch seconds) makes the loop checkpoint and return early, so a run cut at its time limit
loses nothing. Export writes ``adapter_config.json`` (through ``peft.LoraConfig``) and
``adapter_model.safetensors`` with PEFT's key names; ``peft.PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CKPT_FILE = "stacked_lora.pt"


@dataclasses.dataclass(frozen=True)
class PeftTrainConfig:
    """The adapter recipe (the issue's: r=8, alpha=16, all 7 projections, lr 1e-3, response-only loss)."""

    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 300
    batch_per_adapter: int = 16  # rows of each adapter in one step
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # per adapter; 0 = off
    max_seq_len: int = 512  # longer examples are dropped (counted), not truncated: a cut loses the answer
    pad_multiple: int = 64
    dtype: str = "bfloat16"  # base weights + autocast; "float32" for exact CPU tests
    compile: bool = False
    checkpoint_every: int = 100
    seed: int = 0


@dataclasses.dataclass
class AdapterData:
    """One adapter's training sequences: token ids and where the response starts (BOS + prompt length)."""

    ids: list[np.ndarray]
    prompt_len: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ------------------------------------------------------------------------------------------------ the layer
def _torch():  # noqa: ANN202 (lazy: importing this module must not need torch)
    import torch

    return torch


def make_stacked_lora_linear(base, num_adapters: int, r: int, alpha: float):  # noqa: ANN001, ANN201
    """A ``StackedLoRALinear`` around the frozen ``nn.Linear`` ``base`` (defined lazily: torch is optional)."""
    torch = _torch()
    nn = torch.nn

    class StackedLoRALinear(nn.Module):
        """``base(x) + s * (x @ A_k^T) @ B_k^T`` for the rows of adapter k (adapter-major batch)."""

        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.num_adapters, self.r, self.scaling = num_adapters, r, alpha / r
            d_out, d_in = base.weight.shape
            # PEFT's layout per adapter: lora_A.weight [r, d_in], lora_B.weight [d_out, r]
            self.lora_a_kri = nn.Parameter(torch.zeros(num_adapters, r, d_in, dtype=torch.float32))
            self.lora_b_kor = nn.Parameter(torch.zeros(num_adapters, d_out, r, dtype=torch.float32))

        def forward(self, x_btd):  # noqa: ANN001, ANN202
            y_bto = self.base(x_btd)
            b, t, d = x_btd.shape
            k = self.num_adapters
            x_kmd = x_btd.reshape(k, (b // k) * t, d)  # rows are adapter-major: b = k * n
            a_kir = self.lora_a_kri.to(x_btd.dtype)
            b_kor = self.lora_b_kor.to(x_btd.dtype)
            h_kmr = torch.bmm(x_kmd, a_kir.transpose(1, 2))
            d_kmo = torch.bmm(h_kmr, b_kor.transpose(1, 2))
            return y_bto + self.scaling * d_kmo.reshape(b, t, -1).to(y_bto.dtype)

    return StackedLoRALinear()


def attach_stacked_lora(model, names: Sequence[str], cfg: PeftTrainConfig) -> dict[str, object]:  # noqa: ANN001
    """Replaces every target ``nn.Linear`` of ``model`` by a stacked-LoRA wrapper with one slot per name.

    Returns ``{module path: wrapper}`` (paths as in the base model, e.g. ``model.layers.0.self_attn.q_proj``).
    Base parameters are frozen; only the stacked A/B tensors train.
    """
    torch = _torch()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and path.rsplit(".", 1)[-1] in cfg.target_modules
    ]
    if not targets:
        raise ValueError(f"no nn.Linear named {cfg.target_modules} in the model")
    wrappers = {}
    for path, mod in targets:
        parent_path, _, attr = path.rpartition(".")
        wrapper = make_stacked_lora_linear(mod, len(names), cfg.r, cfg.alpha)
        setattr(model.get_submodule(parent_path), attr, wrapper)
        wrappers[path] = wrapper
    init_adapters(wrappers, names, cfg.seed)
    return wrappers


def init_adapters(wrappers: Mapping[str, object], names: Sequence[str], seed: int) -> None:
    """PEFT's init per adapter slot (A kaiming-uniform a=sqrt(5), B zero), seeded by (seed, name, module)."""
    torch = _torch()
    with torch.no_grad():
        for path, w in wrappers.items():
            for k, name in enumerate(names):
                gen = torch.Generator().manual_seed(_stable_seed(seed, name, path))
                d_in = w.lora_a_kri.shape[-1]
                bound = 1.0 / math.sqrt(d_in)
                a = (torch.rand(w.lora_a_kri.shape[1:], generator=gen) * 2 - 1) * bound
                w.lora_a_kri[k].copy_(a)
                w.lora_b_kor[k].zero_()


# ------------------------------------------------------------------------------------------------ batches
@functools.lru_cache(maxsize=64)
def _epoch_permutation(seed: int, name: str, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng(_stable_seed(seed, name, "epoch", epoch)).permutation(size)


def batch_rows(data: AdapterData, name: str, step: int, n: int, seed: int) -> np.ndarray:
    """Example indices of adapter ``name`` at ``step``: a walk over per-epoch seeded permutations."""
    size = len(data)
    return np.asarray(
        [_epoch_permutation(seed, name, j // size, size)[j % size] for j in range(step * n, (step + 1) * n)]
    )


def make_stacked_batch(
    datas: Sequence[AdapterData], rows: Sequence[np.ndarray], *, pad_id: int, pad_multiple: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [K*n, T], attention mask [K*n, T], supervised-target mask [K*n, T]) for adapter-major rows.

    ``target[b, t]`` marks that position t predicts token t + 1 and that token is part of the response.
    """
    seqs = [(d.ids[i], int(d.prompt_len[i])) for d, idx in zip(datas, rows) for i in idx]
    longest = max(len(s) for s, _ in seqs)
    length = -(-longest // pad_multiple) * pad_multiple
    tokens = np.full((len(seqs), length), pad_id, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    target = np.zeros((len(seqs), length), bool)
    for r, (s, plen) in enumerate(seqs):
        tokens[r, : len(s)] = s
        mask[r, : len(s)] = 1
        target[r, max(plen, 1) - 1 : len(s) - 1] = True
    return tokens, mask, target


# ------------------------------------------------------------------------------------------------ training
def stacked_loss(model, tokens, mask, target, num_adapters: int, autocast_dtype):  # noqa: ANN001, ANN201
    """(sum over adapters of each adapter's mean response NLL, per-adapter losses [K]).

    Logits only at supervised positions: the LM head runs on [N, D] instead of [B, T, D].
    """
    torch = _torch()
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden_btd = model.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        pos_b, pos_t = target.nonzero(as_tuple=True)
        logits_nv = model.lm_head(hidden_btd[pos_b, pos_t])
    labels_n = tokens[pos_b, pos_t + 1]
    nll_n = torch.nn.functional.cross_entropy(logits_nv.float(), labels_n, reduction="none")
    rows_per = tokens.shape[0] // num_adapters
    group_n = pos_b // rows_per
    sums_k = torch.zeros(num_adapters, device=tokens.device).index_add_(0, group_n, nll_n)
    counts_k = torch.zeros(num_adapters, device=tokens.device).index_add_(0, group_n, torch.ones_like(nll_n))
    loss_k = sums_k / counts_k.clamp(min=1.0)
    return loss_k.sum(), loss_k.detach()


def _clip_per_adapter(params: list, max_norm: float, num_adapters: int) -> None:  # noqa: ANN001
    torch = _torch()
    sq_k = torch.zeros(num_adapters, device=params[0].device)
    for p in params:
        sq_k += p.grad.reshape(num_adapters, -1).float().pow(2).sum(1)
    factor_k = (max_norm / (sq_k.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor_k.view(-1, *([1] * (p.dim() - 1))))


def _lr_lambda(cfg: PeftTrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:  # linear warm-up, then linear decay to 0 (HF Trainer's default schedule)
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        return max(0.0, (cfg.steps - step) / max(cfg.steps - cfg.warmup_steps, 1))

    return f


def load_base_for_training(base_dir: str | os.PathLike, dtype: str, device: str):  # noqa: ANN201
    """The transformers model of ``base_dir`` (local files only) in ``dtype`` on ``device``, SDPA attention."""
    torch = _torch()
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        os.fspath(base_dir), dtype=getattr(torch, dtype), local_files_only=True, attn_implementation="sdpa"
    )
    return model.to(device).eval()  # eval(): no dropout anywhere; LoRA dropout is 0 by recipe


def train_adapters(
    base_dir: str | os.PathLike,
    datas: Mapping[str, AdapterData],
    out_root: str | os.PathLike,
    cfg: PeftTrainConfig,
    *,
    pad_id: int,
    work_dir: str | os.PathLike | None = None,
    deadline: float | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Trains one adapter per entry of ``datas`` together and exports each to ``out_root/<name>``.

    Returns ``{name: stats}`` for the exported adapters, or ``{}`` when ``deadline`` cut the run (a
    checkpoint in ``work_dir`` then lets the next call continue). Adapters already exported are the
    caller's business (pass only the missing ones).
    """
    torch = _torch()
    from tqdm.auto import tqdm

    names = list(datas)
    k = len(names)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = os.fspath(work_dir or os.path.join(os.fspath(out_root), f".train-{'-'.join(names)[:80]}"))
    os.makedirs(work, exist_ok=True)
    base_dtype = cfg.dtype if device != "cpu" or cfg.dtype == "float32" else "float32"
    model = load_base_for_training(base_dir, base_dtype, device)
    wrappers = attach_stacked_lora(model, names, cfg)
    model.to(device)
    params = [p for w in wrappers.values() for p in (w.lora_a_kri, w.lora_b_kor)]
    opt = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    start = _restore(work, names, cfg, wrappers, opt, sched, device, log)
    forward = stacked_loss
    if cfg.compile:
        forward = torch.compile(stacked_loss, dynamic=False)
    autocast = getattr(torch, cfg.dtype) if cfg.dtype != "float32" else None

    bar = tqdm(
        total=cfg.steps, initial=start, desc=f"adapters x{k}", disable=not progress, dynamic_ncols=True
    )
    losses: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    step = start
    for step in range(start, cfg.steps):
        if deadline is not None and time.time() > deadline:
            _save(work, names, cfg, wrappers, opt, sched, step)
            log(f"deadline reached at step {step}/{cfg.steps}: checkpoint saved in {work}")
            bar.close()
            return {}
        rows = [batch_rows(datas[n], n, step, cfg.batch_per_adapter, cfg.seed) for n in names]
        tok, mask, target = make_stacked_batch(
            [datas[n] for n in names], rows, pad_id=pad_id, pad_multiple=cfg.pad_multiple
        )
        tok_t = torch.from_numpy(tok).to(device, non_blocking=True)
        loss, loss_k = forward(
            model,
            tok_t,
            torch.from_numpy(mask).to(device, non_blocking=True),
            torch.from_numpy(target).to(device, non_blocking=True),
            k,
            autocast,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip_norm:
            _clip_per_adapter(params, cfg.grad_clip_norm, k)
        opt.step()
        sched.step()
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            vals = loss_k.cpu().tolist()  # one sync every 10 steps, not every step
            for n, v in zip(names, vals):
                losses[n].append(v)
            bar.set_postfix(loss=f"{np.mean(vals):.3f}")
        bar.update(1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save(work, names, cfg, wrappers, opt, sched, step + 1)
    bar.close()
    secs = time.perf_counter() - t0
    done = max(cfg.steps - start, 1)
    stats = {}
    for kk, n in enumerate(names):
        out = os.path.join(os.fspath(out_root), n)
        export_peft_adapter(wrappers, kk, out, cfg, base_dir=os.fspath(base_dir))
        stats[n] = {
            "examples": len(datas[n]),
            "first_loss": losses[n][0] if losses[n] else None,
            "last_loss": float(np.mean(losses[n][-3:])) if losses[n] else None,
            "steps": cfg.steps,
            "seconds_per_step": secs / done,
            "adapters_per_process": k,
        }
    shutil.rmtree(work, ignore_errors=True)
    return stats


def _state(names, cfg, wrappers, opt, sched, step) -> dict:  # noqa: ANN001
    return {
        "names": list(names),
        "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        "step": step,
        "lora": {p: (w.lora_a_kri.detach().cpu(), w.lora_b_kor.detach().cpu()) for p, w in wrappers.items()},
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
    }


def _save(work: str, names, cfg, wrappers, opt, sched, step: int) -> None:  # noqa: ANN001
    torch = _torch()
    tmp = os.path.join(work, f".{CKPT_FILE}.{uuid.uuid4().hex[:8]}")
    torch.save(_state(names, cfg, wrappers, opt, sched, step), tmp)
    os.replace(tmp, os.path.join(work, CKPT_FILE))


def _restore(work: str, names, cfg, wrappers, opt, sched, device: str, log) -> int:  # noqa: ANN001
    torch = _torch()
    path = os.path.join(work, CKPT_FILE)
    if not os.path.isfile(path):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["names"] != list(names) or state["config"] != json.dumps(
        dataclasses.asdict(cfg), sort_keys=True
    ):
        log(f"{path}: checkpoint of other adapters or another recipe; starting over")
        return 0
    with torch.no_grad():
        for p, (a, b) in state["lora"].items():
            wrappers[p].lora_a_kri.copy_(a.to(device))
            wrappers[p].lora_b_kor.copy_(b.to(device))
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    log(f"resumed adapters {list(names)} at step {state['step']}")
    return int(state["step"])


# ------------------------------------------------------------------------------------------------ export
def export_peft_adapter(
    wrappers: Mapping[str, object], k: int, out_dir: str, cfg: PeftTrainConfig, *, base_dir: str
) -> str:
    """Writes adapter slot ``k`` as a PEFT LoRA directory (atomically: temp dir, then rename)."""
    import peft
    from safetensors.numpy import save_file

    tensors = {}
    for path, w in wrappers.items():
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = w.lora_a_kri[k].detach().float().cpu().numpy()
        tensors[f"{prefix}.lora_B.weight"] = w.lora_b_kor[k].detach().float().cpu().numpy()
    config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        target_modules=sorted(cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_dir,
    )
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
