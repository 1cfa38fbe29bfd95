"""The training step on a (data, expert) mesh of 8 simulated CPU devices: same loss curve as 1 device, and
parameters really sharded. XLA flags must be set before JAX starts, so the check runs in a subprocess."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from meteora_jax.sharding import RULES, logical_to_spec

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from meteora_jax import sharding
    from meteora_jax.config import ModelConfig, MoEConfig
    from meteora_jax.model.llama import MeteoraLlama
    from meteora_jax.testing.synthetic_tasks import write_tasks
    from meteora_jax.testing.tiny_hf import make_tokenizer
    from meteora_jax.train.config import TrainConfig
    from meteora_jax.train.data import batch_indices, load_task_data, make_batch
    from meteora_jax.train.step import init_state, make_train_step, routing_for

    assert jax.device_count() == 8, jax.devices()
    names = ("upper", "reverse", "spell", "length")
    cfg = TrainConfig.tiny(batch_size=8, max_seq_len=48, length_buckets=(48,), learning_rate=1e-2)
    tok = make_tokenizer()
    td = load_task_data(write_tasks(sys.argv[1], names, n_train=16, n_test=2), tok, cfg, names, context_len=64)

    def run(data, expert):
        model = MeteoraLlama(ModelConfig.tiny(vocab_size=260), MoEConfig(expert_names=names, rank=4), rngs=nnx.Rngs(0))
        mesh = sharding.make_mesh(data, expert)
        losses = []
        with jax.set_mesh(mesh):
            sharding.shard_model(model, mesh)
            state = init_state(model, cfg)
            state.trainable = sharding.shard_state(state.trainable, mesh)
            state.opt = sharding.shard_state(state.opt, mesh)
            step = make_train_step(state, cfg, routing_for(model, cfg))
            bsh = sharding.batch_sharding(mesh)
            for s in range(20):
                b = make_batch(td.train, batch_indices(td.train, s, cfg), pad_id=0, buckets=cfg.buckets,
                               response_only=False)
                batch = {k: jax.device_put(v, bsh) for k, v in b.as_dict().items()}
                state.trainable, state.opt, m = step(state.trainable, state.opt, state.frozen, batch)
                losses.append([float(m[k]) for k in ("loss", "lm_loss", "gate_ce")])
            q = state.model().layers[0].attn.q_proj
            specs = {
                "gate_de": q.gate_de[...].sharding.spec,
                "lora_a_edr": q.lora_a_edr[...].sharding.spec,
                "lora_b_ero": q.lora_b_ero[...].sharding.spec,
                "kernel_io": q.kernel_io[...].sharding.spec,
                "batch": batch["tokens_bl"].sharding.spec,
                "gate_devices": len(q.gate_de[...].sharding.device_set),
                "gate_shard_shape": list(q.gate_de[...].addressable_shards[0].data.shape),
            }
        return losses, {k: (str(v) if isinstance(v, P) else v) for k, v in specs.items()}

    one, spec1 = run(1, 1)
    eight, spec8 = run(4, 2)
    print(json.dumps({"one": one, "eight": eight, "spec1": spec1, "spec8": spec8}))
    """
)


def test_logical_rules():
    assert logical_to_spec(("expert", "embed", "lora_rank")) == P("expert", None, None)
    assert logical_to_spec(("batch", "seq")) == P("data", None)
    assert set(RULES.values()) <= {None, "data", "expert"}
    with pytest.raises(KeyError):
        logical_to_spec(("experts",))


def test_eight_devices_match_one_and_really_shard(tmp_path):
    import json

    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.getcwd(),
    )
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    one, eight = np.asarray(out["one"]), np.asarray(out["eight"])
    assert one.shape == (20, 3)
    # lm loss and gate CE (both O(1)) agree to 1e-5 at every step; the total, lm + 50 * gate CE ~ 75, where
    # one float32 ulp is 7.6e-6, agrees to 1e-6 relative (the reduction order differs over 8 devices)
    np.testing.assert_allclose(eight[:, 1:], one[:, 1:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(eight[:, 0], one[:, 0], rtol=1e-6, atol=0)
    assert one[-1, 0] < one[0, 0]
    s8 = out["spec8"]
    assert s8["gate_de"] == str(P(None, "expert"))
    assert s8["lora_a_edr"] == str(P("expert", None, None))
    assert s8["lora_b_ero"] == str(P("expert", None, None))
    assert s8["kernel_io"] == str(P(None, None))
    assert s8["batch"] == str(P("data"))
    assert s8["gate_devices"] == 8 and s8["gate_shard_shape"] == [64, 2]
