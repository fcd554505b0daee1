from __future__ import annotations

import asyncio
import pickle
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone, load_backbone
from prompts.forward import TaskPrompt, prompted_forward
from service.app import create_app, route_templates
from service.batcher import DynamicBatcher
from service.engine import Row
from service.health import StoreHealth
from service.runtime import Runtime
from service.settings import Settings
from tests.factories import random_artifact
from tests.models import make_tiny_bert

pytest_plugins = ("tests.redis_server",)


@pytest.fixture
def client(tmp_path: Path, backbone: Backbone) -> Iterator[TestClient]:
    settings = Settings(
        store=str(tmp_path / "store"), max_wait_ms=1, max_texts_per_request=8, max_text_chars=500
    )
    with TestClient(create_app(settings, backbone=backbone)) as c:
        yield c


def upload(client: TestClient, artifact: PromptArtifact | bytes, name: str = "task.safetensors") -> Any:
    data = artifact.data if isinstance(artifact, PromptArtifact) else artifact
    return client.post("/v1/prompts", files={"file": (name, data, "application/octet-stream")})


def expected_probs(backbone: Backbone, artifact: PromptArtifact, texts: list[str]) -> torch.Tensor:
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode(texts, backbone.spec.max_positions)]
    with torch.inference_mode():
        return torch.softmax(prompted_forward(backbone, ids, [task] * len(ids)), -1)


