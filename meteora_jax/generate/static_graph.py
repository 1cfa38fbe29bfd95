"""A model's ``nnx.GraphDef`` as a jit static argument that hashes in O(1).

``jax.jit`` hashes its static arguments at every call, before anything is dispatched, and an ``nnx.GraphDef``
hashes its whole node tree each time: ~5 ms per call for a 32-layer model with experts on the CPU host
(session 15; ``GraphDef.__hash__`` was most of a prefill call's host time). Every prefill and every decode
chunk paid it in series with the device work. ``StaticGraph`` computes the hash once; equality is identity
first, then the graph's own.
"""

from __future__ import annotations

from flax import nnx


class StaticGraph:
    """Wraps a ``GraphDef`` for ``static_argnames``; ``merge`` takes either form."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return (
            isinstance(other, StaticGraph) and self._hash == other._hash and self.graphdef == other.graphdef
        )

    def __repr__(self) -> str:
        return f"StaticGraph(hash={self._hash})"


def split(module: nnx.Module) -> tuple[StaticGraph, nnx.State]:
    """``nnx.split`` with the graph wrapped for jit's static arguments."""
    graphdef, state = nnx.split(module)
    return StaticGraph(graphdef), state


def merge(graphdef: nnx.GraphDef | StaticGraph, state: nnx.State) -> nnx.Module:
    """``nnx.merge`` of a plain or wrapped ``GraphDef``."""
    return nnx.merge(graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef, state)
