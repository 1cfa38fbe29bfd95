"""End-to-end generation benchmark: a Llama-3-8B-shaped MeteoRA model (28 rank-8 experts, top-2, bf16) on one GPU.

Measures, in one process, each beside the same model with its experts off (``RoutingOptions.no_experts``):
prefill latency at 512 and 4096 tokens, decode tokens/s at batch 1, 8, 64 (the sampler's jitted while-loop);
then HF transformers (torch, bf16, sdpa) base and with one PEFT LoRA on the same device; and the ceilings:
read bandwidth (the fastest of three reductions over 4 GiB) and the bf16 matmul peak (8192^3). Weights are
random and generated on the device by ``jax.random`` (no host copies). Results go to
``$OUT/generate_<gpu>.json`` (``generate_h200.json`` on an H200; or ``--out``), rewritten after every section so
that a run cut short still reports what it measured.

    python scripts/bench_generate.py                      # the H200 run
    python scripts/bench_generate.py --tiny --skip-hf     # a CPU smoke test of the same code path
"""

# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch needs memory too, later in the run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meteora_jax import knobs  # noqa: E402
from meteora_jax.config import ModelConfig, MoEConfig  # noqa: E402
from meteora_jax.errors import MeteoraInputError  # noqa: E402
from meteora_jax.generate.sampler import DecodeState, _decode, inference_packs, prefill_program  # noqa: E402
from meteora_jax.generate.sampling import SamplingParams  # noqa: E402
from meteora_jax.generate.static_graph import split as split_static  # noqa: E402
from meteora_jax.io import write_text_atomic  # noqa: E402
from meteora_jax.knobs import KNOBS  # noqa: E402
from meteora_jax.model.kv_cache import KVCache  # noqa: E402
from meteora_jax.model.llama import MeteoraLlama  # noqa: E402
from pallas_kernels import timing  # noqa: E402

RESULTS: dict = {}


