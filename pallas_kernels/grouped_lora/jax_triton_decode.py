"""``jax_triton``: the decode kernel written in plain Triton and called through jax-triton's ``triton_call``.

Issue 3 names jax-triton in the design. This backend is the one-launch decode product of
``pallas_gpu_decode.py`` (x @ W plus each token's top-k LoRA, for a few tokens) with the kernel in Triton
itself (``jax_triton_kernel.py``) rather than lowered from Pallas, so the two can be timed against each other
on one GPU: what Pallas's lowering costs or gains over hand-written Triton (explicit pointer arithmetic
and the one reduction of the shrink after the K loop). Everything else, training included, is ``xla``'s.

Needs, on a GPU, the ``jax-triton`` and ``triton`` packages. The GPU image has triton 3.6.0, which takes
jax-triton 0.3.1: install its wheel there (benchmarks/RESULTS.md, "Session 16", has the commands).
``jax_triton_interpret`` runs the same kernel through Triton's own interpreter on the CPU
(``TRITON_INTERPRET=1`` must be set before triton is imported), the check the tests make.

Shape checks happen here, before any launch: d_in / d_out / rank must match between x, W, A and B.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_lora import common, pallas_gpu_decode
from pallas_kernels.grouped_lora.pallas_gpu_decode import DecodeConfig

MAX_TOKENS = 16  # the most tokens a call may have to take this kernel (``make_ops``); not yet timed on a GPU
DEFER_SHRINK_MAX_ELEMS = 8192  # [rows, block_k, block_r] float32 accumulators kept across the K loop


def launch_params(
    num_tokens: int, d_in: int, d_out: int, rank: int, top_k: int, tiles: DecodeConfig | None = None
) -> dict[str, Any]:
    """The grid, warps, stages and every constexpr of ``lora_decode_kernel`` for this call.

    ``tiles`` are the Pallas decode kernel's (``DecodeConfig``: block_n, block_k, warps, stages, split_k,
    base_dot; ``lora_elems`` has no use here), by default its ``DECODE_CONFIG_OVERRIDE`` else ``for_shape``: one
    geometry for both kernels, so that they are timed side by side."""
    cfg = tiles or pallas_gpu_decode.DECODE_CONFIG_OVERRIDE or DecodeConfig.for_shape(num_tokens, d_in, d_out)
    blocks = common.cdiv(d_out, cfg.block_n)
    steps = common.cdiv(d_in, cfg.block_k)
    k_per_split = common.cdiv(steps, cfg.split_for(blocks, steps)) * cfg.block_k
    split = common.cdiv(d_in, k_per_split)  # no empty split
    use_dot = num_tokens > 1 or cfg.base_dot == "mma"
    block_t = max(16, common.pow2(num_tokens)) if use_dot else 1
    block_tl = 1 if num_tokens == 1 else block_t
    block_ks, block_r = common.pow2(top_k), max(2, common.pow2(rank))
    return {
        "grid": (blocks, split),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "splits": split,
        "constexprs": {
            "T": num_tokens,
            "D_IN": d_in,
            "D_OUT": d_out,
            "R": rank,
            "K": top_k,
            "K_PER_SPLIT": k_per_split,
            "BLOCK_T": block_t,
            "BLOCK_TL": block_tl,
            "BLOCK_KS": block_ks,
            "BLOCK_R": block_r,
            "BLOCK_K": cfg.block_k,
            "BLOCK_N": cfg.block_n,
            "USE_DOT": use_dot,
            "DEFER_SHRINK": block_tl * block_ks * cfg.block_k * block_r <= DEFER_SHRINK_MAX_ELEMS,
        },
    }


Caller = Callable[..., jax.Array]  # (x, w, a, b, ids, coef, *, out_shape, params) -> partials


def _jax_triton_call(*args: jax.Array, out_shape: jax.ShapeDtypeStruct, params: dict[str, Any]) -> jax.Array:
    import jax_triton as jt

    from pallas_kernels.grouped_lora.jax_triton_kernel import lora_decode_kernel

    return jt.triton_call(
        *args,
        kernel=lora_decode_kernel,
        out_shape=out_shape,
        grid=params["grid"],
        num_warps=params["num_warps"],
        num_stages=params["num_stages"],
        **params["constexprs"],
    )


def _interpreter_run(*arrays: np.ndarray, out_shape: tuple, params: dict[str, Any]) -> np.ndarray:
    """Host side of ``interpreter_call``: the kernel on torch CPU tensors in Triton's interpreter."""
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("jax_triton_interpret needs TRITON_INTERPRET=1 set before triton is imported")
    from pallas_kernels.grouped_lora.jax_triton_kernel import lora_decode_kernel

    def tensor(a: np.ndarray) -> Any:
        a = np.asarray(a)
        if a.dtype == jnp.bfloat16:  # torch has no NumPy bf16 view; via float32 the values are exact
            return torch.from_numpy(a.astype(np.float32)).bfloat16()
        return torch.from_numpy(np.array(a))

    out = torch.zeros(out_shape, dtype=torch.float32)
    constexprs = {**params["constexprs"], "DOT_IN_F32": True}  # see the kernel's module doc
    lora_decode_kernel[params["grid"]](*(tensor(a) for a in arrays), out, **constexprs)
    return out.numpy()


