"""``force_expert=i`` equals the torch PEFT model with adapter i active, for adapters saved by real PEFT.

The experts are deliberately unlike each other: mixed ranks (4, 8, 6, 5, 3), rslora, rank_pattern /
alpha_pattern (suffix and full-name keys), partial targets (q,v only; a regex on layer 0's q,k; MLP + o of
layer 1 only via layers_to_transform) and one adapter saved as ``adapter_model.bin``. The oracle is PEFT
itself (``PeftModel`` + ``set_adapter``), float32, on a tiny Llama 3 (GQA, llama3 rope scaling).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import meteora_jax as mj  # noqa: E402
from meteora_jax.convert.convert import convert  # noqa: E402
from meteora_jax.testing.peft_adapters import load_torch_base, make_peft_adapter  # noqa: E402
from meteora_jax.testing.tiny_hf import make_tiny_hf_checkpoint  # noqa: E402

ADAPTERS = {
    "full_r4": dict(r=4, alpha=8),
    "qv_rslora_r8": dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns_r6": dict(
        r=6,
        alpha=12,
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 3},
        alpha_pattern={"k_proj": 32, "layers.0.mlp.up_proj": 5},
    ),
    "layer1_mlp_bin": dict(
        r=5,
        alpha=7,
        target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"],
        layers_to_transform=[1],
        save_bin=True,
    ),
    "regex_l0_qk": dict(r=3, alpha=3, target_modules=r".*\.layers\.0\.self_attn\.(q|k)_proj"),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_parity")
    base = make_tiny_hf_checkpoint(root / "base", "llama3", seed=3)
    paths = {
        name: make_peft_adapter(base, root / name, seed=10 + i, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    out = convert(base, list(paths.items()), str(root / "model"), top_k=2, progress=False)
    model = mj.load(out)
    names = list(paths)
    pmodel = peft.PeftModel.from_pretrained(load_torch_base(base), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pmodel.load_adapter(paths[name], adapter_name=name)
    pmodel.eval()
    return model, pmodel, paths


def _ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 260, size=(2, 11))


def test_bin_adapter_was_saved_as_bin(setup):
    _, _, paths = setup
    import os

    assert sorted(os.listdir(paths["layer1_mlp_bin"])) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
    ]


@pytest.mark.parametrize("expert", list(ADAPTERS))
def test_force_expert_matches_peft(setup, expert):
    model, pmodel, _ = setup
    ids = _ids(len(expert))
    pmodel.set_adapter(expert)
    with torch.no_grad():
        ref = pmodel(torch.tensor(ids)).logits.numpy()
        with pmodel.disable_adapter():
            base = pmodel(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(ids, force_expert=expert))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"[parity] {expert}: max|diff|/max|ref| = {rel:.2e}")  # shown with -s
    assert rel <= TOL, f"{expert}: max|diff|/max|ref| = {rel:.2e}"
    # not vacuous: the adapter moves the logits far more than the tolerance
    assert np.abs(ref - base).max() / np.abs(ref).max() > 100 * TOL
    # and by name or index alike
    np.testing.assert_array_equal(got, np.asarray(model(ids, force_expert=list(ADAPTERS).index(expert))))
    # no_experts is the base model, as PEFT's disabled adapter
    got_base = np.asarray(model(ids, no_experts=True))
    assert np.abs(got_base - base).max() / np.abs(base).max() <= TOL


def test_scaling_ranks_and_targets_match_peft_layers(setup):
    """Per module: our scaling_e / zero padding / untargeted zeros equal what PEFT built."""
    model, pmodel, _ = setup
    names = list(ADAPTERS)
    cfg = model.config
    assert model.moe_config.rank == 8 and set(model.moe_config.target_modules) == set(mj.config.PROJECTIONS)
    for i in range(cfg.num_hidden_layers):
        hf_layer = pmodel.base_model.model.model.layers[i]
        for proj in mj.config.PROJECTIONS:
            block = "attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            ours = getattr(getattr(model.layers[i], block), proj)
            theirs = getattr(hf_layer.self_attn if block == "attn" else hf_layer.mlp, proj)
            scaling = np.asarray(ours.scaling_e[...])
            a_edr = np.asarray(ours.lora_a_edr[...])
            b_ero = np.asarray(ours.lora_b_ero[...])
            for e, name in enumerate(names):
                if name in theirs.lora_A:
                    r = theirs.r[name]
                    assert scaling[e] == pytest.approx(theirs.scaling[name], rel=1e-7), (i, proj, name)
                    np.testing.assert_array_equal(
                        a_edr[e, :, :r], theirs.lora_A[name].weight.detach().numpy().T
                    )
                    np.testing.assert_array_equal(
                        b_ero[e, :r, :], theirs.lora_B[name].weight.detach().numpy().T
                    )
                    assert not a_edr[e, :, r:].any() and not b_ero[e, r:, :].any()
                else:
                    assert scaling[e] == 0 and not a_edr[e].any() and not b_ero[e].any(), (i, proj, name)


def test_qwen2_bias_base(tmp_path):
    """q/k/v biases stay in the base path; an expert adds only its delta."""
    base = make_tiny_hf_checkpoint(tmp_path / "base", "qwen2", seed=5)
    a = make_peft_adapter(
        base, tmp_path / "a", seed=1, r=4, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"]
    )
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=2, alpha=8, use_rslora=True)
    model = mj.load(convert(base, [("a", a), ("b", b)], str(tmp_path / "m"), progress=False))
    pmodel = peft.PeftModel.from_pretrained(load_torch_base(base), a, adapter_name="a")
    pmodel.load_adapter(b, adapter_name="b")
    ids = _ids(7)
    for name in ("a", "b"):
        pmodel.set_adapter(name)
        with torch.no_grad():
            ref = pmodel(torch.tensor(ids)).logits.numpy()
        got = np.asarray(model(ids, force_expert=name))
        assert np.abs(got - ref).max() / np.abs(ref).max() <= TOL
