from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from prompts.backbone import Backbone
from service.app import create_app
from service.logs import JsonFormatter, configure_logging, request_id_from
from service.settings import Settings
from tests.factories import random_artifact
from tests.processes import PtserveProcess, clean_environment, free_port


@pytest.fixture
def client(tmp_path: Path, backbone: Backbone) -> Iterator[TestClient]:
    with TestClient(
        create_app(Settings(store=str(tmp_path / "store"), max_wait_ms=1), backbone=backbone)
    ) as c:
        artifact = random_artifact(backbone.spec, task="logged")
        assert c.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code == 201
        yield c


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What the access logger writes, formatted by the JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("ptserve.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_client_request_id_is_echoed(client: TestClient) -> None:
    r = client.post(
        "/v1/classify", json={"task": "logged", "text": "hi"}, headers={"X-Request-ID": "req-42.a"}
    )
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42.a"


@pytest.mark.parametrize("sent", [None, "has spaces in it", "x" * 129, "semi;colon", ""])
def test_missing_or_invalid_request_id_is_replaced_by_a_fresh_one(
    client: TestClient, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    first = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    second = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    assert first != sent and len(first) == 32 and int(first, 16) >= 0
    assert first != second


def test_error_bodies_carry_the_request_id(client: TestClient) -> None:
    r = client.post("/v1/classify", json={"task": "unknown", "text": "hi"}, headers={"X-Request-ID": "e-1"})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "code": "task_not_found",
        "message": r.json()["error"]["message"],
        "request_id": "e-1",
    }
    r = client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["request_id"] == r.headers["X-Request-ID"]
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["request_id"] == r.headers["X-Request-ID"]


def test_one_json_access_line_per_request_with_task_version_status_latency(
    client: TestClient, access_lines: io.StringIO, backbone: Backbone
) -> None:
    version = random_artifact(backbone.spec, task="logged").version
    r = client.post("/v1/classify", json={"task": "logged", "text": "hi"}, headers={"X-Request-ID": "line-1"})
    assert r.status_code == 200
    client.post("/v1/classify", json={"task": "missing", "text": "hi"}, headers={"X-Request-ID": "line-2"})
    lines = parsed(access_lines)
    assert [line["request_id"] for line in lines] == ["line-1", "line-2"]
    ok, missing = lines
    assert ok["logger"] == "ptserve.access" and ok["level"] == "info"
    assert ok["method"] == "POST" and ok["path"] == "/v1/classify" and ok["route"] == "/v1/classify"
    assert ok["task"] == "logged" and ok["version"] == version and ok["status"] == 200
    assert isinstance(ok["latency_ms"], float) and ok["latency_ms"] > 0
    assert "line-1" in ok["message"] and "200" in ok["message"]
    assert missing["status"] == 404 and missing["task"] is None and missing["version"] is None


def test_an_encoded_newline_in_the_path_cannot_forge_a_log_line(
    client: TestClient, access_lines: io.StringIO
) -> None:
    forged = "/x%0A2026-11-23 05:00:00 INFO ptserve.access: POST /v1/prompts 201"
    assert client.get(forged).status_code == 404
    (line,) = parsed(access_lines)  # one line, not two
    assert line["path"].startswith("/x%0A2026") and "\n" not in line["message"]


def test_uploads_are_logged_with_the_uploaded_version(
    client: TestClient, access_lines: io.StringIO, backbone: Backbone
) -> None:
    artifact = random_artifact(backbone.spec, task="logged", seed=9)
    assert client.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code == 201
    (line,) = parsed(access_lines)
    assert (line["task"], line["version"], line["status"]) == ("logged", artifact.version, 201)


def test_configure_logging_routes_uvicorn_through_one_json_handler() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    uv_access = logging.getLogger("uvicorn.access")
    try:
        configure_logging("warning", "json")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        assert root.level == logging.WARNING
        assert (
            logging.getLogger("uvicorn.error").propagate and not logging.getLogger("uvicorn.error").handlers
        )
        assert uv_access.disabled  # the middleware writes the access line
        record = logging.LogRecord(
            "uvicorn.error", logging.WARNING, __file__, 1, "hello %s", ("there",), None
        )
        line = json.loads(handler.format(record))
        assert (
            line["message"] == "hello there"
            and line["level"] == "warning"
            and line["logger"] == "uvicorn.error"
        )
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        uv_access.disabled = False


def test_request_id_header_lookup_is_case_insensitive() -> None:
    assert request_id_from([(b"X-Request-Id", b"abc")]) == "abc"
    assert request_id_from([(b"x-request-id", b"abc\x01")]) != "abc\x01"


@pytest.mark.integration
def test_serve_writes_json_lines_only(tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone) -> None:
    port = free_port()
    env = clean_environment(PTSERVE_LOG_FORMAT="json", PTSERVE_AUTH="off", PTSERVE_MAX_WAIT_MS="1")
    command = ["serve", "--model", str(tiny_bert_dir), "--store", str(tmp_path / "store")]
    command += ["--port", str(port), "--device", "cpu"]
    server = PtserveProcess(command, env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(base)
        artifact = random_artifact(backbone.spec, task="json_logged")
        assert (
            httpx.post(f"{base}/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code
            == 201
        )
        r = httpx.post(
            f"{base}/v1/classify",
            json={"task": "json_logged", "text": "hi"},
            headers={"X-Request-ID": "subproc-1"},
        )
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "subproc-1"
    finally:
        server.stop()
    out = server.output()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line is JSON
    access = [line for line in lines if line.get("request_id") == "subproc-1"]
    assert len(access) == 1, out
    assert access[0]["task"] == "json_logged" and access[0]["version"] == artifact.version
    assert access[0]["status"] == 200 and access[0]["latency_ms"] > 0
    messages = [line["message"] for line in lines]
    assert any("AUTH IS OFF" in m for m in messages)
    assert any("Application startup complete" in m for m in messages)  # uvicorn's, in JSON too
    assert not any(line["logger"] == "uvicorn.access" for line in lines)


def test_an_unhandled_error_is_a_500_with_the_request_id_and_an_access_line(
    tmp_path: Path, backbone: Backbone, access_lines: io.StringIO
) -> None:
    app = create_app(Settings(store=str(tmp_path / "store")), backbone=backbone)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app) as c:
        r = c.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "boom-1"
    assert r.json() == {
        "error": {"code": "internal_error", "message": "internal error: RuntimeError", "request_id": "boom-1"}
    }
    (line,) = [line for line in parsed(access_lines) if line["request_id"] == "boom-1"]
    assert line["status"] == 500 and line["route"] == "/boom"
