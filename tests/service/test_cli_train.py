"""``ptserve train`` / ``eval`` / ``import-peft`` / ``export-peft`` / ``serve --demo`` through ``main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts.artifact import max_text_tokens, parse_artifact
from prompts.backbone import Backbone, load_backbone
from prompts.disk_store import DiskPromptStore
from prompts.forward import TaskPrompt, prompted_forward
from service import cli
from service.app import create_app
from service.settings import Settings
from tests.factories import random_artifact
from tests.synthetic import make_examples, make_learnable_bert, write_data_dir, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]

FAST = ["--epochs", "12", "--batch-size", "16", "--lr", "0.05", "--head-lr", "0.05", "--prefix-length", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_learnable_bert(tmp_path_factory.mktemp("models") / "learnable")


@pytest.fixture(scope="module")
def learnable(model_dir: Path) -> Backbone:
    return load_backbone(model_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data") / "keywords", train=60, dev=30, test=30)


def _train(model_dir: Path, data_dir: Path, *extra: str, task: str = "keywords") -> list[str]:
    return [
        "train",
        "--task",
        task,
        "--data",
        str(data_dir),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        *FAST,
        *extra,
    ]


def test_train_store_eval_round_trip(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert cli.main(_train(model_dir, data_dir, "--store", str(store))) == 0
    out, err = capsys.readouterr()
    assert "task keywords version" in out and "test accuracy" in out
    assert "epoch   1" in err and "dev accuracy" in err  # the per-epoch progress lines
    version = (store / "tasks" / "keywords" / "current").read_text().strip()
    assert f"version {version}" in out

    png = tmp_path / "cm.png"
    argv = ["eval", "--task", "keywords", "--data", str(data_dir / "test.jsonl"), "--store", str(store)]
    assert cli.main([*argv, "--model", str(model_dir), "--device", "cpu", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro-F1" in out and "confusion matrix" in out
    accuracy = float(next(line.split()[1] for line in out.splitlines() if line.startswith("accuracy")))
    artifact = parse_artifact(DiskPromptStore(store).get("keywords").data)
    assert artifact.manifest.metrics is not None
    # eval runs the stored artifact as the service would: the trainer's recorded test accuracy.
    assert accuracy == pytest.approx(artifact.manifest.metrics["test"]["accuracy"], abs=1e-4)
    assert accuracy >= 0.7
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_train_to_a_file_with_each_method(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    for method, name in (("ptuning", "p-tuning"), ("prompt", "prompt-tuning"), ("probe", "linear-probe")):
        out = tmp_path / f"{method}.safetensors"
        assert (
            cli.main(_train(model_dir, data_dir, "--method", method, "--out", str(out), "--epochs", "2")) == 0
        )
        artifact = parse_artifact(out.read_bytes())
        assert artifact.manifest.method == name
        assert artifact.manifest.training is not None and artifact.manifest.training["epochs_run"] <= 2


def test_probe_head_from_the_command_line(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--task", "keywords", "--data", str(data_dir), "--model", str(model_dir)]
    base += ["--device", "cpu"]
    out = tmp_path / "probe.safetensors"
    assert cli.main([*base, "--method", "probe", "--probe-head", "standardized", "--out", str(out)]) == 0
    hp = (parse_artifact(out.read_bytes()).manifest.training or {})["hyperparameters"]
    assert hp["probe_head"] == "standardized" and "epochs" not in hp  # fitted to convergence, no epochs
    assert cli.main([*base, "--method", "probe", "--out", str(out)]) == 0  # the probe's default
    hp = (parse_artifact(out.read_bytes()).manifest.training or {})["hyperparameters"]
    assert hp["probe_head"] == "standardized"
    assert (
        cli.main([*base, "--method", "probe", "--probe-head", "trained", "--epochs", "2", "--out", str(out)])
        == 0
    )
    hp = (parse_artifact(out.read_bytes()).manifest.training or {})["hyperparameters"]
    assert "probe_head" not in hp and hp["epochs"] == 2  # trained by epochs, its manifest as before
    assert cli.main([*base, "--method", "prefix", "--probe-head", "standardized", "--out", str(out)]) == 1
    assert "use method linear-probe" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--probe-head", "svm", "--out", str(out)])
    assert exit_info.value.code == 2 and "invalid choice: 'svm'" in capsys.readouterr().err


def test_train_reports_bad_data(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    write_data_dir(bad, train=12, dev=6, test=6)
    (bad / "dev.jsonl").write_text('{"text": "x", "label": "phone"}\n{"text": "y", "label": "toys"}\n')
    assert cli.main(_train(model_dir, bad, "--out", str(tmp_path / "x.safetensors"))) == 1
    err = capsys.readouterr().err
    assert "ptserve train: error:" in err and "'toys' (1)" in err
    assert cli.main(_train(model_dir, bad, "--out", str(tmp_path / "x.safetensors"), task="Bad Name")) == 1
    assert "invalid task name" in capsys.readouterr().err


def _app_client(store: Path, backbone: Backbone) -> TestClient:
    return TestClient(create_app(Settings(store=str(store), max_wait_ms=1), backbone=backbone))


def test_upload_to_a_running_service(
    model_dir: Path,
    data_dir: Path,
    learnable: Backbone,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "served"
    monkeypatch.setattr(cli, "make_http_client", lambda: _app_client(store, learnable))
    assert cli.main(_train(model_dir, data_dir, "--server", "http://testserver", "--epochs", "6")) == 0
    assert "-> http://testserver (version" in capsys.readouterr().out
    stored = parse_artifact(DiskPromptStore(store).get("keywords").data)

    # eval --server classifies through the service and agrees with running the artifact here.
    argv = ["eval", "--task", "keywords", "--data", str(data_dir), "--server", "http://testserver"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    remote = float(next(line.split()[1] for line in out.splitlines() if line.startswith("accuracy")))
    assert stored.manifest.metrics is not None
    assert remote == pytest.approx(stored.manifest.metrics["test"]["accuracy"], abs=1e-4)


def test_uploader_reports_refusals(learnable: Backbone, backbone: Backbone, tmp_path: Path) -> None:
    with _app_client(tmp_path / "s", learnable) as client:
        good = random_artifact(learnable.spec, task="up")
        body = cli.upload_artifact("http://testserver", good.data, client=client)
        assert body["task"] == "up" and body["version"] == good.version
        foreign = random_artifact(backbone.spec, task="other")  # the default tiny BERT: other weights
        with pytest.raises(cli.CliError, match="HTTP 422: incompatible_artifact"):
            cli.upload_artifact("http://testserver", foreign.data, client=client)
        with pytest.raises(cli.CliError, match="task_not_found"):
            cli.classify_remote("http://testserver", "missing", ["a text"], client=client)


def test_unreachable_server_is_a_clear_error(
    model_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--task", "keywords", "--data", str(data_dir), "--server", "http://127.0.0.1:9"]
    assert cli.main(argv) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


def test_eval_refuses_labels_the_task_lacks(
    model_dir: Path, learnable: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    artifact = random_artifact(learnable.spec, task="three", num_labels=3)
    DiskPromptStore(store).put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    data = write_jsonl(tmp_path / "eval.jsonl", make_examples(6, seed=0))  # book/phone/shirt labels
    argv = ["eval", "--task", "three", "--data", str(data), "--store", str(store), "--model", str(model_dir)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "labels the task does not know" in err and "'book' (2)" in err


def test_peft_export_and_import_commands(
    model_dir: Path, data_dir: Path, learnable: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert (
        cli.main(_train(model_dir, data_dir, "--store", str(store), "--head", "peft", "--epochs", "2")) == 0
    )
    adapter = tmp_path / "adapter"
    assert cli.main(["export-peft", "--task", "keywords", "--store", str(store), "--out", str(adapter)]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    out = tmp_path / "imported.safetensors"
    argv = ["import-peft", str(adapter), "--task", "again", "--out", str(out), "--model", str(model_dir)]
    assert cli.main(argv) == 0
    original = parse_artifact(DiskPromptStore(store).get("keywords").data)
    imported = parse_artifact(out.read_bytes())
    assert imported.manifest.labels == original.manifest.labels
    ids = [e.input_ids for e in learnable.encode(["phone battery", "a book", "shirt size okay"], 50)]
    with torch.no_grad():
        a, b = (
            prompted_forward(
                learnable, ids, [TaskPrompt.from_artifact(x, learnable.device, learnable.dtype)] * 3
            )
            for x in (original, imported)
        )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    capsys.readouterr()
    cls_store = tmp_path / "cls"
    cls_task = random_artifact(learnable.spec, task="clshead")
    DiskPromptStore(cls_store).put(cls_task.task, cls_task.version, cls_task.data, cls_task.manifest_json())
    argv = ["export-peft", "--task", "clshead", "--store", str(cls_store), "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 1
    assert "--head peft" in capsys.readouterr().err


def test_serve_demo_trains_once_then_serves(
    model_dir: Path, data_dir: Path, backbone: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[Any] = []
    monkeypatch.setattr(cli, "DEMO_DATA", data_dir)
    monkeypatch.setattr(cli, "serve", lambda settings, backbone=None: served.append((settings, backbone)))
    store = tmp_path / "store"
    argv = ["serve", "--demo", "--model", str(model_dir), "--store", str(store), "--device", "cpu"]
    assert cli.main(argv) == 0
    version = DiskPromptStore(store).current_version(cli.DEMO_TASK)
    settings, reused = served[0]
    assert settings.store == str(store) and reused is not None  # the trainer's backbone is reused
    assert cli.main(argv) == 0  # already there: nothing retrained
    assert DiskPromptStore(store).versions(cli.DEMO_TASK) == [version]
    assert cli.ensure_demo_task(settings, backbone_used := served[0][1]) is False
    # A stored demo task trained on another backbone cannot be served by this one: it is retrained.
    assert backbone.spec.fingerprint != backbone_used.spec.fingerprint
    assert cli.ensure_demo_task(settings, backbone) is True
    assert len(DiskPromptStore(store).versions(cli.DEMO_TASK)) == 2


def test_serve_without_demo_is_unchanged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served: list[Any] = []
    monkeypatch.setattr(cli, "serve", lambda settings, backbone=None: served.append((settings, backbone)))
    assert cli.main(["serve", "--store", str(tmp_path / "s")]) == 0
    assert served[0][1] is None and not (tmp_path / "s").exists()


def test_bad_arguments_are_refused_before_any_work(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_train(model_dir, data_dir, "--epochs", "0"))
    assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_train(model_dir, data_dir, "--out", str(tmp_path / "a"), "--store", str(tmp_path / "s")))
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(_train(model_dir, data_dir, "--max-length", "1", "--out", str(tmp_path / "a"))) == 1
    assert "max_length must leave room" in capsys.readouterr().err


def test_objective_pairs_from_the_command_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    few = write_data_dir(tmp_path / "few", train=12, dev=6, test=6)  # 4 rows per label: auto trains pairs
    base = ["train", "--task", "few", "--data", str(few), "--model", str(model_dir), "--device", "cpu"]
    out = tmp_path / "few.safetensors"
    assert cli.main([*base, "--lr", "0.05", "--prefix-length", "4", "--out", str(out)]) == 0
    training = parse_artifact(out.read_bytes()).manifest.training or {}
    assert training["plan"]["objective"] == training["hyperparameters"]["objective"] == "pairs"
    printed = capsys.readouterr().out  # the plan is printed, and which candidate was kept on what evidence
    plan = training["plan"]
    assert "sentence pairs" in printed and f"kept {plan['kept']}: dev accuracy" in printed
    assert f"McNemar z {plan['mcnemar_z']} " in printed
    # Asked for on another method, or with epochs, it is refused before any training.
    assert cli.main([*base, "--method", "probe", "--objective", "pairs", "--out", str(out)]) == 1
    assert "objective 'pairs' trains a prefix" in capsys.readouterr().err
    assert cli.main([*base, "--objective", "pairs", "--epochs", "3", "--out", str(out)]) == 1
    assert "no epochs, patience or head learning rate" in capsys.readouterr().err
    # --objective labels keeps cross-entropy on few-shot data.
    assert cli.main([*base, *FAST, "--objective", "labels", "--epochs", "1", "--out", str(out)]) == 0
    hp = (parse_artifact(out.read_bytes()).manifest.training or {})["hyperparameters"]
    assert "objective" not in hp and hp["selection"] == "robust"
    # Auto's pass alone trains (IA)^3 scales; --no-scales turns them off, --scales on a probe is refused.
    assert parse_artifact(out.read_bytes()).manifest.scales is None
    assert plan["kept"] == "p-tuning-v2"  # so the default's artifact held its scales:
    assert cli.main([*base, "--lr", "0.05", "--prefix-length", "4", "--out", str(out)]) == 0
    assert parse_artifact(out.read_bytes()).manifest.scales == "ia3"
    assert cli.main([*base, "--lr", "0.05", "--prefix-length", "4", "--no-scales", "--out", str(out)]) == 0
    assert parse_artifact(out.read_bytes()).manifest.scales is None
    assert training["plan"]["scales"] is True and training["hyperparameters"]["scales"] is True
    assert cli.main([*base, "--method", "probe", "--scales", "--out", str(out)]) == 1
    assert "linear probe trains on features pooled once" in capsys.readouterr().err


def _accuracy(out: str) -> float:
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("accuracy")))


def test_eval_reads_an_artifact_file_written_by_train_out(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keywords.safetensors"
    assert cli.main(_train(model_dir, data_dir, "--out", str(out), "--epochs", "4")) == 0
    capsys.readouterr()
    argv = ["eval", "--task", "keywords", "--data", str(data_dir), "--model", str(model_dir)]
    assert cli.main([*argv, "--device", "cpu", "--artifact", str(out)]) == 0
    recorded = parse_artifact(out.read_bytes()).manifest.metrics
    assert recorded is not None
    assert _accuracy(capsys.readouterr().out) == pytest.approx(recorded["test"]["accuracy"], abs=1e-4)

    assert cli.main(["eval", "--task", "other", "--data", str(data_dir), "--artifact", str(out)]) == 1
    assert "holds task 'keywords', not 'other'" in capsys.readouterr().err
    assert cli.main([*argv, "--artifact", str(tmp_path / "missing.safetensors")]) == 1
    assert "missing.safetensors: no such artifact file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--artifact", str(out), "--store", str(tmp_path / "s")])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture
def restore_threads() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
def test_train_and_eval_take_a_thread_setting(
    model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Threads as the backbone is loaded, i.e. what the command's forward passes run with.
    seen: list[int] = []
    load = cli._load_backbone

    def spy(model: str | None, device: str) -> Backbone:
        seen.append(torch.get_num_threads())
        return load(model, device)

    monkeypatch.setattr(cli, "_load_backbone", spy)
    out = tmp_path / "t.safetensors"
    torch.set_num_threads(1)
    assert (
        cli.main(_train(model_dir, data_dir, "--out", str(out), "--epochs", "1", "--torch-threads", "2")) == 0
    )
    argv = [
        "eval",
        "--task",
        "keywords",
        "--data",
        str(data_dir),
        "--artifact",
        str(out),
        "--model",
        str(model_dir),
    ]
    torch.set_num_threads(1)
    assert cli.main([*argv, "--torch-threads", "2"]) == 0
    torch.set_num_threads(1)
    monkeypatch.setenv("PTSERVE_TORCH_THREADS", "2")
    assert cli.main(argv) == 0  # the environment, as serve and worker read it
    assert seen == [2, 2, 2]
    torch.set_num_threads(1)
    assert cli.main([*argv, "--torch-threads", "1"]) == 0  # the flag wins over the environment
    assert seen[-1] == 1
    monkeypatch.setenv("PTSERVE_TORCH_THREADS", "many")
    capsys.readouterr()
    assert cli.main(argv) == 1
    assert "PTSERVE_TORCH_THREADS must be a positive integer, got 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--torch-threads", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


# Run in a fresh interpreter: this one imported torch long ago.
_FRESH = """
import sys
from service.cli import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def _fresh_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("PTSERVE_TORCH_THREADS", None)
    return subprocess.run(
        [sys.executable, "-c", _FRESH, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_bad_data_fails_before_torch_or_the_backbone(tmp_path: Path) -> None:
    missing_model = str(tmp_path / "no-model")
    missing_data = str(tmp_path / "no-data")
    train = _fresh_cli("train", "--task", "t", "--data", missing_data, "--model", missing_model)
    assert train.returncode == 1
    assert f"ptserve train: error: {missing_data}: no such file or directory" in train.stderr
    assert "no-model" not in train.stderr and "torch imported: False" in train.stdout

    one_label = write_jsonl(
        tmp_path / "one.jsonl", [e for e in make_examples(9, seed=0) if e.label == "book"]
    )
    train = _fresh_cli("train", "--task", "t", "--data", str(one_label), "--model", missing_model)
    assert train.returncode == 1 and "every example has the label 'book'" in train.stderr
    assert "torch imported: False" in train.stdout

    ev = _fresh_cli("eval", "--task", "t", "--data", missing_data, "--model", missing_model, "--store", "x")
    assert ev.returncode == 1 and f"{missing_data}: no such file" in ev.stderr
    assert "torch imported: False" in ev.stdout


def test_eval_checks_labels_before_loading_the_backbone(
    learnable: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = random_artifact(learnable.spec, task="three", num_labels=3)
    path = tmp_path / "three.safetensors"
    artifact.save(path)
    data = write_jsonl(tmp_path / "eval.jsonl", make_examples(6, seed=0))
    argv = ["eval", "--task", "three", "--data", str(data), "--artifact", str(path)]
    assert cli.main([*argv, "--model", str(tmp_path / "no-model")]) == 1
    err = capsys.readouterr().err
    assert "labels the task does not know" in err and "no-model" not in err


def test_eval_server_keeps_the_texts_order(
    model_dir: Path, data_dir: Path, learnable: Backbone, tmp_path: Path
) -> None:
    store = tmp_path / "served"
    artifact = random_artifact(learnable.spec, task="order", num_labels=3)
    DiskPromptStore(store).put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    texts = ["phone battery screen size " * 6, "book", "a shirt", "the great movie music " * 3, "okay"]
    with _app_client(store, learnable) as client:
        labels, remote = cli.classify_remote("http://testserver", "order", texts, batch_size=2, client=client)
    task = TaskPrompt.from_artifact(artifact, learnable.device, learnable.dtype)
    ids = [e.input_ids for e in learnable.encode(texts, max_text_tokens(artifact.manifest, learnable.spec))]
    with torch.no_grad():
        local = [labels[i] for i in prompted_forward(learnable, ids, [task] * len(ids)).argmax(-1).tolist()]
    assert remote == local
