"""Logical axis names and their mapping onto a device mesh: the only place that knows mesh axes.

Parameters and activations are annotated with logical names (``embed``, ``expert``, ...). ``RULES`` maps each
name to a mesh axis (or ``None`` = replicated). The default mesh is ``(data, expert)``: batches split over
``data``, stacked experts and gates split over ``expert``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

LOGICAL_AXES = (
    "batch",
    "seq",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "expert",
    "lora_rank",
)

# logical axis -> mesh axis. Base weights stay replicated: they are small next to activations at the scales
# where gate training runs on one host, and replication keeps the base matmul free of collectives.
RULES: dict[str, str | None] = {
    "batch": "data",
    "seq": None,
    "embed": None,
    "mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "vocab": None,
    "expert": "expert",
    "lora_rank": None,
}

MESH_AXES = ("data", "expert")


def make_mesh(
    data: int | None = None, expert: int = 1, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ``(data, expert)`` mesh with explicit axis types; ``data=None`` takes every remaining device."""
    devices = list(devices if devices is not None else jax.devices())
    if data is None:
        if len(devices) % expert:
            raise ValueError(f"{len(devices)} devices do not split into expert={expert} groups")
        data = len(devices) // expert
    n = data * expert
    if n > len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} needs {n} devices, found {len(devices)}")
    arr = np.asarray(devices[:n]).reshape(data, expert)
    axis_types = (jax.sharding.AxisType.Explicit,) * 2
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=axis_types)


def logical_to_spec(
    names: Sequence[str | None] | None, rules: dict[str, str | None] | None = None
) -> PartitionSpec:
    """Logical names -> PartitionSpec; unknown names fail loudly (a typo would silently replicate)."""
    rules = RULES if rules is None else rules
    if names is None:
        return PartitionSpec()
    out = []
    for n in names:
        if n is None:
            out.append(None)
        elif n not in rules:
            raise KeyError(f"logical axis {n!r} has no sharding rule; known: {sorted(rules)}")
        else:
            out.append(rules[n])
    return PartitionSpec(*out)


def _spec_for_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide the dimension (e.g. 5 experts on 2 devices) instead of failing."""
    parts = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is not None and dim % mesh.shape[axis] != 0:
            axis = None
        parts.append(axis)
    return PartitionSpec(*parts)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedSharding for every variable of ``state`` from its ``logical_axes`` metadata."""

    def one(var: nnx.Variable) -> NamedSharding:
        names = var.get_metadata().get("logical_axes")
        spec = _spec_for_shape(logical_to_spec(names), var.value.shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places every parameter of ``model`` on ``mesh`` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    values = jax.tree.map(lambda v: v.value, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(
        values, jax.tree.map(lambda s: s, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    )
    nnx.update(model, placed)
    return model


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
