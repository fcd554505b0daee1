from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import REPO_ROOT


def serve_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``ptserve serve`` in a subprocess with ``env`` on top of a PTSERVE_-free environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PTSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
        cwd=REPO_ROOT,
        env={**base, "PTSERVE_AUTH": "off", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"PTSERVE_MAX_BATCH_SIZE": "0"},
            "max_batch_size (--max-batch-size / PTSERVE_MAX_BATCH_SIZE): Input should be greater than or "
            "equal to 1 (got '0')",
        ),
        ({"PTSERVE_LOG_FORMAT": "xml"}, "log_format (--log-format / PTSERVE_LOG_FORMAT): Input should be"),
        ({"PTSERVE_REQUEST_TIMEOUT_S": "-1"}, "request_timeout_s (PTSERVE_REQUEST_TIMEOUT_S)"),
        ({"PTSERVE_API_KEYS": "admin:secret"}, "api_keys (PTSERVE_API_KEYS): entry 1 (scope 'admin')"),
        ({"PTSERVE_AUTH": "on"}, "auth is on but no API keys are configured: set PTSERVE_API_KEYS"),
        ({"PTSERVE_MAX_QUEUE": "10"}, "max_queue (10) must be at least max_texts_per_request (256)"),
    ],
)
def test_invalid_settings_stop_serve_with_one_clean_message(env: dict[str, str], expected: str) -> None:
    done = serve_with(env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("ptserve: invalid settings:\n"), done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and "pydantic" not in done.stderr.lower()
    assert done.stdout == ""


def test_front_ends_default_to_one_on_a_cpu_and_to_a_quarter_of_the_cores_up_to_four_on_cuda() -> None:
    from service.settings import default_frontends

    assert [default_frontends(False, cores) for cores in (1, 2, 16, 64)] == [1, 1, 1, 1]
    assert [default_frontends(True, cores) for cores in (2, 4, 8, 12, 16, 64)] == [1, 1, 2, 3, 4, 4]


def test_serve_decides_unset_front_ends_and_keeps_explicit_ones_without_a_store_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from service.cli import with_frontends
    from service.settings import Settings

    store = str(tmp_path / "store")
    assert with_frontends(Settings(store=store, device="cpu")).frontends == 1
    # Without CUDA, "cuda" fails to resolve (loading the backbone reports it) and "auto" is the CPU:
    # both mean one front end there.
    cores = os.cpu_count() or 1
    expected = min(4, max(1, cores // 4)) if torch.cuda.is_available() else 1
    assert with_frontends(Settings(store=store, device="cuda")).frontends == expected
    assert with_frontends(Settings(store=store, device="auto")).frontends == expected
    assert not [r for r in caplog.records if "rate limits" in r.getMessage()]
    with caplog.at_level("WARNING", logger="service.cli"):
        assert with_frontends(Settings(store=store, frontends=3)).frontends == 3
    # A directory store's key buckets live in the engine (one for every front end): nothing to warn of.
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
