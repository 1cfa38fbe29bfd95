"""BIG-bench importer on a tiny synthetic sdist with the real layout, plus the real sdist when cached."""

import hashlib
import io
import json
import os
import tarfile
import urllib.error

import pytest

from meteora_jax import cli
from meteora_jax.data import bigbench as B
from meteora_jax.data.tasks import read_split
from meteora_jax.errors import MeteoraInputError

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _mc_task(n):
    # Multiple choice, choices not appended by the task (as logical_deduction): we must list them.
    return {
        "name": "mc_task",
        "task_prefix": "Pick one.\n",
        "example_input_prefix": "",
        "example_output_prefix": " ",
        "append_choices_to_input": False,
        "examples": [
            {"input": f"Item {i} is", "target_scores": {f"right {i}": 1, f"wrong {i}": 0, f"other {i}": 0}}
            for i in range(n)
        ],
    }


def _gen_task(n):
    # Generative with a list of targets and BIG-bench's default prefixes; one exact duplicate example.
    examples = [{"input": f"What is {i}+{i}?", "target": [str(2 * i), f"{2 * i}.0"]} for i in range(n)]
    return {"name": "gen_task", "examples": examples + [examples[0]]}


def _sub(name, n, **kw):
    return {
        "name": name,
        "examples": [{"input": f"{name} q{i}", "target_scores": {"yes": 0, "no": 1}, **kw} for i in range(n)],
    }


def _add(tf, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _task_files():
    """task.json objects by path under benchmark_tasks/: top-level, sub-task and parent task.json files."""
    return {
        "mc_task/task.json": _mc_task(40),
        "gen_task/task.json": _gen_task(30),
        "sub_task/task.json": {"name": "sub_task", "description": "parent, no examples"},
        "sub_task/one/task.json": _sub("one", 20),
        # Both target and target_scores (as strategyqa): the target is the response, choices not listed.
        "sub_task/two/task.json": {
            **_sub("two", 30, target="No. Because."),
            "append_choices_to_input": False,
        },
        "unused_task/task.json": _gen_task(20),
    }


def make_sdist(path, extra_members=(), root="bigbench-1.0.0"):
    """A tarball with the sdist's internal layout; another ``root`` gives a GitHub archive's layout."""
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, f"{root}/setup.py", b"raise SystemExit('never run')\n")
        for rel, obj in _task_files().items():
            _add(tf, f"{root}/bigbench/benchmark_tasks/{rel}", json.dumps(obj).encode())
        for name, data, kind, link in extra_members:
            _add(tf, name, data, kind, link)
    return path


def make_checkout(root):
    """The same task.json files as ``make_sdist``, as a google/BIG-bench checkout directory."""
    for rel, obj in _task_files().items():
        path = root / "bigbench" / "benchmark_tasks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    (root / "setup.py").write_text("raise SystemExit('never run')\n")
    return root


@pytest.fixture
def sdist(tmp_path):
    return make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")


TASKS = ["mc_task", "gen_task", "sub_task"]