def assert_error(response: Any, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


def test_round_trip_upload_classify_list_delete(client: TestClient, backbone: Backbone) -> None:
    artifact = random_artifact(backbone.spec, task="product_type", num_labels=3, prefix_length=4, seed=1)
    r = upload(client, artifact)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "task": "product_type",
        "version": artifact.version,
        "labels": ["label_0", "label_1", "label_2"],
        "method": "p-tuning-v2",
    }

    texts = ["this phone is great", "the shirt color is red", "refund please, it is broken"]
    r = client.post("/v1/classify", json={"task": "product_type", "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "product_type" and body["version"] == artifact.version
    expected = expected_probs(backbone, artifact, texts)
    for i, result in enumerate(body["results"]):
        assert set(result["scores"]) == {"label_0", "label_1", "label_2"}
        assert list(result["scores"].values()) == sorted(result["scores"].values(), reverse=True)
        assert result["label"] == f"label_{int(expected[i].argmax())}"
        for j in range(3):
            assert result["scores"][f"label_{j}"] == pytest.approx(float(expected[i, j]), abs=1e-5)
        assert result["score"] == max(result["scores"].values())
        assert result["truncated"] is False

    r = client.post("/v1/classify", json={"task": "product_type", "text": texts[0], "top_k": 1})
    assert r.status_code == 200
    (single,) = r.json()["results"]
    assert list(single["scores"]) == [single["label"]]

    listed = client.get("/v1/prompts").json()["tasks"]
    assert [t["task"] for t in listed] == ["product_type"]
    assert listed[0]["version"] == artifact.version and listed[0]["prefix_length"] == 4
    info = client.get("/v1/prompts/product_type").json()
    assert info["versions"] == [artifact.version] and info["labels"] == ["label_0", "label_1", "label_2"]

    r = client.delete("/v1/prompts/product_type")
    assert r.status_code == 200 and r.json() == {"task": "product_type", "deleted": True}
    assert_error(
        client.post("/v1/classify", json={"task": "product_type", "text": "x"}), 404, "task_not_found"
    )
    assert_error(client.get("/v1/prompts/product_type"), 404, "task_not_found", "product_type")
    assert_error(client.delete("/v1/prompts/product_type"), 404, "task_not_found")
    assert client.get("/v1/prompts").json() == {"tasks": []}


def test_new_upload_is_served_by_the_next_request(client: TestClient, backbone: Backbone) -> None:
    v1 = random_artifact(backbone.spec, task="topic", seed=1)
    v2 = random_artifact(backbone.spec, task="topic", seed=2)
    assert upload(client, v1).status_code == 201
    assert (
        client.post("/v1/classify", json={"task": "topic", "text": "hello"}).json()["version"] == v1.version
    )
    assert upload(client, v2).status_code == 201
    r = client.post("/v1/classify", json={"task": "topic", "text": "hello"}).json()
    assert r["version"] == v2.version
    assert r["results"][0]["scores"]["label_0"] == pytest.approx(
        float(expected_probs(backbone, v2, ["hello"])[0, 0]), abs=1e-5
    )
    assert client.get("/v1/prompts/topic").json()["versions"] == [v2.version, v1.version]


async def _gate_forward(runtime: Runtime) -> tuple[threading.Event, threading.Event]:
    """Swap in a batcher whose forward signals ``entered`` and then waits for ``release``."""
    entered, release = threading.Event(), threading.Event()

    def gated(rows: list[Row]) -> list[list[float]]:
        entered.set()
        assert release.wait(10)
        return runtime.engine.run_batch(rows)

    await runtime.batcher.stop()
    limits = runtime.settings
    runtime.batcher = DynamicBatcher(
        gated,
        max_batch_size=limits.max_batch_size,
        max_batch_tokens=limits.max_batch_tokens,
        max_wait_ms=0,
        cost=Row.cost,
        max_queue=limits.max_queue,
    )
    runtime.batcher.start()
    return entered, release


def test_admitted_request_finishes_on_its_version_across_upload_and_delete(
    client: TestClient, backbone: Backbone
) -> None:
    v1 = random_artifact(backbone.spec, task="pinned", seed=1)
    v2 = random_artifact(backbone.spec, task="pinned", seed=2)
    assert upload(client, v1).status_code == 201
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    entered, release = client.portal.call(_gate_forward, runtime)  # type: ignore[union-attr]

    with ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(client.post, "/v1/classify", json={"task": "pinned", "text": "hello world"})
        assert entered.wait(10)
        # While the v1 request is inside the forward: publish v2, then delete the task.
        assert upload(client, v2).status_code == 201
        assert client.delete("/v1/prompts/pinned").status_code == 200
        release.set()
        r = admitted.result(10)
    assert r.status_code == 200
    assert r.json()["version"] == v1.version
    assert r.json()["results"][0]["scores"]["label_0"] == pytest.approx(
        float(expected_probs(backbone, v1, ["hello world"])[0, 0]), abs=1e-5
    )
    assert_error(client.post("/v1/classify", json={"task": "pinned", "text": "hello"}), 404, "task_not_found")


def test_concurrent_requests_of_many_tasks_share_batches(client: TestClient, backbone: Backbone) -> None:
    artifacts = [
        random_artifact(
            backbone.spec,
            task=f"t{i}",
            num_labels=2 + i % 3,
            prefix_length=i % 4,
            prompt_length=i % 3,
            seed=i,
            method="custom",
        )
        for i in range(6)
    ]
    for a in artifacts:
        assert upload(client, a).status_code == 201
    assert_served_concurrently_as_alone(client, backbone, artifacts)


def assert_served_concurrently_as_alone(
    client: TestClient, backbone: Backbone, artifacts: list[PromptArtifact]
) -> None:
    """Single-text requests of every uploaded task at once, from 16 threads: each gets its task's
    probabilities alone, and mixed batches happened (fewer forwards than requests)."""
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    batches_before = runtime.engine.batches
    texts = ["great phone", "bad shirt", "what is the price of this laptop", "free offer"]
    jobs = [(a, t) for a in artifacts for t in texts]
    with ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(
                lambda job: client.post("/v1/classify", json={"task": job[0].task, "text": job[1]}), jobs
            )
        )
    for (artifact, text), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        expected = expected_probs(backbone, artifact, [text])[0]
        got = r.json()["results"][0]["scores"]
        for j in range(len(artifact.manifest.labels)):
            assert got[f"label_{j}"] == pytest.approx(float(expected[j]), abs=1e-5)
    assert runtime.engine.batches - batches_before < len(jobs)


def test_over_long_text_is_truncated_and_flagged(client: TestClient, backbone: Backbone) -> None:
    artifact = random_artifact(backbone.spec, task="long", prefix_length=8, prompt_length=4)
    assert upload(client, artifact).status_code == 201
    long_text = " ".join(["phone"] * 80)  # 82 tokens > 64 positions - 8 prefix - 4 prompt
    r = client.post("/v1/classify", json={"task": "long", "texts": [long_text, "short text"]})
    assert r.status_code == 200, r.text
    assert [x["truncated"] for x in r.json()["results"]] == [True, False]


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        ({"task": "nope", "text": "hi"}, 404, "task_not_found", "unknown task 'nope'"),
        ({"text": "hi"}, 422, "invalid_request", "task"),
        ({"task": "x"}, 422, "invalid_request", "exactly one of 'text' or 'texts'"),
        ({"task": "x", "text": "a", "texts": ["b"]}, 422, "invalid_request", "exactly one"),
        ({"task": "x", "texts": []}, 422, "invalid_request", "at least one text"),
        ({"task": "x", "text": 5}, 422, "invalid_request", "text"),
        ({"task": "x", "text": "hi", "top_k": 0}, 422, "invalid_request", "top_k"),
        ({"task": "x", "text": "hi", "extra": 1}, 422, "invalid_request", "extra"),
        ({"task": "Bad/Name", "text": "hi"}, 422, "invalid_task_name", "invalid task name"),
        ({"task": "a" * 65, "text": "hi"}, 422, "invalid_task_name", "65 characters"),
        ({"task": "..", "text": "hi"}, 422, "invalid_task_name", "invalid task name"),
        ({"task": "x", "text": ""}, 422, "invalid_input", "text is empty"),
        ({"task": "x", "text": " \n\t "}, 422, "invalid_input", "text is empty or whitespace only"),
        ({"task": "x", "texts": ["ok", ""]}, 422, "invalid_input", "texts[1] is empty"),
        ({"task": "x", "text": "y" * 501}, 422, "invalid_input", "501 characters; the limit is 500"),
        ({"task": "x", "texts": ["a"] * 9}, 422, "invalid_input", "9 texts in one request; the limit is 8"),
    ],
)
def test_classify_errors(
    client: TestClient, backbone: Backbone, body: Any, status: int, code: str, fragment: str
) -> None:
    assert upload(client, random_artifact(backbone.spec, task="x")).status_code == 201
    assert_error(client.post("/v1/classify", json=body), status, code, fragment)
    # The service is still healthy and serving afterwards.
    assert client.post("/v1/classify", json={"task": "x", "text": "still fine"}).status_code == 200