def interpreter_call(*args: jax.Array, out_shape: jax.ShapeDtypeStruct, params: dict[str, Any]) -> jax.Array:
    """A ``Caller`` that runs the kernel in Triton's interpreter on the host (CPU tests)."""
    run = functools.partial(_interpreter_run, out_shape=out_shape.shape, params=params)
    return jax.pure_callback(run, out_shape, *args)


def decode_forward(
    x_td: Float[Array, "T D"],
    w_do: Float[Array, "D O"],
    lora_a_edr: Float[Array, "E D R"],
    lora_b_ero: Float[Array, "E R O"],
    expert_ids_tk: Int[Array, "T K"],
    expert_weights_tk: Float[Array, "T K"],
    scaling_e: Float[Array, " E"],
    *,
    call: Caller | None = None,
    tiles: DecodeConfig | None = None,
) -> Float[Array, "T O"]:
    """``x @ W`` plus the top-k LoRA term in one Triton launch (and one XLA sum of the K splits)."""
    num_tokens, d_in = x_td.shape
    num_experts, a_in, rank = lora_a_edr.shape
    d_out = w_do.shape[1]
    if w_do.shape[0] != d_in or a_in != d_in or lora_b_ero.shape != (num_experts, rank, d_out):
        raise ValueError(
            f"jax_triton decode: x {x_td.shape}, W {w_do.shape}, A {lora_a_edr.shape}, B {lora_b_ero.shape} "
            "do not agree on d_in / d_out / rank"
        )
    top_k = expert_ids_tk.shape[1]
    params = launch_params(num_tokens, d_in, d_out, rank, top_k, tiles)
    ids_m = expert_ids_tk.astype(jnp.int32).reshape(-1)
    coef_m = common.coef_tk(expert_ids_tk, expert_weights_tk, scaling_e).reshape(-1)
    out_shape = jax.ShapeDtypeStruct((params["splits"], num_tokens, d_out), jnp.float32)
    partials = (call or _jax_triton_call)(
        x_td, w_do, lora_a_edr, lora_b_ero, ids_m, coef_m, out_shape=out_shape, params=params
    )
    return partials.sum(axis=0).astype(x_td.dtype)


def make_ops(fallback: Any, *, interpret: bool = False) -> Any:
    """``fallback`` (an XLA ops object) whose inference forward, for a call with ``w`` and 1 ..
    ``MAX_TOKENS`` tokens, is this kernel; NotImplementedError where it cannot run."""
    if interpret:
        call = interpreter_call
    else:
        if jax.default_backend() != "gpu":
            raise NotImplementedError(
                "jax_triton needs a GPU (or jax_triton_interpret with TRITON_INTERPRET=1)"
            )
        try:
            import jax_triton  # noqa: F401
            import triton  # noqa: F401
        except ImportError as e:
            raise NotImplementedError(f"jax_triton needs the jax-triton and triton packages: {e}") from e
        call = _jax_triton_call

    def kernel(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e):  # noqa: ANN001, ANN202
        if w_do is None or not 0 < x_td.shape[0] <= MAX_TOKENS:
            return None
        return decode_forward(x_td, w_do, lora_a_edr, lora_b_ero, ids_tk, weights_tk, scaling_e, call=call)

    return common.kernel_first(fallback, "jax_triton", kernel)
