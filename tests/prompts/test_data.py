"""Reading, splitting and checking labelled data, and the errors bad files get."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from prompts.data import (
    DataError,
    Example,
    cap_rows,
    load_task_data,
    read_examples,
    stratified_split,
)
from prompts.errors import InvalidInputError
from tests.synthetic import make_examples, write_data_dir, write_jsonl


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_reads_jsonl_and_tsv(tmp_path: Path) -> None:
    jsonl = _write(
        tmp_path / "a.jsonl",
        '{"text": "great  phone", "label": "phone"}\n\n{"text": "a book", "label": 3}\n',
    )
    assert read_examples(jsonl) == [Example("great phone", "phone"), Example("a book", "3")]
    tsv = _write(tmp_path / "a.tsv", "phone\tgreat phone\r\nbook\ta\tbook with a tab\n")
    assert read_examples(tsv) == [Example("great phone", "phone"), Example("a book with a tab", "book")]


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("empty.jsonl", "", ["empty.jsonl", "holds no examples"]),
        ("blank.tsv", "\n  \n", ["holds no examples"]),
        ("bad.jsonl", '{"text": "ok", "label": "a"}\n{"text": "broken"\n', ["bad.jsonl:2", "not valid JSON"]),
        ("nolabel.jsonl", '{"text": "ok"}\n', ["nolabel.jsonl:1", "missing field", "label"]),
        ("notext.jsonl", '{"label": "a"}\n', ["notext.jsonl:1", "missing field", "text"]),
        ("list.jsonl", '["a", "b"]\n', ["list.jsonl:1", "expected a JSON object"]),
        ("types.jsonl", '{"text": 3, "label": "a"}\n', ["types.jsonl:1", "'text' must be a string"]),
        ("booly.jsonl", '{"text": "x", "label": true}\n', ["booly.jsonl:1", "'label' must be a string"]),
        ("notab.tsv", "a\tfine\nno tab here\n", ["notab.tsv:2", "found no tab"]),
        ("emptytext.tsv", "a\t   \n", ["emptytext.tsv:1", "empty text"]),
        ("data.csv", "a,b\n", ["unknown data format", ".csv"]),
    ],
)
def test_bad_files_name_the_file_and_line(
    tmp_path: Path, name: str, content: str, fragments: list[str]
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        read_examples(path)
    for fragment in fragments:
        assert fragment in info.value.message
    assert isinstance(info.value, InvalidInputError) and info.value.code == "invalid_data"


def test_undecodable_line_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin.tsv", b"a\tfine\n" + b"b\tcaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.tsv:2: not UTF-8"):
        read_examples(path)


def test_missing_file_and_directory_without_train(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_task_data(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train file"):
        load_task_data(tmp_path / "empty")


def test_directory_with_all_splits(tmp_path: Path) -> None:
    data = load_task_data(write_data_dir(tmp_path / "d", train=30, dev=9, test=12))
    assert data.labels == ["book", "phone", "shirt"]  # sorted unique train labels
    assert (len(data.train), len(data.dev), len(data.test)) == (30, 9, 12)
    assert data.label_ids(data.train[:1]) == [data.labels.index(data.train[0].label)]
    assert not data.notes


def test_labels_json_fixes_the_order_and_must_cover_train(tmp_path: Path) -> None:
    directory = write_data_dir(tmp_path / "d", train=30, dev=9, test=9)
    (directory / "labels.json").write_text(
        json.dumps({"labels": ["shirt", "phone", "book", "other"], "note": "x"})
    )
    assert load_task_data(directory).labels == ["shirt", "phone", "book", "other"]
    (directory / "labels.json").write_text(json.dumps(["shirt", "phone"]))
    with pytest.raises(DataError, match=r"labels the task does not know: 'book'"):
        load_task_data(directory)


def test_unknown_dev_and_test_labels_are_listed(tmp_path: Path) -> None:
    directory = write_data_dir(tmp_path / "d", train=30, dev=9, test=9)
    write_jsonl(directory / "test.jsonl", [Example("x", "phone"), Example("y", "toys"), Example("z", "toys")])
    with pytest.raises(DataError) as info:
        load_task_data(directory)
    assert "test.jsonl" in info.value.message and "'toys' (2)" in info.value.message
    write_jsonl(directory / "dev.jsonl", [Example("x", "laptop"), Example("y", "beauty")])
    with pytest.raises(
        DataError, match=r"dev\.jsonl has labels the task does not know: .*'beauty'.*'laptop'"
    ):
        load_task_data(directory)


def test_single_class_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [Example(f"text {i}", "spam") for i in range(10)])
    with pytest.raises(DataError, match=r"every example has the label 'spam'.*at least two labels"):
        load_task_data(path)


def test_two_train_files_are_ambiguous(tmp_path: Path) -> None:
    directory = write_data_dir(tmp_path / "d")
    _write(directory / "train.tsv", "a\tb\n")
    with pytest.raises(DataError, match="several train files"):
        load_task_data(directory)


def test_single_file_gets_a_stratified_seeded_dev_split(tmp_path: Path) -> None:
    examples = make_examples(60, seed=3)
    path = write_jsonl(tmp_path / "all.jsonl", examples)
    data = load_task_data(path, dev_fraction=0.2, seed=7)
    assert len(data.dev) == 12 and len(data.train) == 48 and not data.test
    assert Counter(e.label for e in data.dev) == {"book": 4, "phone": 4, "shirt": 4}
    assert set(data.train).isdisjoint(data.dev) or len(set(examples)) < len(examples)
    assert load_task_data(path, dev_fraction=0.2, seed=7).dev == data.dev
    assert load_task_data(path, dev_fraction=0.2, seed=8).dev != data.dev
    assert any("split off" in note for note in data.notes)


def test_split_keeps_singleton_labels_in_train() -> None:
    rows = [Example(f"a{i}", "a") for i in range(9)] + [Example("b0", "b")]
    kept, held = stratified_split(rows, 0.3, seed=0)
    assert Example("b0", "b") in kept and all(e.label == "a" for e in held) and len(held) == 3


def test_cap_rows_is_stratified_and_keeps_rare_labels() -> None:
    rows = [Example(f"a{i}", "a") for i in range(90)] + [Example(f"b{i}", "b") for i in range(10)]
    capped = cap_rows(rows, 20, seed=0)
    counts = Counter(e.label for e in capped)
    assert len(capped) == 20 and counts == {"a": 18, "b": 2}
    assert cap_rows(rows, 20, seed=0) == capped
    assert cap_rows(rows, 500, seed=0) == rows


def test_max_train_rows_caps_after_the_dev_split(tmp_path: Path) -> None:
    data = load_task_data(write_jsonl(tmp_path / "all.jsonl", make_examples(90, seed=1)), max_train_rows=30)
    assert len(data.train) == 30 and len(data.dev) == 9
    assert any("capped" in note for note in data.notes)
