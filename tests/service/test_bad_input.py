"""Every kind of bad input over HTTP: the exact status, a message naming the problem, and a healthy service.

One app (default text limits, a 1 MiB artifact limit so "oversize" is cheap) serves one good task for
the whole module; after each refusal the good task still answers with exactly its expected
probabilities and the store still holds only its version. Training-job inputs are tested with the
jobs API. The artifact checks themselves are unit-tested in tests/prompts/test_artifact.py; here they
are reached end to end through ``POST /v1/prompts``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone, load_backbone
from prompts.forward import TaskPrompt, prompted_forward
from service.app import create_app
from service.settings import Settings
from tests.factories import forge_artifact, random_artifact
from tests.models import make_tiny_bert

GOOD = "good"
GOOD_TEXT = "the battery of this phone is great"
ARTIFACT_LIMIT = 1024 * 1024
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def good(backbone: Backbone) -> PromptArtifact:
    # prefix [2, 2, 4, 4, 8], prompt [2, 32], head [3, 32] and [3] on the tiny backbone
    return random_artifact(backbone.spec, task=GOOD, num_labels=3, prefix_length=4, prompt_length=2, seed=7)


@pytest.fixture(scope="module")
def expected(backbone: Backbone, good: PromptArtifact) -> list[float]:
    prompt = TaskPrompt.from_artifact(good, backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode([GOOD_TEXT], backbone.spec.max_positions)]
    with torch.inference_mode():
        return [float(p) for p in torch.softmax(prompted_forward(backbone, ids, [prompt]), -1)[0]]


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, backbone: Backbone, good: PromptArtifact
) -> Iterator[TestClient]:
    settings = Settings(
        store=str(tmp_path_factory.mktemp("bad-input") / "store"),
        max_wait_ms=1,
        max_artifact_bytes=ARTIFACT_LIMIT,
    )
    assert (settings.max_text_chars, settings.max_texts_per_request) == (20_000, 256)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        assert upload(c, good.data).status_code == 201
        yield c


def upload(client: TestClient, data: bytes) -> Any:
    return client.post("/v1/prompts", files={"file": ("task.safetensors", data, "application/octet-stream")})


def assert_error(response: Any, status: int, code: str, *fragments: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_healthy(client: TestClient, good: PromptArtifact, expected: list[float]) -> None:
    """The good task answers exactly as before and the store holds only its version."""
    r = client.post("/v1/classify", json={"task": GOOD, "text": GOOD_TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == good.version
    scores = body["results"][0]["scores"]
    for i, p in enumerate(expected):
        assert scores[f"label_{i}"] == pytest.approx(p, abs=1e-5)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    listed = client.get("/v1/prompts").json()["tasks"]
    assert [(t["task"], t["version"], t["versions"]) for t in listed] == [
        (GOOD, good.version, [good.version])
    ]


# --------------------------------------------------------------------------------------- classify bodies

CONTROL_ONLY = "\x00\x01\x02\x07\x7f"  # not whitespace to str.strip(), and no tokens either
FORMAT_ONLY = "\u200b\u200d\ufeff"  # zero-width characters: no tokens

JSON_CASES = [
    # wrong types
    pytest.param(
        {"task": GOOD, "text": 5},
        422,
        "invalid_request",
        ["text: Input should be a valid string"],
        id="text-not-string",
    ),
    pytest.param(
        {"task": GOOD, "texts": "hello"},
        422,
        "invalid_request",
        ["texts: Input should be a valid list"],
        id="texts-not-list",
    ),
    pytest.param(
        {"task": GOOD, "texts": ["ok", 3]},
        422,
        "invalid_request",
        ["texts.1", "valid string"],
        id="texts-item-not-string",
    ),
    pytest.param(
        {"task": 5, "text": "hi"},
        422,
        "invalid_request",
        ["task: Input should be a valid string"],
        id="task-not-string",
    ),
    pytest.param(
        {"task": GOOD, "text": "hi", "top_k": "2"},
        422,
        "invalid_request",
        ["top_k", "valid integer"],
        id="top-k-string",
    ),
    pytest.param(
        {"task": GOOD, "text": "hi", "top_k": True},
        422,
        "invalid_request",
        ["top_k", "valid integer"],
        id="top-k-bool",
    ),
    pytest.param(
        {"task": GOOD, "text": "hi", "top_k": 2.0},
        422,
        "invalid_request",
        ["top_k", "valid integer"],
        id="top-k-float",
    ),
    pytest.param(
        {"task": GOOD, "text": "hi", "top_k": 0},
        422,
        "invalid_request",
        ["top_k", "greater than or equal to 1"],
        id="top-k-zero",
    ),
    pytest.param([GOOD, "hi"], 422, "invalid_request", ["body", "JSON object"], id="body-is-list"),
    pytest.param("hi", 422, "invalid_request", ["body", "JSON object"], id="body-is-string"),
    pytest.param(
        {"task": GOOD, "text": "hi", "lang": "en"},
        422,
        "invalid_request",
        ["lang", "Extra inputs"],
        id="unknown-field",
    ),
    # missing parts
    pytest.param({"text": "hi"}, 422, "invalid_request", ["task: Field required"], id="missing-task"),
    pytest.param(
        {"task": GOOD}, 422, "invalid_request", ["exactly one of 'text' or 'texts'"], id="missing-text"
    ),
    pytest.param(
        {"task": GOOD, "text": "a", "texts": ["b"]},
        422,
        "invalid_request",
        ["exactly one of"],
        id="text-and-texts",
    ),
    pytest.param(
        {"task": GOOD, "texts": []},
        422,
        "invalid_request",
        ["'texts' must hold at least one text"],
        id="no-texts",
    ),
    # texts
    pytest.param(
        {"task": GOOD, "text": ""}, 422, "invalid_input", ["text is empty or whitespace only"], id="empty"
    ),
    pytest.param(
        {"task": GOOD, "text": " \t\n\r\u3000 "},
        422,
        "invalid_input",
        ["text is empty or whitespace only"],
        id="whitespace",
    ),
    pytest.param(
        {"task": GOOD, "texts": ["fine", "  "]},
        422,
        "invalid_input",
        ["texts[1] is empty"],
        id="one-empty-of-many",
    ),
    pytest.param(
        {"task": GOOD, "text": "x" * 1_000_000},
        422,
        "invalid_input",
        ["text has 1000000 characters; the limit is 20000"],
        id="1-mb",
    ),
    pytest.param(
        {"task": GOOD, "text": CONTROL_ONLY},
        422,
        "invalid_input",
        ["text has no tokens to classify", "control"],
        id="control-only",
    ),
    pytest.param(
        {"task": GOOD, "text": FORMAT_ONLY},
        422,
        "invalid_input",
        ["text has no tokens to classify"],
        id="format-only",
    ),
    pytest.param(
        {"task": GOOD, "texts": ["fine", CONTROL_ONLY]},
        422,
        "invalid_input",
        ["texts[1] has no tokens"],
        id="control-among-good",
    ),
    pytest.param(
        {"task": GOOD, "texts": ["hi"] * 10_000},
        422,
        "invalid_input",
        ["10000 texts in one request; the limit is 256"],
        id="10000-texts",
    ),
    # tasks
    pytest.param(
        {"task": "nope", "text": "hi"}, 404, "task_not_found", ["unknown task 'nope'"], id="unknown-task"
    ),
    pytest.param(
        {"task": "team/good/x", "text": "hi"},
        422,
        "invalid_task_name",
        ["invalid task name 'team/good/x'", "after a tenant and a '/'"],
        id="task-slashes",
    ),
    pytest.param(
        {"task": "team/good", "text": "hi"},
        404,
        "task_not_found",
        ["unknown task 'team/good'"],
        id="task-tenant",
    ),
    pytest.param(
        {"task": "..", "text": "hi"}, 422, "invalid_task_name", ["invalid task name '..'"], id="task-dotdot"
    ),
    pytest.param(
        {"task": "../../etc/passwd", "text": "hi"},
        422,
        "invalid_task_name",
        ["'../../etc/passwd'"],
        id="task-traversal",
    ),
    pytest.param(
        {"task": "Good", "text": "hi"},
        422,
        "invalid_task_name",
        ["invalid task name 'Good'"],
        id="task-upper",
    ),
    pytest.param(
        {"task": "a" * 65, "text": "hi"},
        422,
        "invalid_task_name",
        ["(65 characters)", "1-64 characters"],
        id="task-65",
    ),
    pytest.param(
        {"task": "", "text": "hi"}, 422, "invalid_task_name", ["invalid task name ''"], id="task-empty"
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "fragments"), JSON_CASES)
def test_classify_refuses_bad_json_bodies(
    client: TestClient,
    good: PromptArtifact,
    expected: list[float],
    body: Any,
    status: int,
    code: str,
    fragments: list[str],
) -> None:
    assert_error(client.post("/v1/classify", json=body), status, code, *fragments)
    assert_healthy(client, good, expected)


RAW_CASES = [
    pytest.param(
        b'{"task": "good", "text": ',
        "application/json",
        422,
        "invalid_request",
        ["body is not valid JSON", "at character"],
        id="truncated-json",
    ),
    pytest.param(
        b"task=good&text=hi",
        "application/json",
        422,
        "invalid_request",
        ["body is not valid JSON: Expecting value at character 0"],
        id="not-json",
    ),
    pytest.param(
        b'{"task": "good", "text": "caf\xe9 \xff\xfe"}',
        "application/json",
        422,
        "invalid_request",
        ["not valid UTF-8", "0xe9"],
        id="invalid-utf8",
    ),
    pytest.param(
        b'{"task": "good", "text": "a\\ud800b"}',
        "application/json",
        422,
        "invalid_input",
        ["text is not valid Unicode", "unpaired surrogate"],
        id="lone-surrogate",
    ),
    pytest.param(b"", "application/json", 422, "invalid_request", ["body: Field required"], id="empty-body"),
    pytest.param(
        b'{"task": "good", "text": "hi"}',
        "text/plain",
        422,
        "invalid_request",
        ["JSON object", "application/json"],
        id="not-declared-json",
    ),
]


@pytest.mark.parametrize(("content", "content_type", "status", "code", "fragments"), RAW_CASES)
def test_classify_refuses_bodies_that_are_not_json(
    client: TestClient,
    good: PromptArtifact,
    expected: list[float],
    content: bytes,
    content_type: str,
    status: int,
    code: str,
    fragments: list[str],
) -> None:
    r = client.post("/v1/classify", content=content, headers={"content-type": content_type})
    assert_error(r, status, code, *fragments)
    assert_healthy(client, good, expected)


def test_a_text_with_some_control_characters_is_still_classified(client: TestClient) -> None:
    r = client.post("/v1/classify", json={"task": GOOD, "texts": [f"great{CONTROL_ONLY} phone", "ok\u200b"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2


# ----------------------------------------------------------------------------------- task names in paths

# Percent-escapes travel as written; the server decodes them before routing.
PATH_CASES = [
    # One '/' separates a tenant from its task; more are no route at all.
    pytest.param("team/good", 404, "task_not_found", ["unknown task 'team/good'"], id="tenant"),
    pytest.param("team%2Fgood", 404, "task_not_found", ["unknown task 'team/good'"], id="encoded-slash"),
    pytest.param(
        "team/good/x",
        404,
        "not_found",
        ["no route for {method} /v1/prompts/team/good/x", "(no other '/')"],
        id="slashes",
    ),
    pytest.param(
        "..%2F..%2Fetc", 404, "not_found", ["/v1/prompts/../../etc", "(no other '/')"], id="traversal"
    ),
    pytest.param("..%2Fetc", 422, "invalid_task_name", ["invalid task name '../etc'"], id="traversal-tenant"),
    pytest.param("%2E%2E", 422, "invalid_task_name", ["invalid task name '..'"], id="dotdot"),
    pytest.param("%2E", 422, "invalid_task_name", ["invalid task name '.'"], id="dot"),
    pytest.param("Good", 422, "invalid_task_name", ["invalid task name 'Good'"], id="upper"),
    pytest.param("a" * 65, 422, "invalid_task_name", ["(65 characters)", "1-64 characters"], id="65-chars"),
    pytest.param("my%20task", 422, "invalid_task_name", ["invalid task name 'my task'"], id="space"),
    pytest.param("nope", 404, "task_not_found", ["unknown task 'nope'"], id="unknown"),
]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(("raw_name", "status", "code", "fragments"), PATH_CASES)
def test_bad_task_names_in_prompt_paths(
    client: TestClient,
    good: PromptArtifact,
    expected: list[float],
    method: str,
    raw_name: str,
    status: int,
    code: str,
    fragments: list[str],
) -> None:
    r = client.request(method, f"/v1/prompts/{raw_name}")
    assert_error(r, status, code, *(f.format(method=method) for f in fragments))
    assert_healthy(client, good, expected)


# ---------------------------------------------------------------------------------------------- uploads


def _set(key: str, value: Any) -> Any:
    def edit(manifest: dict[str, Any], tensors: Tensors) -> None:
        manifest[key] = value

    return edit


def _tensor(name: str, value: torch.Tensor) -> Any:
    def edit(manifest: dict[str, Any], tensors: Tensors) -> None:
        tensors[name] = value

    return edit


def _poison(name: str, value: float) -> Any:
    def edit(manifest: dict[str, Any], tensors: Tensors) -> None:
        tensors[name].view(-1)[1] = value

    return edit


def _labels_without_rows(manifest: dict[str, Any], tensors: Tensors) -> None:
    manifest["labels"] = [*manifest["labels"], "label_3"]


def _fingerprint(manifest: dict[str, Any], tensors: Tensors) -> None:
    manifest["backbone"] = {**manifest["backbone"], "fingerprint": "bert-L2-H32-0123456789abcdef"}


Upload = tuple[str, bytes, int, str, list[str]]


def _bad_uploads(good: PromptArtifact, other_backbone: Backbone) -> list[Upload]:
    """(case, bytes, status, code, message fragments) for every kind of bad artifact."""
    foreign = random_artifact(other_backbone.spec, task="foreign", seed=3)
    return [
        (
            "not-safetensors",
            b"label,text\nphone,great battery\n",
            422,
            "invalid_artifact",
            ["not a safetensors file"],
        ),
        ("truncated", good.data[: len(good.data) - 100], 422, "invalid_artifact", ["truncated"]),
        ("header-only", good.data[:64], 422, "invalid_artifact", ["not a safetensors file (or truncated)"]),
        ("zero-bytes", b"", 422, "invalid_artifact", ["the upload is empty (0 bytes)"]),
        ("pickle", pickle.dumps({"prefix": [0.0] * 16}), 422, "invalid_artifact", ["pickle", "never loaded"]),
        (
            "wrong-shape",
            forge_artifact(good, _tensor("prompt", torch.zeros(2, 16))),
            422,
            "invalid_artifact",
            ["tensor 'prompt' has shape [2, 16]; the manifest implies [2, 32]"],
        ),
        (
            "wrong-dtype",
            forge_artifact(good, _tensor("head.bias", torch.arange(3))),
            422,
            "invalid_artifact",
            ["tensor 'head.bias' has dtype torch.int64", "expected float32, float16 or bfloat16"],
        ),
        (
            "float64",
            forge_artifact(good, _tensor("head.bias", torch.zeros(3, dtype=torch.float64))),
            422,
            "invalid_artifact",
            ["dtype torch.float64"],
        ),
        (
            "nan",
            forge_artifact(good, _poison("prefix", float("nan"))),
            422,
            "invalid_artifact",
            ["tensor 'prefix' holds 1 non-finite values (NaN or Inf)"],
        ),
        (
            "inf",
            forge_artifact(good, _poison("head.weight", float("inf"))),
            422,
            "invalid_artifact",
            ["tensor 'head.weight' holds 1 non-finite values"],
        ),
        (
            "head-rows-not-labels",
            forge_artifact(good, _labels_without_rows),
            422,
            "invalid_artifact",
            ["tensor 'head.weight' has shape [3, 32]; the manifest implies [4, 32]"],
        ),
        (
            "duplicate-labels",
            forge_artifact(good, _set("labels", ["yes", "no", "yes"])),
            422,
            "invalid_artifact",
            ["duplicate labels: ['yes']"],
        ),
        (
            "prefix-length-lies",
            forge_artifact(good, _set("prefix_length", 9)),
            422,
            "invalid_artifact",
            ["tensor 'prefix' has shape [2, 2, 4, 4, 8]; the manifest implies [2, 2, 4, 9, 8]"],
        ),
        (
            "prompt-length-lies",
            forge_artifact(good, _set("prompt_length", 0)),
            422,
            "invalid_artifact",
            ["tensor names do not match", "unexpected ['prompt']"],
        ),
        (
            "version-lies",
            forge_artifact(good, _set("version", "0123456789abcdef"), rehash=False),
            422,
            "invalid_artifact",
            ["does not match the content hash", "edited after export"],
        ),
        (
            "task-name-traversal",
            forge_artifact(good, _set("task", "../good")),
            422,
            "invalid_artifact",
            ["invalid task name '../good'"],
        ),
        (
            "other-backbone",
            foreign.data,
            422,
            "incompatible_artifact",
            [f"trained on backbone {other_backbone.spec.fingerprint}", "different weights"],
        ),
        (
            "forged-fingerprint",
            forge_artifact(good, _fingerprint),
            422,
            "incompatible_artifact",
            ["bert-L2-H32-0123456789abcdef", "different weights"],
        ),
        (
            "oversize",
            good.data + b" " * ARTIFACT_LIMIT,
            413,
            "artifact_too_large",
            [f"limit of {ARTIFACT_LIMIT} bytes"],
        ),
    ]


def test_bad_uploads_are_refused_and_change_nothing(
    client: TestClient, good: PromptArtifact, expected: list[float], tmp_path: Path
) -> None:
    other = load_backbone(make_tiny_bert(tmp_path / "other-weights", seed=1))
    cases = _bad_uploads(good, other)
    for name, data, status, code, fragments in cases:
        try:
            assert_error(upload(client, data), status, code, *fragments)
            assert_healthy(client, good, expected)
        except AssertionError as exc:
            raise AssertionError(f"upload case {name!r}: {exc}") from exc
    assert len(cases) == 19


def test_uploads_without_a_file(client: TestClient, good: PromptArtifact, expected: list[float]) -> None:
    r = client.post("/v1/prompts", data={"nothing": "here"})
    assert_error(r, 422, "invalid_request", "file: Field required")
    r = client.post("/v1/prompts", content=b"\x00" * 64, headers={"content-type": "multipart/form-data"})
    assert_error(r, 422, "invalid_request", "request body could not be parsed")
    r = client.post(
        "/v1/prompts",
        content=b"--xx\r\nbroken header\r\n\r\nabc\r\n--xx--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    assert_error(r, 422, "invalid_request", "request body could not be parsed")
    assert_healthy(client, good, expected)
