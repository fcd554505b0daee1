"""The ZeroMQ link in one process: a front end's client against the engine app's real endpoint.

The engine app runs in TestClient's thread with its own event loop; the client runs in this thread's
loop, as a front-end process would. Replies carry what the single-process route answers; requests
that arrive within the coalescing window travel in one message, and so do the replies that finish
together and the finished requests' records; errors keep their HTTP meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from prompts.artifact import PromptArtifact, max_text_tokens
from prompts.backbone import Backbone
from service.app import create_app
from service.engine import Engine, Row
from service.frontends.link import EngineClient, EngineEndpoint
from service.frontends.protocol import Call, Observed, Reply
from service.settings import Settings
from service.tenancy import Principal
from tests.factories import random_artifact
from tests.processes import eventually

OPEN = Principal("-", "admin", None)
CLIENT_IDS = itertools.count()
TEXTS = ["the battery lasts two days", "a b c", "d e f g", "hello there", "one more text"]


def ask_all(address: str, backbone: Backbone, coalesce_s: float, tasks: list[str]) -> list[Reply]:
    async def run() -> list[Reply]:
        client = EngineClient(address, identity=f"test-frontend-{next(CLIENT_IDS)}", coalesce_s=coalesce_s)
        client.start()
        try:
            rows = backbone.text.untruncated(TEXTS)
            calls = [client.classify(f"req-{i}", task, OPEN, rows[i : i + 1]) for i, task in enumerate(tasks)]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
        finally:
            await client.close()

    return asyncio.run(run())


def test_calls_are_answered_as_the_route_answers_and_coalesced(tmp_path: Path, backbone: Backbone) -> None:
    address = f"ipc://{tmp_path / 'engine.sock'}"
    app = create_app(
        Settings(store=str(tmp_path / "store"), max_wait_ms=2), backbone=backbone, engine_address=address
    )
    artifact = random_artifact(backbone.spec, task="demo", seed=3)
    with TestClient(app) as http:
        assert http.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code == 201
        endpoint = app.state.engine_endpoint

        # The task in the engine's cache first: the five calls then join one batch.
        assert http.post("/v1/classify", json={"task": "demo", "text": "warm"}).status_code == 200
        before, sent_before = endpoint.messages, endpoint.replies_sent
        replies = ask_all(address, backbone, coalesce_s=0.05, tasks=["demo"] * len(TEXTS))
        assert endpoint.messages - before == 1  # five requests within 50 ms: one message
        assert endpoint.replies_sent - sent_before == 1  # answered by one batch: one message back
        for text, reply in zip(TEXTS, replies, strict=True):
            direct = http.post("/v1/classify", json={"task": "demo", "text": text}).json()
            assert (reply.task, reply.version) == ("demo", artifact.version)
            expected = direct["results"][0]["scores"]
            got = dict(zip(reply.labels, reply.probabilities[0], strict=True))
            assert got.keys() == expected.keys()
            assert all(abs(got[k] - expected[k]) < 1e-6 for k in got)
            assert reply.truncated == [False]

        before, sent_before = endpoint.messages, endpoint.replies_sent
        replies = ask_all(
            address, backbone, coalesce_s=0.0, tasks=["demo", "missing", "demo", "demo", "demo"]
        )
        assert endpoint.messages - before == len(TEXTS)  # no window: a message per request
        assert 1 <= endpoint.replies_sent - sent_before <= len(TEXTS)
        assert replies[1].error_status == 404 and replies[1].error_code == "task_not_found"
        assert "'missing'" in replies[1].error_message
        assert all(
            r.error_status == 0 and r.version == artifact.version for i, r in enumerate(replies) if i != 1
        )


def test_finished_requests_reach_the_engines_metrics_in_one_message(
    tmp_path: Path, backbone: Backbone
) -> None:
    address = f"ipc://{tmp_path / 'engine.sock'}"
    app = create_app(Settings(store=str(tmp_path / "store")), backbone=backbone, engine_address=address)

    def served(status: str) -> float:
        value = app.state.metrics.requests.labels("/v1/classify", "demo", status)._value.get()
        return float(value)

    with TestClient(app):
        endpoint = app.state.engine_endpoint
        before = endpoint.messages

        async def report() -> None:
            client = EngineClient(address, identity="test-frontend")
            client.start()
            # A round trip first: records sent before the link is up are dropped, not queued.
            await client.classify("req", "missing", OPEN, [[1]])
            for status in (200, 200, 404):
                client.observe(Observed("/v1/classify", "demo", status, 3.0, None, None))
            await client.close()  # flushes what waits for the interval

        asyncio.run(report())
        eventually(lambda: served("200") == 2 and served("404") == 1, "observed requests", deadline_s=30)
        assert endpoint.messages - before == 2  # the call, then every record in one message


def count_coroutine_answers(endpoint: EngineEndpoint) -> list[int]:
    """The ids of the calls the endpoint answers through its coroutine path (``_answer``)."""
    seen: list[int] = []
    coroutine_path = endpoint._answer

    async def counted(identity: bytes, call: Call) -> None:
        seen.append(call.id)
        await coroutine_path(identity, call)

    endpoint._answer = counted  # type: ignore[method-assign]
    return seen


@contextlib.contextmanager
def engine_serving_demo(
    tmp_path: Path, backbone: Backbone, settings: Settings
) -> Iterator[tuple[str, PromptArtifact, list[int], FastAPI]]:
    """The engine app with task "demo" uploaded and on the device (one classify through its route):
    its ZeroMQ address, the artifact, the ids of the calls it then answers by coroutine, the app."""
    address = f"ipc://{tmp_path / 'engine.sock'}"
    app = create_app(settings, backbone=backbone, engine_address=address)
    artifact = random_artifact(backbone.spec, task="demo", seed=5)
    with TestClient(app) as http:
        assert http.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code == 201
        assert http.post("/v1/classify", json={"task": "demo", "text": "warm"}).status_code == 200
        yield address, artifact, count_coroutine_answers(app.state.engine_endpoint), app


def ask_rows(address: str, rows: list[list[int]]) -> Reply:
    """One call of ``rows`` from a new client. Each client has its own identity, as front ends do (the
    pid is in theirs): a ROUTER drops a peer that connects under an identity it still holds, and the
    reply to it would be lost."""

    async def run() -> Reply:
        client = EngineClient(address, identity=f"test-frontend-rows-{next(CLIENT_IDS)}")
        client.start()
        try:
            return await asyncio.wait_for(client.classify("req-rows", "demo", OPEN, rows), timeout=60)
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.mark.parametrize("pointer_ttl_s", [60.0, 0.0])
def test_calls_of_a_cached_task_skip_the_coroutine_and_answer_alike(
    tmp_path: Path, backbone: Backbone, pointer_ttl_s: float
) -> None:
    """Calls of a task version on the device with a fresh pointer, one row or several, are answered
    from the batcher's callbacks; any call once the pointer must be read again (TTL 0) goes through
    the coroutine. The replies are the same either way."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2, pointer_ttl_s=pointer_ttl_s)
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, coroutine_calls, _):
        single = ask_all(address, backbone, coalesce_s=0.05, tasks=["demo"] * len(TEXTS))
        several = ask_rows(address, backbone.text.untruncated(TEXTS))

    assert len(coroutine_calls) == (0 if pointer_ttl_s else len(TEXTS) + 1)
    assert several.version == artifact.version and several.truncated == [False] * len(TEXTS)
    for i, reply in enumerate(single):
        assert (reply.error_status, reply.version, reply.labels) == (0, artifact.version, several.labels)
        assert reply.truncated == [False]
        assert reply.probabilities[0] == pytest.approx(several.probabilities[i], abs=1e-6)


