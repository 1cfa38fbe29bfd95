"""Logical axis names and their mapping onto a device mesh: the only place that knows mesh axes.

Parameters and activations are annotated with logical names (``embed``, ``expert``, ...). ``RULES`` maps each
name to a mesh axis (or ``None`` = replicated). The default mesh is ``(data, expert)``: batches split over
``data``, stacked experts and gates split over ``expert``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
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
    data: int | None = None,
    expert: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Auto,
) -> jax.sharding.Mesh:
    """A ``(data, expert)`` mesh; ``data=None`` (or 0) takes every device not on the expert axis.

    Both axes get ``axis_type`` explicitly. ``Auto`` (the default) lets XLA's partitioner place the
    intermediates we do not annotate (the grouped-LoRA gathers, attention); ``Explicit`` sharding-in-types
    would demand a rule for each of them. Parameters and batches are still placed explicitly, by
    ``shard_model`` and ``batch_sharding``, and the tests assert where they end up.
    """
    devices = list(devices if devices is not None else jax.devices())
    if expert < 1:
        raise ValueError(f"expert axis size must be >= 1, got {expert}")
    if not data:
        if len(devices) % expert:
            raise ValueError(f"{len(devices)} devices do not split into expert={expert} groups")
        data = len(devices) // expert
    n = data * expert
    if n > len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} needs {n} devices, found {len(devices)}")
    return jax.make_mesh((data, expert), MESH_AXES, axis_types=(axis_type,) * 2, devices=devices[:n])


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` when this process is one of several (multi-host runs).

    Driven by the environment, so single-process runs need nothing: ``JAX_COORDINATOR_ADDRESS`` (host:port
    of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` -- or a cluster JAX detects by itself
    (SLURM, Cloud TPU, Open MPI), which ``METEORA_JAX_DISTRIBUTED=1`` asks for. Must run before any other
    JAX call. Returns whether it initialised.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS") and int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    if not explicit and os.environ.get("METEORA_JAX_DISTRIBUTED") != "1":
        return False
    if explicit:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True


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
    """NamedSharding for every variable of ``state`` (same tree, a sharding per leaf) from ``logical_axes``."""

    def one(var: nnx.Variable) -> NamedSharding:
        names = var.get_metadata().get("logical_axes")
        shape = tuple(jnp.shape(var.get_value()))
        if names is not None and len(names) != len(shape):
            names = None  # e.g. optimizer moments of a scalar: replicate
        spec = _spec_for_shape(logical_to_spec(names), shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """``state`` with every array placed on ``mesh`` by its logical axes (a new tree)."""
    shardings = state_shardings(state, mesh)
    return jax.tree.map(
        lambda var, sh: var.replace(jax.device_put(var.get_value(), sh)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` according to its logical axes (in place)."""
    nnx.update(model, shard_state(nnx.state(model), mesh))
    return model


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows over ``data``, everything else replicated (a batch's leading axis is its ``batch`` axis)."""
    return NamedSharding(mesh, logical_to_spec(("batch",)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
