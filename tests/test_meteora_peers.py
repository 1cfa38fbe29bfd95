"""The MeteoRA peers of ``bench_moe_lora.py`` (``scripts/meteora_peers.py``), on the CPU.

The original repository is not part of this one, so most tests stand a small stand-in for its
``layer_ops_torch.py`` in a temporary ``peers`` folder: they check the loading, MeteoRA's tensor layouts,
the timing on a CPU host and the bench rows. Where a real clone is in ``peers/meteora`` (git-ignored), its
``bmm-torch v1`` is also checked against a float64 NumPy reference.
"""

import json

import numpy as np
import pytest
from script_loader import load_script

torch = pytest.importorskip("torch")

# MeteoRA's v1 signature, reimplemented here: gathered per-slot LoRA, weighted, added in place to ``result``.
STAND_IN = """
import torch


def _moelinear_fwd_inner_bmm_torch_v1(x, result, lora_A_weights, lora_B_weights, scalings, lora_dropout,
                                     moe_weights, selected_loras):
    for slot in range(selected_loras.shape[1]):
        ids = selected_loras[:, slot]
        h = torch.einsum("td,tdr->tr", lora_dropout(x).float(), lora_A_weights[ids].float())
        y = torch.einsum("tr,tro->to", h, lora_B_weights[ids].float())
        result.add_((y * (scalings[ids] * moe_weights[:, slot].float())[:, None]).to(result.dtype))
    return result
"""


@pytest.fixture(scope="module")
def mp():
    return load_script("meteora_peers")


@pytest.fixture
def stand_in(tmp_path):
    ops = tmp_path / "meteora" / "MoELoRA" / "layer_ops"
    ops.mkdir(parents=True)
    (ops / "layer_ops_torch.py").write_text(STAND_IN)
    return tmp_path / "meteora"


def _inputs(seed: int, t: int = 5, d_in: int = 32, d_out: int = 48, e: int = 6, r: int = 4, k: int = 2):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((t, d_in)).astype(np.float32),
        "w": rng.standard_normal((d_in, d_out)).astype(np.float32) / np.sqrt(d_in),
        "lora_a": rng.standard_normal((e, d_in, r)).astype(np.float32) / np.sqrt(d_in),
        "lora_b": rng.standard_normal((e, r, d_out)).astype(np.float32),
        "scaling": rng.uniform(0.5, 2.0, e).astype(np.float32),
        "expert_ids": np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32),
        "expert_weights": rng.dirichlet(np.ones(k), t).astype(np.float32),
    }


def _reference(inp) -> np.ndarray:
    """x @ W + sum_j w_j s_e x @ A_e @ B_e in float64."""
    f = {k: np.asarray(v, np.float64) for k, v in inp.items()}
    y = f["x"] @ f["w"]
    for t, (ids, ws) in enumerate(zip(inp["expert_ids"], f["expert_weights"], strict=True)):
        for e, w in zip(ids, ws, strict=True):
            y[t] += w * f["scaling"][e] * (f["x"][t] @ f["lora_a"][e] @ f["lora_b"][e])
    return y


def test_missing_clone_names_the_fix(mp, tmp_path):
    with pytest.raises(mp.PeerUnavailable, match="git clone https://github.com/NJUDeepEngine/meteora"):
        mp.peer_call("meteora_bmm_torch_v1", mp.to_torch(_inputs(0), "cpu", "float32"), tmp_path / "none")
    with pytest.raises(ValueError, match="unknown peer"):
        mp.peer_call("meteora_v9", mp.to_torch(_inputs(0), "cpu", "float32"), tmp_path)


def test_v1_call_through_meteoras_layouts(mp, stand_in):
    """Our arrays in MeteoRA's layouts (nn.Linear weight [d_out, d_in], A [E, d_in, r], B [E, r, d_out]):
    the base linear plus the peer's in-place add is the float64 reference."""
    inp = _inputs(1)
    call = mp.peer_call("meteora_bmm_torch_v1", mp.to_torch(inp, "cpu", "float32"), stand_in)
    with torch.no_grad():
        got = call().numpy()
    np.testing.assert_allclose(got, _reference(inp), rtol=1e-4, atol=1e-4)


