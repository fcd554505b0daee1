"""Tasks with (IA)^3 scales or LoRA through the real app: uploaded, listed, and served in mixed
batches with tasks without them, each with the probabilities it has alone; a task whose scales or
LoRA do not fit the backbone is refused with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from prompts.backbone import Backbone
from service.app import create_app
from service.settings import Settings
from tests.factories import forge_artifact, random_artifact
from tests.service.test_api import assert_error, assert_served_concurrently_as_alone, upload


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

    assert_served_concurrently_as_alone(client, backbone, artifacts)


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


def test_lora_tasks_are_listed_and_served_with_other_tasks(client: TestClient, backbone: Backbone) -> None:
    artifacts = [
        random_artifact(
            backbone.spec,
            task=f"l{i}",
            num_labels=2 + i % 3,
            prefix_length=i % 3 + 1,
            seed=i,
            scales=i == 0,
            lora_rank=(0, 4, 2, 4)[i],
        )
        for i in range(4)
    ]
    for a in artifacts:
        assert upload(client, a).status_code == 201
    listed = {t["task"]: t["lora"] for t in client.get("/v1/prompts").json()["tasks"]}
    targets = list(backbone.family.lora_targets(backbone.spec.shape()))
    assert listed == {
        "l0": None,
        "l1": {"rank": 4, "targets": targets},
        "l2": {"rank": 2, "targets": targets},
        "l3": {"rank": 4, "targets": targets},
    }
    assert_served_concurrently_as_alone(client, backbone, artifacts)


def test_lora_that_does_not_fit_the_backbone_is_refused(client: TestClient, backbone: Backbone) -> None:
    spec = backbone.spec
    adapted = random_artifact(spec, task="wide", seed=0, lora_rank=2)

    def wider(manifest: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
        tensors["lora.ffn_in.up"] = torch.zeros(spec.num_layers, 2, spec.ffn_size + 8)

    assert_error(
        upload(client, forge_artifact(adapted, wider)),
        422,
        "incompatible_artifact",
        f"LoRA 'ffn_in' from {spec.hidden_size} to {spec.ffn_size + 8}",
    )
    assert client.get("/v1/prompts").json() == {"tasks": []}
