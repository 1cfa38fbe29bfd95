"""Build MeteoRA's 22 BIG-bench tasks in the task-data layout, from BIG-bench's ``task.json`` files.

Source. Every task is a ``bigbench/benchmark_tasks/<task>[/<subtask>]/task.json``. Three sources carry them:
the ``bigbench==1.0.0`` PyPI sdist (``bigbench-1.0.0.tar.gz``, 358 MB, sha256 pinned below; members
``bigbench-1.0.0/bigbench/...``), a GitHub archive of https://github.com/google/BIG-bench (``.tar.gz``,
members ``BIG-bench-main/bigbench/...``: any one top folder), or a checkout of that repository (a directory).
The sdist may no longer be downloadable from PyPI (in December 2026 it listed only 0.0.1), so the other two
are the fallback; the manifest records which was read and its digest, since they may differ in detail from
the 1.0.0 release. A tarball is untrusted input: it is only *read*, member by member, by exact name
pattern (regular files, bounded size), and parsed as JSON in memory. Nothing from it is extracted,
installed or executed, so a member named ``../../x`` cannot be written anywhere. A checkout is read the same
way: only the wanted ``task.json`` paths, never through a symlink. ``pip download bigbench==1.0.0`` does not
work for this package (pip has to build the sdist's metadata, which runs its ``setup.py`` and then rejects
its direct-URL dependency on ``bleurt``), so when no ``--sdist`` is given the file is fetched from PyPI's
file host with ``urllib`` into ``~/.cache/meteora-jax/`` (or ``$METEORA_JAX_CACHE``) and checked against
the pinned sha256.

How MeteoRA built these tasks (``data/create_dataset.py`` in NJUDeepEngine/meteora) and what we keep:

* It read the Hugging Face ``bigbench`` dataset, which BIG-bench's own ``bbseqio`` bridge generates from the
  same ``task.json`` files: ``inputs = task_prefix + example_input_prefix + input [+ choices] +
  example_output_prefix``, stripped; ``targets`` = the example's ``target`` (or, for multiple choice with no
  ``target``, the highest-scoring choice); sub-tasks concatenated into one task. We format the same way, with
  the task's own prefixes and BIG-bench's defaults (``"\\nQ: "``, ``"\\nA: "``, ``"\\n  choice: "``).
* It used ``targets[0]`` as the response. So do we: the first target of a generative example, or ``target``
  when a multiple-choice example also has one (strategyqa answers "Yes. <explanation>", as in MeteoRA).
* It used HF's ``validation`` split as ``test``. That split is BIG-bench's: per sub-task, shuffle, then hold
  out 20% (at least 16). Our default is the same rule (``test_size=0.2``, ``min_test=16``), per sub-task, with
  our own seeded shuffle, so test sets have MeteoRA's sizes but not its exact members.
* It stored prompts already wrapped as ``[INST] {inputs} [/INST]\\n``. We store the raw ``inputs``: the
  template belongs to the trainer and sampler (see ``meteora_jax.data.tasks``).

Differences, on purpose:

* Choices are always listed in the prompt when the response is a choice (an example with ``target_scores``
  and no ``target``), even where the task sets ``append_choices_to_input: false``; otherwise exact match
  would ask the model to guess the wording. MeteoRA patched this for four tasks (logical_deduction,
  abstract_narrative_understanding, tracking_shuffled_objects, unit_conversion) by appending
  ``choice: X`` lines after the whole prompt; we do it for all such examples and put the lines before the
  output prefix (``"...\\nchoice: X\\nchoice: Y\\nThis narrative is a good illustration of ..."``). Tasks
  that list choices themselves keep BIG-bench's layout and ``choice_prefix``. Where ``target`` exists, the
  task's ``append_choices_to_input`` is followed as BIG-bench does (truthiness: contextual_parametric_
  knowledge_conflicts writes the *string* ``"false"``, which BIG-bench, and so MeteoRA's data, took as true).
* Choice order is a seeded shuffle per example (BIG-bench permutes too; the source often lists the correct
  choice first).
* Duplicate (prompt, response) pairs within a task are dropped before splitting (BIG-bench drops exact
  duplicate examples), so no test prompt also appears in train; the summary counts them.
* Each line keeps ``"subtask"`` (the sub-folder, or the task name) as an extra key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from meteora_jax.data.tasks import num_test_examples, split_train_test, write_jsonl_atomic
from meteora_jax.errors import MeteoraInputError

# The 22 BIG-bench tasks among MeteoRA's 28 (the other six come from Hugging Face: gsm8k, alpaca,
# cnn_dailymail, news_commentary_{de,es,it}).
BIGBENCH_TASKS: tuple[str, ...] = (
    "abstract_narrative_understanding",
    "contextual_parametric_knowledge_conflicts",
    "cs_algorithms",
    "disfl_qa",
    "elementary_math_qa",
    "epistemic_reasoning",
    "formal_fallacies_syllogisms_negation",
    "goal_step_wikihow",
    "language_identification",
    "linguistics_puzzles",
    "logical_deduction",
    "object_counting",
    "paragraph_segmentation",
    "play_dialog_same_or_different",
    "question_selection",
    "reasoning_about_colored_objects",
    "strategyqa",
    "topical_chat",
    "tracking_shuffled_objects",
    "unit_conversion",
    "vitaminc_fact_verification",
    "winowhy",
)

# MeteoRA's composite-n sub-task lists (two of composite-10's tasks are not BIG-bench: eval.composite's
# OFFLINE_SUBSTITUTES maps them). Light on imports: the study's config reads them for its defaults.
COMPOSITE_TASKS: dict[int, tuple[str, ...]] = {
    3: ("logical_deduction", "question_selection", "strategyqa"),
    5: (
        "logical_deduction",
        "question_selection",
        "strategyqa",
        "abstract_narrative_understanding",
        "goal_step_wikihow",
    ),
    10: (
        "logical_deduction",
        "question_selection",
        "abstract_narrative_understanding",
        "goal_step_wikihow",
        "winowhy",
        "strategyqa",
        "disfl_qa",
        "news_commentary_de",
        "alpaca",
        "linguistics_puzzles",
    ),
}

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/"
    "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz"
)
GITHUB_URL = "https://github.com/google/BIG-bench"
_GITHUB_ADVICE = (
    f"--sdist also takes a checkout of {GITHUB_URL} (git clone --depth 1) or its archive tarball "
    f"({GITHUB_URL}/archive/refs/heads/main.tar.gz)."
)
# The largest task.json we need (vitaminc_fact_verification) is ~40 MB; anything far larger is not a task.
MAX_MEMBER_BYTES = 512 * 1024 * 1024
# <root>/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json, from a conservative alphabet only. The root
# is one plain folder name (``bigbench-1.0.0``, ``BIG-bench-main``, ...); its first character excludes ``.``
# and ``..``.
_MEMBER_RE = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)/bigbench/benchmark_tasks/([a-z0-9_]+)/(?:([A-Za-z0-9_]+)/)?task\.json$"
)
# The sdist's root; any other root is a GitHub archive (or a repacked tree).
_SDIST_ROOT_RE = re.compile(r"^bigbench-[0-9][A-Za-z0-9.]*$")
_SUBTASK_RE = re.compile(r"^[A-Za-z0-9_]+$")
_TASK_NAME_RE = re.compile(r"^[a-z0-9_]+$")
MANIFEST = "bigbench_manifest.json"

# BIG-bench's defaults when a task.json does not set them (bigbench/api/json_task.py).
_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "
# When we list choices that the task itself does not, MeteoRA's wording (data/dataset_utils.py).
_LISTED_CHOICE_PREFIX = "\nchoice: "


def cache_dir() -> Path:
    """Where the sdist is cached: ``$METEORA_JAX_CACHE`` or ``~/.cache/meteora-jax``."""
    return Path(os.environ.get("METEORA_JAX_CACHE") or Path.home() / ".cache" / "meteora-jax")


def ensure_sdist(cache: str | os.PathLike[str] | None = None, *, url: str = SDIST_URL) -> Path:
    """The cached sdist, downloading it (358 MB, sha256-checked, atomically) if it is not there yet."""
    cache = Path(cache) if cache is not None else cache_dir()
    path = cache / SDIST_NAME
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{SDIST_NAME}.{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise MeteoraInputError(
            f"Could not download {SDIST_NAME} from {url} ({e}). The 1.0.0 sdist may no longer be "
            f"downloadable from PyPI. Where you have it (sha256 {SDIST_SHA256}), pass it with --sdist PATH "
            f"or copy it to {path}. Otherwise {_GITHUB_ADVICE}"
        ) from None
    if digest.hexdigest() != SDIST_SHA256:
        tmp.unlink(missing_ok=True)
        raise MeteoraInputError(
            f"The download of {url} has sha256 {digest.hexdigest()}, not the pinned {SDIST_SHA256}; nothing "
            f"was kept. Retry, or download it yourself and pass --sdist PATH. Or {_GITHUB_ADVICE}"
        )
    os.replace(tmp, path)
    return path


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm  # lazy: keep `import meteora_jax.data` light

    return tqdm(iterable, **kwargs)


class _CountingReader(io.RawIOBase):
    """A read-only file that reports bytes read to a progress bar (the gzip pass is the slow part)."""

    def __init__(self, f: io.BufferedReader, bar: Any) -> None:
        self._f, self._bar = f, bar

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self._bar.update(n)
        return n


TaskJsons = dict[str, list[tuple[str, dict[str, Any]]]]


class SourceRead(NamedTuple):
    """What ``read_source`` found: the task.json files, and provenance for the manifest."""

    tasks: TaskJsons
    kind: str  # "sdist" (root bigbench-<version>/), "archive" (any other root) or "directory"
    digest: str | None  # directory only: sha256 over the sorted (relative path, sha256) of the files read


def read_task_jsons(
    sdist: str | os.PathLike[str], tasks: Sequence[str], *, progress: bool = True
) -> TaskJsons:
    """Parse ``task.json`` of every wanted task and sub-task: ``{task: [(subtask, task_json), ...]}``.

    ``sdist`` is the bigbench sdist, a GitHub archive of google/BIG-bench (``.tar.gz``) or a BIG-bench
    checkout directory (see ``read_source``). A parent ``task.json`` that only lists sub-tasks has no
    examples and is skipped. Sub-tasks come back sorted by name (tar and directory order are not a contract).
    """
    return read_source(sdist, tasks, progress=progress).tasks


def read_source(sdist: str | os.PathLike[str], tasks: Sequence[str], *, progress: bool = True) -> SourceRead:
    """``read_task_jsons`` plus which kind of source it was and, for a directory, its content digest."""
    sdist = Path(sdist)
    if sdist.is_dir():
        return _read_directory(sdist, tasks, progress)
    if not sdist.is_file():
        raise MeteoraInputError(
            f"BIG-bench source {sdist} does not exist. Pass the path of {SDIST_NAME} (from {SDIST_URL}; it "
            f"may no longer be downloadable from PyPI), or leave --sdist out to download it into the cache. "
            f"{_GITHUB_ADVICE}"
        )
    return _read_tarball(sdist, tasks, progress)


def _parse_task_json(raw: bytes, where: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeteoraInputError(f"{where} is not valid UTF-8 JSON ({e}). {fix}") from None
    if not isinstance(data, dict):
        raise MeteoraInputError(f"{where} is not a JSON object. {fix}")
    return data


def _check_found(found: TaskJsons, source: Path, hint: str) -> TaskJsons:
    missing = [t for t, subs in found.items() if not subs]
    if missing:
        raise MeteoraInputError(
            f"{source} has no task.json with examples for {missing}. Check the task names (the 22 MeteoRA "
            f"tasks are {list(BIGBENCH_TASKS)}) and {hint}"
        )
    return {t: sorted(subs, key=lambda s: s[0]) for t, subs in found.items()}


def _read_tarball(sdist: Path, tasks: Sequence[str], progress: bool) -> SourceRead:
    """One sequential pass over the gzip stream.

    Members are matched by exact name pattern and read only if they are regular files under
    ``MAX_MEMBER_BYTES``; everything else (links, devices, ``..`` paths, other tasks) is skipped unread.
    """
    wanted = set(tasks)
    found: TaskJsons = {t: [] for t in tasks}
    roots: set[str] = set()
    fix = "The archive is damaged; delete it and download it again."
    bar = _progress(
        total=sdist.stat().st_size, unit="B", unit_scale=True, desc="read archive", disable=not progress
    )
    try:
        with open(sdist, "rb") as raw, tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|gz") as tf:
            for member in tf:
                m = _MEMBER_RE.match(member.name)
                if not m:
                    continue
                roots.add(m.group(1))
                if len(roots) > 1:
                    # Two trees would merge two BIG-bench versions' sub-tasks into one task.
                    raise MeteoraInputError(
                        f"{sdist} holds BIG-bench tasks under more than one top folder ({sorted(roots)}). "
                        "Pass an archive of one BIG-bench tree (the sdist or one GitHub archive)."
                    )
                if m.group(2) not in wanted or not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    continue
                task, subtask = m.group(2), m.group(3) or m.group(2)
                fobj = tf.extractfile(member)
                assert fobj is not None  # regular file
                data = _parse_task_json(fobj.read(), f"{sdist}: member {member.name}", fix)
                if data.get("examples"):
                    found[task].append((subtask, data))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise MeteoraInputError(
            f"{sdist} is not a readable .tar.gz ({e}). Pass {SDIST_NAME} (sha256 {SDIST_SHA256}) or a GitHub "
            f"archive of {GITHUB_URL}, downloaded again, or a checkout directory of it."
        ) from None
    finally:
        bar.close()
    hint = (
        f"that the file is {SDIST_NAME} or a GitHub archive of {GITHUB_URL} (members "
        "<root>/bigbench/benchmark_tasks/<task>/task.json)."
    )
    kind = "sdist" if roots and all(_SDIST_ROOT_RE.match(r) for r in roots) else "archive"
    return SourceRead(_check_found(found, sdist, hint), kind, None)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _is_real_dir(path: Path) -> bool:
    """A directory and not a symlink to one (lstat): a link in a checkout could lead anywhere."""
    st = _lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _read_regular(path: Path) -> bytes | None:
    """The bytes of a regular file (not a symlink) under ``MAX_MEMBER_BYTES``, else None: skipped unread."""
    st = _lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MEMBER_BYTES:
        return None
    # O_NOFOLLOW: the file may have been replaced by a link since the lstat.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(MAX_MEMBER_BYTES + 1)
    return data if len(data) <= MAX_MEMBER_BYTES else None


def benchmark_tasks_dir(root: Path) -> Path:
    """``benchmark_tasks`` of a checkout: given its root, its ``bigbench`` folder, or the folder itself."""
    for cand in (root / "bigbench" / "benchmark_tasks", root / "benchmark_tasks"):
        if _is_real_dir(cand):
            return cand
    return root


def _read_directory(root: Path, tasks: Sequence[str], progress: bool) -> SourceRead:
    """Only ``<task>/task.json`` and ``<task>/<subtask>/task.json`` of the wanted tasks are read.

    Symlinked folders and files, non-regular files and files over ``MAX_MEMBER_BYTES`` are skipped unread,
    as a tarball's links are; the error for a task left without examples lists what was skipped.
    """
    base = benchmark_tasks_dir(root)
    found: TaskJsons = {t: [] for t in tasks}
    hashes: list[tuple[str, str]] = []
    skipped: list[str] = []
    fix = f"Restore that file from {GITHUB_URL} (e.g. `git checkout -- <file>` in the checkout)."

    def read(path: Path, task: str, subtask: str) -> None:
        if _lstat(path) is None:
            return
        raw = _read_regular(path)
        if raw is None:
            skipped.append(str(path))
            return
        hashes.append((path.relative_to(base).as_posix(), hashlib.sha256(raw).hexdigest()))
        data = _parse_task_json(raw, str(path), fix)
        if data.get("examples"):
            found[task].append((subtask, data))

    try:
        for task in _progress(tasks, desc="read task.json", unit="task", disable=not progress):
            task_dir = base / task
            if not _is_real_dir(task_dir):
                if _lstat(task_dir) is not None:
                    skipped.append(str(task_dir))
                continue
            read(task_dir / "task.json", task, task)
            for sub in sorted(os.listdir(task_dir)):
                if not _SUBTASK_RE.match(sub):
                    continue
                if _is_real_dir(task_dir / sub):
                    read(task_dir / sub / "task.json", task, sub)
                elif (task_dir / sub).is_symlink():
                    skipped.append(str(task_dir / sub))
    except OSError as e:
        raise MeteoraInputError(
            f"Could not read the BIG-bench checkout {root} ({e}). Check its permissions."
        ) from None
    hint = (
        f"that {root} is a checkout of {GITHUB_URL}, its bigbench/ or its bigbench/benchmark_tasks/ folder."
        + (f" Skipped (symlinks, not regular files, or too large): {skipped}." if skipped else "")
    )
    tasks_read = _check_found(found, root, hint)
    digest = hashlib.sha256()
    for rel, sha in sorted(hashes):
        digest.update(f"{rel}\t{sha}\n".encode())
    return SourceRead(tasks_read, "directory", digest.hexdigest())


def _best_choice(scores: dict[str, Any], where: str) -> str:
    best = max(scores.values())
    # BIG-bench takes the first choice with the maximal score; a tie with every choice has no answer.
    if (len(scores) > 1 and best <= min(scores.values())) or (len(scores) == 1 and best == 0):
        raise MeteoraInputError(f"{where}: target_scores has no correct choice: {scores}")
    return next(k for k, v in scores.items() if v == best)


def convert_example(
    example: dict[str, Any], task_json: dict[str, Any], rng: random.Random, where: str
) -> dict:
    """One BIG-bench example -> ``{"prompt", "response"}`` (see the module docstring for the format)."""
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        raise MeteoraInputError(f"{where}: an example must be an object with a string 'input'.")
    input_prefix = task_json.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    output_prefix = task_json.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = task_json.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    body = example["input"]
    scores = example.get("target_scores")
    target = example.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if scores is not None:
        if not isinstance(scores, dict) or not scores:
            raise MeteoraInputError(f"{where}: target_scores must be a non-empty object.")
        choices = sorted(scores)
        rng.shuffle(choices)
        if task_json.get("append_choices_to_input", True):
            body = body + choice_prefix + choice_prefix.join(choices)
        elif target is None:
            body = body + "".join(_LISTED_CHOICE_PREFIX + c for c in choices)
        if target is None:
            target = _best_choice(scores, where)
    if not isinstance(target, str):
        raise MeteoraInputError(f"{where}: no usable target (need a string 'target' or 'target_scores').")
    prompt = (str(task_json.get("task_prefix", "")) + input_prefix + body + output_prefix).strip()
    return {"prompt": prompt, "response": target.strip()}


def convert_task(
    task: str,
    subtasks: Sequence[tuple[str, dict[str, Any]]],
    *,
    seed: int,
    test_size: float | int,
    min_test: int,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Convert and split one task: per sub-task, dedupe, shuffle and hold out; then merge and shuffle."""
    train: list[dict] = []
    test: list[dict] = []
    seen: set[tuple[str, str]] = set()
    dropped = 0
    for subtask, data in subtasks:
        rows = []
        for i, ex in enumerate(data["examples"]):
            # A per-example RNG (string seeds are stable across runs) keeps choice order independent of
            # which other tasks or sub-tasks were selected.
            rng = random.Random(f"{seed}/{task}/{subtask}/{i}")
            row = convert_example(ex, data, rng, where=f"{task}/{subtask} example {i}")
            key = (row["prompt"], row["response"])
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            rows.append({**row, "subtask": subtask})
        n_test = max(num_test_examples(len(rows), test_size), min(min_test, len(rows) - 1))
        tr, te = split_train_test(rows, n_test, seed=_stable_int(seed, task, subtask))
        train += tr
        test += te
    # Interleave sub-tasks so that a truncated read of train.jsonl still sees all of them.
    random.Random(_stable_int(seed, task, "merge")).shuffle(train)
    random.Random(_stable_int(seed, task, "merge-test")).shuffle(test)
    info = {
        "train": len(train),
        "test": len(test),
        "subtasks": [s for s, _ in subtasks],
        "duplicates_dropped": dropped,
    }
    return train, test, info


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MeteoraInputError(f"Output path {out} is a file. Pick a directory path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MeteoraInputError(
            f"Output directory {out} already exists and is not empty. Pass --overwrite to replace it, or pick "
            "another --out."
        )