@pytest.mark.parametrize("pointer_ttl_s", [60.0, 0.0])
def test_a_row_past_the_tasks_room_is_cut_and_flagged_on_both_paths(
    tmp_path: Path, backbone: Backbone, pointer_ttl_s: float
) -> None:
    """A row longer than the room the task's version leaves is cut as the route cuts it (its head and
    closing token) and flagged; the short row beside it is not; the same on the coroutine path."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2, pointer_ttl_s=pointer_ttl_s)
    long_row, short_row = backbone.text.untruncated([" ".join(["phone"] * 80), "short text"])
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, coroutine_calls, _):
        limit = max_text_tokens(artifact.manifest, backbone.spec)
        cut = backbone.text.truncate(long_row, limit).input_ids
        assert len(long_row) > limit == len(cut) and cut[-1] == long_row[-1]
        mixed = ask_rows(address, [long_row, short_row])
        precut = ask_rows(address, [cut, short_row])

    assert len(coroutine_calls) == (0 if pointer_ttl_s else 2)
    assert mixed.truncated == [True, False] and precut.truncated == [False, False]
    for got, expected in zip(mixed.probabilities, precut.probabilities, strict=True):
        assert got == pytest.approx(expected, abs=1e-6)


def test_a_full_queue_refuses_the_one_row_calls_past_it_and_runs_the_rest(
    tmp_path: Path, backbone: Backbone
) -> None:
    """Five calls in one message meet a queue of two places: the engine's loop queues them in one
    turn, so the first two run and the other three get the HTTP API's 429 ``overloaded``."""
    settings = Settings(store=str(tmp_path / "store"), max_queue=2, max_texts_per_request=2, max_wait_ms=2)
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, coroutine_calls, _):
        replies = ask_all(address, backbone, coalesce_s=0.05, tasks=["demo"] * len(TEXTS))

    assert coroutine_calls == []
    assert [r.error_status for r in replies] == [0, 0, 429, 429, 429]
    assert all(r.error_code == "overloaded" and "2 items are queued" in r.error_message for r in replies[2:])
    assert all(r.version == artifact.version and len(r.probabilities[0]) == 3 for r in replies[:2])


