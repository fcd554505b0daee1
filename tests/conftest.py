from __future__ import annotations

import os
from pathlib import Path

import pytest

# No code path may reach a hub; make any accidental attempt fail loudly instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Auth is on by default and needs keys. Tests of other parts build apps (and start `ptserve serve`
# subprocesses, which inherit this) without keys; tests of auth pass auth="on" and keys explicitly.
os.environ.setdefault("PTSERVE_AUTH", "off")

from prompts.backbone import Backbone, load_backbone
from tests.models import make_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def backbone(tiny_bert_dir: Path) -> Backbone:
    return load_backbone(tiny_bert_dir)