def test_malformed_json_and_unknown_routes(client: TestClient) -> None:
    r = client.post(
        "/v1/classify", content=b'{"task": "x", "text": ', headers={"content-type": "application/json"}
    )
    assert_error(r, 422, "invalid_request", "JSON")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.put("/v1/classify", json={}), 405, "method_not_allowed")
    assert_error(client.get("/v1/prompts/UPPER"), 422, "invalid_task_name")


def _other_backbone_artifact(tmp_path: Path, **kwargs: Any) -> PromptArtifact:
    other = load_backbone(make_tiny_bert(tmp_path / "other", **kwargs))
    return random_artifact(other.spec, task="foreign")


def test_upload_errors(client: TestClient, backbone: Backbone, tmp_path: Path) -> None:
    good = random_artifact(backbone.spec, task="good", num_labels=2)
    cases: list[tuple[bytes, int, str, str]] = [
        (b"", 422, "invalid_artifact", "empty"),
        (b"hello, not tensors at all", 422, "invalid_artifact", "not a safetensors file"),
        (pickle.dumps({"a": 1}), 422, "invalid_artifact", "pickle"),
        (good.data[: len(good.data) // 2], 422, "invalid_artifact", ""),
        (st_save({"x": torch.zeros(2)}), 422, "invalid_artifact", "no ptserve manifest"),
        (_other_backbone_artifact(tmp_path, seed=1).data, 422, "incompatible_artifact", "different weights"),
        (_other_backbone_artifact(tmp_path, hidden=48).data, 422, "incompatible_artifact", "hidden_size=48"),
        (b"x" * (64 * 1024 * 1024 + 1), 413, "artifact_too_large", "limit"),
    ]
    for data, status, code, fragment in cases:
        assert_error(upload(client, data), status, code, fragment)
    assert_error(client.post("/v1/prompts", data={"nothing": "here"}), 422, "invalid_request", "file")
    assert client.get("/v1/prompts").json() == {"tasks": []}
    assert upload(client, good).status_code == 201


def test_health_and_openapi(client: TestClient, backbone: Backbone) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"backbone": backbone.spec.fingerprint, "store": "ok"}
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/prompts", "/v1/prompts/{task}", "/healthz", "/readyz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_readyz_reports_an_unusable_store_but_stays_ready(tmp_path: Path, backbone: Backbone) -> None:
    store_dir = tmp_path / "store"
    with TestClient(create_app(Settings(store=str(store_dir)), backbone=backbone)) as client:
        # Every probe pings (the default keeps an answer for a second).
        client.app.state.runtime.store_health = StoreHealth(max_age_s=0.0)  # type: ignore[attr-defined]
        assert client.get("/readyz").status_code == 200
        assert "ptserve_store_up 1.0" in client.get("/metrics").text
        # The store directory vanishes and a plain file takes its place (a lost mount, say).
        shutil.rmtree(store_dir)
        store_dir.write_text("not a directory")
        r = client.get("/readyz")
        # Readiness is about this replica; the store's state is reported beside it.
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert str(store_dir) in r.json()["checks"]["store"]
        assert "ptserve_store_up 0.0" in client.get("/metrics").text
        assert client.get("/healthz").status_code == 200


def test_readyz_answers_503_while_draining(tmp_path: Path, backbone: Backbone) -> None:
    with TestClient(create_app(Settings(store=str(tmp_path / "store")), backbone=backbone)) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        runtime.draining = True
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert client.get("/healthz").status_code == 200


def test_upload_interrupted_before_the_pointer_rename_keeps_serving_the_previous_version(
    client: TestClient, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prompts.disk_store as disk_store

    v1 = random_artifact(backbone.spec, task="safe", seed=1)
    v2 = random_artifact(backbone.spec, task="safe", seed=2)
    assert upload(client, v1).status_code == 201
    real_replace = disk_store.os.replace

    def crash_on_pointer(src: str, dst: str) -> None:
        if str(dst).endswith("current"):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(disk_store.os, "replace", crash_on_pointer)
    assert_error(upload(client, v2), 500, "store_error", "Input/output error")
    monkeypatch.setattr(disk_store.os, "replace", real_replace)

    r = client.post("/v1/classify", json={"task": "safe", "text": "hello"})
    assert r.status_code == 200 and r.json()["version"] == v1.version
    assert client.get("/v1/prompts/safe").json()["version"] == v1.version
    # A fresh replica on the same store (a restart) serves v1 as well.
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    settings = runtime.settings
    with TestClient(create_app(settings, backbone=backbone)) as restarted:
        r = restarted.post("/v1/classify", json={"task": "safe", "text": "hello"})
        assert r.status_code == 200 and r.json()["version"] == v1.version


def test_full_queue_answers_429_and_the_queued_requests_still_finish(
    tmp_path: Path, backbone: Backbone
) -> None:
    settings = Settings(store=str(tmp_path / "s"), max_queue=2, max_texts_per_request=2, max_batch_size=2)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        assert upload(client, random_artifact(backbone.spec, task="busy")).status_code == 201
        runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        entered, release = client.portal.call(_gate_forward, runtime)  # type: ignore[union-attr]
        body = {"task": "busy", "texts": ["one", "two"]}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/v1/classify", json=body)
            assert entered.wait(10)  # its two rows are in the forward; the queue is empty
            queued = pool.submit(client.post, "/v1/classify", json=body)
            # The queued request holds both slots once the batcher reports them.
            client.portal.call(_wait_for_depth, runtime, 2)  # type: ignore[union-attr]
            r = client.post("/v1/classify", json={"task": "busy", "text": "three"})
            assert_error(r, 429, "overloaded", "2 items are queued (limit 2)")
            release.set()
            assert running.result(10).status_code == 200
            assert queued.result(10).status_code == 200


async def _wait_for_depth(runtime: Runtime, depth: int) -> None:
    async with asyncio.timeout(10):
        while runtime.batcher.queue_depth < depth:
            await asyncio.sleep(0.001)


def test_settings_refuse_a_queue_smaller_than_a_request() -> None:
    with pytest.raises(ValueError, match=r"max_queue \(4\) must be at least max_texts_per_request \(8\)"):
        Settings(max_queue=4, max_texts_per_request=8)


def test_round_trip_on_the_redis_store(redis_url: str, redis_prefix: str, backbone: Backbone) -> None:
    from prompts.redis_store import RedisPromptStore

    store = RedisPromptStore(redis_url, prefix=redis_prefix)
    v1 = random_artifact(backbone.spec, task="on_redis", seed=1)
    with TestClient(create_app(Settings(store=redis_url), backbone=backbone, store=store)) as client:
        assert upload(client, v1).status_code == 201
        r = client.post("/v1/classify", json={"task": "on_redis", "text": "hello"})
        assert r.status_code == 200 and r.json()["version"] == v1.version
        assert [t["task"] for t in client.get("/v1/prompts").json()["tasks"]] == ["on_redis"]
        assert client.get("/readyz").json()["checks"]["store"] == "ok"
        assert client.delete("/v1/prompts/on_redis").status_code == 200
        assert_error(
            client.post("/v1/classify", json={"task": "on_redis", "text": "x"}), 404, "task_not_found"
        )


def test_settings_select_the_redis_store(redis_url: str) -> None:
    from prompts.redis_store import RedisPromptStore
    from service.runtime import open_store

    store = open_store(redis_url)
    assert isinstance(store, RedisPromptStore)
    store.ping()
    store.close()


@pytest.mark.parametrize("inline_chars", [0, 10_000])
def test_classify_tokenises_the_same_on_the_loop_and_in_a_thread(
    client: TestClient, backbone: Backbone, monkeypatch: pytest.MonkeyPatch, inline_chars: int
) -> None:
    """Short requests are tokenised on the event loop, longer ones in a thread: same answers."""
    import service.routes

    monkeypatch.setattr(service.routes, "INLINE_TOKENIZE_CHARS", inline_chars)
    calls: list[bool] = []
    encode = backbone.encode

    def spy(texts: list[str], max_tokens: int) -> Any:
        try:
            asyncio.get_running_loop()
            calls.append(True)  # on the event loop's thread
        except RuntimeError:
            calls.append(False)  # in a worker thread
        return encode(texts, max_tokens)

    monkeypatch.setattr(backbone, "encode", spy)
    artifact = random_artifact(backbone.spec, task="where", prefix_length=4, num_labels=3)
    assert upload(client, artifact).status_code == 201
    texts = ["this phone is great", "terrible battery and the screen is broken"]
    r = client.post("/v1/classify", json={"task": "where", "texts": texts})
    assert r.status_code == 200, r.text
    got = torch.tensor([[x["scores"][f"label_{i}"] for i in range(3)] for x in r.json()["results"]])
    monkeypatch.setattr(backbone, "encode", encode)
    torch.testing.assert_close(got, expected_probs(backbone, artifact, texts).float(), rtol=0, atol=1e-5)
    assert calls == [inline_chars > 0]


def test_route_templates_name_every_route_of_the_app(tmp_path: Path, backbone: Backbone) -> None:
    """What a front end labels the requests it answers for the engine with (service/frontends/app.py)
    is the engine app's own route list, so its records land in the engine's series."""
    app = create_app(Settings(store=str(tmp_path / "store")), backbone=backbone)
    assert sorted(route_templates()) == sorted(app.openapi()["paths"])
