"""Faults under real ``ptserve serve`` processes: SIGKILL in the middle of an upload, a full disk, a
read-only store. After each, the store holds complete versions only and the service serves them.

The kill lands at an exact point of the disk store's write through its test-only pause hook
(``PTSERVE_TEST_PAUSE_AT``): the writer creates a marker file and blocks, the test sees the marker
and kills the process. The full and read-only disks are a real, tiny tmpfs mounted by the test
(skipped where this process may not mount); a file-size limit (RLIMIT_FSIZE) on the server makes the
kernel refuse a write everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from prompts.disk_store import PAUSE_ENV, TMP_PREFIX, DiskPromptStore
from prompts.forward import TaskPrompt, prompted_forward
from tests.factories import random_artifact
from tests.processes import free_port

REPO = Path(__file__).resolve().parents[2]
TEXT = "great phone, bad battery"
pytestmark = pytest.mark.integration


def _wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str], timeout: float) -> None:
    """Poll ``condition`` until it holds; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited ({proc.returncode}) while waiting for {what}:\n{out}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def serve(
    model: Path,
    store: Path,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real ``ptserve serve`` on a free port; killed on the way out if the test did not kill it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--store", str(store),
         "--port", str(port), "--device", "cpu"],
        cwd=REPO,
        env={**os.environ, "PTSERVE_MAX_WAIT_MS": "1", "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _ready(base), "readiness", proc, timeout=60)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _probabilities(backbone: Backbone, artifact: PromptArtifact) -> list[float]:
    prompt = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode([TEXT], backbone.spec.max_positions)]
    with torch.inference_mode():
        return [float(p) for p in torch.softmax(prompted_forward(backbone, ids, [prompt]), -1)[0]]


def assert_serves(base: str, backbone: Backbone, artifact: PromptArtifact, versions: list[str]) -> None:
    """``artifact`` is the task's current version, complete: it answers exactly as the artifact says."""
    r = httpx.post(f"{base}/v1/classify", json={"task": artifact.task, "text": TEXT}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == artifact.version
    scores = r.json()["results"][0]["scores"]
    for i, p in enumerate(_probabilities(backbone, artifact)):
        assert scores[f"label_{i}"] == pytest.approx(p, abs=1e-5)
    info = httpx.get(f"{base}/v1/prompts/{artifact.task}", timeout=30).json()
    assert (info["version"], info["versions"]) == (artifact.version, versions)


def upload(base: str, artifact: PromptArtifact) -> httpx.Response:
    return httpx.post(f"{base}/v1/prompts", files={"file": ("a.safetensors", artifact.data)}, timeout=30)


def _temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


# ------------------------------------------------------------------------------------ SIGKILL mid-upload

# A store writer in its own process (as ``ptserve train`` or another replica would be), for the kill
# points after the artifact is written: the store is what must survive, and this starts in 0.1 s.
WRITER = """
import sys
from pathlib import Path
from prompts.disk_store import DiskPromptStore
root, task, version, data, manifest = sys.argv[1:]
DiskPromptStore(root).put(task, version, Path(data).read_bytes(), Path(manifest).read_text())
"""


def _kill_writer_at(stage: str, root: Path, artifact: PromptArtifact, tmp_path: Path) -> None:
    data, manifest, marker = (tmp_path / f"{artifact.task}.{ext}" for ext in ("bin", "json", "paused"))
    data.write_bytes(artifact.data)
    manifest.write_text(artifact.manifest_json())
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), artifact.task, artifact.version, str(data), str(manifest)],
        cwd=REPO,
        env={**os.environ, PAUSE_ENV: f"{stage}:{artifact.task}:{marker}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(marker.exists, f"the writer to pause at {stage}", proc, timeout=30)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_sigkill_during_upload_leaves_the_old_or_the_new_version_complete(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    root = tmp_path / "store"
    store = DiskPromptStore(root)
    spec = backbone.spec
    # (task, old version or None, new version): new ones are bigger, with other labels.
    tasks = {
        name: (
            random_artifact(spec, task=name, seed=10 + i, prefix_length=4) if name != "first-put" else None,
            random_artifact(spec, task=name, seed=20 + i, prefix_length=8, num_labels=5),
        )
        for i, name in enumerate(["server-killed", "before-pointer", "before-history", "first-put"])
    }
    for old, _ in tasks.values():
        if old is not None:
            store.put(old.task, old.version, old.data, old.manifest_json())

    # The service itself, killed while the new artifact's bytes are half on disk.
    old, new = tasks["server-killed"]
    assert old is not None
    marker = tmp_path / "server-paused"
    with serve(tiny_bert_dir, root, {PAUSE_ENV: f"artifact_half_written:{new.task}:{marker}"}) as (
        base,
        proc,
    ):
        assert_serves(base, backbone, old, [old.version])
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(upload, base, new)
            _wait_for(marker.exists, "the upload to pause half-written", proc, timeout=30)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            with pytest.raises(httpx.TransportError):
                pending.result(timeout=30)  # the client saw the connection die, never a 201
    assert _temp_files(root), "the kill did not land mid-write"

    # Writers killed just before and just after the pointer rename (the commit point), and in the
    # middle of a task's very first put.
    _kill_writer_at("before_pointer", root, tasks["before-pointer"][1], tmp_path)
    _kill_writer_at("before_history", root, tasks["before-history"][1], tmp_path)
    _kill_writer_at("artifact_half_written", root, tasks["first-put"][1], tmp_path)

    with serve(tiny_bert_dir, root) as (base, _):
        for name in ("server-killed", "before-pointer"):  # killed before the commit point: old
            old, new = tasks[name]
            assert old is not None
            assert_serves(base, backbone, old, [old.version])
        old, new = tasks["before-history"]  # after it: new, and the old one is still listed
        assert old is not None
        assert_serves(base, backbone, new, [new.version, old.version])
        r = httpx.post(f"{base}/v1/classify", json={"task": "first-put", "text": TEXT}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        listed = [t["task"] for t in httpx.get(f"{base}/v1/prompts", timeout=30).json()["tasks"]]
        assert listed == ["before-history", "before-pointer", "server-killed"]
        # Uploading again works and sweeps the dead writers' temporary files.
        for old, new in tasks.values():
            assert upload(base, new).status_code == 201
            assert_serves(base, backbone, new, [new.version] + ([old.version] if old else []))
    assert _temp_files(root) == []


# ------------------------------------------------------------------------------- full / read-only disk


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "store"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "ptserve-test", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _remount(mount_point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount_point)], check=True)


