"""Reading docker-compose.yml: each service's environment as compose resolves it, or mapped onto loopback.

Shared by the deployment-file checks (tests/test_deploy_files.py) and the topology test
(tests/test_topology.py), which runs what compose runs as local processes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}``: ``env`` first, else the default, else empty."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def compose_environment(service: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment compose gives ``service``, interpolated from ``env`` (default: none set)."""
    block = load_compose()["services"][service].get("environment", {})
    if isinstance(block, list):  # the KEY=VALUE list form
        block = dict(item.split("=", 1) for item in block)
    return {str(k): interpolate(str(v), env or {}) for k, v in block.items()}


def local_environment(
    service: str,
    *,
    redis_url: str,
    port: int | None = None,
    paths: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Compose's environment for ``service`` as a process on this machine: the Redis URL (store, and
    jobs if set) points at ``redis_url``, the bind address is loopback with ``port``, and container
    paths (e.g. ``/data/training``) are mapped by ``paths``. For topology tests."""
    local = compose_environment(service, env)
    for key in ("PTSERVE_STORE", "PTSERVE_JOBS_URL"):
        if local.get(key, "").startswith("redis://redis:6379"):
            local[key] = redis_url
    if "PTSERVE_HOST" in local:
        local["PTSERVE_HOST"] = "127.0.0.1"
    if port is not None:
        local["PTSERVE_PORT"] = str(port)
    for key, value in list(local.items()):
        if paths and value in paths:
            local[key] = paths[value]
    return local
