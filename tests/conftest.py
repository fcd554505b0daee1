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

from collections.abc import Callable, Iterator

import torch

from prompts.backbone import Backbone, load_backbone
from tests.models import (
    make_tiny_bert,
    make_tiny_bert_mlm,
    make_tiny_deberta,
    make_tiny_decoder,
    make_tiny_modernbert,
    make_tiny_roberta,
)

# One tiny random model per architecture ptserve runs (tests/models.py), by name.
KINDS = ("bert", "roberta", "llama", "mistral", "qwen2", "qwen3", "deberta-v3", "deberta-v2", "modernbert")
DECODER_KINDS = ("llama", "mistral", "qwen2", "qwen3")


def make_kind(kind: str, directory: Path) -> Path:
    if kind == "bert":
        return make_tiny_bert(directory)
    if kind == "roberta":
        return make_tiny_roberta(directory)
    if kind in DECODER_KINDS:
        return make_tiny_decoder(directory, kind)
    if kind == "deberta-v3":
        return make_tiny_deberta(directory)
    if kind == "deberta-v2":
        return make_tiny_deberta(directory, v2=True)
    if kind == "modernbert":
        return make_tiny_modernbert(directory)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``),
    restored after. Tiny models are all thread overhead: one thread runs them many times faster on a
    busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def backbone(tiny_bert_dir: Path) -> Backbone:
    return load_backbone(tiny_bert_dir)


@pytest.fixture(scope="session")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertForMaskedLM (a backbone the verbalizer head can use)."""
    return make_tiny_bert_mlm(tmp_path_factory.mktemp("models") / "mlm", initializer_range=0.2)


@pytest.fixture(scope="session")
def mlm_backbone(mlm_dir: Path) -> Backbone:
    return load_backbone(mlm_dir)


@pytest.fixture(scope="session")
def kind_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The directory of one tiny model per kind (KINDS), written once per session."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_kind(kind, tmp_path_factory.mktemp("kinds") / kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def kind_backbone(kind_dir: Callable[[str], Path]) -> Callable[[str], Backbone]:
    """One loaded backbone per kind, shared by the session (frozen: tests never change it)."""
    loaded: dict[str, Backbone] = {}

    def get(kind: str) -> Backbone:
        if kind not in loaded:
            loaded[kind] = load_backbone(kind_dir(kind))
        return loaded[kind]

    return get
