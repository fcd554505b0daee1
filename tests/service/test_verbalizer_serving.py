"""Verbalizer tasks through the real app and the CLI: served in mixed batches, refused without an MLM head."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts.artifact import PromptArtifact, parse_artifact
from prompts.backbone import Backbone, load_backbone
from prompts.forward import TaskPrompt, prompted_forward
from service import cli
from service.app import create_app
from service.settings import Settings
from tests.factories import make_verbalizer_artifact, random_artifact
from tests.synthetic import write_data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = {"book": ["book", "movie"], "phone": ["phone"], "shirt": ["shirt", "size"]}


def _client(store: Path, backbone: Backbone) -> TestClient:
    return TestClient(create_app(Settings(store=str(store), max_wait_ms=20), backbone=backbone))


@pytest.fixture
def client(tmp_path: Path, mlm_backbone: Backbone) -> Iterator[TestClient]:
    with _client(tmp_path / "store", mlm_backbone) as c:
        yield c


def upload(client: TestClient, artifact: PromptArtifact) -> Any:
    return client.post(
        "/v1/prompts", files={"file": ("t.safetensors", artifact.data, "application/octet-stream")}
    )


def alone(backbone: Backbone, artifact: PromptArtifact, text: str) -> torch.Tensor:
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode([text], backbone.spec.max_positions)]
    with torch.inference_mode():
        return torch.softmax(prompted_forward(backbone, ids, [task]), -1)[0]


def test_verbalizer_and_head_tasks_are_served_side_by_side(
    client: TestClient, mlm_backbone: Backbone
) -> None:
    verbal, _ = make_verbalizer_artifact(mlm_backbone, WORDS, ["it", "is", "a"], task="verbal")
    head = random_artifact(mlm_backbone.spec, task="head", num_labels=4, prefix_length=4, seed=3)
    for artifact in (verbal, head):
        assert upload(client, artifact).status_code == 201
    info = client.get("/v1/prompts/verbal").json()
    assert info["labels"] == sorted(WORDS)
    texts = ["my phone screen", "a great movie book", "shirt size okay", "the price is cheap"]
    jobs = [(task, text) for text in texts for task in (verbal, head)]
    # Concurrent requests, so the batcher can merge verbalizer and head rows into one forward.
    from concurrent.futures import ThreadPoolExecutor

    def classify(job: tuple[PromptArtifact, str]) -> Any:
        artifact, text = job
        return client.post("/v1/classify", json={"task": artifact.task, "texts": [text]})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(classify, jobs))
    for (artifact, text), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        expected = alone(mlm_backbone, artifact, text)
        labels = artifact.manifest.labels
        got = torch.tensor([result["scores"][label] for label in labels])
        torch.testing.assert_close(got, expected[: len(labels)], rtol=0, atol=1e-5)
        assert result["label"] == labels[int(expected.argmax())]


def test_a_backbone_without_an_mlm_head_refuses_verbalizer_tasks(
    tmp_path: Path, mlm_backbone: Backbone, backbone: Backbone
) -> None:
    verbal, _ = make_verbalizer_artifact(mlm_backbone, WORDS, ["a"], task="verbal")
    # The same encoder weights without cls.predictions: a plain BertModel directory.
    plain_dir = tmp_path / "plain"
    mlm_backbone.model.save_pretrained(plain_dir)
    mlm_backbone.tokenizer.save_pretrained(plain_dir)
    plain = load_backbone(plain_dir)
    assert plain.spec.fingerprint == mlm_backbone.spec.fingerprint and plain.spec.mlm_fingerprint is None
    with _client(tmp_path / "store", plain) as c:
        response = upload(c, verbal)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "incompatible_artifact" and "has no masked-LM head" in error["message"]


def test_cli_trains_a_verbalizer_task_and_refuses_one_without_an_mlm_head(
    mlm_dir: Path, tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data_dir(tmp_path / "data", train=30, dev=15, test=15)
    words = tmp_path / "words.json"
    words.write_text(json.dumps({"phone": ["phone", "battery"], "book": "book"}))
    out = tmp_path / "verbal.safetensors"
    base = ["train", "--task", "verbal", "--data", str(data), "--method", "ptuning", "--epochs", "2"]
    argv = [*base, "--head", "verbalizer", "--label-words", str(words), "--out", str(out)]
    assert cli.main([*argv, "--model", str(mlm_dir), "--lr", "0.02", "--prompt-length", "4"]) == 0
    verbalizer = parse_artifact(out.read_bytes()).manifest.head.verbalizer
    assert verbalizer is not None and verbalizer.words == [["book"], ["phone", "battery"], ["shirt"]]
    capsys.readouterr()
    assert (
        cli.main(
            ["eval", "--task", "verbal", "--data", str(data), "--artifact", str(out), "--model", str(mlm_dir)]
        )
        == 0
    )
    assert "accuracy" in capsys.readouterr().out

    inline = [*base, "--head", "verbalizer", "--label-words", "phone=phone|screen", "--out", str(out)]
    assert cli.main([*inline, "--model", str(tiny_bert_dir)]) == 1
    assert "needs a backbone with a masked-LM head" in capsys.readouterr().err
    assert cli.main([*base, "--label-words", "phone=phone", "--out", str(out), "--model", str(mlm_dir)]) == 1
    assert "label words are for head 'verbalizer'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--head", "verbalizer", "--label-words", "phone", "--model", str(mlm_dir)])
    assert "expected label=word|word,label=word" in capsys.readouterr().err
