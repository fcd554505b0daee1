"""Classification metrics (accuracy, macro-F1, per-class scores, confusion matrix) and their reports.

Plain Python on label indices: the service and the benchmarks need no scikit-learn for this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ClassReport", "Report", "evaluate", "format_confusion", "format_report", "save_confusion_png"]


@dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Report:
    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassReport]
    confusion: list[list[int]]  # [true label][predicted label]
    count: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the shape stored in an artifact's ``metrics``."""
        return {
            "accuracy": round(self.accuracy, 6),
            "macro_f1": round(self.macro_f1, 6),
            "count": self.count,
            "per_class_f1": {label: round(c.f1, 6) for label, c in self.per_class.items()},
        }


def evaluate(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> Report:
    """Scores over ``labels`` (indices into it). Macro-F1 averages the labels present in ``y_true``
    or ``y_pred``: a label that never occurs in an evaluation set cannot be scored, and counting it
    as 0 would punish a small dev set for what it lacks."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred, strict=True):
        confusion[t][p] += 1
    per_class: dict[str, ClassReport] = {}
    f1s: list[float] = []
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(confusion[r][i] for r in range(n))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = ClassReport(precision, recall, f1, support)
        if support or predicted:
            f1s.append(f1)
    correct = sum(confusion[i][i] for i in range(n))
    return Report(
        labels=list(labels),
        accuracy=correct / len(y_true) if y_true else 0.0,
        macro_f1=sum(f1s) / len(f1s) if f1s else 0.0,
        per_class=per_class,
        confusion=confusion,
        count=len(y_true),
    )


def format_report(report: Report) -> str:
    """Accuracy, macro-F1 and a per-class precision/recall/F1/support table."""
    width = max([len("label"), *(len(label) for label in report.labels)])
    lines = [
        f"examples  {report.count}",
        f"accuracy  {report.accuracy:.4f}",
        f"macro-F1  {report.macro_f1:.4f}",
        "",
        f"{'label':<{width}}  precision  recall  f1      support",
    ]
    for label, c in report.per_class.items():
        lines.append(f"{label:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:6.4f}  {c.support:7d}")
    return "\n".join(lines)


def format_confusion(report: Report) -> str:
    """The confusion matrix as text: rows are true labels, columns predicted labels (by index)."""
    n = len(report.labels)
    corner = "true \\ pred"
    width = max([len(corner), *(len(label) for label in report.labels)])
    cell = max(3, len(str(max((max(r) for r in report.confusion), default=0))), len(str(n - 1)))
    header = f"{corner:<{width}}  " + " ".join(f"{i:>{cell}d}" for i in range(n))
    lines = [header]
    for i, label in enumerate(report.labels):
        cells = " ".join(f"{v:>{cell}d}" for v in report.confusion[i])
        lines.append(f"{label:<{width}}  {cells}")
    lines.append("columns: " + ", ".join(f"{i}={label}" for i, label in enumerate(report.labels)))
    return "\n".join(lines)


def save_confusion_png(report: Report, path: str | Path, *, title: str = "") -> Path:
    """Write the confusion matrix as a PNG heat map (rows true, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    n = len(report.labels)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    try:
        image = ax.imshow(report.confusion, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), report.labels, rotation=45, ha="right")
        ax.set_yticks(range(n), report.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = max((max(row) for row in report.confusion), default=0)
        if n <= 30:  # numbers in cells stop being readable beyond this
            for i, row in enumerate(report.confusion):
                for j, value in enumerate(row):
                    colour = "white" if top and value > top / 2 else "black"
                    ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
        heading = f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}"
        ax.set_title(f"{title}\n{heading}" if title else heading)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out
