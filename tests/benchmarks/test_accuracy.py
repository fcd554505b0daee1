"""benchmarks/accuracy.py's options: the probe's head is chosen, and a parallel run's children get it."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.accuracy import _child_argv, parse_args


def test_the_probe_head_option_reaches_every_child_and_refuses_unknown_heads(tmp_path: Path) -> None:
    common = ["--data-root", str(tmp_path), "--out", str(tmp_path)]
    args = parse_args([*common, "--probe-head", "trained", "--probe-epochs", "50"])
    argv = _child_argv(args, "trec", "probe", tmp_path / "runs" / "trec-probe")
    assert argv[argv.index("--probe-head") + 1] == "trained"
    assert argv[argv.index("--probe-epochs") + 1] == "50"
    # Unset: the trainer's default head, and no flag, so a resumed run keeps earlier results only if
    # they were made the same way.
    default = _child_argv(parse_args(common), "trec", "probe", tmp_path / "r")
    assert "--probe-head" not in default
    with pytest.raises(SystemExit):
        parse_args([*common, "--probe-head", "fitted"])
