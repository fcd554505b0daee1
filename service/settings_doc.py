"""The README's settings table, generated from :class:`service.settings.Settings`.

``python -m service.settings_doc --write README.md`` rewrites the table between its markers;
``--check`` exits 1 when it is stale (tests/service/test_settings_doc.py runs the same comparison).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from service.cli import SERVE_FLAGS
from service.settings import Settings

START = "<!-- settings-table:start (generated: python -m service.settings_doc --write README.md) -->"
END = "<!-- settings-table:end -->"
_MIB = 1024 * 1024


def _default(name: str, value: Any) -> str:
    if value is None or value == [] or value is PydanticUndefined:
        return "–"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and name.endswith("_bytes") and value >= _MIB and value % _MIB == 0:
        return f"`{value}` ({value // _MIB} MiB)"
    return f"`{value}`"


def settings_table() -> str:
    """One markdown row per Settings field, in declaration order."""
    flags = {dest: flag for flag, dest, _, _ in SERVE_FLAGS}
    rows = ["| setting | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        flag = f"`{flags[name]}`" if name in flags else ""
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `PTSERVE_{name.upper()}` | {flag} | {_default(name, default)} | {text} |")
    return "\n".join(rows)


def with_table(readme: str) -> str:
    """``readme`` with the text between the markers replaced by the current table."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the README has no settings-table markers ({START} ... {END})")
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("readme", type=Path, nargs="?", default=Path("README.md"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when the table is stale")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(settings_table())
        return 0
    text = args.readme.read_text(encoding="utf-8")
    updated = with_table(text)
    if args.write:
        args.readme.write_text(updated, encoding="utf-8")
    elif updated != text:
        print(f"{args.readme}: the settings table is stale; run python -m service.settings_doc --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
