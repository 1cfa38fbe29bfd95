"""MeteoRA's task-data layout: one folder per task, JSONL lines of ``{"prompt", "response"}``.

::

    DATA/
      <task>/train.jsonl     one JSON object a line: {"prompt": str, "response": str, ...extra keys}
      <task>/test.jsonl      the held-out split (evaluation, routing accuracy)

Task names are folder names, and they are also the expert (adapter) names: gate training uses the sorted
task list as the label space. Extra keys on a line (``"subtask"``, ``"metric"``, ...) are kept in
``Example.extra`` and written back unchanged.

Prompts are stored *raw*, without a chat template: the trainer and the sampler apply the template
(MeteoRA's ``[INST] {prompt} [/INST]\\n`` or the model's own), so one data folder serves every base model.

Reading is strict. Every problem is a ``MeteoraInputError`` whose message names the file, the line (1-based,
as an editor shows it) and the fix, because a silently skipped line would bias a task's share of the data
and a silently skipped task would shift every gate label after it. Blank lines are the one thing tolerated
(a trailing newline is normal; an editor may leave a blank line at the end).

Writes go through ``write_jsonl_atomic``: a temporary file in the same folder, then ``os.replace``, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meteora_jax.errors import MeteoraInputError

SPLITS = ("train", "test")
_REQUIRED = ("prompt", "response")
_FIX_LAYOUT = (
    "The data folder must hold one sub-folder per task, each with train.jsonl (and test.jsonl) whose lines "
    'are JSON objects {"prompt": "...", "response": "..."}; `meteora-jax data bigbench --out DIR` builds one.'
)

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One training or evaluation sample of one task.

    ``extra`` holds every key of the JSONL line besides prompt and response; treat it as read-only.
    """

    task: str
    prompt: str
    response: str
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_row(self) -> dict[str, Any]:
        """The JSONL object for this example (the task is the folder, so it is not repeated)."""
        return {"prompt": self.prompt, "response": self.response, **self.extra}


def _check_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    root = Path(data_dir)
    if not root.exists():
        raise MeteoraInputError(f"Data directory {root} does not exist. {_FIX_LAYOUT}")
    if not root.is_dir():
        raise MeteoraInputError(f"Data path {root} is a file, not a directory. {_FIX_LAYOUT}")
    return root


def list_tasks(data_dir: str | os.PathLike[str]) -> list[str]:
    """The task names under ``data_dir``, sorted: every non-hidden sub-folder.

    Raises if there is none, or if a task folder holds no ``.jsonl`` file (an empty folder is almost always an
    import that failed half-way, and skipping it would renumber the gate labels of the tasks after it).
    """
    root = _check_data_dir(data_dir)
    tasks = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not tasks:
        raise MeteoraInputError(f"Data directory {root} has no task folders. {_FIX_LAYOUT}")
    for task in tasks:
        if not any((root / task).glob("*.jsonl")):
            raise MeteoraInputError(
                f"Task folder {root / task} holds no .jsonl file. Add train.jsonl (and test.jsonl) to it, "
                f"or remove the folder if {task!r} is not meant to be a task."
            )
    return tasks


def _parse_line(path: Path, lineno: int, line: str, task: str) -> Example:
    where = f"{path}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MeteoraInputError(
            f"{where} is not valid JSON ({e.msg} at column {e.colno}). Each line must be one complete JSON "
            'object such as {"prompt": "...", "response": "..."}; fix or delete that line.'
        ) from None
    if not isinstance(obj, dict):
        raise MeteoraInputError(
            f"{where} is a JSON {type(obj).__name__}, not an object. Each line must be one JSON object "
            'such as {"prompt": "...", "response": "..."}.'
        )
    for key in _REQUIRED:
        if key not in obj:
            raise MeteoraInputError(
                f'{where} has no "{key}" key (keys found: {sorted(obj)}). Every line needs a "prompt" and a '
                '"response" string; rename the keys or drop the line.'
            )
        if not isinstance(obj[key], str):
            raise MeteoraInputError(
                f'{where}: "{key}" is a {type(obj[key]).__name__}, not a string. Write it as a JSON string '
                f'(e.g. "{key}": "{obj[key]}").'
            )
    extra = {k: v for k, v in obj.items() if k not in _REQUIRED}
    return Example(task=task, prompt=obj["prompt"], response=obj["response"], extra=extra)


