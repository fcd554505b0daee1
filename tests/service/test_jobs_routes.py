"""POST/GET /v1/training-jobs through the real app: 202/404/503 and every kind of bad job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from prompts.backbone import Backbone
from prompts.jobs import JobQueue
from service.app import create_app
from service.settings import Settings
from tests.service.test_api import assert_error
from tests.synthetic import make_examples, write_data_dir

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)


def rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    return [{"text": e.text, "label": e.label} for e in make_examples(count, seed)]


def job(**overrides: Any) -> dict[str, Any]:
    return {"task": "keywords", "method": "prefix", "train": rows(12), **overrides}


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_data_dir(root / "keywords")
    (tmp_path / "outside.jsonl").write_text('{"text": "phone", "label": "phone"}\n')
    return root


@pytest.fixture
def client(private_redis: RedisServer, data_root: Path, backbone: Backbone) -> Iterator[TestClient]:
    settings = Settings(store=private_redis.url, data_root=data_root, max_job_examples=40, max_wait_ms=1)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        yield c


def test_submit_answers_202_with_id_and_location_then_get_shows_the_job(
    client: TestClient, private_redis: RedisServer
) -> None:
    r = client.post("/v1/training-jobs", json=job(hyperparameters={"epochs": 5, "lr": 0.02}))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "queued" and len(body["id"]) == 32
    assert r.headers["location"] == f"/v1/training-jobs/{body['id']}"

    r = client.get(r.headers["location"])
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["id"] == body["id"] and status["task"] == "keywords" and status["method"] == "prefix"
    assert status["state"] == "queued" and status["attempts"] == 0
    assert status["progress"] is None and status["metrics"] is None and status["error"] is None
    assert status["created_at"].endswith("+00:00")

    # The job sits in the shared queue for a worker, inline examples included.
    queue = JobQueue(private_redis.url)
    try:
        lease = queue.take("test-worker", block_s=0.1)
        assert lease is not None and lease.job_id == body["id"]
        assert lease.spec.train is not None and len(lease.spec.train) == 12
        assert lease.spec.hyperparameters.lr == 0.02
    finally:
        queue.close()
    assert client.get(f"/v1/training-jobs/{body['id']}").json()["state"] == "running"


def test_server_side_data_path_inside_the_root_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/training-jobs", json=job(train=None, data_path="keywords", method="probe"))
    assert r.status_code == 202, r.text


def test_unknown_job_is_404(client: TestClient) -> None:
    assert_error(client.get(f"/v1/training-jobs/{'0' * 32}"), 404, "job_not_found", "no training job")
    assert_error(client.get("/v1/training-jobs/nope"), 404, "job_not_found", "'nope'")


def test_no_job_queue_is_503(tmp_path: Path, backbone: Backbone) -> None:
    settings = Settings(store=str(tmp_path / "store"))
    with TestClient(create_app(settings, backbone=backbone)) as c:
        assert_error(c.post("/v1/training-jobs", json=job()), 503, "jobs_disabled", "PTSERVE_JOBS_URL")
        assert_error(c.get(f"/v1/training-jobs/{'0' * 32}"), 503, "jobs_disabled", "not configured")


def test_unreachable_job_queue_is_503(tmp_path: Path, backbone: Backbone, dead_redis_url: str) -> None:
    settings = Settings(store=str(tmp_path / "store"), jobs_url=dead_redis_url)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        assert_error(c.post("/v1/training-jobs", json=job()), 503, "store_unavailable", "unreachable")


@pytest.mark.parametrize(
    ("fields", "status", "code", "fragment"),
    [
        ({"method": "finetune"}, 422, "invalid_request", "method"),
        ({"hyperparameters": {"lr": -0.5}}, 422, "invalid_request", "hyperparameters.lr"),
        ({"hyperparameters": {"epochs": 0}}, 422, "invalid_request", "hyperparameters.epochs"),
        ({"hyperparameters": {"warmup": 3}}, 422, "invalid_request", "hyperparameters.warmup"),
        ({"task": "No Spaces"}, 422, "invalid_request", "invalid task name"),
        ({"method": "probe", "hyperparameters": {"scales": True}}, 422, "invalid_input", "linear probe"),
        ({"hyperparameters": {"scales": True, "head": "peft"}}, 422, "invalid_input", "no (IA)^3 scales"),
        ({"hyperparameters": {"probe_head": "svm"}}, 422, "invalid_request", "hyperparameters.probe_head"),
        (
            {"method": "prefix", "hyperparameters": {"probe_head": "standardized"}},
            422,
            "invalid_input",
            "use method linear-probe",
        ),
        ({"train": []}, 422, "invalid_request", "train: List should have at least 1 item"),
        ({"train": None}, 422, "invalid_request", "exactly one of 'train'"),
        ({"data_path": "keywords"}, 422, "invalid_request", "exactly one of 'train'"),
        (
            {"dev": [{"text": "a tablet", "label": "tablet"}]},
            422,
            "invalid_data",
            "dev has labels the task does not know: 'tablet'",
        ),
        (
            {"train": [{"text": f"phone {i}", "label": "phone"} for i in range(6)]},
            422,
            "invalid_data",
            "at least two labels",
        ),
        ({"train": rows(41)}, 413, "payload_too_large", "41 inline examples"),
        (
            {"train": None, "data_path": "missing.jsonl"},
            422,
            "invalid_input",
            "'missing.jsonl' does not exist",
        ),
        (
            {"train": None, "data_path": "../outside.jsonl"},
            422,
            "invalid_input",
            "outside the server's data root",
        ),
    ],
)
def test_bad_jobs_are_refused_naming_the_problem(
    client: TestClient, fields: dict[str, Any], status: int, code: str, fragment: str
) -> None:
    assert_error(client.post("/v1/training-jobs", json=job(**fields)), status, code, fragment)


def test_data_path_without_a_data_root_is_refused(private_redis: RedisServer, backbone: Backbone) -> None:
    settings = Settings(store=private_redis.url)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        r = c.post("/v1/training-jobs", json=job(train=None, data_path="keywords"))
        assert_error(r, 422, "invalid_input", "no data root configured")


def test_a_verbalizer_job_is_refused_on_a_backbone_without_a_masked_lm_head(client: TestClient) -> None:
    verbal = {"head": "verbalizer", "label_words": {"phone": "phone"}}
    r = client.post("/v1/training-jobs", json=job(method="ptuning", hyperparameters=verbal))
    assert_error(r, 422, "invalid_input", "needs a backbone with a masked-LM head")
    # Server-side data and no words: nothing to check but the backbone, which is still refused.
    body = job(train=None, data_path="keywords", method="auto", hyperparameters={"head": "verbalizer"})
    assert_error(client.post("/v1/training-jobs", json=body), 422, "invalid_input", "masked-LM head")
    # Label words say nothing without the verbalizer head: refused rather than ignored.
    r = client.post("/v1/training-jobs", json=job(hyperparameters={"label_words": {"phone": ["phone"]}}))
    assert_error(r, 422, "invalid_input", "label words are for head 'verbalizer'")


@pytest.fixture
def mlm_client(private_redis: RedisServer, data_root: Path, mlm_backbone: Backbone) -> Iterator[TestClient]:
    settings = Settings(store=private_redis.url, data_root=data_root, max_wait_ms=1)
    with TestClient(create_app(settings, backbone=mlm_backbone)) as c:
        yield c


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        (
            {"label_words": {"phone": ["smartphones"]}},
            "invalid_input",
            "'smartphones' (label 'phone') is not one",
        ),
        (
            {"label_words": {"tablet": ["phone"]}},
            "invalid_input",
            "labels the data does not have: ['tablet']",
        ),
        ({"label_words": {"phone": [" "]}}, "invalid_request", "label_words['phone'] has no word"),
        ({"label_words": {"phone": []}}, "invalid_request", "label_words['phone'] has no word"),
        ({"label_words": ["phone"]}, "invalid_request", "hyperparameters.label_words"),
    ],
)
def test_bad_label_words_are_refused_when_the_job_is_submitted(
    mlm_client: TestClient, fields: dict[str, Any], code: str, fragment: str
) -> None:
    body = job(method="ptuning", hyperparameters={"head": "verbalizer", **fields})
    assert_error(mlm_client.post("/v1/training-jobs", json=body), 422, code, fragment)


def test_a_verbalizer_job_is_queued_with_its_label_words(
    mlm_client: TestClient, private_redis: RedisServer
) -> None:
    words = {"phone": "phone", "book": ["book", "movie"]}  # "shirt": spelled by its own name
    r = mlm_client.post(
        "/v1/training-jobs",
        json=job(method="auto", hyperparameters={"head": "verbalizer", "label_words": words}),
    )
    assert r.status_code == 202, r.text
    queue = JobQueue(private_redis.url)
    try:
        lease = queue.take("w", block_s=1.0)
        assert lease is not None and lease.job_id == r.json()["id"]
        assert lease.spec.hyperparameters.head == "verbalizer"
        assert lease.spec.hyperparameters.label_words == {"phone": ["phone"], "book": ["book", "movie"]}
    finally:
        queue.close()
    # Server-side data: its labels are read by the worker, the words are checked against the vocabulary now.
    bad = {"head": "verbalizer", "label_words": {"phone": ["smartphones"]}}
    r = mlm_client.post(
        "/v1/training-jobs", json=job(train=None, data_path="keywords", method="auto", hyperparameters=bad)
    )
    assert_error(r, 422, "invalid_input", "is not one token")
    r = mlm_client.post(
        "/v1/training-jobs",
        json=job(train=None, data_path="keywords", method="auto", hyperparameters={"head": "verbalizer"}),
    )
    assert r.status_code == 202, r.text
