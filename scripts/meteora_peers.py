"""The original MeteoRA kernels (PyTorch) as peers in ``bench_moe_lora.py``: same inputs, same run.

Issue 3 asks for MeteoRA's two inference paths beside ours: ``bmm-torch v1`` (a gathered per-token
``torch.bmm`` pair) and ``triton v4`` (its Triton kernel on A split into ``m`` row groups). Their code is not
ours to commit: clone the public repository into the git-ignored ``peers/`` folder and carry it to the GPU::

    git clone https://github.com/NJUDeepEngine/meteora peers/meteora      # or --peers-dir elsewhere

Only ``MoELoRA/layer_ops/`` is imported, as a package under a private name (its parent package pulls in
PEFT wrappers the kernels do not need). ``v1`` needs only torch, so it runs on a CPU host too; ``v4`` needs
triton and a GPU. Each peer is timed as MeteoRA's layer runs it: the base ``F.linear`` (an ``nn.Linear``'s
weight layout), then the peer's in-place add of the LoRA term, in bf16 under ``torch.no_grad``.

Timers (a GPU; on a CPU host only ``wall``, for the smoke test):
- ``kernels``: per-call sum of CUDA kernel time from a ``torch.profiler`` trace, cut into calls as
  ``pallas_kernels.timing.per_call_kernel_us`` does: comparable with the JAX rows' ``profile`` timer.
- ``events``: per-call CUDA-event time, launch gaps and eager-mode host cost included (how shared/ANCHORS.md
  measured these peers).
``peak_mb``: ``torch.cuda.max_memory_allocated`` during one call beyond what was allocated before it, less
the output.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "peers" / "meteora"
LAYER_OPS = Path("MoELoRA") / "layer_ops"
PEERS = ("meteora_bmm_torch_v1", "meteora_triton_v4")
TRITON_GROUP_SIZE = 16  # MeteoRA's default ``accelerate_fwd_backend_triton_group_size``


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (code absent, no triton or GPU, a shape it does not support)."""


def _load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_package(name: str, directory: Path) -> ModuleType:
    """``directory`` (with an ``__init__.py``) imported as the top-level package ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing: its relative imports look it up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def layer_ops_dir(peers_dir: str | os.PathLike | None = None) -> Path:
    """``MoELoRA/layer_ops`` of the MeteoRA checkout, or PeerUnavailable naming the fix."""
    root = Path(peers_dir) if peers_dir else DEFAULT_DIR
    ops = root / LAYER_OPS
    if not (ops / "layer_ops_torch.py").is_file():
        raise PeerUnavailable(
            f"{ops}: no MeteoRA layer_ops here. Clone the original repository there: "
            f"git clone https://github.com/NJUDeepEngine/meteora {root}"
        )
    return ops


def torch_v1_function(peers_dir: str | os.PathLike | None = None) -> Callable:
    """MeteoRA's ``_moelinear_fwd_inner_bmm_torch_v1`` (torch only: its file imports nothing else)."""
    module = _load_file("meteora_peer_layer_ops_torch", layer_ops_dir(peers_dir) / "layer_ops_torch.py")
    return module._moelinear_fwd_inner_bmm_torch_v1


def triton_v4_forward(peers_dir: str | os.PathLike | None = None) -> Callable:
    """MeteoRA's ``_moelinear_fwd_inner_bmm_triton_v4``: what its v4 autograd Function's forward runs. Its layer
    reaches it through ``moelinear_fwd_inner_bmm_triton``, which calls ``MoeLinear_Inner_Bmm_Triton_v4.apply(
    **kwargs)``; torch 2.11 rejects that ("apply() takes no keyword arguments", seen on the GPU image, session
    17), so the peer calls the forward's own function with the arguments the Function passes it. Needs triton."""
    ops = layer_ops_dir(peers_dir)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise PeerUnavailable(f"triton is not installed ({e}); meteora_triton_v4 needs it and a GPU") from e
    return _load_package("meteora_peer_layer_ops", ops).layer_ops_triton._moelinear_fwd_inner_bmm_triton_v4