def test_a_row_that_fails_answers_its_call_with_the_error_and_drops_the_rows_not_run(
    tmp_path: Path, backbone: Backbone
) -> None:
    """A call of four rows, one row a batch: the second row's forward fails, so the call is answered
    with the error (500, as the route answers) and its last two rows never reach the forward, as
    ``submit_many`` drops them; the engine then answers the same rows without the fault."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2, max_batch_size=1, pipeline_depth=1)
    rows = backbone.text.untruncated(TEXTS[:4])
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, coroutine_calls, app):
        engine: Engine = app.state.runtime.engine
        real = engine.run_batch
        forwarded: list[list[int]] = []

        def failing(batch: list[Row]) -> list[list[float]]:
            forwarded.extend(list(row.input_ids) for row in batch)
            if any(list(row.input_ids) == rows[1] for row in batch):
                raise RuntimeError("the device failed")
            return real(batch)

        engine.run_batch = failing  # type: ignore[method-assign]
        failed = ask_rows(address, rows)
        engine.run_batch = real  # type: ignore[method-assign]
        again = ask_rows(address, rows)

    assert coroutine_calls == []
    assert (failed.error_status, failed.error_code) == (500, "internal_error")
    assert "RuntimeError" in failed.error_message and failed.probabilities == []
    assert forwarded == rows[:2]
    assert again.error_status == 0 and again.version == artifact.version and len(again.probabilities) == 4


def test_an_error_in_the_callback_path_answers_its_call_and_the_loop_goes_on(
    tmp_path: Path, backbone: Backbone
) -> None:
    """Cutting a row to its task's room raises (as a manifest whose room is below the special tokens
    would): that call is answered with a 500, and the receive loop still answers the calls after it
    (an exception there ended the receiver, and every front end's later call waited for its 504)."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2)
    long_row = backbone.text.untruncated([" ".join(["phone"] * 80)])[0]
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, coroutine_calls, app):
        text = app.state.runtime.backbone.text
        real = text.truncate

        def broken(ids: list[int], limit: int) -> object:
            raise ValueError("no room for the special tokens")

        text.truncate = broken
        try:
            failed = ask_rows(address, [long_row])
        finally:
            text.truncate = real
        after = ask_all(address, backbone, coalesce_s=0.0, tasks=["demo"])

    assert coroutine_calls == []
    assert (failed.error_status, failed.error_code) == (500, "internal_error")
    assert "ValueError" in failed.error_message
    assert after[0].error_status == 0 and after[0].version == artifact.version


