"""Run-time model options that ``generate`` and ``eval`` share: the same flags, help and errors in both."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from meteora_jax.errors import MeteoraInputError

if TYPE_CHECKING:
    from meteora_jax.model.llama import MeteoraLlama

# = model.llama.ATTENTION_IMPLEMENTATIONS (tests/test_generate_cli.py checks): spelled out so that building
# the parsers (every `--help`) does not import JAX
ATTENTION_CHOICES = ("einsum", "xla", "cudnn")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--attention``, ``--lora-impl`` and ``--knob``."""
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: the dtype the model was saved in)",
    )
    p.add_argument(
        "--attention",
        default=None,
        choices=list(ATTENTION_CHOICES),
        help="attention implementation: einsum (the float32 reference), xla, or cudnn (fused, GPU, bf16/fp16)",
    )
    p.add_argument(
        "--lora-impl",
        default=None,
        help="grouped-LoRA kernel backend: reference, xla, xla_ragged, pallas_gpu, pallas_gpu_decode, "
        "pallas_tpu, mosaic_gpu, jax_triton, tokamax, ... (pallas_kernels.grouped_lora.api.IMPLEMENTATIONS; "
        "default: the model's, else the fastest for this platform)",
    )
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a trace-time performance knob (meteora_jax/knobs.py), e.g. packed=2 or gate_rows=1; repeatable; "
        "also settable for every command with METEORA_JAX_KNOBS='packed=2,gate_rows=1'",
    )


def apply_model_options(model: MeteoraLlama, args: argparse.Namespace) -> None:
    """Sets ``args.attention`` / ``args.lora_impl`` on a loaded model and ``args.knob`` for the process; an
    unknown backend or knob is a clear error."""
    from meteora_jax import knobs

    knobs.set_knobs(knobs.parse(getattr(args, "knob", None) or [], where="--knob"))
    if args.attention:
        model.set_attention_implementation(args.attention)
    if args.lora_impl:
        try:
            model.set_lora_implementation(args.lora_impl)
        except ValueError as e:
            raise MeteoraInputError(f"--lora-impl: {e}.") from e