@dataclasses.dataclass
class PeerInputs:
    """One bench case in MeteoRA's layouts (torch tensors on ``device``)."""

    x: Any  # [T, d_in]
    weight: Any  # [d_out, d_in], nn.Linear's layout
    lora_a: Any  # [E, d_in, r]
    lora_b: Any  # [E, r, d_out]
    scalings: Any  # [E] float32
    moe_weights: Any  # [T, k]
    selected: Any  # [T, k] int64


def to_torch(inp: dict[str, Any], device: str, dtype: str = "bfloat16") -> PeerInputs:
    """``shapes.make_inputs`` arrays (JAX) as MeteoRA's tensors, on ``device``."""
    import torch

    tdtype = getattr(torch, dtype)

    def t(a, dt=tdtype):  # noqa: ANN001, ANN202
        return torch.from_numpy(np.array(a, np.float32)).to(device=device, dtype=dt).contiguous()

    return PeerInputs(
        x=t(inp["x"]),
        weight=t(np.asarray(inp["w"], np.float32).T),
        lora_a=t(inp["lora_a"]),
        lora_b=t(inp["lora_b"]),
        scalings=t(inp["scaling"], torch.float32),
        moe_weights=t(inp["expert_weights"]),
        selected=torch.from_numpy(np.asarray(inp["expert_ids"], np.int64)).to(device),
    )


def base_call(p: PeerInputs) -> Callable[[], Any]:
    import torch.nn.functional as F

    return lambda: F.linear(p.x, p.weight)


def _layer_kwargs(p: PeerInputs, dropout: Any) -> dict[str, Any]:
    """The arguments MeteoRA's layer passes its inner functions, but ``result`` (the base output)."""
    return {
        "x": p.x,
        "lora_A_weights": p.lora_a,
        "lora_B_weights": p.lora_b,
        "scalings": p.scalings,
        "lora_dropout": dropout,
        "moe_weights": p.moe_weights,
        "selected_loras": p.selected,
    }


def _v1_call(p: PeerInputs, peers_dir: str | os.PathLike | None) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    v1, dropout = torch_v1_function(peers_dir), torch.nn.Identity()

    def call():  # noqa: ANN202
        result = F.linear(p.x, p.weight)
        v1(result=result, **_layer_kwargs(p, dropout))
        return result

    return call


