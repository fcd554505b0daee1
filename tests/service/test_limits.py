from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from prompts.backbone import Backbone
from service.app import create_app
from service.engine import Row
from service.runtime import Runtime
from service.settings import Settings
from tests.factories import random_artifact


def limit_settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(store=str(tmp_path / "store"), max_wait_ms=1, **values)


@asynccontextmanager
async def serving(settings: Settings, backbone: Backbone) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app with its lifespan, reached through ASGI (the body is streamed chunk by chunk)."""
    app = create_app(settings, backbone=backbone)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ptserve") as client,
    ):
        yield app, client


async def add_task(client: httpx.AsyncClient, backbone: Backbone, task: str = "limited") -> None:
    artifact = random_artifact(backbone.spec, task=task)
    r = await client.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)})
    assert r.status_code == 201, r.text


def gate_forward(app: FastAPI) -> tuple[threading.Event, threading.Event]:
    """Make the next forwards signal ``entered``, then wait for ``release`` (engine looked up per batch)."""
    runtime: Runtime = app.state.runtime
    entered, release = threading.Event(), threading.Event()
    real = runtime.engine.run_batch

    def gated(rows: list[Row]) -> list[list[float]]:
        entered.set()
        assert release.wait(10)
        return real(rows)

    runtime.engine.run_batch = gated  # type: ignore[method-assign]
    return entered, release


def assert_json_error(r: httpx.Response, status: int, code: str, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error
    # Errors made by the middleware carry the request id like every other error.
    assert error["request_id"] == r.headers["X-Request-ID"]
    return error


async def test_body_over_the_limit_by_content_length_is_413(tmp_path: Path, backbone: Backbone) -> None:
    async with serving(limit_settings(tmp_path, max_body_bytes=1024), backbone) as (_, client):
        await add_task(client, backbone)
        body = json.dumps({"task": "limited", "text": "x" * 2000}).encode()
        r = await client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
        assert_json_error(
            r, 413, "payload_too_large", f"of {len(body)} bytes", "limit of 1024 bytes", "max_body_bytes"
        )
        assert r.headers["Connection"] == "close"
        small = await client.post("/v1/classify", json={"task": "limited", "text": "fine"})
        assert small.status_code == 200, small.text


async def test_streamed_body_without_length_is_cut_at_the_limit(tmp_path: Path, backbone: Backbone) -> None:
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'{"task": "limited", "text": "'
        for _ in range(100):
            pulled += 1
            yield b"y" * 512
        yield b'"}'

    async with serving(limit_settings(tmp_path, max_body_bytes=2048), backbone) as (_, client):
        await add_task(client, backbone)
        r = await client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_json_error(r, 413, "payload_too_large", "limit of 2048 bytes", "max_body_bytes")
        # Refused once the limit was passed, not after reading all 50 KiB.
        assert pulled <= 6
        assert (await client.post("/v1/classify", json={"task": "limited", "text": "ok"})).status_code == 200


async def test_uploads_may_be_as_large_as_an_artifact_plus_multipart_overhead(
    tmp_path: Path, backbone: Backbone
) -> None:
    async with serving(
        limit_settings(tmp_path, max_body_bytes=1024, max_artifact_bytes=1 << 20), backbone
    ) as (
        _,
        client,
    ):
        # An artifact far over max_body_bytes is accepted: uploads have their own limit.
        artifact = random_artifact(backbone.spec, task="big", prefix_length=16)
        assert 1024 < len(artifact.data) < 1 << 20
        r = await client.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)})
        assert r.status_code == 201, r.text
        # Over the artifact limit but within the multipart allowance: the route's own 413.
        r = await client.post("/v1/prompts", files={"file": ("a.safetensors", b"\0" * ((1 << 20) + 10))})
        assert_json_error(r, 413, "artifact_too_large", f"limit of {1 << 20} bytes")
        # Past both: refused before the route reads it.
        r = await client.post("/v1/prompts", files={"file": ("a.safetensors", b"\0" * (3 << 20))})
        assert_json_error(r, 413, "payload_too_large", "max_artifact_bytes plus 1 MiB of multipart overhead")


async def test_too_many_concurrent_requests_get_429_with_retry_after(
    tmp_path: Path, backbone: Backbone
) -> None:
    settings = limit_settings(tmp_path, max_concurrent_requests=2, retry_after_s=7)
    async with serving(settings, backbone) as (app, client):
        await add_task(client, backbone)
        entered, release = gate_forward(app)
        body = {"task": "limited", "text": "wait"}
        first = asyncio.create_task(client.post("/v1/classify", json=body))
        assert await asyncio.to_thread(entered.wait, 10)
        second = asyncio.create_task(client.post("/v1/classify", json=body))
        try:
            # The second request is admitted (it queues behind the gated forward); wait until it has.
            runtime: Runtime = app.state.runtime
            async with asyncio.timeout(10):
                while runtime.batcher.queue_depth < 1:
                    await asyncio.sleep(0.001)
            # Bounded: without the limit this request would wait behind the gated forward.
            r = await asyncio.wait_for(client.post("/v1/classify", json=body), 10)
            assert_json_error(r, 429, "too_many_requests", "handling 2 requests", "max_concurrent_requests")
            assert r.headers["Retry-After"] == "7"
            # Probes and scrapes are never refused, however busy the replica is.
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
        finally:
            release.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200
        assert (await client.post("/v1/classify", json=body)).status_code == 200


async def test_full_batch_queue_429_carries_retry_after(tmp_path: Path, backbone: Backbone) -> None:
    settings = limit_settings(
        tmp_path, max_queue=1, max_texts_per_request=1, max_batch_size=1, retry_after_s=3
    )
    async with serving(settings, backbone) as (app, client):
        await add_task(client, backbone)
        entered, release = gate_forward(app)
        body = {"task": "limited", "text": "wait"}
        running = asyncio.create_task(client.post("/v1/classify", json=body))
        assert await asyncio.to_thread(entered.wait, 10)
        queued = asyncio.create_task(client.post("/v1/classify", json=body))
        try:
            runtime: Runtime = app.state.runtime
            async with asyncio.timeout(10):
                while runtime.batcher.queue_depth < 1:
                    await asyncio.sleep(0.001)
            # Bounded: without the limit this request would wait behind the gated forward.
            r = await asyncio.wait_for(client.post("/v1/classify", json=body), 10)
            assert_json_error(r, 429, "overloaded")
            assert r.headers["Retry-After"] == "3"
        finally:
            release.set()
        assert (await running).status_code == 200 and (await queued).status_code == 200


async def test_request_over_the_time_limit_is_504_and_the_replica_goes_on(
    tmp_path: Path, backbone: Backbone
) -> None:
    async with serving(limit_settings(tmp_path, request_timeout_s=0.2), backbone) as (app, client):
        await add_task(client, backbone)
        entered, release = gate_forward(app)
        try:
            r = await client.post("/v1/classify", json={"task": "limited", "text": "slow"})
            assert entered.is_set()
            assert_json_error(r, 504, "request_timeout", "within 0.2 s", "request_timeout_s")
        finally:
            release.set()
        r = await client.post("/v1/classify", json={"task": "limited", "text": "fast again"})
        assert r.status_code == 200, r.text


async def test_shutdown_drains_admitted_requests_and_refuses_new_ones(
    tmp_path: Path, backbone: Backbone
) -> None:
    app = create_app(limit_settings(tmp_path), backbone=backbone)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    stopping: asyncio.Task[Any] | None = None
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ptserve"
        ) as client:
            await add_task(client, backbone)
            runtime: Runtime = app.state.runtime
            entered, release = gate_forward(app)
            body = {"task": "limited", "texts": ["admitted one", "admitted two"]}
            admitted = asyncio.create_task(client.post("/v1/classify", json=body))
            assert await asyncio.to_thread(entered.wait, 10)
            stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
            # Shutdown has begun once the batcher is closed; the admitted request is still running.
            async with asyncio.timeout(10):
                while not runtime.batcher._closed:
                    await asyncio.sleep(0.001)
            r = await client.post("/v1/classify", json={"task": "limited", "text": "too late"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
            assert not admitted.done()
            release.set()
            r = await admitted
            assert r.status_code == 200, r.text
            assert len(r.json()["results"]) == 2
            await stopping
    finally:
        if stopping is None:
            await lifespan.__aexit__(None, None, None)


async def test_upload_that_times_out_mid_write_still_publishes_and_is_served(
    tmp_path: Path, backbone: Backbone
) -> None:
    async with serving(limit_settings(tmp_path, request_timeout_s=1.0), backbone) as (app, client):
        await add_task(client, backbone)
        runtime: Runtime = app.state.runtime
        entered, release = threading.Event(), threading.Event()
        real_put = runtime.store.put

        def slow_put(task: str, version: str, data: bytes, manifest_json: str) -> None:
            entered.set()
            assert release.wait(10)
            real_put(task, version, data, manifest_json)

        runtime.store.put = slow_put  # type: ignore[method-assign]
        newer = random_artifact(backbone.spec, task="limited", seed=5)
        try:
            r = await client.post("/v1/prompts", files={"file": ("a.safetensors", newer.data)})
            assert entered.is_set()
            assert_json_error(r, 504, "request_timeout")
        finally:
            release.set()
        # The write went on after the 504: once the lock is free, the store and this replica's
        # cache agree on the new version (a second change waits for the first to finish).
        async with asyncio.timeout(10), runtime.upload_lock:
            pass
        assert runtime.store.current_version("limited") == newer.version
        r = await client.post("/v1/classify", json={"task": "limited", "text": "after"})
        assert r.status_code == 200 and r.json()["version"] == newer.version
