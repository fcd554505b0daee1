"""Labelled text for training and evaluation: JSON Lines or tab-separated files, split and checked.

Formats (UTF-8, one example per line, blank lines skipped):

- ``.jsonl`` / ``.json``: ``{"text": "...", "label": "..."}`` (integer labels are read as strings);
- ``.tsv`` / ``.txt``: ``label<TAB>text`` (split at the first tab, so the text may hold tabs).

A data *directory* holds ``train``, optionally ``dev`` and ``test`` files in either format and an
optional ``labels.json`` (a JSON list, or ``{"labels": [...]}``, fixing the label order). A single
*file* is a train file whose dev split is cut off, stratified and seeded. Every problem raises
:class:`DataError` naming the file (and line) at fault: these files are written by hand far more
often than by programs.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prompts.errors import InvalidInputError

__all__ = [
    "JSONL_SUFFIXES",
    "TSV_SUFFIXES",
    "DataError",
    "Example",
    "TaskData",
    "cap_rows",
    "check_labels",
    "find_split_file",
    "load_task_data",
    "read_examples",
    "stratified_split",
]

JSONL_SUFFIXES = (".jsonl", ".json")
TSV_SUFFIXES = (".tsv", ".txt")
SPLITS = ("train", "dev", "test")
# Errors list at most this many offending labels or lines; the rest is counted.
_SHOWN = 10


class DataError(InvalidInputError):
    """A training or evaluation data file that cannot be used as it is."""

    code = "invalid_data"


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass
class TaskData:
    """Train, dev and (optional) test examples with the label order every split is indexed by."""

    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # what was done to the data (dev split, cap), for logs

    def label_ids(self, examples: Sequence[Example]) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[e.label] for e in examples]


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_jsonl_line(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}): {_shorten(line)!r}") from exc
    if not isinstance(row, dict):
        raise DataError(
            f'{where}: expected a JSON object {{"text": ..., "label": ...}}, got {_shorten(line)!r}'
        )
    missing = [name for name in ("text", "label") if name not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; every row needs 'text' and 'label'")
    text, label = row["text"], row["label"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    # bool is an int subclass, but a True/False label is almost certainly a mistake in the file.
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise DataError(f"{where}: 'label' must be a string (or integer), got {type(label).__name__}")
    return Example(text, str(label))


def _parse_tsv_line(line: str, where: str) -> Example:
    label, tab, text = line.partition("\t")
    if not tab:
        raise DataError(f"{where}: expected 'label<TAB>text', found no tab: {_shorten(line)!r}")
    return Example(text, label)


def read_examples(path: str | Path) -> list[Example]:
    """Every example of one file; raises DataError for unreadable, malformed or empty files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        parse = _parse_jsonl_line
    elif suffix in TSV_SUFFIXES:
        parse = _parse_tsv_line
    else:
        raise DataError(
            f"{path}: unknown data format {suffix or '(no suffix)'!r}; expected .jsonl/.json "
            '({"text", "label"} per line) or .tsv/.txt (label<TAB>text per line)'
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc

    examples: list[Example] = []
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if not line.strip():
            continue
        example = parse(line.rstrip("\r"), where)
        text, label = " ".join(example.text.split()), example.label.strip()
        if not text:
            raise DataError(f"{where}: empty text")
        if not label:
            raise DataError(f"{where}: empty label")
        examples.append(Example(text, label))
    if not examples:
        raise DataError(f"{path}: the file holds no examples")
    return examples


def find_split_file(directory: Path, split: str) -> Path | None:
    """``<split>.jsonl``/``.json``/``.tsv``/``.txt`` in ``directory``; two candidates is an error."""
    found = [directory / f"{split}{s}" for s in (*JSONL_SUFFIXES, *TSV_SUFFIXES)]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise DataError(f"{directory}: several {split} files {[p.name for p in found]}; keep one")
    return found[0] if found else None


def _read_label_list(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the label list: {exc}") from exc
    if isinstance(value, dict) and "labels" in value:
        value = value["labels"]  # other keys (glosses, notes) are for people
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f'{path}: expected a JSON list of non-empty label strings (or {{"labels": [...]}})')
    dupes = sorted(label for label, n in Counter(value).items() if n > 1)
    if dupes:
        raise DataError(f"{path}: duplicate labels {dupes[:_SHOWN]}")
    return [v.strip() for v in value]


def _show_labels(counts: Counter[str]) -> str:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:_SHOWN]
    shown = [f"{label!r} ({n})" for label, n in ranked]
    more = len(counts) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def check_labels(examples: Sequence[Example], labels: Sequence[str], where: str) -> None:
    """Raise DataError listing every label in ``examples`` that is not one of ``labels``."""
    known = set(labels)
    unknown = Counter(e.label for e in examples if e.label not in known)
    if unknown:
        raise DataError(
            f"{where} has labels the task does not know: {_show_labels(unknown)}; "
            f"known labels: {list(labels)[: _SHOWN * 3]}"
        )