def _fill(mount_point: Path) -> Path:
    """Write a file until the filesystem has no space left; returns it."""
    filler = mount_point / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_full_and_read_only_store_refuse_uploads_and_keep_serving(
    tiny_tmpfs: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    v1, v2, v3 = (random_artifact(backbone.spec, task="survivor", seed=s, prefix_length=8) for s in (1, 2, 3))
    with serve(tiny_bert_dir, tiny_tmpfs) as (base, _):
        assert upload(base, v1).status_code == 201

        filler = _fill(tiny_tmpfs)
        r = upload(base, v2)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "store_full"
        assert "prompt store is full" in r.json()["error"]["message"]
        assert "No space left on device" in r.json()["error"]["message"]
        assert_serves(base, backbone, v1, [v1.version])
        assert _temp_files(tiny_tmpfs) == []
        # Space comes back: the same replica takes the upload, no restart.
        filler.unlink()
        assert upload(base, v2).status_code == 201
        assert_serves(base, backbone, v2, [v2.version, v1.version])

        _remount(tiny_tmpfs, "ro")
        r = upload(base, v3)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "store_error"
        assert "read-only" in r.json()["error"]["message"]
        assert_serves(base, backbone, v2, [v2.version, v1.version])
        _remount(tiny_tmpfs, "rw")
        assert upload(base, v3).status_code == 201
        assert_serves(base, backbone, v3, [v3.version, v2.version, v1.version])


FILE_LIMIT = 16 * 1024


def _limit_file_size() -> None:
    """In the server child: files may not grow past FILE_LIMIT (a quota), and writing past it fails
    with EFBIG instead of killing the process with SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def test_a_write_the_filesystem_refuses_fails_the_upload_and_keeps_serving(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    """Runs everywhere (no mount needed): the kernel refuses the write through RLIMIT_FSIZE."""
    small = random_artifact(backbone.spec, task="quota", seed=1, prefix_length=4)
    big = random_artifact(backbone.spec, task="quota", seed=2, prefix_length=48)
    assert len(small.data) < FILE_LIMIT < len(big.data)
    root = tmp_path / "store"
    with serve(tiny_bert_dir, root, preexec=_limit_file_size) as (base, _):
        assert upload(base, small).status_code == 201
        r = upload(base, big)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "store_error"
        assert "File too large" in r.json()["error"]["message"]
        assert_serves(base, backbone, small, [small.version])
        assert _temp_files(root) == []
