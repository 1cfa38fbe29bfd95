"""Parameter roles as NNX Variable types.

Roles decide what trains: gate-only training is ``nnx.Optimizer(model, tx, wrt=GateParam)``; base weights stay
plain ``nnx.Param`` and experts are ``ExpertParam``. Every variable carries ``logical_axes`` metadata, which
``meteora_jax.sharding`` maps onto a device mesh (kept out of ``out_sharding`` so that building a model never
needs a mesh).
"""

from flax import nnx


class ExpertParam(nnx.Param):
    """A stacked LoRA expert tensor (``lora_a_edr``, ``lora_b_ero``, ``scaling_e``): frozen by default."""


class GateParam(nnx.Param):
    """A MeteoRA gate ``Linear(d_in -> E)`` without bias: the only thing trained by default."""


class InferencePack(nnx.Variable):
    """A derived copy of a group's weights laid out for inference (``MeteoraLlama.inference_packs``), attached
    only to a model merged inside a jitted inference function (``attach_packs``): never trained, saved or
    stale."""
