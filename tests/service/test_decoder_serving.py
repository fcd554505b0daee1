"""The service on a decoder backbone: train, upload, classify, hot swap, over HTTP.

In process: ``ptserve train --server`` trains on a tiny Qwen3 and uploads through the real app, the
service answers what the artifact gives when run here, a second training run becomes the served
version without a restart, and an artifact of another family is refused by name. Across processes: a
real ``ptserve serve --model`` on a tiny Llama (no pad token, grouped-query attention) serves an
upload, and picks up a version that another process (``ptserve train --store``) publishes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from prompts.artifact import parse_artifact
from prompts.backbone import Backbone
from prompts.disk_store import DiskPromptStore
from prompts.forward import TaskPrompt, prompted_forward
from service import cli
from service.app import create_app
from service.settings import Settings
from tests.factories import random_artifact
from tests.processes import PtserveProcess, clean_environment, eventually
from tests.redis_server import free_port
from tests.synthetic import write_data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--epochs", "4", "--batch-size", "16", "--lr", "0.05", "--head-lr", "0.05", "--prefix-length", "4"]
TEXTS = ["the phone battery is great", "a red shirt of my size", "this book is a good movie"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data") / "keywords", train=48, dev=18, test=18)


def _train(model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--task",
        "keywords",
        "--data",
        str(data),
        "--model",
        str(model),
        "--device",
        "cpu",
        *FAST,
        *extra,
    ]


class _Lent:
    """The test's client, lent to the CLI: the CLI's ``with`` block must not shut the app down."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def __enter__(self) -> TestClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        return None


def _expected(backbone: Backbone, data: bytes, texts: list[str]) -> list[list[float]]:
    task = TaskPrompt.from_artifact(parse_artifact(data), backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode(texts, backbone.spec.max_positions)]
    with torch.inference_mode():
        probs: list[list[float]] = torch.softmax(
            prompted_forward(backbone, ids, [task] * len(ids)), -1
        ).tolist()
    return probs


def test_train_upload_classify_and_hot_swap_in_process(
    kind_dir: Callable[[str], Path],
    kind_backbone: Callable[[str], Backbone],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backbone = kind_backbone("qwen3")
    store = tmp_path / "store"
    with TestClient(create_app(Settings(store=str(store), max_wait_ms=1), backbone=backbone)) as client:
        monkeypatch.setattr(cli, "make_http_client", lambda: _Lent(client))
        assert cli.main(_train(kind_dir("qwen3"), data_dir, "--server", "http://testserver")) == 0
        first = DiskPromptStore(store).get("keywords")
        m = parse_artifact(first.data).manifest
        assert (m.backbone.family, m.head.pooling) == ("decoder", "last")

        r = client.post("/v1/classify", json={"task": "keywords", "texts": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == first.version
        got = [[res["scores"][label] for label in m.labels] for res in body["results"]]
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(_expected(backbone, first.data, TEXTS)), atol=1e-5, rtol=0
        )

        # Hot swap: a second run (another seed, input prompts this time) is served by the next request.
        argv = _train(
            kind_dir("qwen3"), data_dir, "--server", "http://testserver", "--seed", "1", "--method", "prompt"
        )
        assert cli.main(argv) == 0
        second = DiskPromptStore(store).get("keywords")
        assert second.version != first.version
        r = client.post("/v1/classify", json={"task": "keywords", "texts": TEXTS})
        assert r.json()["version"] == second.version
        got = [[res["scores"][label] for label in m.labels] for res in r.json()["results"]]
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(_expected(backbone, second.data, TEXTS)), atol=1e-5, rtol=0
        )

        # An artifact trained on another family is refused, and says which.
        foreign = random_artifact(kind_backbone("bert").spec, task="keywords")
        r = client.post("/v1/prompts", files={"file": ("a.safetensors", foreign.data)})
        assert r.status_code == 422 and r.json()["error"]["code"] == "incompatible_artifact"
        assert (
            "family=bert" in r.json()["error"]["message"]
            and "(family=decoder)" in r.json()["error"]["message"]
        )


@pytest.mark.integration
def test_a_served_decoder_picks_up_a_version_published_by_another_process(
    kind_dir: Callable[[str], Path], kind_backbone: Callable[[str], Backbone], data_dir: Path, tmp_path: Path
) -> None:
    model = kind_dir("llama")
    backbone = kind_backbone("llama")
    store = tmp_path / "store"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = clean_environment(PTSERVE_AUTH="off", PTSERVE_MAX_WAIT_MS="1", PTSERVE_DEVICE="cpu")
    args = ["serve", "--model", str(model), "--store", str(store), "--port", str(port)]
    server = PtserveProcess(args, env, tmp_path / "serve.log")
    try:
        server.wait_ready(base)
        uploaded = random_artifact(backbone.spec, task="keywords", prefix_length=3, pooling="last", seed=4)
        r = httpx.post(f"{base}/v1/prompts", files={"file": ("a.safetensors", uploaded.data)}, timeout=30)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{base}/v1/classify", json={"task": "keywords", "texts": TEXTS}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == uploaded.version, r.text
        served = [[res["scores"][f"label_{i}"] for i in range(3)] for res in r.json()["results"]]
        torch.testing.assert_close(
            torch.tensor(served), torch.tensor(_expected(backbone, uploaded.data, TEXTS)), atol=1e-5, rtol=0
        )

        # Another process trains and publishes into the same store; the server follows its change token.
        trainer = PtserveProcess(_train(model, data_dir, "--store", str(store)), env, tmp_path / "train.log")
        assert trainer.proc.wait(timeout=300) == 0, trainer.output()
        published = DiskPromptStore(store).get("keywords")
        assert published.version != uploaded.version

        def swapped() -> bool:
            reply = httpx.post(f"{base}/v1/classify", json={"task": "keywords", "text": TEXTS[0]}, timeout=30)
            return bool(reply.status_code == 200 and reply.json()["version"] == published.version)

        eventually(swapped, "the published version to be served")
        labels = parse_artifact(published.data).manifest.labels
        r = httpx.post(f"{base}/v1/classify", json={"task": "keywords", "texts": TEXTS}, timeout=30)
        got = [[res["scores"][label] for label in labels] for res in r.json()["results"]]
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(_expected(backbone, published.data, TEXTS)), atol=1e-5, rtol=0
        )
    finally:
        status = server.stop()
    assert status in (0, -signal.SIGTERM), server.output()[-4000:]
