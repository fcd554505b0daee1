"""Accuracy, macro-F1, per-class scores and the confusion matrix, against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompts.metrics import evaluate, format_confusion, format_report, save_confusion_png

LABELS = ["a", "b", "c"]


def test_scores_match_hand_computation() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    report = evaluate(y_true, y_pred, LABELS)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = (report.per_class[x] for x in LABELS)
    assert (a.precision, a.recall, a.support) == (1.0, pytest.approx(2 / 3), 3)
    assert a.f1 == pytest.approx(0.8)
    assert (b.precision, b.recall, b.f1) == (0.5, 0.5, 0.5)
    assert (c.precision, c.recall) == (0.5, 1.0) and c.f1 == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report.as_dict()["per_class_f1"]["b"] == 0.5


def test_labels_absent_from_both_sides_do_not_count_in_macro_f1() -> None:
    report = evaluate([0, 1], [0, 1], [*LABELS, "never"])
    assert report.macro_f1 == 1.0 and report.per_class["never"].support == 0


def test_text_reports_and_png(tmp_path: Path) -> None:
    report = evaluate([0, 1, 2, 2], [0, 1, 2, 1], ["phone", "laptop", "kitchen"])
    text = format_report(report)
    assert "accuracy  0.7500" in text and "kitchen" in text and "support" in text
    confusion = format_confusion(report)
    assert confusion.splitlines()[3].split() == ["kitchen", "0", "1", "1"]
    assert "0=phone" in confusion
    png = save_confusion_png(report, tmp_path / "out" / "cm.png", title="demo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        evaluate([0, 1], [0], LABELS)