def build_bigbench(
    out_dir: str | os.PathLike[str],
    *,
    sdist: str | os.PathLike[str] | None = None,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    test_size: float | int = 0.2,
    min_test: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/<task>/{train,test}.jsonl`` for the BIG-bench ``tasks`` (default: MeteoRA's 22).

    ``test_size`` is per sub-task: a fraction in (0, 1) or a count; at least ``min_test`` examples are held
    out (BIG-bench's split rule is 0.2 and 16). ``sdist`` is the sdist, a GitHub
    archive or a checkout directory (``read_source``); ``None`` uses or downloads the cached sdist.
    The output appears all at once: everything is built in ``<out>.tmp-*`` next to it, then renamed; an
    existing non-empty ``out_dir`` is refused unless ``overwrite``. Returns the summary that is also
    written to ``out_dir/bigbench_manifest.json``.
    """
    out = Path(out_dir)
    tasks = list(BIGBENCH_TASKS if tasks is None else tasks)
    bad = [t for t in tasks if not _TASK_NAME_RE.match(t)]
    if bad or not tasks or len(set(tasks)) != len(tasks):
        raise MeteoraInputError(
            f"Task names must be distinct BIG-bench folder names (lower case, digits, '_'); got {tasks}."
        )
    _prepare_out(out, overwrite)  # fail before the slow read
    num_test_examples(100, test_size)  # validates test_size early
    sdist_path = Path(sdist) if sdist is not None else ensure_sdist()
    source = read_source(sdist_path, tasks, progress=progress)
    task_jsons = source.tasks
    # Provenance: a file of another version, a GitHub archive or a checkout may silently give other data.
    sha = None if source.kind == "directory" else sha256_of(sdist_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    summary: dict[str, Any] = {
        "source": SDIST_NAME if source.kind == "sdist" else GITHUB_URL,
        "source_kind": source.kind,
        "sdist": str(sdist_path),
        "sdist_sha256": sha,  # None for a directory: see directory_sha256
        "sdist_is_pinned_release": sha == SDIST_SHA256,
        **({"directory_sha256": source.digest} if source.digest is not None else {}),
        "seed": seed,
        "test_size": test_size,
        "min_test": min_test,
        "tasks": {},
    }
    try:
        for task in _progress(tasks, desc="convert tasks", unit="task", disable=not progress):
            train, test, info = convert_task(
                task, task_jsons[task], seed=seed, test_size=test_size, min_test=min_test
            )
            write_jsonl_atomic(tmp / task / "train.jsonl", train)
            write_jsonl_atomic(tmp / task / "test.jsonl", test)
            summary["tasks"][task] = info
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _prepare_out(out, overwrite)  # again: another process may have written there meanwhile
        if out.exists():
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary
