"""What every step shares: ``<work>/state.json`` (``StudyState``, written atomically), the step context
``Ctx`` (config, work dir, deadline, log), and the plan of steps (``step_names``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meteora_jax.errors import MeteoraInputError
from meteora_jax.study.config import StudyConfig


class StudyState:
    """``<work>/state.json``: per step ``done``, ``outputs``, ``seconds``, ``runs``; plus ``device_seconds``."""

    def __init__(self, work: Path):
        self.path = work / "state.json"
        self.data: dict = {"steps": {}, "device_seconds": 0.0, "runs": []}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())

    def step(self, name: str) -> dict:
        return self.data["steps"].setdefault(name, {"done": False, "outputs": {}, "seconds": 0.0, "runs": 0})

    def done(self, name: str) -> bool:
        return bool(self.data["steps"].get(name, {}).get("done"))

    def outputs(self, name: str) -> dict:
        if not self.done(name):
            raise MeteoraInputError(f"step {name!r} has not finished yet: run it first (--until {name}).")
        return self.data["steps"][name]["outputs"]

    def save(self) -> None:
        write_json(self.path, self.data)


def write_json(path: str | os.PathLike, obj: object) -> None:
    from meteora_jax.io import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@dataclasses.dataclass
class Ctx:
    cfg: StudyConfig
    work: Path
    state: StudyState
    deadline: float | None
    out_dir: Path
    progress: bool = True
    log: Callable[[str], None] = print
    started: float = dataclasses.field(default_factory=time.time)  # this process: its seconds count too

    @property
    def tasks(self) -> list[str]:
        return sorted(self.cfg.data.tasks) if self.cfg.data.tasks else default_tasks()

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()


def default_tasks() -> list[str]:
    from meteora_jax.data.bigbench import BIGBENCH_TASKS

    return sorted(BIGBENCH_TASKS)


def step_names(cfg: StudyConfig, tasks: Sequence[str]) -> list[str]:
    """Every step of the study, in order (adapter chunks from ``adapters.chunk_size``)."""
    n, size = len(tasks), max(cfg.adapters.chunk_size, 1)
    chunks = [f"adapters:{a}-{min(a + size, n) - 1}" for a in range(0, n, size)]
    gates = [f"gates:top{k}" for k in cfg.gate_top_ks()]
    return ["data", "base", *chunks, "adapters:baselines", "convert", *gates] + [
        "eval:single",
        "eval:meteora",
        "eval:composite",
        "report",
    ]
