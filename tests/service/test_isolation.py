"""A bad request never hurts others: good and bad requests for many tasks, all at once.

Good requests for eight tasks of every prompt kind are first sent one at a time (their reference
answers), then again, shuffled among bad ones, from 24 threads at once: unknown tasks, over-long
texts, malformed and mistyped bodies, texts with nothing to classify, and a task whose stored
artifact is corrupt on disk (its load fails with 409 on every request). Every good request must get
exactly its reference answer, every bad one its own error, and the good ones must have shared
forward passes (mixed batches), so the bad ones really ran among them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from prompts.disk_store import DiskPromptStore
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.factories import random_artifact

TEXTS = [
    "great phone with a fast screen",
    "the shirt color is red",
    "refund please, it is broken",
    "what is the price of this laptop",
    "free offer call now",
    "hello world",
]
BROKEN = "broken"


@dataclass(frozen=True)
class Call:
    """One request: a JSON body (or raw bytes), and what must come back."""

    body: Any
    status: int
    code: str = ""  # error code for refusals
    raw: bool = False


def _artifacts(backbone: Backbone) -> list[PromptArtifact]:
    spec = backbone.spec
    return [
        random_artifact(spec, task="prefix", num_labels=2, prefix_length=4, seed=1),
        random_artifact(spec, task="prefix_long", num_labels=5, prefix_length=12, seed=2),
        random_artifact(spec, task="prompt", num_labels=3, prefix_length=0, prompt_length=4, seed=3),
        random_artifact(spec, task="both", num_labels=4, prefix_length=2, prompt_length=2, seed=4),
        random_artifact(spec, task="probe", num_labels=3, prefix_length=0, pooling="mean", seed=5),
        random_artifact(
            spec, task="first", num_labels=2, prefix_length=3, prompt_length=1, pooling="first", seed=6
        ),
        random_artifact(spec, task="zero_pos", num_labels=3, prefix_length=5, positions="from_zero", seed=7),
        random_artifact(spec, task="pooled", num_labels=2, prefix_length=2, pooler="backbone", seed=8),
    ]


@pytest.fixture
def client(tmp_path: Path, backbone: Backbone) -> Iterator[TestClient]:
    root = tmp_path / "store"
    # The corrupt task is written before the service starts, so no replica ever held it in memory.
    store = DiskPromptStore(root)
    broken = random_artifact(backbone.spec, task=BROKEN, seed=9)
    store.put(BROKEN, broken.version, broken.data, broken.manifest_json())
    path = root / "tasks" / BROKEN / "versions" / f"{broken.version}.safetensors"
    path.write_bytes(b"\x00garbage where tensors were" * 10)
    settings = Settings(store=str(root), max_wait_ms=20, max_batch_size=16, max_text_chars=300)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        for artifact in _artifacts(backbone):
            r = c.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)})
            assert r.status_code == 201, r.text
        yield c


def _send(client: TestClient, call: Call) -> Any:
    if call.raw:
        return client.post("/v1/classify", content=call.body, headers={"content-type": "application/json"})
    return client.post("/v1/classify", json=call.body)


def _bad_calls() -> list[Call]:
    return [
        Call({"task": "no_such_task", "text": "hello"}, 404, "task_not_found"),
        Call({"task": "prefix", "text": "long " * 100}, 422, "invalid_input"),
        Call({"task": "prompt", "texts": ["fine", "x" * 301]}, 422, "invalid_input"),
        Call({"task": "both", "text": "\x00\x01\x02"}, 422, "invalid_input"),
        Call({"task": "both", "texts": ["fine", "  "]}, 422, "invalid_input"),
        Call({"task": "prefix", "text": 7}, 422, "invalid_request"),
        Call({"task": "Prefix", "text": "hello"}, 422, "invalid_task_name"),
        Call(b'{"task": "prefix", "text": "unterminated', 422, "invalid_request", raw=True),
        Call(b'{"task": "prefix", "text": "\xff\xfe"}', 422, "invalid_request", raw=True),
        Call({"task": BROKEN, "text": "hello"}, 409, "task_unavailable"),
        Call({"task": BROKEN, "texts": ["hello", "world"]}, 409, "task_unavailable"),
    ]


def test_good_requests_get_their_own_answers_among_bad_ones(client: TestClient, backbone: Backbone) -> None:
    tasks = [a.task for a in _artifacts(backbone)]
    good = [Call({"task": t, "text": text}, 200) for t in tasks for text in TEXTS]
    good += [
        Call({"task": t, "texts": [TEXTS[(i + k) % len(TEXTS)] for k in range(3)]}, 200)
        for i, t in enumerate(tasks)
    ]

    # Reference answers: each good request alone, one at a time.
    alone = {}
    for call in good:
        r = _send(client, call)
        assert r.status_code == 200, r.text
        alone[json.dumps(call.body)] = r.json()

    calls = good + _bad_calls() * 4
    random.Random(0).shuffle(calls)
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    batches_before = runtime.engine.batches
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda call: _send(client, call), calls))

    for call, r in zip(calls, responses, strict=True):
        assert r.status_code == call.status, (call.body, r.text)
        if call.status != 200:
            assert r.json()["error"]["code"] == call.code, (call.body, r.text)
            continue
        got, ref = r.json(), alone[json.dumps(call.body)]
        assert got["version"] == ref["version"]
        assert len(got["results"]) == len(ref["results"])
        for result, reference in zip(got["results"], ref["results"], strict=True):
            assert result["label"] == reference["label"], call.body
            assert result["scores"].keys() == reference["scores"].keys()
            for label, p in reference["scores"].items():
                assert result["scores"][label] == pytest.approx(p, abs=1e-5), (call.body, label)
    # The good rows shared forward passes with each other while the bad requests came and went.
    good_rows = sum(len(c.body.get("texts", [None])) for c in good)
    assert runtime.engine.batches - batches_before < good_rows
    # The corrupt task stays refused and nothing else changed.
    assert client.post("/v1/classify", json={"task": BROKEN, "text": "x"}).status_code == 409
    listed = {t["task"] for t in client.get("/v1/prompts").json()["tasks"]}
    assert listed == {*tasks, BROKEN}
