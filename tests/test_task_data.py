"""Task-data layout: reading, strict errors that name the file and line, atomic writes, the split."""

import json
import os

import pytest

from meteora_jax.data import tasks as T
from meteora_jax.errors import MeteoraInputError


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _row(prompt="p", response="r", **extra):
    return json.dumps({"prompt": prompt, "response": response, **extra})


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "DATA"
    _write(root / "b_task" / "train.jsonl", [_row("p1", "r1", metric="bleu"), "", _row("p2", "r2")])
    _write(root / "b_task" / "test.jsonl", [_row("t1", "s1")])
    _write(root / "a_task" / "train.jsonl", [_row("héllo", "wörld")])
    _write(root / "a_task" / "test.jsonl", [_row("x", "y")])
    (root / ".cache").mkdir()  # hidden folders are not tasks
    return root


def test_read_split_sorted_and_keeps_extra(data_dir):
    assert T.list_tasks(data_dir) == ["a_task", "b_task"]
    split = T.read_split(data_dir)
    assert list(split) == ["a_task", "b_task"]
    b = split["b_task"]
    assert [e.prompt for e in b] == ["p1", "p2"]  # the blank line is skipped
    assert b[0] == T.Example("b_task", "p1", "r1", {"metric": "bleu"})
    assert split["a_task"][0].response == "wörld"
    assert T.read_split(data_dir, "test", tasks=["b_task"])["b_task"][0].prompt == "t1"


def test_write_then_read_round_trip(tmp_path):
    rows = [T.Example("t", "¿qué?", "sí", {"subtask": "s"}), {"prompt": "a", "response": "b"}]
    path = tmp_path / "D" / "t" / "train.jsonl"
    assert T.write_jsonl_atomic(path, rows) == 2
    back = T.read_jsonl(path)
    assert back[0] == rows[0]
    assert back[1] == T.Example("t", "a", "b", {})
    assert "¿qué?" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert sorted(os.listdir(path.parent)) == ["train.jsonl"]  # no temp file left behind


def test_write_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "train.jsonl"
    T.write_jsonl_atomic(path, [{"prompt": "old", "response": "old"}])

    def rows():
        yield {"prompt": "new", "response": "new"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        T.write_jsonl_atomic(path, rows())
    assert T.read_jsonl(path)[0].prompt == "old"
    assert os.listdir(tmp_path) == ["train.jsonl"]


@pytest.mark.parametrize(
    ("lines", "line_no", "needle"),
    [
        ([_row(), '{"prompt": "a", "response": '], 2, "not valid JSON"),
        ([_row(), _row(), '["a", "b"]'], 3, "not an object"),
        (['{"prompt": "a"}'], 1, '"response"'),
        (['{"response": "a"}'], 1, '"prompt"'),
        ([_row(), '{"prompt": "a", "response": 3}'], 2, "not a string"),
        (['{"prompt": null, "response": "b"}'], 1, "not a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, lines, line_no, needle):
    path = _write(tmp_path / "D" / "task" / "train.jsonl", lines)
    with pytest.raises(MeteoraInputError) as e:
        T.read_jsonl(path)
    msg = str(e.value)
    assert f"{path}, line {line_no}" in msg and needle in msg


def test_not_utf8_and_bom(tmp_path):
    path = tmp_path / "D" / "task" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xef\xbb\xbf" + _row().encode() + b"\r\n" + b'{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(MeteoraInputError, match=f"{path}, line 2 is not UTF-8"):
        T.read_jsonl(path)
    path.write_bytes(b"\xef\xbb\xbf" + _row().encode() + b"\r\n")
    assert T.read_jsonl(path)[0].prompt == "p"


def test_empty_file(tmp_path):
    path = _write(tmp_path / "D" / "task" / "train.jsonl", ["", "  "])
    with pytest.raises(MeteoraInputError, match=f"{path} is empty"):
        T.read_jsonl(path)


def test_missing_data_dir_and_no_tasks(tmp_path):
    with pytest.raises(MeteoraInputError, match="does not exist"):
        T.list_tasks(tmp_path / "nope")
    with pytest.raises(MeteoraInputError, match="no task folders"):
        T.list_tasks(tmp_path)


def test_empty_task_folder(data_dir):
    (data_dir / "c_empty").mkdir()
    with pytest.raises(MeteoraInputError, match="c_empty holds no .jsonl"):
        T.read_split(data_dir)


def test_unknown_task_and_missing_split(data_dir):
    with pytest.raises(MeteoraInputError, match=r"Unknown task\(s\) \['zzz'\].*a_task"):
        T.read_split(data_dir, tasks=["a_task", "zzz"])
    (data_dir / "a_task" / "test.jsonl").unlink()
    with pytest.raises(MeteoraInputError, match="test.jsonl does not exist"):
        T.read_split(data_dir, "test")


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, test = T.split_train_test(items, 0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert sorted(train + test) == items
    assert (train, test) == T.split_train_test(items, 0.2, seed=3)
    # Pinned: the split must not change between machines or Python versions (it defines the test sets).
    assert T.split_train_test(list(range(10)), 3, seed=0) == ([5, 3, 4, 2, 0, 9, 6], [7, 8, 1])
    assert test != T.split_train_test(items, 0.2, seed=4)[1]
    assert len(T.split_train_test(items, 7, seed=0)[1]) == 7
    assert T.split_train_test(items, 0, seed=0)[1] == []
    with pytest.raises(MeteoraInputError, match="leaving none"):
        T.split_train_test(items, 100, seed=0)
    with pytest.raises(MeteoraInputError):
        T.split_train_test(items, 1.5, seed=0)
    with pytest.raises(MeteoraInputError):
        T.split_train_test(items, -1, seed=0)