def test_build_layout_formats_and_split(tmp_path, sdist):
    out = tmp_path / "out"
    summary = B.build_bigbench(out, sdist=sdist, tasks=TASKS, seed=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(TASKS + [B.MANIFEST])
    train, test = read_split(out, "train"), read_split(out, "test")
    assert list(train) == sorted(TASKS)  # unused_task not imported

    # Split per sub-task: 20% but at least 16 held out.
    assert summary["tasks"]["mc_task"] == {
        "train": 24,
        "test": 16,
        "subtasks": ["mc_task"],
        "duplicates_dropped": 0,
    }
    assert summary["tasks"]["gen_task"]["duplicates_dropped"] == 1
    assert summary["tasks"]["sub_task"]["subtasks"] == ["one", "two"]
    assert len(test["sub_task"]) == 16 + 16 and len(train["sub_task"]) == 4 + 14
    assert {e.extra["subtask"] for e in test["sub_task"]} == {"one", "two"}
    for task in TASKS:
        prompts_train = {e.prompt for e in train[task]}
        assert not prompts_train & {e.prompt for e in test[task]}  # no leakage

    mc = next(e for e in train["mc_task"] + test["mc_task"] if "Item 3 is\n" in e.prompt)
    assert mc.response == "right 3"
    assert mc.prompt.startswith("Pick one.\nItem 3 is\nchoice: ")
    assert sorted(line for line in mc.prompt.split("\n") if line.startswith("choice: ")) == [
        "choice: other 3",
        "choice: right 3",
        "choice: wrong 3",
    ]

    gen = next(e for e in train["gen_task"] + test["gen_task"] if "7+7" in e.prompt)
    assert (gen.prompt, gen.response) == ("Q: What is 7+7?\nA:", "14")  # BIG-bench defaults, stripped

    by_sub = {e.extra["subtask"]: e for e in train["sub_task"] + test["sub_task"]}
    # Sub-task "one": MC with no target -> best choice, choices listed (BIG-bench's default prefix).
    assert by_sub["one"].response == "no"
    assert "\n  choice: " in by_sub["one"].prompt
    # Sub-task "two": has a target -> the target, choices not appended (task says so).
    assert by_sub["two"].response == "No. Because." and "choice" not in by_sub["two"].prompt

    manifest = json.loads((out / B.MANIFEST).read_text())
    assert manifest["tasks"] == summary["tasks"] and manifest["seed"] == 0
    assert manifest["sdist_sha256"] == B.sha256_of(sdist) and not manifest["sdist_is_pinned_release"]


def test_deterministic_by_seed(tmp_path, sdist):
    def build(name, seed):
        B.build_bigbench(tmp_path / name, sdist=sdist, tasks=["mc_task"], seed=seed, progress=False)
        return (tmp_path / name / "mc_task" / "test.jsonl").read_bytes()

    first = build("a", 0)
    assert build("b", 0) == first
    assert build("c", 1) != first


def test_test_size_count(tmp_path, sdist):
    s = B.build_bigbench(
        tmp_path / "o", sdist=sdist, tasks=["mc_task"], test_size=20, min_test=0, progress=False
    )
    assert s["tasks"]["mc_task"]["test"] == 20


def test_refuses_non_empty_out_unless_overwrite(tmp_path, sdist):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MeteoraInputError, match="--overwrite"):
        B.build_bigbench(out, sdist=sdist, tasks=["mc_task"], progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    B.build_bigbench(out, sdist=sdist, tasks=["mc_task"], overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [B.MANIFEST, "mc_task"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigbench-1.0.0.tar.gz", "out"]  # no tmp/old dirs


def test_failure_leaves_nothing(tmp_path):
    bad = {"name": "bad_task", "examples": [{"input": "q", "target_scores": {"a": 0, "b": 0}}]}
    sdist = make_sdist(
        tmp_path / "s.tar.gz", [(f"{ROOT}/bad_task/task.json", json.dumps(bad).encode(), tarfile.REGTYPE, "")]
    )
    with pytest.raises(MeteoraInputError, match="no correct choice"):
        B.build_bigbench(tmp_path / "out", sdist=sdist, tasks=["mc_task", "bad_task"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar.gz"]


def test_unknown_task_and_bad_sdist(tmp_path, sdist):
    with pytest.raises(MeteoraInputError, match=r"no task.json with examples for \['nope'\]"):
        B.build_bigbench(tmp_path / "o", sdist=sdist, tasks=["nope"], progress=False)
    with pytest.raises(MeteoraInputError, match="does not exist"):
        B.build_bigbench(tmp_path / "o", sdist=tmp_path / "missing.tar.gz", tasks=["mc_task"], progress=False)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(MeteoraInputError, match="not a readable"):
        B.build_bigbench(tmp_path / "o", sdist=junk, tasks=["mc_task"], progress=False)
    with pytest.raises(MeteoraInputError, match="folder names"):
        B.build_bigbench(tmp_path / "o", sdist=sdist, tasks=["../etc"], progress=False)
    assert not (tmp_path / "o").exists()


def test_malicious_members_are_never_written_or_read(tmp_path, monkeypatch):
    evil = json.dumps(_mc_task(40) | {"task_prefix": "EVIL "}).encode()
    members = [
        ("../../x", b"pwned", tarfile.REGTYPE, ""),
        (f"../../{ROOT}/mc_task/task.json", evil, tarfile.REGTYPE, ""),
        (f"/{ROOT}/mc_task/task.json", evil, tarfile.REGTYPE, ""),
        (f"bigbench-1.0.0/../{ROOT.split('/', 1)[1]}/mc_task/task.json", evil, tarfile.REGTYPE, ""),
        # Any one root folder is accepted now, but never "." or ".." (nor an empty one).
        ("./bigbench/benchmark_tasks/mc_task/task.json", evil, tarfile.REGTYPE, ""),
        ("../bigbench/benchmark_tasks/mc_task/task.json", evil, tarfile.REGTYPE, ""),
        ("/bigbench/benchmark_tasks/mc_task/task.json", evil, tarfile.REGTYPE, ""),
        (f"{ROOT}/mc_task/sub/task.json", b"", tarfile.SYMTYPE, "/etc/passwd"),
        (f"{ROOT}/mc_task/hard/task.json", b"", tarfile.LNKTYPE, f"{ROOT}/gen_task/task.json"),
    ]
    sdist = make_sdist(tmp_path / "evil.tar.gz", members)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    summary = B.build_bigbench(work / "out", sdist=sdist, tasks=["mc_task"], progress=False)
    assert summary["tasks"]["mc_task"]["subtasks"] == ["mc_task"]  # the link and ../ members were skipped
    assert not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["a", "b", "evil.tar.gz", "out", B.MANIFEST, "mc_task", "train.jsonl", "test.jsonl"]
    )
    assert "EVIL" not in (work / "out" / "mc_task" / "train.jsonl").read_text()


def test_ensure_sdist_offline_and_bad_hash(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(B.urllib.request, "urlopen", offline)
    with pytest.raises(MeteoraInputError, match="--sdist PATH") as e:
        B.ensure_sdist(tmp_path / "cache")
    assert "no longer be downloadable from PyPI" in str(e.value) and B.GITHUB_URL in str(e.value)
    monkeypatch.setattr(B.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered"))
    with pytest.raises(MeteoraInputError, match="not the pinned"):
        B.ensure_sdist(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # no partial download left
    (tmp_path / "cache" / B.SDIST_NAME).write_bytes(b"cached")
    assert B.ensure_sdist(tmp_path / "cache") == tmp_path / "cache" / B.SDIST_NAME


def test_cli(tmp_path, sdist, capsys):
    out = tmp_path / "cli_out"
    argv = [
        "data",
        "bigbench",
        "--out",
        str(out),
        "--sdist",
        str(sdist),
        "--tasks",
        "mc_task,gen_task",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    assert sorted(read_split(out)) == ["gen_task", "mc_task"]
    assert "mc_task" in capsys.readouterr().out
    assert cli.main(argv) == 2  # non-empty --out
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite", "--seed", "5", "--test-size", "0.5"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "bigbench", "--help"])
    assert e.value.code == 0
    assert "bigbench==1.0.0" in capsys.readouterr().out


def _outputs(out):
    """Every train/test jsonl of a build, by relative path, as bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}


def test_github_archive_same_as_sdist(tmp_path, sdist):
    archive = make_sdist(tmp_path / "BIG-bench-main.tar.gz", root="BIG-bench-main")
    a = B.build_bigbench(tmp_path / "a", sdist=sdist, tasks=TASKS, progress=False)
    b = B.build_bigbench(tmp_path / "b", sdist=archive, tasks=TASKS, progress=False)
    assert len(_outputs(tmp_path / "a")) == 2 * len(TASKS)
    assert _outputs(tmp_path / "b") == _outputs(tmp_path / "a")
    assert a["tasks"] == b["tasks"]
    manifest = json.loads((tmp_path / "b" / B.MANIFEST).read_text())
    assert (a["source_kind"], manifest["source_kind"]) == ("sdist", "archive")
    assert manifest["sdist_sha256"] == B.sha256_of(archive) and not manifest["sdist_is_pinned_release"]
    assert "directory_sha256" not in manifest


def test_archive_with_two_roots_is_refused(tmp_path):
    other = "BIG-bench-main/bigbench/benchmark_tasks/mc_task/extra/task.json"
    archive = make_sdist(
        tmp_path / "two.tar.gz", [(other, json.dumps(_sub("extra", 20)).encode(), tarfile.REGTYPE, "")]
    )
    with pytest.raises(MeteoraInputError, match="more than one top folder"):
        B.build_bigbench(tmp_path / "o", sdist=archive, tasks=["mc_task"], progress=False)


def _digest(base, rels):
    """The manifest's directory_sha256, recomputed: sorted (relative path, sha256 of the file)."""
    lines = sorted(f"{r}\t{B.sha256_of(base / r)}\n" for r in rels)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_checkout_directory_same_as_sdist(tmp_path, sdist, capsys):
    B.build_bigbench(tmp_path / "ref", sdist=sdist, tasks=TASKS, progress=False)
    ref = _outputs(tmp_path / "ref")
    checkout = make_checkout(tmp_path / "BIG-bench")
    base = checkout / "bigbench" / "benchmark_tasks"
    digests = set()
    for i, given in enumerate([checkout, checkout / "bigbench", base]):
        out = tmp_path / f"dir{i}"
        summary = B.build_bigbench(out, sdist=given, tasks=TASKS, progress=False)
        assert _outputs(out) == ref, given
        manifest = json.loads((out / B.MANIFEST).read_text())
        assert manifest["source_kind"] == "directory" and manifest["sdist"] == str(given)
        assert manifest["sdist_sha256"] is None and manifest["sdist_is_pinned_release"] is False
        assert manifest["directory_sha256"] == summary["directory_sha256"]
        digests.add(manifest["directory_sha256"])
    # The same files read, whichever folder was given; unused_task is not read, so not in the digest.
    read = [r for r in _task_files() if not r.startswith("unused_task/")]
    assert digests == {_digest(base, read)}
    (base / "unused_task" / "task.json").write_text("{}")
    assert (
        B.build_bigbench(tmp_path / "d3", sdist=base, tasks=TASKS, progress=False)["directory_sha256"]
        in digests
    )
    (base / "sub_task" / "task.json").write_text('{"name": "sub_task"} ')  # one byte more, no examples
    changed = B.build_bigbench(tmp_path / "d4", sdist=base, tasks=TASKS, progress=False)
    assert changed["directory_sha256"] not in digests and _outputs(tmp_path / "d4") == ref

    argv = ["data", "bigbench", "--out", str(tmp_path / "cli"), "--sdist", str(checkout), "--quiet"]
    assert cli.main(argv + ["--tasks", "mc_task"]) == 0
    assert "may differ from the bigbench 1.0.0 release in detail" in capsys.readouterr().out


def test_checkout_symlinks_are_not_followed(tmp_path, monkeypatch):
    checkout = make_checkout(tmp_path / "BIG-bench")
    base = checkout / "bigbench" / "benchmark_tasks"
    outside = tmp_path / "outside"
    (outside / "three").mkdir(parents=True)
    (outside / "task.json").write_text(json.dumps(_mc_task(40) | {"task_prefix": "EVIL "}))
    (outside / "three" / "task.json").write_text(json.dumps(_sub("three", 20)))
    (base / "mc_task" / "task.json").unlink()
    (base / "mc_task" / "task.json").symlink_to(outside / "task.json")
    (base / "sub_task" / "three").symlink_to(outside / "three", target_is_directory=True)
    # A symlinked task.json is skipped unread, so its task has no examples: named, with the skipped path.
    with pytest.raises(MeteoraInputError, match=r"no task.json with examples for \['mc_task'\]") as e:
        B.build_bigbench(tmp_path / "o", sdist=checkout, tasks=["mc_task", "gen_task"], progress=False)
    assert "Skipped" in str(e.value) and str(base / "mc_task" / "task.json") in str(e.value)
    summary = B.build_bigbench(tmp_path / "o", sdist=checkout, tasks=["sub_task"], progress=False)
    assert summary["tasks"]["sub_task"]["subtasks"] == [
        "one",
        "two",
    ]  # the linked sub-task folder is not read
    # Oversized files are skipped the same way.
    monkeypatch.setattr(B, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(MeteoraInputError, match=r"examples for \['gen_task'\]"):
        B.build_bigbench(tmp_path / "o2", sdist=checkout, tasks=["gen_task"], progress=False)


def test_checkout_bad_json_names_the_file(tmp_path):
    checkout = make_checkout(tmp_path / "BIG-bench")
    bad = checkout / "bigbench" / "benchmark_tasks" / "gen_task" / "task.json"
    bad.write_text("{not json")
    with pytest.raises(MeteoraInputError, match="not valid UTF-8 JSON") as e:
        B.build_bigbench(tmp_path / "o", sdist=checkout, tasks=["gen_task"], progress=False)
    assert str(bad) in str(e.value) and "git checkout" in str(e.value)


def test_missing_source_names_path_and_github(tmp_path):
    missing = tmp_path / "nowhere" / "BIG-bench-main.tar.gz"
    with pytest.raises(MeteoraInputError, match="does not exist") as e:
        B.read_task_jsons(missing, ["mc_task"], progress=False)
    assert str(missing) in str(e.value)
    assert "https://github.com/google/BIG-bench" in str(e.value) and "archive tarball" in str(e.value)
    assert "no longer be downloadable from PyPI" in str(e.value)


REAL_SDIST = B.cache_dir() / B.SDIST_NAME


@pytest.mark.slow
@pytest.mark.skipif(not REAL_SDIST.is_file(), reason=f"real sdist not cached at {REAL_SDIST} (358 MB)")
def test_real_sdist(tmp_path):
    # One gzip pass over the 358 MB file (~8 s); two tasks keep the conversion small.
    summary = B.build_bigbench(
        tmp_path / "bb", sdist=REAL_SDIST, tasks=["logical_deduction", "strategyqa"], progress=False
    )
    assert summary["sdist_is_pinned_release"]
    ld, sq = summary["tasks"]["logical_deduction"], summary["tasks"]["strategyqa"]
    assert ld["subtasks"] == ["five_objects", "seven_objects", "three_objects"]
    assert (ld["train"], ld["test"]) == (1200, 300)  # 300 + 500 + 700 examples, 20% each held out
    assert sq["train"] + sq["test"] + sq["duplicates_dropped"] == 2290
    test = read_split(tmp_path / "bb", "test")
    ex = test["logical_deduction"][0]
    assert ex.prompt.startswith("The following paragraphs each describe a set of")
    assert f"choice: {ex.response}" in ex.prompt
    assert all(e.prompt.startswith("Q: ") and e.prompt.endswith("\nA:") for e in test["strategyqa"])
    assert all(e.response.split(".")[0] in ("Yes", "No") for e in test["strategyqa"])
