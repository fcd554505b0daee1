"""benchmarks/ab_http.py: which point of a perf_http report a run is judged by, and the ratio summary."""

from __future__ import annotations

import math

import pytest

from benchmarks.ab_http import best_closed, spread


def _point(shape: str, mode: str, rows: float, raw: float) -> dict[str, object]:
    return {"shape": shape, "mode": mode, "rows_per_s": rows, "raw_adjacent": raw, "p99_ms": 10.0}


def test_best_closed_takes_the_fastest_closed_point_of_the_shape() -> None:
    report = {
        "points": [
            _point("single", "closed", 90.0, 100.0),
            _point("single", "closed", 120.0, 130.0),
            _point("single", "open", 500.0, math.nan),  # open loop: never the judge
            _point("batch", "closed", 300.0, 310.0),
        ]
    }
    assert best_closed(report, "single") == {"rows_per_s": 120.0, "raw_adjacent": 130.0, "p99_ms": 10.0}
    assert best_closed(report, "batch")["rows_per_s"] == 300.0


def test_spread_of_ratios() -> None:
    summary = spread([0.5, 2.0, 1.0])
    assert summary["median"] == 1.0
    assert summary["geomean"] == pytest.approx(1.0)  # 0.5 and 2.0 cancel
    assert (summary["min"], summary["max"]) == (0.5, 2.0)