def test_a_record_the_metrics_cannot_count_does_not_stop_the_receive_loop(
    tmp_path: Path, backbone: Backbone
) -> None:
    """A front end's finished-request record whose counting raises is logged and dropped; the call
    sent after it on the same socket is still answered."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2)
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, _, app):
        metrics = app.state.engine_endpoint.metrics
        counted: list[str] = []

        def broken(*args: object) -> None:
            counted.append("tried")
            raise RuntimeError("a metrics bug")

        metrics.observe_requests = broken

        async def run() -> Reply:
            client = EngineClient(address, identity=f"test-frontend-obs-{next(CLIENT_IDS)}")
            client.start()
            try:
                client.observe(Observed("/v1/classify", "demo", 200, 1.0, None, None))
                client._observed.flush()  # sent now, ahead of the call on the same socket
                rows = backbone.text.untruncated(["after the record"])
                return await asyncio.wait_for(client.classify("req-obs", "demo", OPEN, rows), timeout=60)
            finally:
                await client.close()

        reply = asyncio.run(run())

    assert counted == ["tried"]
    assert reply.error_status == 0 and reply.version == artifact.version


def test_a_name_resolved_for_one_tenant_is_not_reused_for_another(tmp_path: Path, backbone: Backbone) -> None:
    """The engine remembers the full name a call's task name resolves to, per tenant: after a platform
    key's call of ``demo`` is served, a tenant key's call of ``demo`` means ``acme/demo`` (none) and
    gets 404, however often either is asked."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2)
    tenant = Principal("k_acme", "classify", "acme")
    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, _, _app):

        async def run() -> list[Reply]:
            client = EngineClient(address, identity=f"test-frontend-names-{next(CLIENT_IDS)}")
            client.start()
            rows = backbone.text.untruncated(["a text"])
            try:
                replies = []
                for i, principal in enumerate([OPEN, tenant, OPEN, tenant]):
                    call = client.classify(f"req-{i}", "demo", principal, rows)
                    replies.append(await asyncio.wait_for(call, timeout=60))
                return replies
            finally:
                await client.close()

        replies = asyncio.run(run())

    assert [r.error_status for r in replies] == [0, 404, 0, 404]
    assert replies[0].version == replies[2].version == artifact.version
    assert all(r.error_code == "task_not_found" and "demo" in r.error_message for r in replies[1::2])


@pytest.mark.parametrize("pointer_ttl_s", [60.0, 0.0])
def test_a_calls_bucket_is_taken_in_the_engine_on_both_paths(
    tmp_path: Path, backbone: Backbone, pointer_ttl_s: float
) -> None:
    """Calls that carry their key's bucket (a directory store's front ends send it) take a token in
    the engine, on the callback path and on the coroutine's (TTL 0): two of three one-row calls pass
    a burst of 2, the third and a later multi-row call get 429 ``rate_limited`` with the bucket's
    Retry-After; a call without a bucket is not limited."""
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=2, pointer_ttl_s=pointer_ttl_s)
    key = Principal("k1", "classify", None)
    bucket = (0.001, 2)

    async def run(address: str, rows: list[list[int]]) -> tuple[list[Reply], Reply, Reply]:
        client = EngineClient(address, identity="test-frontend-bucket", coalesce_s=0.05)
        client.start()
        try:
            calls = [client.classify(f"r{i}", "demo", key, rows[i : i + 1], bucket) for i in range(3)]
            singles = await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
            several = await client.classify("r-rows", "demo", key, rows[:2], bucket)
            unlimited = await client.classify("r-free", "demo", key, rows[:1])
            return singles, several, unlimited
        finally:
            await client.close()

    with engine_serving_demo(tmp_path, backbone, settings) as (address, artifact, coroutine_calls, app):
        singles, several, unlimited = asyncio.run(run(address, backbone.text.untruncated(TEXTS)))
        refusals = app.state.metrics.tenant_refusals.labels("platform", "rate_limited")._value.get()

    assert [r.error_status for r in singles] == [0, 0, 429]
    assert len(coroutine_calls) == (0 if pointer_ttl_s else 5)
    for refused in (singles[2], several):
        assert (refused.error_status, refused.error_code) == (429, "rate_limited")
        assert "key k1 is over its rate" in refused.error_message and refused.error_retry_after_s > 60
    assert unlimited.error_status == 0 and unlimited.version == artifact.version
    assert refusals == 2
