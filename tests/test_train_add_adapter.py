"""add-adapter: the trained experts and gate columns are kept, the new PEFT adapter becomes expert E."""

import numpy as np
from safetensors.numpy import load_file

import meteora_jax as mj
from meteora_jax import cli
from meteora_jax.convert.convert import convert
from meteora_jax.model.params_io import flat_params
from meteora_jax.testing.peft_adapters import make_peft_adapter
from meteora_jax.testing.synthetic_tasks import write_tasks
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint
from meteora_jax.train.add_adapter import extend_model


def test_add_adapter_extends_every_gate_and_trains(tmp_path):
    base = make_tiny_hf_checkpoint(tmp_path / "base", "llama2")
    a = make_peft_adapter(base, tmp_path / "a", seed=1, r=4)
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=8, target_modules=("q_proj", "down_proj"))
    model_dir = convert(base, [("upper", a)], str(tmp_path / "m1"), top_k=1, progress=False)

    ext = extend_model(model_dir, "reverse", b)
    old = {k: np.asarray(v) for k, v in flat_params(mj.load(model_dir)).items()}
    new = {k: np.asarray(v) for k, v in flat_params(ext).items()}
    assert ext.expert_names == ["upper", "reverse"] and ext.moe_config.rank == 8
    reference = load_file(f"{b}/adapter_model.safetensors")
    for k, v in old.items():
        if k.endswith("gate_de"):
            np.testing.assert_array_equal(new[k][:, :1], v)  # trained column kept
            assert new[k].shape == (v.shape[0], 2)
        elif k.endswith("lora_a_edr"):
            np.testing.assert_array_equal(new[k][:1, :, :4], v)
            assert not new[k][:1, :, 4:].any()  # rank padding adds nothing
        elif not k.endswith(("lora_b_ero", "scaling_e")):
            np.testing.assert_array_equal(new[k], v)  # base untouched
    # the new expert is the PEFT adapter: A^T where it targets, zeros (scaling 0) where it does not
    key = next(k for k in reference if "layers.1.self_attn.q_proj.lora_A" in k)
    np.testing.assert_allclose(new["layers.1.attn.q_proj.lora_a_edr"][1], reference[key].T)
    assert new["layers.1.attn.k_proj.scaling_e"][1] == 0.0

    data = write_tasks(tmp_path / "data", ("upper", "reverse"), n_train=8, n_test=2)
    out = tmp_path / "m2"
    rc = cli.main(
        [
            "add-adapter",
            "--model",
            model_dir,
            "--adapter",
            f"reverse={b}",
            "--data",
            data,
            "--out",
            str(out),
            "--steps",
            "3",
            "--set",
            "max_seq_len=48",
            "--set",
            "batch_size=4",
            "--set",
            "progress=false",
        ]
    )
    assert rc == 0
    trained = mj.load(out)
    assert trained.expert_names == ["upper", "reverse"]
    after = {k: np.asarray(v) for k, v in flat_params(trained).items()}
    for k in new:
        same = np.array_equal(after[k], new[k])
        assert same != k.endswith("gate_de"), k  # gates moved, nothing else did
