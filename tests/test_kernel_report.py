"""scripts/kernel_report.py: the PTX loop reader and the occupancy arithmetic on hand-written inputs, and the
whole report on the real decode kernel where the ``triton`` package is installed (``.triton/``)."""

import os

import pytest
from script_loader import load_script

kr = load_script("kernel_report")

PTX = """
	ld.global.b32 { %r1 }, [ %rd1 + 0 ];
$L__BB0_1:                              // =>This Inner Loop Header: Depth=1
	cp.async.wait_group 	2;
	bar.sync 	0;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %r2 }, { %r3 }, { %r4 }, { %r2 };
	@%p1 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
	fma.rn.f32 	%r9, %r5, %r6, %r9;
	@!%p2 cp.async.cg.shared.global [ %r10 + 0 ], [ %rd3 + 0 ], 0x10, %r11;
	cp.async.commit_group;
	@%p5 bra 	$L__BB0_1;
	ld.global.b32 { %r12 }, [ %rd4 + 0 ];
$L__BB0_3:                              // =>This Inner Loop Header: Depth=1
	ld.global.b16 { %rs1 }, [ %rd5 + 0 ];
	bra.uni 	$L__BB0_3;
"""


def test_loops_count_only_what_is_inside_each_loop():
    first, second = kr.loops(PTX)
    assert first["cp.async"] == 1  # the copy, not wait_group / commit_group
    assert first["ld.global"] == 1  # the predicated one inside; the loads before and after are outside
    assert first["mma"] == 1 and first["bar.sync"] == 1 and first["fp32"] == 1
    assert second["ld.global"] == 1 and second["cp.async"] == 0


def test_blocks_per_sm_is_the_tightest_limit():
    usage = "Function k:\n  REG:128 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:608"
    # 128 regs x 128 threads = 16K of 64K registers: 4 blocks; 97 KiB of 227 KiB shared memory: 2 blocks
    assert kr.resources(usage, 97 * 1024, 4) == {
        "regs": 128,
        "spill_bytes": 8,
        "shared_bytes": 97 * 1024,
        "blocks_per_sm": 2,
    }
    assert kr.resources(usage, 1024, 8)["blocks_per_sm"] == 2  # 128 regs x 256 threads: registers bind
    assert kr.resources(usage.replace("REG:128", "REG:32"), 0, 1)["blocks_per_sm"] == 32  # the block cap


@pytest.mark.skipif(not os.path.isdir(kr.os.path.join(kr.ROOT, ".triton")), reason="triton not in .triton/")
def test_report_on_the_decode_kernel(tmp_path):
    out = tmp_path / "r.json"
    assert kr.main(["--cases", "q_o", "--out", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())["rows"]
    assert row["kernel"] == "lora_decode_fused" and row["loops"] == 1 and row["loop_mma"] > 0


@pytest.mark.parametrize(
    "case,name,loops",
    [
        ("routed_down", "lora_decode_fused_group", 1),
        ("expand_qkv_b64", "lora_expand_fused", 6),
        ("expand_routed_qkv_b64", "lora_expand_fused_routed", 6),
    ],
)
def test_new_kinds_lower_to_one_named_kernel(case, name, loops):
    """The session-12 kinds lower (on this CPU host, no triton needed) to one Triton kernel each: the routed
    decode kernel (one K loop), the fused expands (a W loop and a B_flat loop per projection)."""
    _, d_in, d_outs, kind = {c[0]: c for c in kr.CASES}[case]
    (k,) = kr.lower_case(d_in, d_outs, None, experts=28, rank=8, top_k=2, kind=kind)
    assert k["name"] == name
    assert k["ttir"].count(" scf.for ") == loops
