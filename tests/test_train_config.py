"""TrainConfig: YAML + --set layering, typed parsing, strict errors naming the file and key."""

import pytest

from meteora_jax.errors import MeteoraInputError
from meteora_jax.train.config import TrainConfig, describe, load_config, parse_overrides


def test_layers_yaml_then_set_then_kwargs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlearning_rate: 1e-2\nlength_buckets: [16, 32]\nresponse_only: true\n")
    cfg = load_config(path, ["steps=9", "mode=gate_and_experts"], batch_size=4)
    assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.mode) == (9, 0.01, 4, "gate_and_experts")
    assert cfg.length_buckets == (16, 32) and cfg.response_only is True
    assert cfg.buckets == (16, 32, 512)


def test_repo_config_loads():
    assert load_config("configs/train_gate.yaml").gate_loss_weight == 50.0


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\ngate_los_weight: 10\n")
    with pytest.raises(MeteoraInputError, match=r"bad\.yaml.*'gate_los_weight'.*gate_loss_weight"):
        load_config(path)


@pytest.mark.parametrize(
    "pair, match",
    [
        ("nope=1", "unknown key 'nope'"),
        ("steps=1.5", "steps"),
        ("response_only=3", "response_only"),
        ("steps", "key=value"),
        ("mode=sideways", "mode"),
        ("expert_learning_rate=-1e-4", "expert_learning_rate.*>= 0"),
    ],
)
def test_bad_overrides(pair, match):
    with pytest.raises(MeteoraInputError, match=match):
        load_config(None, [pair])


def test_typed_overrides():
    d = parse_overrides(["learning_rate=3", "add_eos=false", "prompt_template=Q: {prompt}\\nA:", "seed=4"])
    assert d == {"learning_rate": 3.0, "add_eos": False, "prompt_template": "Q: {prompt}\\nA:", "seed": 4}
    assert isinstance(d["learning_rate"], float)


def test_every_field_has_help():
    assert describe().count("\n") + 1 == len(TrainConfig.__dataclass_fields__)