def stratified_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(kept, held_out): ``fraction`` of each label held out, at least one for labels with 2+ rows."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    kept: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_label):
        rows = list(by_label[label])
        rng.shuffle(rows)
        n = round(len(rows) * fraction)
        # A label with one row stays in train: a dev-only label could never be predicted.
        n = min(max(n, 1), len(rows) - 1) if len(rows) > 1 else 0
        held.extend(rows[:n])
        kept.extend(rows[n:])
    rng.shuffle(kept)
    rng.shuffle(held)
    return kept, held


def cap_rows(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """At most ``limit`` rows, sampled per label in proportion (every label keeps at least one)."""
    if len(examples) <= limit:
        return list(examples)
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    total = len(examples)
    out: list[Example] = []
    for label in sorted(by_label):
        rows = list(by_label[label])
        rng.shuffle(rows)
        out.extend(rows[: max(1, round(len(rows) * limit / total))])
    rng.shuffle(out)
    return out[:limit] if len(out) > limit else out


def load_task_data(
    path: str | Path,
    *,
    dev_fraction: float = 0.1,
    seed: int = 0,
    max_train_rows: int | None = None,
) -> TaskData:
    """Read a data directory (train/dev/test files) or one train file, and check it is trainable."""
    path = Path(path)
    notes: list[str] = []
    label_list: list[str] | None = None
    test: list[Example] = []
    if path.is_dir():
        train_file = find_split_file(path, "train")
        if train_file is None:
            raise DataError(
                f"{path}: no train file; expected train.jsonl or train.tsv "
                "(and optionally dev.* and test.*) in the directory"
            )
        train = read_examples(train_file)
        dev_file = find_split_file(path, "dev")
        test_file = find_split_file(path, "test")
        dev = read_examples(dev_file) if dev_file is not None else []
        test = read_examples(test_file) if test_file is not None else []
        if (path / "labels.json").is_file():
            label_list = _read_label_list(path / "labels.json")
        source = str(path)
    elif path.exists():
        train_file, dev_file, test_file = path, None, None
        train, dev = read_examples(path), []
        source = str(path)
    else:
        raise DataError(f"{path}: no such file or directory")

    labels = label_list if label_list is not None else sorted({e.label for e in train})
    if label_list is not None:
        check_labels(train, label_list, f"{train_file} (checked against labels.json)")
    present = {e.label for e in train}
    if len(present) < 2:
        only = next(iter(present))
        raise DataError(
            f"{train_file}: every example has the label {only!r}; a classifier needs at least two labels"
        )
    if not dev:
        if len(train) < 4:
            raise DataError(f"{train_file}: {len(train)} examples are too few to split a dev set off")
        train, dev = stratified_split(train, dev_fraction, seed)
        notes.append(f"dev set: {len(dev)} rows split off the train file ({dev_fraction:.0%}, seed {seed})")
    else:
        check_labels(dev, labels, str(dev_file))
    if test:
        check_labels(test, labels, str(test_file))
    if max_train_rows is not None and len(train) > max_train_rows:
        notes.append(f"train capped from {len(train)} to {max_train_rows} rows (stratified, seed {seed})")
        train = cap_rows(train, max_train_rows, seed)
    return TaskData(labels=labels, train=train, dev=dev, test=test, source=source, notes=notes)
