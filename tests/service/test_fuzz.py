"""Property-based fuzzing of the HTTP API against its own OpenAPI document (schemathesis, in process).

Every operation of ``/openapi.json`` gets schema-valid and schema-invalid requests (bodies, path
parameters, multipart uploads) sent through the real app with its lifespan. Each answer must be no
5xx, carry a documented status and content type, match the documented response schema, and refuse
schema-invalid input with a 4xx. Classify requests whose task name is well formed are pointed at a
real task, so random texts reach the tokenizer and the batcher instead of stopping at 404.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from prompts.backbone import Backbone
from prompts.names import TASK_NAME_PATTERN
from service.app import create_app
from service.settings import Settings
from tests.factories import random_artifact
from tests.redis_server import RedisUnavailable, no_redis, start_server
from tests.synthetic import write_data_dir

FUZZ_TASK = "fuzz"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def jobs_redis() -> Iterator[str]:
    """A private redis-server, so the training-job routes run for real (not 503 jobs_disabled)."""
    try:
        server = start_server()
    except RedisUnavailable as exc:
        no_redis(str(exc))
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone, jobs_redis: str) -> FastAPI:
    tmp = tmp_path_factory.mktemp("fuzz")
    write_data_dir(tmp / "data" / "keywords")  # a data_path a drawn job may name
    settings = Settings(
        store=str(tmp / "store"),
        jobs_url=jobs_redis,
        data_root=tmp / "data",
        max_wait_ms=1,
        max_texts_per_request=16,
        max_text_chars=2000,
    )
    return create_app(settings, backbone=backbone)


@pytest.fixture(scope="module")
def fuzz_client(fuzz_app: FastAPI, backbone: Backbone) -> Iterator[ASGIClient]:
    """schemathesis's in-process client; entering it runs the app's lifespan (stopped on the way out)."""
    with asgi.get_client(fuzz_app) as client:
        artifact = random_artifact(backbone.spec, task=FUZZ_TASK)
        r = client.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)})
        assert r.status_code == 201, r.text
        try:
            yield client
        finally:
            asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def api_schema(fuzz_app: FastAPI) -> Any:
    return schemathesis.openapi.from_dict(fuzz_app.openapi())


def _aim_at_real_task(case: Any) -> None:
    body = case.body
    task = body.get("task") if isinstance(body, dict) else None
    if isinstance(task, str) and TASK_NAME_PATTERN.fullmatch(task):
        body["task"] = FUZZ_TASK


def _send_and_check(case: Any, client: ASGIClient) -> int:
    if case.method == "DELETE" and isinstance(case.path_parameters, dict):
        # Deleting the fuzz task would turn every later classify into a 404: still no 5xx, but less reach.
        case.path_parameters = {**case.path_parameters, "task": f"{case.path_parameters.get('task')}-x"}
    if case.path == "/v1/classify":
        _aim_at_real_task(case)
    response = case.call(session=client)
    case.validate_response(response, checks=CHECKS)
    return int(response.status_code)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(mode: GenerationMode, fuzz_client: ASGIClient, api_schema: Any) -> None:
    seen: Counter[tuple[str, str, int]] = Counter()

    # derandomize: the same bounded set of examples every run, so CI never flakes on a new draw;
    # FUZZ_RANDOM=1 FUZZ_EXAMPLES=2000 explores further by hand.
    @settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
        deadline=None,
        derandomize=not os.environ.get("FUZZ_RANDOM"),
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=api_schema.as_strategy(mode))
    def fuzz(case: Any) -> None:
        seen[(case.method, case.path, _send_and_check(case, fuzz_client))] += 1

    fuzz()
    if mode == GenerationMode.POSITIVE:
        # The draw reached the forward pass, not only the validators.
        assert seen[("POST", "/v1/classify", 200)] > 0, seen
    else:
        # Schema-violating bodies reached the validators (negative_data_rejection checked each answer).
        assert seen[("POST", "/v1/classify", 422)] > 0, seen
    # Whatever came before, the service still answers a good request.
    r = fuzz_client.post("/v1/classify", json={"task": FUZZ_TASK, "text": "still fine"})
    assert r.status_code == 200 and len(r.json()["results"]) == 1
