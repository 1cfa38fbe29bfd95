"""``eval.ablation.FirstLayersForced``: forcing every layer equals ``force_expert``; forcing the first layer
routes only it to the expert; ``use(None)`` restores the trained model."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_generate_fixtures import tiny_model

from meteora_jax.eval.ablation import FirstLayersForced


@pytest.fixture
def model_ids():
    model = tiny_model(5, experts=("a", "b", "c"))
    ids = jnp.asarray(np.random.default_rng(11).integers(3, model.config.vocab_size, (2, 7)), jnp.int32)
    return model, ids


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_layers_forced_equals_force_expert(model_ids, top_k):
    model, ids = model_ids
    want = model.forward(ids, routing=model.routing_options(force_expert="b")).logits
    routed = model.forward(ids, routing=model.routing_options(top_k=top_k)).logits
    assert not np.allclose(np.asarray(routed), np.asarray(want), atol=1e-4)  # the gates do route elsewhere
    FirstLayersForced(model, model.config.num_hidden_layers).use("b")
    got = model.forward(ids, routing=model.routing_options(top_k=top_k)).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_first_layer_only_and_restore(model_ids):
    model, ids = model_ids
    before = model.forward(ids, return_routing=True)
    ablation = FirstLayersForced(model, 1)
    ablation.use("c")
    out = model.forward(ids, return_routing=True)
    for entry in out.routing:
        if entry["layer"] == 0:
            # every slot holds expert c: the ids are slots, the gate (zeroed) ties all of them
            np.testing.assert_array_equal(np.asarray(entry["gate_logits"]), 0.0)
        else:
            assert np.any(np.asarray(entry["gate_logits"]) != 0.0)  # later gates untouched
    ablation.use(None)
    again = model.forward(ids, return_routing=True)
    np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(before.logits))
    with pytest.raises(ValueError, match="layers"):
        FirstLayersForced(model, model.config.num_hidden_layers + 1)
