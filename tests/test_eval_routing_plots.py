"""The routing plots write real PNGs (checked by their magic bytes) and reject mis-shaped input."""

import numpy as np
import pytest

from meteora_jax.eval.routing_plots import plot_routing_heatmap, plot_task_accuracy_bars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_heatmap_writes_png(tmp_path, rng):
    ids_lt = rng.integers(-1, 4, size=(3, 7))
    path = plot_routing_heatmap(ids_lt, list("abcdefg"), ["w", "x", "y", "z"], tmp_path / "h.png", title="t")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temp file left behind


def test_heatmap_rejects_label_mismatch(tmp_path):
    with pytest.raises(ValueError, match="token labels"):
        plot_routing_heatmap(np.zeros((2, 3), int), ["a"], ["e"], tmp_path / "h.png")


def test_accuracy_bars_writes_png(tmp_path):
    scores = {"base": {"a": 0.1, "b": 0.2}, "oracle": {"a": 0.5, "b": 0.6}, "meteora": {"a": 0.4}}
    path = plot_task_accuracy_bars(scores, tmp_path / "b.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
