"""PNG plots of routing: a token x layer heatmap coloured by expert, and per-task accuracy bars.

Matplotlib runs on the Agg backend (no display needed); every figure is written to a temp file beside the
target and renamed into place, so a crash never leaves half a PNG. Both functions take plain NumPy-convertible
inputs, so the demo, the eval harness and notebooks can call them alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_atomic(fig, path: str | os.PathLike) -> str:  # noqa: ANN001
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_routing_heatmap(
    expert_ids_lt: np.ndarray,
    tokens: Sequence[str],
    expert_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> str:
    """Heatmap of the top-1 expert per (layer, token): rows are layers, columns tokens, colour = expert.

    ``expert_ids_lt`` [L, T] holds expert indices (negative = no routing, drawn white); ``tokens`` labels the
    T columns. Returns the written path.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    ids_lt = np.asarray(expert_ids_lt)
    if ids_lt.ndim != 2:
        raise ValueError(f"expert_ids_lt must be [layers, tokens], got shape {ids_lt.shape}")
    num_layers, num_tokens = ids_lt.shape
    if len(tokens) != num_tokens:
        raise ValueError(f"{len(tokens)} token labels for {num_tokens} token columns")
    num_experts = max(len(expert_names), int(ids_lt.max(initial=-1)) + 1, 1)
    base = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
    colours = [base(i % base.N) for i in range(num_experts)]
    cmap = ListedColormap(colours)
    cmap.set_bad("white")
    masked = np.ma.masked_less(ids_lt, 0)

    width = min(max(6.0, 0.28 * num_tokens + 2.5), 60.0)
    height = min(max(3.0, 0.22 * num_layers + 1.8), 30.0)
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5)
    ax.set_xticks(range(num_tokens))
    ax.set_xticklabels([repr(t)[1:-1][:12] for t in tokens], rotation=90, fontsize=7)
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels([str(i) for i in range(num_layers)], fontsize=7)
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    # A legend only for experts that appear: 28 entries would hide the plot.
    used = sorted({int(e) for e in np.unique(ids_lt) if e >= 0})
    names = list(expert_names) + [f"expert {i}" for i in range(len(expert_names), num_experts)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[e]) for e in used]
    if handles:
        ax.legend(handles, [names[e] for e in used], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    try:
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_task_accuracy_bars(
    scores: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    title: str | None = None,
    ylabel: str = "score",
) -> str:
    """Grouped bars: for each task, one bar per system (e.g. ``base``, ``oracle``, ``meteora``).

    ``scores`` maps system -> {task: value}; tasks missing for a system are left out of its bars.
    """
    plt = _pyplot()
    systems = list(scores)
    tasks = sorted({t for per_task in scores.values() for t in per_task})
    if not systems or not tasks:
        raise ValueError("plot_task_accuracy_bars needs at least one system with one task")
    x = np.arange(len(tasks))
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(tasks) * max(1, len(systems) / 2) + 2), 4.0))
    for i, system in enumerate(systems):
        vals = [scores[system].get(t, np.nan) for t in tasks]
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, vals, width, label=system)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    try:
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)
