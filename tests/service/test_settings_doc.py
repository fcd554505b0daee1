from __future__ import annotations

import re
from pathlib import Path

from service.cli import REPO_ROOT
from service.settings import Settings
from service.settings_doc import END, START, main, settings_table, with_table

README = REPO_ROOT / "README.md"


def test_readme_settings_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    assert with_table(text) == text, "stale README settings table: python -m service.settings_doc --write"
    assert main([str(README), "--check"]) == 0


def test_table_lists_every_setting_and_no_other() -> None:
    text = README.read_text(encoding="utf-8")
    table = text[text.index(START) : text.index(END)]
    documented = re.findall(r"^\| `PTSERVE_([A-Z0-9_]+)` \|", table, flags=re.M)
    assert [name.lower() for name in documented] == list(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"


def test_check_fails_on_a_stale_table(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{START}\n| old |\n{END}\noutro\n", encoding="utf-8")
    assert main([str(stale), "--check"]) == 1
    assert main([str(stale), "--write"]) == 0
    assert stale.read_text(encoding="utf-8") == f"intro\n{START}\n{settings_table()}\n{END}\noutro\n"
    assert main([str(stale), "--check"]) == 0
