"""Gate-training throughput and MFU on one accelerator: SmolLM2-135M and Llama-3-8B shapes, 28 rank-8 experts.

    python scripts/bench_train.py [--out DIR] [--tiny]

Random weights in bf16 (gates float32), built on the device. One gate-only training step (the library's own
``make_train_step``: forward, backward to every gate, AdamW update) is timed after warm-up.

FLOPs counted per token (the work gate-only training must do; no base weight gradients are needed):
  forward  2 * (matmul params incl. the LM head) + 4 * L * T * d_q (attention scores and values, full T x T as
           computed) + 2 * k * 2 * r * (d_in + d_out) per adapted projection (top-k LoRA experts)
  backward the same again (gradients w.r.t. activations, which every gate below the top layer needs)
MFU = achieved FLOP/s / peak, the peak being a bf16 matmul measured in the same run (8192^3, best of 5).
Writes ``$OUT/train_h200.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> ModelConfig preset
SHAPES = ("smollm2-135m", "llama3-8b", "tiny")


def model_config(name: str):  # noqa: ANN201
    from meteora_jax.config import ModelConfig

    return {
        "smollm2-135m": ModelConfig.smollm2_135m,
        "llama3-8b": lambda: ModelConfig.llama3_8b(max_position_embeddings=8192),
        "tiny": ModelConfig.tiny,
    }[name]()


def matmul_peak(n: int = 8192, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(cfg, moe, seq: int) -> float:  # noqa: ANN001
    d, m, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = sum(a * b for a, b in (cfg.projection_shape(p) for p in moe.target_modules))
    other = sum(
        a * b
        for a, b in (
            cfg.projection_shape(p)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            if p not in moe.target_modules
        )
    )
    matmul = L * (per_layer + other) + cfg.vocab_size * d
    attn = 4 * L * seq * cfg.q_dim
    lora = L * sum(2 * moe.top_k * 2 * moe.rank * sum(cfg.projection_shape(p)) for p in moe.target_modules)
    del m
    fwd = 2 * matmul + attn + lora
    return 2 * fwd


def bench_one(name: str, batch: int, seq: int, steps: int, attention: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from meteora_jax.config import MoEConfig
    from meteora_jax.model.llama import MeteoraLlama
    from meteora_jax.train.config import TrainConfig
    from meteora_jax.train.step import init_state, make_train_step, routing_for

    cfg = model_config(name)
    moe = MoEConfig(expert_names=tuple(f"task{i:02d}" for i in range(28)), rank=8, top_k=2)
    t0 = time.perf_counter()
    model = MeteoraLlama(cfg, moe, dtype="bfloat16", rngs=nnx.Rngs(0))
    if attention:
        model.set_attention_implementation(attention)
    build_s = time.perf_counter() - t0
    tcfg = TrainConfig(steps=1000, batch_size=batch, max_seq_len=seq, warmup_steps=1)
    state = init_state(model, tcfg)
    step = make_train_step(state, tcfg, routing_for(model, tcfg))
    rng = np.random.default_rng(0)
    batch_d = {
        "tokens_bl": jax.numpy.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jax.numpy.int32),
        "mask_bl": jax.numpy.ones((batch, seq), jax.numpy.int32),
        "lm_weight_bl": jax.numpy.ones((batch, seq), jax.numpy.float32),
        "task_b": jax.numpy.asarray(rng.integers(0, 28, (batch,)), jax.numpy.int32),
        "response_bl": jax.numpy.ones((batch, seq), jax.numpy.int32),
    }
    t0 = time.perf_counter()
    state.trainable, state.opt, m = step(state.trainable, state.opt, state.frozen, batch_d)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    state.trainable, state.opt, m = step(state.trainable, state.opt, state.frozen, batch_d)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state.trainable, state.opt, m = step(state.trainable, state.opt, state.frozen, batch_d)
    jax.block_until_ready(m["loss"])
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * seq
    return {
        "shape": name,
        "batch": batch,
        "seq": seq,
        "experts": 28,
        "rank": 8,
        "top_k": 2,
        "attention": attention or "einsum",
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "flops_per_token": flops_per_token(cfg, moe, seq),
        "achieved_tflops": flops_per_token(cfg, moe, seq) * tokens / dt / 1e12,
        "loss": float(m["loss"]),
        "build_s": build_s,
        "compile_s": compile_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tiny", action="store_true", help="CPU smoke run of the script itself")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    import jax

    runs = (
        [("tiny", 2, 64, "")]
        if args.tiny
        else [("smollm2-135m", 16, 2048, "cudnn"), ("llama3-8b", 4, 2048, "cudnn")]
    )
    result = {
        "date": "2026-11-29",
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "command": "python scripts/bench_train.py",
        "peak_bf16_matmul_tflops": matmul_peak(512 if args.tiny else 8192) / 1e12,
        "runs": [],
    }
    path = os.path.join(args.out, "train_h200.json")
    os.makedirs(args.out, exist_ok=True)
    for name, b, t, attn in runs:
        errors = []
        for impl in (attn, "xla") if attn else (attn,):
            try:
                r = bench_one(name, b, t, args.steps, impl)
                break
            except Exception as e:  # record and go on: one shape failing must not lose the other
                errors.append(f"{impl}: {type(e).__name__}: {str(e)[:400]}")
                r = {"shape": name, "error": " | ".join(errors)}
        if errors and "error" not in r:
            r["fallback_from"] = errors
        if "achieved_tflops" in r:
            r["mfu"] = r["achieved_tflops"] / result["peak_bf16_matmul_tflops"]
        result["runs"].append(r)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(r), flush=True)
    print(f"\npeak bf16 matmul {result['peak_bf16_matmul_tflops']:.0f} TFLOP/s on {result['device']}")
    print(f"{'shape':<14}{'B x T':>12}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['shape']:<14} error: {r['error'][:80]}")
            continue
        print(
            f"{r['shape']:<14}{r['batch']:>5} x {r['seq']:<5}{1e3 * r['step_s']:>10.1f}{r['tokens_per_s']:>12.0f}"
            f"{r['achieved_tflops']:>9.1f}{100 * r['mfu']:>6.1f}%"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
