"""An original-MeteoRA checkpoint, written here in its layout from real PEFT adapters, converts to the same
experts as the PEFT route, and keeps its trained gates.

The layout written below follows NJUDeepEngine/meteora (``MoELoRA/layer.py``, ``peft_model.py``): the
PeftModel state dict, ``base_model.model.`` prefix, ``<proj>.base_layer.weight`` for base projections,
``lora_A`` = cat of the experts' lora_A along rows [N*r, d_in], ``lora_B`` = cat along columns [d_out, N*r],
``moe_gate.weight`` [N, d_in], experts in alphabetical task order.
"""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.convert.convert import convert
from meteora_jax.model.params_io import flat_params
from meteora_jax.testing.peft_adapters import make_peft_adapter
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint

pytest.importorskip("peft")

TASKS = {"zeta_task": 16, "alpha_task": 4, "mid_task": 8}  # task -> lora_alpha (rank 4 for all)
PROJ = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def write_meteora_checkpoint(base_dir, adapter_dirs, path, *, n_layers, rng, prefix="base_model.model."):
    """MeteoRA's layout from PEFT adapters given in checkpoint (alphabetical) order; returns the gates."""
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    loras = [load_file(os.path.join(d, "adapter_model.safetensors")) for d in adapter_dirs]
    out, gates = {}, {}
    for key, value in base.items():
        module = key.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in PROJ:
            key = f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
        out[prefix + key] = value
    for i in range(n_layers):
        for proj, block in PROJ.items():
            module = f"model.layers.{i}.{block}.{proj}"
            a = [lo[f"base_model.model.{module}.lora_A.weight"] for lo in loras]
            b = [lo[f"base_model.model.{module}.lora_B.weight"] for lo in loras]
            out[f"{prefix}{module}.lora_A.weight"] = np.concatenate(a, axis=0)
            out[f"{prefix}{module}.lora_B.weight"] = np.concatenate(b, axis=1)
            gate = rng.standard_normal((len(loras), a[0].shape[1])).astype(np.float32)
            out[f"{prefix}{module}.moe_gate.weight"] = gate
            gates[(i, proj)] = gate
    save_file(out, path)
    return gates


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("meteora")
    base = make_tiny_hf_checkpoint(root / "base", "llama2", seed=4)
    adapter_root = root / "adapters"
    for i, (task, alpha) in enumerate(TASKS.items()):
        make_peft_adapter(base, adapter_root / task, seed=20 + i, r=4, alpha=alpha)
    ordered = sorted(TASKS)
    ckpt = str(root / "meteora.safetensors")
    gates = write_meteora_checkpoint(
        base, [adapter_root / t for t in ordered], ckpt, n_layers=2, rng=np.random.default_rng(0)
    )
    peft_model = mj.load(
        convert(base, [(t, str(adapter_root / t)) for t in ordered], str(root / "from_peft"), progress=False)
    )
    return root, base, str(adapter_root), ckpt, gates, peft_model


def _flat(model):
    return {k: np.asarray(v) for k, v in flat_params(model).items()}


def test_checkpoint_equals_peft_route(setup):
    root, base, adapter_dir, ckpt, gates, peft_model = setup
    out = str(root / "from_meteora")
    # tasks given unsorted: the checkpoint's order is alphabetical, and so is the expert order
    rc = main(
        ["convert", "--base", base, "--meteora-checkpoint", ckpt, "--tasks", ",".join(TASKS), "--out", out,
         "--meteora-adapter-dir", adapter_dir, "--quiet"]
    )  # fmt: skip
    assert rc == 0
    model = mj.load(out)
    assert model.expert_names == sorted(TASKS) == peft_model.expert_names
    ours, ref = _flat(model), _flat(peft_model)
    assert ours.keys() == ref.keys()
    for k in ours:
        if k.endswith("gate_de"):
            continue
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    for (i, proj), gate in gates.items():
        block = "attn" if PROJ[proj] == "self_attn" else "mlp"
        np.testing.assert_array_equal(ours[f"layers.{i}.{block}.{proj}.gate_de"], gate.T)
    # per-expert scaling alpha / r from each adapter's own config
    np.testing.assert_allclose(ours["layers.0.attn.q_proj.scaling_e"], [4 / 4, 8 / 4, 16 / 4])
    ids = np.arange(3, 19).reshape(2, 8)
    for e in range(3):
        np.testing.assert_array_equal(
            np.asarray(model(ids, force_expert=e)), np.asarray(peft_model(ids, force_expert=e))
        )


def test_plain_hf_names_and_lora_alpha(setup, tmp_path, capsys):
    """Without the PeftModel prefix / base_layer infix, and with one --lora-alpha for all experts."""
    root, base, adapter_dir, _, _, peft_model = setup
    ckpt = str(tmp_path / "plain.safetensors")
    ordered = [os.path.join(adapter_dir, t) for t in sorted(TASKS)]
    write_meteora_checkpoint(base, ordered, ckpt, n_layers=2, rng=np.random.default_rng(1), prefix="")
    flat = load_file(ckpt)
    flat = {k.replace(".base_layer.", "."): v for k, v in flat.items()}
    save_file(flat, ckpt)
    out = str(tmp_path / "m")
    rc = main(["convert", "--base", base, "--meteora-checkpoint", ckpt, "--tasks", "mid_task,alpha_task,zeta_task",
               "--out", out, "--lora-alpha", "8", "--top-k", "3", "--quiet"])  # fmt: skip
    assert rc == 0
    model = mj.load(out)
    np.testing.assert_allclose(np.asarray(model.layers[1].mlp.down_proj.scaling_e[...]), [2.0, 2.0, 2.0])
    assert model.moe_config.top_k == 3
    np.testing.assert_array_equal(np.asarray(model.embed_vd[...]), np.asarray(peft_model.embed_vd[...]))


def test_default_scaling_warns(setup, tmp_path, capsys):
    root, base, _, ckpt, _, _ = setup
    rc = main(["convert", "--base", base, "--meteora-checkpoint", ckpt, "--tasks", ",".join(TASKS),
               "--out", str(tmp_path / "m"), "--quiet"])  # fmt: skip
    assert rc == 0
    assert "lora_alpha = 2 r" in capsys.readouterr().err
    model = mj.load(tmp_path / "m")
    np.testing.assert_allclose(np.asarray(model.layers[0].attn.k_proj.scaling_e[...]), [2.0, 2.0, 2.0])


def test_wrong_number_of_tasks(setup, tmp_path, capsys):
    _, base, _, ckpt, _, _ = setup
    rc = main(["convert", "--base", base, "--meteora-checkpoint", ckpt, "--tasks", "a,b",
               "--out", str(tmp_path / "m"), "--quiet"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert ckpt in err and "holds 3 experts" in err
    assert os.listdir(tmp_path) == []