def triton_v4_layouts(lora_a, lora_b, scalings, group_size: int = TRITON_GROUP_SIZE) -> dict[str, Any]:  # noqa: ANN001
    """The extra inputs MeteoRA's layer builds once for ``triton v4`` (``MoELinear._prepare_forward``): A cut
    into ``m`` row groups side by side ([E, d_in/m, r*m]) and pre-scaled, B likewise by columns, and the 0/1
    masks that pick each group's own r columns. Its kernel asserts 16 <= r*m <= 128 and 16 <= m <= 64."""
    import torch

    num_experts, d_in, rank = lora_a.shape
    d_out, m, dt = lora_b.shape[2], group_size, lora_a.dtype
    if d_in % m or d_out % m or not (16 <= rank * m <= 128 and 16 <= m <= 64):
        raise PeerUnavailable(
            f"meteora_triton_v4 supports r*m in [16, 128] (m={m}), d % m == 0; got r={rank}"
        )
    a_split = torch.cat(lora_a.split(d_in // m, dim=1), dim=2) * scalings[:, None, None].to(dt)
    b_split = torch.cat(lora_b.split(d_out // m, dim=2), dim=1) * scalings[:, None, None].to(dt)
    dev = lora_a.device
    block = torch.zeros(m, rank * m, dtype=dt, device=dev)
    for i in range(m):
        block[i, i * rank : (i + 1) * rank] = 1
    eyes = torch.cat([torch.eye(rank, dtype=dt, device=dev)] * m, dim=0)
    return {
        "lora_A_weights_split": a_split.contiguous(),
        "lora_B_weights_split": b_split.contiguous(),
        "lora_A_mask": (block, eyes.contiguous()),
        "lora_B_mask": (block.T.contiguous(), eyes.T.contiguous()),
    }


def _v4_call(p: PeerInputs, peers_dir: str | os.PathLike | None) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    if p.x.device.type != "cuda":
        raise PeerUnavailable("meteora_triton_v4 needs a CUDA device")
    v4, dropout = triton_v4_forward(peers_dir), torch.nn.Identity()
    layouts = triton_v4_layouts(p.lora_a, p.lora_b, p.scalings)
    # as MoeLinear_Inner_Bmm_Triton_v4.forward calls it: A split (pre-scaled), B as stored, A's masks
    kwargs = {**_layer_kwargs(p, dropout), "lora_A_weights": layouts["lora_A_weights_split"]}

    def call():  # noqa: ANN202
        result = F.linear(p.x, p.weight)
        v4(result=result, lora_A_mask=layouts["lora_A_mask"], **kwargs)  # updates result in place
        return result

    return call


def peer_call(name: str, p: PeerInputs, peers_dir: str | os.PathLike | None = None) -> Callable[[], Any]:
    """A no-argument call of peer ``name`` that returns base + LoRA ([T, d_out]); PeerUnavailable if it
    cannot run here."""
    if name == "meteora_bmm_torch_v1":
        return _v1_call(p, peers_dir)
    if name == "meteora_triton_v4":
        return _v4_call(p, peers_dir)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")


# ------------------------------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class PeerTiming:
    us: dict[str, float]  # timer -> per-call microseconds
    valid: dict[str, bool]
    notes: dict[str, str]
    peak_mb: float | None
    kernels_per_call: int | None = None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wall_us(calls: Sequence[Callable[[], Any]], n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _events_us(calls: Sequence[Callable[[], Any]], n: int) -> float:
    import torch

    pairs = []
    for i in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in pairs)


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # all device work, as XLA's stream lines count it


def _kernel_events(trace_path: str) -> list[tuple[float, float, str]]:
    """(start, duration, name) of the device events in a torch profiler's Chrome trace, in time order."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [
        (float(e["ts"]), float(e["dur"]), e.get("name", ""))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
    ]
    return sorted(kernels)


def _kernels_timing(calls: Sequence[Callable[[], Any]], n: int):  # noqa: ANN202
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pallas_kernels import timing

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            calls[i % len(calls)]()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        return timing.per_call_kernel_us(_kernel_events(path), n)


def peak_mb(call: Callable[[], Any]) -> float | None:
    """Transient CUDA memory of one call: peak allocated beyond the start, less its output (None on CPU)."""
    if not _cuda():
        return None
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    return max(extra, 0) / 2**20


def time_peer(calls: Sequence[Callable[[], Any]], n: int = 50, warmup: int = 3) -> PeerTiming:
    """Per-call time of ``calls`` used in turn (copies of the inputs, so the weights are L2-cold as in the JAX
    rows); every timer the host supports."""
    import torch

    with torch.no_grad():
        for i in range(max(warmup, len(calls))):
            calls[i % len(calls)]()
        if not _cuda():
            return PeerTiming({"wall": _wall_us(calls, n)}, {"wall": True}, {"wall": "CPU wall clock"}, None)
        torch.cuda.synchronize()
        kt = _kernels_timing(calls, n)
        ev = _events_us(calls, n)
        return PeerTiming(
            us={"kernels": kt.us, "events": ev},
            valid={"kernels": kt.valid, "events": True},
            notes={"kernels": kt.note, "events": "median per-call CUDA-event time (launches included)"},
            peak_mb=peak_mb(calls[0]),
            kernels_per_call=kt.kernels_per_call,
        )