def read_jsonl(path: str | os.PathLike[str], task: str | None = None) -> list[Example]:
    """Read one task file. ``task`` defaults to the name of the folder holding the file."""
    path = Path(path)
    task = path.parent.name if task is None else task
    if not path.is_file():
        raise MeteoraInputError(f"{path} does not exist (or is not a file). {_FIX_LAYOUT}")
    examples = []
    # Binary lines, decoded one by one, so that a bad byte is reported with its line number.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark written by some Windows editors is not JSON
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MeteoraInputError(
                    f"{path}, line {lineno} is not UTF-8 ({e.reason} at byte {e.start}). Re-save the file as "
                    "UTF-8."
                ) from None
            if line.strip():
                examples.append(_parse_line(path, lineno, line, task))
    if not examples:
        raise MeteoraInputError(
            f"{path} is empty (no JSON lines). Put at least one "
            '{"prompt": "...", "response": "..."} line in it, or delete the file.'
        )
    return examples


def read_split(
    data_dir: str | os.PathLike[str], split: str = "train", tasks: Sequence[str] | None = None
) -> dict[str, list[Example]]:
    """Read ``<data_dir>/<task>/<split>.jsonl`` for each task (all tasks when ``tasks`` is None).

    Returns ``{task: examples}`` in the order of ``tasks`` (sorted order by default).
    """
    root = _check_data_dir(data_dir)
    available = list_tasks(root)
    if tasks is None:
        tasks = available
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise MeteoraInputError(
            f"Unknown task(s) {unknown} in {root}: the tasks there are {available}. Check the spelling, or "
            "add a folder <task>/ with train.jsonl and test.jsonl."
        )
    out = {}
    for task in tasks:
        path = root / task / f"{split}.jsonl"
        if not path.is_file():
            have = sorted(p.name for p in (root / task).glob("*.jsonl"))
            raise MeteoraInputError(
                f"{path} does not exist (task {task!r} has {have}). Add the {split} split, or pick a split "
                f"the task has."
            )
        out[task] = read_jsonl(path, task=task)
    return out


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any] | Example]) -> int:
    """Write rows (dicts or ``Example``s) as JSONL to ``path`` atomically; returns the number of lines.

    The temporary file lives in the destination folder so that ``os.replace`` is a rename on one file
    system (atomic on POSIX and Windows); on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                obj = row.to_row() if isinstance(row, Example) else row
                # ensure_ascii=False: keep non-English tasks readable and the files smaller.
                f.write(json.dumps(obj, ensure_ascii=False))
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def num_test_examples(n: int, test_size: float | int) -> int:
    """How many of ``n`` examples a ``test_size`` holds out: a fraction in (0, 1) or a count >= 0."""
    if isinstance(test_size, bool) or not isinstance(test_size, int | float):
        raise MeteoraInputError(f"test_size must be a fraction in (0, 1) or a count >= 0, got {test_size!r}.")
    if isinstance(test_size, float) and not test_size.is_integer():
        if not 0.0 < test_size < 1.0:
            raise MeteoraInputError(f"test_size {test_size} must be a fraction in (0, 1) or a whole count.")
        return math.floor(n * test_size)
    if test_size < 0:
        raise MeteoraInputError(f"test_size {test_size} must not be negative.")
    return int(test_size)


def split_train_test(examples: Sequence[T], test_size: float | int, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with ``seed`` and hold out ``test_size`` examples (a fraction in (0, 1), or a count).

    Deterministic: the same inputs, size and seed give the same split on every machine and Python version
    (``random.Random`` with an int seed is stable). Both halves come back in the shuffled order.
    Raises if the test split would take every example (nothing left to train on).
    """
    n_test = num_test_examples(len(examples), test_size)
    if n_test >= len(examples) and len(examples) > 0:
        raise MeteoraInputError(
            f"test_size {test_size} holds out {n_test} of {len(examples)} examples, leaving none to train "
            "on. Use a smaller test size."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:]]
    return train, test
