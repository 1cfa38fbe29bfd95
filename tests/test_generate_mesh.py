"""The sampler under a (data, expert) mesh of 8 simulated CPU devices gives the tokens of one device.

Runs in a subprocess: the device count is fixed when JAX starts, and the rest of the suite runs on one device.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    import jax
    import meteora_jax as mj
    from meteora_jax.sharding import make_mesh, shard_model
    from test_generate_fixtures import tiny_model

    assert len(jax.devices()) == 8
    experts = ("a", "b", "c", "d")
    prompts = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61], [1, 70, 71, 72]]
    one = mj.generate(tiny_model(seed=5, experts=experts), prompts, max_new_tokens=6).token_ids
    model = tiny_model(seed=5, experts=experts)
    mesh = make_mesh(data=2, expert=4)
    shard_model(model, mesh)
    spec = model.layers[0].attn.q_proj.lora_a_edr[...].sharding.spec
    assert spec[0] == "expert", spec
    many = mj.generate(model, prompts, max_new_tokens=6, mesh=mesh).token_ids
    assert one == many, (one, many)
    print("OK", one)
    """
)


def test_mesh_of_8_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
