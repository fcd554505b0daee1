"""Tasks with (IA)^3 scales through the real app: uploaded, listed, and served in mixed batches with
tasks without them, each with the probabilities it has alone; a task whose scales do not fit the
backbone is refused with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from prompts.backbone import Backbone
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.factories import forge_artifact, random_artifact
from tests.service.test_api import assert_error, expected_probs, upload


@pytest.fixture
def client(tmp_path: Path, backbone: Backbone) -> Iterator[TestClient]:
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=5)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        yield c


def test_scaled_and_unscaled_tasks_are_served_together(client: TestClient, backbone: Backbone) -> None:
    artifacts = [
        random_artifact(
            backbone.spec,
            task=f"t{i}",
            num_labels=2 + i % 3,
            prefix_length=i % 3 + 1,
            seed=i,
            scales=i % 2 == 0,
        )
        for i in range(4)
    ]
    for a in artifacts:
        assert upload(client, a).status_code == 201
    listed = {t["task"]: t for t in client.get("/v1/prompts").json()["tasks"]}
    assert {name: t["scales"] for name, t in listed.items()} == {
        "t0": "ia3",
        "t1": None,
        "t2": "ia3",
        "t3": None,
    }

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
    assert runtime.engine.batches - batches_before < len(jobs)  # mixed batches happened


def test_scales_that_do_not_fit_the_backbone_are_refused(client: TestClient, backbone: Backbone) -> None:
    spec = backbone.spec
    scaled = random_artifact(spec, task="wide", seed=0, scales=True)

    def wider(manifest: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
        tensors["scales"] = torch.ones(spec.num_layers, spec.scales_width + 8)

    assert_error(
        upload(client, forge_artifact(scaled, wider)),
        422,
        "incompatible_artifact",
        f"(IA)^3 scales {spec.scales_width + 8} wide",
    )
    assert client.get("/v1/prompts").json() == {"tasks": []}
