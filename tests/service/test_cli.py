from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from prompts.backbone import Backbone
from service.cli import build_parser, main, settings_from_args
from tests.factories import random_artifact
from tests.processes import free_port

REPO = Path(__file__).resolve().parents[2]
pytest_plugins = ("tests.redis_server",)


def test_flags_override_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PTSERVE_STORE", "/tmp/from-env")
    settings = settings_from_args(build_parser().parse_args(["serve", "--store", "/tmp/from-flag"]))
    assert settings.max_batch_size == 7
    assert settings.store == "/tmp/from-flag"
    assert settings.max_wait_ms == 5.0


def test_invalid_settings_stop_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PTSERVE_MAX_BATCH_SIZE", "0")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "max_batch_size" in err and "PTSERVE_MAX_BATCH_SIZE" in err and "--max-batch-size" in err


@pytest.mark.integration
def test_serve_runs_a_real_server_process(tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone) -> None:
    port = free_port()
    env = {**os.environ, "PTSERVE_MAX_WAIT_MS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model",
            str(tiny_bert_dir),
            "--store",
            str(tmp_path / "store"),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness poll: the server process needs a moment to import torch and bind
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        artifact = random_artifact(backbone.spec, task="cli_task")
        r = httpx.post(f"{base}/v1/prompts", files={"file": ("a.safetensors", artifact.data)})
        assert r.status_code == 201, r.text
        r = httpx.post(
            f"{base}/v1/classify", json={"task": "cli_task", "texts": ["great phone", "bad shirt"]}
        )
        assert r.status_code == 200 and r.json()["version"] == artifact.version
        assert len(r.json()["results"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn drains, runs the lifespan shutdown, then re-raises SIGTERM so the exit status shows it.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert (tmp_path / "store" / "tasks" / "cli_task" / "current").read_text().strip() == artifact.version


def test_cli_publishes_to_a_redis_store_url(redis_url: str, backbone: Backbone) -> None:
    from prompts.redis_store import RedisPromptStore
    from service.cli import publish

    artifact = random_artifact(backbone.spec, task="cli_redis")
    assert publish(artifact, store=redis_url, server=None, out=None) == f"store {redis_url}"
    store = RedisPromptStore(redis_url)
    try:
        assert store.get("cli_redis").data == artifact.data
        store.delete("cli_redis")
    finally:
        store.close()