def llama3_8b(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig.tiny(vocab_size=512, max_position_embeddings=8192)
    return ModelConfig.llama3_8b()


def save(path: str) -> None:
    write_text_atomic(path, json.dumps(RESULTS, indent=2))


def timed(fn, reps: int) -> float:  # noqa: ANN001
    """Median seconds of ``fn()`` (which must block) after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(tiny: bool) -> None:
    n = 1 << (20 if tiny else 31)  # 2^31 bf16 = 4 GiB
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    # the ceiling is the fastest of three read-only kernels: XLA emits each differently (a tree reduction to a
    # scalar, one row per block, a column reduction), and one alone may sit below what the memory can do
    reads = {
        "sum": lambda v: jnp.sum(v, dtype=jnp.float32),
        "rows": lambda v: jnp.sum(v.reshape(-1, 4096), axis=1, dtype=jnp.float32),
        "cols": lambda v: jnp.sum(v.reshape(-1, 4096), axis=0, dtype=jnp.float32),
    }
    for name, fn in reads.items():
        read = jax.jit(fn)
        s = timed(lambda read=read: read(x).block_until_ready(), 10)
        RESULTS[f"read_bandwidth_{name}_tb_s"] = 2 * n / s / 1e12
    RESULTS["read_bandwidth_tb_s"] = max(RESULTS[f"read_bandwidth_{name}_tb_s"] for name in reads)
    x = None  # free the 4 GiB before the matmul
    m = 256 if tiny else 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    s = timed(lambda: mm(a, b).block_until_ready(), 10)
    RESULTS["bf16_matmul_peak_tflops"] = 2 * m**3 / s / 1e12


def build_model(
    cfg: ModelConfig, num_experts: int, rank: int, implementation: str | None = None
) -> MeteoraLlama:
    """Random bf16 weights made on the device, one small jitted fill per distinct shape.

    (Jitting the whole constructor makes XLA compile one 16 GB initializer program, which took over five
    minutes on the H200; shapes repeat across layers, so per-shape fills compile a dozen tiny programs.)
    """
    import functools

    from flax import nnx

    from meteora_jax.model.params_io import abstract_model
    from meteora_jax.model.rope import inv_frequencies

    moe = MoEConfig(
        expert_names=tuple(f"task{i}" for i in range(num_experts)),
        rank=rank,
        top_k=2,
        implementation=implementation,
    )
    abstract = abstract_model(cfg, moe, jnp.bfloat16)
    graphdef, state = nnx.split(abstract)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    counter = iter(range(1 << 30))

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if "inv_freq" in name:
            return jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), leaf.dtype)
        if "scale_d" in name or "scaling_e" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        return normal(jax.random.key(next(counter)), tuple(leaf.shape), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def prefill_flops(cfg: ModelConfig, t: int) -> float:
    linear = sum(np.prod(cfg.projection_shape(p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    linear += sum(np.prod(cfg.projection_shape(p)) for p in ("gate_proj", "up_proj", "down_proj"))
    per_token = 2 * linear * cfg.num_hidden_layers
    unembed = 2 * cfg.hidden_size * cfg.vocab_size  # the last position's logits only (as _prefill computes)
    attention = 2 * cfg.num_hidden_layers * t * t * cfg.q_dim  # QK^T and PV, causal half of 4*T^2*d
    return float(per_token * t + unembed + attention)


def bench_prefill(model: MeteoraLlama, t: int, reps: int) -> dict:

    graphdef, state = split_static(model)  # as the sampler: the graph hashed once, not at every jit call
    packs = inference_packs(graphdef, state)  # as the sampler does: once per model state, not timed
    ids = jax.random.randint(jax.random.key(t), (1, t), 0, model.config.vocab_size, jnp.int32)
    valid = jnp.ones((1, t), jnp.int32)
    out = {}
    for label, routing in (("", model.routing_options()), ("base_", model.routing_options(no_experts=True))):

        def run() -> None:
            carry, _ = prefill_program()(
                graphdef,
                state,
                ids,
                valid,
                jax.random.key(0),
                jnp.int32(0),
                jnp.asarray([-1], jnp.int32),
                routing=routing,
                params=SamplingParams(),
                return_routing=False,
                new_bucket=16,
                packs=packs,
            )
            carry.out_bn.block_until_ready()

        out[f"{label}ms"] = 1e3 * timed(run, reps)
    return out


def fresh_decode_state(model: MeteoraLlama, batch: int, prompt: int, steps: int) -> DecodeState:
    """A decode carry as a prefill of ``prompt`` tokens leaves it (zeros in the cache: contents do not change
    the work), with room for ``steps`` more tokens."""
    s = prompt + steps + 1
    cache = model.init_cache(batch, s)
    return DecodeState(
        cache=KVCache(layers=cache.layers, index=jnp.int32(prompt)),
        mask_bs=jnp.zeros((batch, s), jnp.int32).at[:, :prompt].set(1),
        pos_b=jnp.full((batch,), prompt, jnp.int32),
        out_bn=jnp.ones((batch, steps + 1), jnp.int32),
        done_b=jnp.zeros((batch,), bool),
        step=jnp.ones((), jnp.int32),
        key=jax.random.key(0),
        routing_bnlpk=None,
    )


def bench_decode(model: MeteoraLlama, batch: int, prompt: int, steps: int, reps: int) -> dict:
    """Tokens/s of the jitted decode loop, from a cache already holding ``prompt`` tokens (contents do not
    change the work, so the cache is zeros and no prefill program is compiled)."""

    graphdef, state = split_static(model)  # as the sampler: the graph hashed once, not at every jit call
    packs = inference_packs(graphdef, state)  # as the sampler does: once per model state, not timed

    def fresh() -> DecodeState:
        return fresh_decode_state(model, batch, prompt, steps)

    out = {}
    for label, routing in (("", model.routing_options()), ("base_", model.routing_options(no_experts=True))):
        holder = {}

        def setup() -> None:
            holder["c"] = jax.block_until_ready(fresh())

        def run() -> None:
            c = _decode(
                graphdef,
                state,
                holder["c"],
                jnp.int32(steps + 1),
                jnp.int32(0),
                jnp.asarray([-1], jnp.int32),
                routing=routing,
                params=SamplingParams(),
                return_routing=False,
                packs=packs,
            )
            c.out_bn.block_until_ready()

        times = []
        for i in range(reps + 1):
            setup()
            t0 = time.perf_counter()
            run()
            if i:  # the first call compiles
                times.append(time.perf_counter() - t0)
        out[f"{label}tok_s"] = batch * steps / statistics.median(times)
    return out


def bench_hf(
    cfg: ModelConfig, num_lora_rank: int, tiny: bool, prefill_t: int, decode_batches: list[int]
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    with torch.device(dev):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def measure(prefix: str, m) -> None:  # noqa: ANN001
        ids = torch.randint(0, cfg.vocab_size, (1, prefill_t), device=dev)
        with torch.no_grad():

            def fwd() -> None:
                # the last position's logits alone, as our prefill (and HF's own generate) computes them;
                # until 2026-11-29 both sides computed every position's (the 127.1 ms anchor was that)
                m(ids, use_cache=False, logits_to_keep=1)
                sync()

            RESULTS[f"{prefix}prefill_{prefill_t}_ms"] = 1e3 * timed(fwd, 3)
            for b in decode_batches:
                prompt = torch.randint(0, cfg.vocab_size, (b, 128), device=dev)
                new = 32

                def gen() -> None:
                    m.generate(
                        prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
                    )
                    sync()

                RESULTS[f"{prefix}decode_b{b}_tok_s"] = b * new / timed(gen, 1)

    measure("hf_base_", model)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=num_lora_rank, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, lora).to(torch.bfloat16).eval()
    measure("hf_peft_", peft_model)
    del model, peft_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke test)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--sections", default="ceil,decode,prefill,hf", help="comma list, in order")
    ap.add_argument("--attention", default=None, help="attention for prefill (default: cudnn on GPU)")
    ap.add_argument("--lora-impl", default=None, help="grouped_lora implementation (default: automatic)")
    ap.add_argument("--decode-batches", default="1,64,8", help="comma list of decode batch sizes")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default: $OUT/generate_<gpu>.json, <gpu> from the device kind: h200 on an H200)",
    )
    ap.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=N",
        help=f"a trace-time knob for the whole run (repeatable; meteora_jax/knobs.py): {sorted(KNOBS)}",
    )
    args = ap.parse_args()
    try:
        knobs.set_knobs(knobs.parse(args.knob, where="--knob"))
    except MeteoraInputError as e:
        ap.error(str(e))
    card = timing.card_slug(str(jax.devices()[0].device_kind))
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), f"generate_{card}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cfg = llama3_8b(args.tiny)
    gpu = jax.default_backend() == "gpu"
    RESULTS.update(
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        experts=28,
        rank=8,
        top_k=2,
        config="tiny" if args.tiny else "llama3-8b",
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(["python3 scripts/bench_generate.py", *sys.argv[1:]]),
        knobs=knobs.current(),
    )
    reps = 2 if args.tiny else 5
    t0 = time.perf_counter()
    model = None
    for section in args.sections.split(","):
        ts = time.perf_counter()
        if section == "ceil":
            ceilings(args.tiny)
        elif section in ("decode", "prefill") and model is None:
            model = build_model(cfg, 28, 8, args.lora_impl)
            RESULTS["lora_implementation"] = model.kernel_implementation
            jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
            RESULTS["build_model_s"] = time.perf_counter() - ts
        if section == "decode":
            model.set_attention_implementation("einsum")
            for b in [int(x) for x in args.decode_batches.split(",")]:
                r = bench_decode(
                    model, b, prompt=128, steps=16 if args.tiny else 64, reps=1 if args.tiny else 3
                )
                RESULTS[f"decode_b{b}_tok_s"] = r["tok_s"]
                RESULTS[f"base_decode_b{b}_tok_s"] = r["base_tok_s"]
                RESULTS[f"decode_b{b}_x_vs_base"] = r["base_tok_s"] / r["tok_s"]
                if "read_bandwidth_tb_s" in RESULTS and b == 1:
                    nbytes = sum(x.nbytes for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
                    RESULTS["weights_and_experts_gb"] = nbytes / 1e9
                    RESULTS["decode_b1_bandwidth_fraction"] = (
                        nbytes * r["tok_s"] / 1e12 / RESULTS["read_bandwidth_tb_s"]
                    )
                save(out)
        elif section == "prefill":
            impl = args.attention or ("cudnn" if gpu else "einsum")
            for t in (4096, 512):
                try:
                    model.set_attention_implementation(impl)
                    r = bench_prefill(model, t, reps)
                    RESULTS["prefill_attention"] = impl
                except Exception as e:  # cuDNN may refuse a shape: fall back to the reference attention
                    RESULTS[f"prefill_{t}_cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    model.set_attention_implementation("einsum")
                    r = bench_prefill(model, t, reps)
                RESULTS[f"prefill_{t}_ms"] = r["ms"]
                RESULTS[f"base_prefill_{t}_ms"] = r["base_ms"]
                RESULTS[f"prefill_{t}_x_vs_base"] = r["ms"] / r["base_ms"]
                if "bf16_matmul_peak_tflops" in RESULTS:
                    achieved = prefill_flops(cfg, t) / (r["ms"] / 1e3) / 1e12
                    RESULTS[f"prefill_{t}_tflops"] = achieved
                    RESULTS[f"prefill_{t}_mfu"] = achieved / RESULTS["bf16_matmul_peak_tflops"]
                save(out)
        elif section == "hf" and not args.skip_hf:
            model = None  # free the JAX weights for torch
            bench_hf(cfg, 8, args.tiny, 128 if args.tiny else 4096, [1, 64])
            if "prefill_4096_ms" in RESULTS and "hf_base_prefill_4096_ms" in RESULTS:
                RESULTS["prefill_4096_x_vs_hf_base"] = (
                    RESULTS["prefill_4096_ms"] / RESULTS["hf_base_prefill_4096_ms"]
                )
        RESULTS[f"section_{section}_s"] = time.perf_counter() - ts
        save(out)
        print(f"[{time.perf_counter() - t0:7.1f}s] {section} done", flush=True)
    print(json.dumps(RESULTS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