def test_triton_v4_layouts_reproduce_each_experts_shrink(mp):
    """MeteoRA's v4 reads A as m row groups side by side and keeps each group's own r columns with the masks:
    summed over the groups that is x @ A_e * s_e, for every expert."""
    inp = _inputs(2, d_in=64, d_out=32, r=4)
    p = mp.to_torch(inp, "cpu", "float32")
    m = 16
    lay = mp.triton_v4_layouts(p.lora_a, p.lora_b, p.scalings, group_size=m)
    block, eyes = lay["lora_A_mask"]
    assert lay["lora_A_weights_split"].shape == (6, 64 // m, 4 * m) and block.shape == (m, 4 * m)
    x = p.x[0]
    for e in range(6):
        groups = x.view(m, -1) @ lay["lora_A_weights_split"][e]  # [m, r*m]: every group against every A block
        got = ((groups * block) @ eyes).sum(0)
        want = x @ p.lora_a[e] * p.scalings[e]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    b_block, b_eyes = lay["lora_B_mask"]
    assert b_block.shape == (4 * m, m) and b_eyes.shape == (4, 4 * m)
    wide = mp.to_torch(_inputs(2, d_in=64, d_out=32, r=16), "cpu", "float32")  # r*m = 256 > 128
    with pytest.raises(mp.PeerUnavailable, match="r\\*m"):
        mp.triton_v4_layouts(wide.lora_a, wide.lora_b, wide.scalings, group_size=m)


def test_cpu_timing_is_wall_clock(mp, stand_in):
    p = mp.to_torch(_inputs(3), "cpu", "float32")
    t = mp.time_peer([mp.peer_call("meteora_bmm_torch_v1", p, stand_in)], n=3, warmup=1)
    assert set(t.us) == {"wall"} and t.us["wall"] > 0 and t.peak_mb is None


def test_bench_writes_peer_rows(stand_in, tmp_path, capsys):
    """``bench --peers``: each peer that can run gets a row with the issue's keys beside the JAX impl; one that
    cannot (v4: no GPU here) is printed as not run, and the run goes on."""
    bench = load_script("bench_moe_lora")
    out = tmp_path / "rows.json"
    bench.bench(
        bench.TINY_CASES[:1],
        ["xla"],
        str(out),
        calls=3,
        reps=5,
        peers=["meteora_bmm_torch_v1", "meteora_triton_v4"],
        peers_dir=str(stand_in),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["xla", "meteora_bmm_torch_v1"]
    peer = rows[1]
    assert {"us", "base_us", "x_vs_base", "bound", "peak_mb", "timer"} <= peer.keys()
    assert peer["timer"] == "wall" and peer["bound"] == rows[0]["bound"]
    assert peer["rel_err_vs_first_impl"] < 2e-2  # bf16 peer vs the bf16 xla row
    assert "meteora_triton_v4 (bfloat16): not run" in capsys.readouterr().out


def test_real_clone_v1_matches_float64(mp):
    """Only where a real clone sits in peers/meteora: MeteoRA's own bmm-torch v1 on our inputs."""
    try:
        mp.layer_ops_dir()
    except mp.PeerUnavailable:
        pytest.skip("no MeteoRA clone in peers/meteora")
    inp = _inputs(4)
    with torch.no_grad():
        got = mp.peer_call("meteora_bmm_torch_v1", mp.to_torch(inp, "cpu", "float32"))().numpy()
    np.testing.assert_allclose(got, _reference(inp), rtol=1e-4, atol=1e-4)


def test_device_events_from_a_torch_trace(mp, tmp_path):
    """Kernels, copies and memsets count (as XLA's stream lines do); host-side ops and CUDA runtime calls do not."""
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "ts": 30.0, "dur": 2.0, "name": "gemm"},
            {"ph": "X", "cat": "gpu_memset", "ts": 10.0, "dur": 1.0, "name": "Memset (Device)"},
            {"ph": "X", "cat": "gpu_memcpy", "ts": 20.0, "dur": 1.5, "name": "Memcpy DtoD"},
            {"ph": "X", "cat": "cuda_runtime", "ts": 5.0, "dur": 9.0, "name": "cudaLaunchKernel"},
            {"ph": "X", "cat": "cpu_op", "ts": 4.0, "dur": 40.0, "name": "aten::linear"},
            {"ph": "i", "cat": "kernel", "ts": 50.0, "name": "marker"},
        ]
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    assert mp._kernel_events(str(path)) == [
        (10.0, 1.0, "Memset (Device)"),
        (20.0, 1.5, "Memcpy DtoD"),
        (30.0, 2.0, "gemm"),
    ]
