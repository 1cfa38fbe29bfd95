"""The ``tokamax`` backend: ``xla_ragged``'s sorted rows through ``tokamax.ragged_dot_general``.

tokamax is optional (a peer in the benchmark, its wheel carried to the GPU), so the plumbing is checked with
a stand-in module whose ``ragged_dot_general`` counts its calls and defers to ``lax``'s: outputs and every
gradient equal ``reference``, and the shrink, expand and weight-gradient products all went through it.
Where tokamax itself is installed, the same check runs on it.
"""

import sys
import types

import jax
import pytest
from grouped_lora_cases import assert_matches_reference, inputs_for, run

from pallas_kernels.grouped_lora import shapes

CASES = [
    shapes.Case("tk_T13_E6_r4_k2_skewed", 13, 24, 20, 6, 4, 2, "skewed", "float32", ("tokamax",)),
    shapes.Case("tk_T9_E5_r8_k1_empty", 9, 16, 12, 5, 8, 1, "empty_experts", "bfloat16", ("tokamax",)),
]


def _check(case: shapes.Case) -> None:
    for fused in (False, True):
        assert_matches_reference(case, "tokamax", fused=fused)


@pytest.fixture(params=["top_level", "api_module"])
def stand_in(request, monkeypatch):
    """tokamax <= 0.0.12 exports ``ragged_dot_general``; 0.0.17 keeps it in ``tokamax._src.ops.ragged_dot.api``."""
    calls = []

    def ragged_dot_general(lhs, rhs, group_sizes, dims, **kwargs):  # noqa: ANN001, ANN202
        calls.append(dims)
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, **kwargs)

    if request.param == "top_level":
        monkeypatch.setitem(
            sys.modules, "tokamax", types.SimpleNamespace(ragged_dot_general=ragged_dot_general)
        )
    else:
        monkeypatch.setitem(sys.modules, "tokamax", types.SimpleNamespace(ragged_dot=None))
        api_module = types.SimpleNamespace(ragged_dot_general=ragged_dot_general)
        monkeypatch.setitem(sys.modules, "tokamax._src.ops.ragged_dot.api", api_module)
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_through_a_stand_in(case, stand_in):
    _check(case)
    # shrink and expand (ragged lhs rows, grouped rhs) and the weight gradients (ragged contraction)
    assert any(list(d.rhs_group_dimensions) == [0] for d in stand_in)
    assert any(list(d.rhs_group_dimensions) == [] for d in stand_in)


def test_missing_tokamax_is_not_implemented(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)  # import fails
    inp = inputs_for(CASES[0], "missing")
    with pytest.raises(NotImplementedError, match="tokamax is not installed"):
        run(inp, "tokamax")


def test_real_tokamax():
    pytest.importorskip("tokamax")
    _check(CASES[0])
