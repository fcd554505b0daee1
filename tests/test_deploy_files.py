"""docker-compose.yml, docker/Dockerfile, docker/nginx.conf and .dockerignore against the code.

No Docker engine runs here, so these tests read the files and check them against what the code
accepts: commands are real CLI subcommands, PTSERVE_* variables are real settings, ports, health
checks, volumes and the load balancer agree. The last test runs the service with compose's own
environment and the image's own HEALTHCHECK command.

The compose readers are in ``tests/compose.py``, shared with the topology test (tests/test_topology.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import crossplane
import httpx
import pytest
from compose_spec import PyCompose

from service.app import create_app
from service.cli import build_parser
from service.limits import MULTIPART_OVERHEAD_BYTES
from service.settings import Settings
from tests.compose import compose_environment, interpolate, load_compose, local_environment
from tests.processes import PtserveProcess, clean_environment, free_port

pytest_plugins = ("tests.redis_server",)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
REDIS_DOCKERFILE = REPO / "docker" / "redis.Dockerfile"
NGINX_DOCKERFILE = REPO / "docker" / "nginx.Dockerfile"
NGINX = REPO / "docker" / "nginx.conf"

PTSERVE_SERVICES = ("service", "worker", "service-gpu", "worker-gpu")


# ------------------------------------------------------------------------------------------ readers


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def subcommands() -> set[str]:
    parser = build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if hasattr(action, "choices") and action.choices:
            return set(action.choices)
    raise AssertionError("ptserve has no subcommands")


def nginx_config() -> list[dict[str, Any]]:
    """docker/nginx.conf as nginx's own grammar reads it (crossplane checks directive contexts)."""
    parsed = crossplane.parse(str(NGINX), comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    (config,) = parsed["config"]
    block: list[dict[str, Any]] = config["parsed"]
    return block


def find(block: list[dict[str, Any]], *path: str) -> list[dict[str, Any]]:
    """Every directive reached by following directive names, e.g. ``find(conf, "http", "upstream")``."""
    found = [d for d in block if d["directive"] == path[0]]
    if len(path) == 1:
        return found
    return [deeper for d in found for deeper in find(d.get("block", []), *path[1:])]


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(x) for x in command]


def _interpolated(value: Any) -> Any:
    if isinstance(value, str):
        return interpolate(value, {})
    if isinstance(value, dict):
        return {k: _interpolated(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolated(v) for v in value]
    return value


def _ptserve_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = load_compose()["services"]
    return {name: services[name] for name in PTSERVE_SERVICES if name in services}


def _healthcheck_url(test: list[str]) -> str:
    (url,) = re.findall(r"http://[^'\"\s]+", " ".join(test))
    return url


# ------------------------------------------------------------------------------------------ compose


def test_compose_file_follows_the_compose_specification() -> None:
    # Anchors and merge keys resolved, ${VAR:-default} interpolated with nothing set (as compose does)
    # and x- fragments dropped, then parsed by the Compose specification's types: unknown keys, bad
    # conditions or durations would be refused.
    data = _interpolated({k: v for k, v in load_compose().items() if not k.startswith("x-")})
    compose = PyCompose.from_json(json.dumps(data))
    assert set(compose.service_names()) == set(data["services"])


def test_compose_has_redis_service_worker_and_a_load_balancer() -> None:
    services = load_compose()["services"]
    assert {"redis", "service", "worker", "nginx"} <= set(services)
    # Upstream images by default; REDIS_IMAGE/NGINX_IMAGE name local builds (docker/*.Dockerfile).
    assert interpolate(services["redis"]["image"], {}) == "redis:7-alpine"
    assert interpolate(services["nginx"]["image"], {}) == "nginx:1.27-alpine"
    local = {"REDIS_IMAGE": "localhost/r:1", "NGINX_IMAGE": "localhost/n:1"}
    assert interpolate(services["redis"]["image"], local) == "localhost/r:1"
    assert interpolate(services["nginx"]["image"], local) == "localhost/n:1"


def test_every_command_is_a_real_cli_subcommand() -> None:
    known = subcommands()
    for name, service in _ptserve_services().items():
        command = _command(service)
        assert command, f"{name} has no command"
        assert command[0] in known, f"{name}: {command[0]} is not a subcommand"
        build_parser().parse_args(command)  # flags too, if any
    assert {"serve", "worker", "hash-key"} <= known


def test_every_ptserve_variable_is_a_real_setting_with_a_valid_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fields = set(Settings.model_fields)
    services = load_compose()["services"]
    for name in _ptserve_services():
        env = compose_environment(name)
        settings_env = {k: v for k, v in env.items() if k.startswith("PTSERVE_")}
        assert settings_env, name
        unknown = {k.removeprefix("PTSERVE_").lower() for k in settings_env} - fields
        assert not unknown, f"{name}: not settings: {sorted(unknown)}"
        # The values as compose resolves them by default form valid settings (keys given, as a
        # deployment must: auth stays on by default).
        for key in [k for k in os.environ if k.startswith("PTSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in settings_env.items():
            if key == "PTSERVE_DATA_ROOT":
                # Settings checks the directory exists: in the container it is a mounted volume.
                mounts = [str(v).split(":")[1] for v in services[name].get("volumes", [])]
                assert value in mounts, f"{name}: {value} is not a mounted volume"
                value = str(tmp_path)
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.auth == "on" and settings.api_keys == []
        assert settings.store == "redis://redis:6379/0"


def test_other_environment_values_are_interpolated_from_the_callers_environment() -> None:
    env = compose_environment("service", {"PTSERVE_API_KEYS": "admin:" + "0" * 64, "PTSERVE_AUTH": "off"})
    assert env["PTSERVE_API_KEYS"] == "admin:" + "0" * 64 and env["PTSERVE_AUTH"] == "off"
    assert compose_environment("service")["PTSERVE_AUTH"] == "on"


def test_service_is_scalable_and_its_ports_and_healthcheck_match_the_settings() -> None:
    services = load_compose()["services"]
    for name in ("service", "service-gpu"):
        service = services[name]
        env = compose_environment(name)
        port = int(env["PTSERVE_PORT"])
        assert env["PTSERVE_HOST"] == "0.0.0.0"
        # --scale service=3 must not clash on a host port.
        assert "ports" not in service, f"{name} publishes a host port"
        assert [int(p) for p in service["expose"]] == [port]
        url = _healthcheck_url(service["healthcheck"]["test"])
        assert url == f"http://127.0.0.1:{port}/readyz"
        assert service["healthcheck"]["test"][:2] == ["CMD", "python"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        # Compose waits long enough for a drain: admitted requests get their full time.
        grace = int(str(service["stop_grace_period"]).removesuffix("s"))
        assert grace > Settings.model_fields["request_timeout_s"].default
    assert set(_routes()) >= {"/readyz", "/healthz"}


def _routes() -> list[str]:
    return list(create_app(Settings(auth="off")).openapi()["paths"])


def test_dependencies_wait_for_health() -> None:
    services = load_compose()["services"]
    redis = services["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["service"]["condition"] == "service_healthy"
    # The worker has no HTTP port, so the image's HTTP HEALTHCHECK must not run for it.
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_redis_persists_on_a_volume_and_holds_the_prompts() -> None:
    compose = load_compose()
    redis = compose["services"]["redis"]
    command = _command(redis)
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    (volume,) = redis["volumes"]
    source, target = volume.split(":")[:2]
    assert target == "/data" and source in compose["volumes"]
    # Prompts (and training jobs) live in that Redis: every ptserve container's store points at it.
    for name in _ptserve_services():
        store = compose_environment(name)["PTSERVE_STORE"]
        assert store.startswith("redis://redis:6379/"), store


def test_local_environment_maps_redis_host_and_paths() -> None:
    env = local_environment(
        "worker", redis_url="redis://127.0.0.1:7000/3", port=9001, paths={"/data/training": "/tmp/data"}
    )
    assert env["PTSERVE_STORE"] == "redis://127.0.0.1:7000/3"
    assert env["PTSERVE_DATA_ROOT"] == "/tmp/data"
    assert env["PTSERVE_HOST"] == "127.0.0.1" and env["PTSERVE_PORT"] == "9001"
    assert env["PTSERVE_LOG_FORMAT"] == compose_environment("worker")["PTSERVE_LOG_FORMAT"]


def test_worker_data_root_is_a_mounted_volume() -> None:
    compose = load_compose()
    for name in ("worker", "worker-gpu"):
        worker = compose["services"][name]
        root = compose_environment(name)["PTSERVE_DATA_ROOT"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
        assert root in mounts and mounts[root] in compose["volumes"]


def test_gpu_profile_reserves_the_device() -> None:
    services = load_compose()["services"]
    gpu = {name: s for name, s in services.items() if "gpu" in s.get("profiles", [])}
    assert set(gpu) == {"service-gpu", "worker-gpu"}
    for name, service in gpu.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert compose_environment(name)["PTSERVE_DEVICE"].startswith("cuda")
    assert "/cu" in services["service-gpu"]["build"]["args"]["TORCH_INDEX_URL"]
    # The GPU replicas answer to the name nginx balances over.
    assert "service" in services["service-gpu"]["networks"]["default"]["aliases"]
    # Nothing outside the profile reserves a GPU (the default stack runs on CPU-only hosts).
    assert not any("deploy" in s for name, s in services.items() if name not in gpu)


# ------------------------------------------------------------------------------------------ nginx


def test_nginx_balances_over_the_service_port_and_publishes_8080() -> None:
    compose = load_compose()
    nginx = compose["services"]["nginx"]
    conf = nginx_config()
    port = compose_environment("service")["PTSERVE_PORT"]
    (upstream,) = find(conf, "http", "upstream")
    name = upstream["args"][0]
    servers = [d["args"] for d in find(upstream["block"], "server")]
    # Docker's DNS name of the service, its port, re-resolved as replicas come and go.
    assert servers == [[f"service:{port}", "resolve"]]
    assert find(upstream["block"], "zone")  # `resolve` needs a shared-memory zone
    # The resolver is the container's own nameserver (Docker's 127.0.0.11, podman's aardvark-dns),
    # filled in by the nginx image's entrypoint from the template compose mounts.
    # (crossplane reads "${X} valid=10s" as one argument; nginx sees the substituted text.)
    resolvers = [" ".join(d["args"]).split() for d in find(conf, "http", "resolver")]
    assert [r[0] for r in resolvers] == ["${NGINX_LOCAL_RESOLVERS}"]
    # envsubst replaces only the environment's variables: nginx's own are lower-case, and the only
    # upper-case one is the resolver.
    names = set(re.findall(r"\$\{?([A-Za-z_]\w*)", NGINX.read_text(encoding="utf-8")))
    assert {n for n in names if not n.islower()} == {"NGINX_LOCAL_RESOLVERS"}
    nginx_env = compose_environment("nginx")
    (server,) = find(conf, "http", "server")
    assert [d["args"] for d in find(server["block"], "listen")] == [["8080"]]
    passes = [d["args"] for d in find(server["block"], "location", "proxy_pass")]
    assert passes == [[f"http://{name}"]]
    assert [interpolate(p, {}) for p in nginx["ports"]] == ["8080:8080"]
    assert [interpolate(p, {"PTSERVE_HTTP_PORT": "9090"}) for p in nginx["ports"]] == ["9090:8080"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in nginx["volumes"]}
    template = Path(mounted["./docker/nginx.conf"])
    # The entrypoint writes NGINX_ENVSUBST_OUTPUT_DIR/<name without .template>: nginx's main file.
    assert template.parent == Path("/etc/nginx/templates") and template.suffix == ".template"
    assert Path(nginx_env["NGINX_ENVSUBST_OUTPUT_DIR"]) / template.stem == Path("/etc/nginx/nginx.conf")
    # The resolver script replaces the official image's (which lists every nameserver: podman's
    # resolv.conf adds the host's, which do not know the services) and runs before the templates.
    script = mounted["./docker/nginx-resolver.envsh"]
    assert script == "/docker-entrypoint.d/15-local-resolvers.envsh"
    assert os.access(REPO / "docker" / "nginx-resolver.envsh", os.X_OK)
    assert "NGINX_LOCAL_RESOLVERS" in (REPO / "docker" / "nginx-resolver.envsh").read_text(encoding="utf-8")


def test_nginx_lets_uploads_and_slow_requests_reach_the_service() -> None:
    conf = nginx_config()
    fields = Settings.model_fields
    (size,) = find(conf, "http", "client_max_body_size")
    assert size["args"][0].endswith("m")
    upload = fields["max_artifact_bytes"].default + MULTIPART_OVERHEAD_BYTES
    assert int(size["args"][0][:-1]) * 1024 * 1024 >= upload
    (location,) = [d for d in find(conf, "http", "server", "location") if d["args"] == ["/"]]
    directives = {d["directive"]: d["args"] for d in location["block"]}
    # nginx gives up later than ptserve, so a slow request gets ptserve's own 504.
    assert int(directives["proxy_read_timeout"][0].removesuffix("s")) > fields["request_timeout_s"].default
    request_ids = [
        d["args"] for d in find(location["block"], "proxy_set_header") if d["args"][0] == "X-Request-ID"
    ]
    assert request_ids == [["X-Request-ID", "$ptserve_request_id"]]
    (mapping,) = find(conf, "http", "map")
    assert mapping["args"] == ["$http_x_request_id", "$ptserve_request_id"]


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_runs_ptserve_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    stage = final_stage(instructions)
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    # CPU torch unless the build says otherwise (the CUDA variant is a build argument).
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    cmd = [rest for keyword, rest in stage if keyword == "CMD"]
    assert entrypoint == ['["ptserve"]'] and cmd == ['["serve"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["ptserve"] == "service.cli:main"
    assert "serve" in subcommands()


def test_dockerfile_environment_and_healthcheck_match_the_settings() -> None:
    stage = final_stage(dockerfile_instructions())
    env = dockerfile_env(stage)
    settings_env = {k.removeprefix("PTSERVE_").lower(): v for k, v in env.items() if k.startswith("PTSERVE_")}
    assert set(settings_env) <= set(Settings.model_fields)
    assert settings_env["host"] == "0.0.0.0"
    Settings(**settings_env, auth="off")  # valid values
    assert env["HF_HUB_OFFLINE"] == "1"
    exposed = [rest for keyword, rest in stage if keyword == "EXPOSE"]
    assert exposed == [settings_env["port"]]
    (health,) = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert " CMD python -c " in f" {health}" and "/readyz" in health
    assert "PTSERVE_PORT" in health  # follows the port setting
    # The store's default directory is a declared volume owned by the runtime user.
    volumes = [rest for keyword, rest in stage if keyword == "VOLUME"]
    assert volumes == [f'["{settings_env["store"]}"]']


def test_dockerfile_installs_the_lock_then_torch_then_ptserve_without_resolving() -> None:
    """The image gets the tested set: scripts/setup.sh's order, hash-checked, nothing re-resolved."""
    instructions = dockerfile_instructions()
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    assert ["requirements/serve.txt", "/tmp/serve.txt"] in copies
    (lock,) = [i for i, r in enumerate(runs) if "-r /tmp/serve.txt" in r]
    assert "--require-hashes" in runs[lock] and "--no-deps" in runs[lock]
    (torch,) = [i for i, r in enumerate(runs) if '"$TORCH_SPEC"' in r]
    # torch from the index, or from docker/wheels alone when TORCH_INDEX_URL is empty (offline).
    assert (
        '--index-url "$TORCH_INDEX_URL"' in runs[torch] and "--no-index --find-links /wheels" in runs[torch]
    )
    assert args["TORCH_SPEC"].strip('"') == "torch==" + _locked_torch()
    (project,) = [i for i, r in enumerate(runs) if "--no-build-isolation ." in r]
    assert "--no-deps" in runs[project] and "pip check" in runs[project]
    assert lock < torch < project
    # Debian's own python has no `python` before the venv exists; python:3.11-slim has python3 too.
    assert runs[0].startswith("python3 -m venv ")


def _locked_torch() -> str:
    """The torch version scripts/setup.sh installs with the lock."""
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    match = re.search(r"TORCH_SPEC:-torch==([\w.+]+)", setup)
    assert match is not None
    return match.group(1)


def test_local_redis_and_nginx_images_build_on_a_base_and_do_what_compose_expects() -> None:
    services = load_compose()["services"]
    for path, service in ((REDIS_DOCKERFILE, "redis"), (NGINX_DOCKERFILE, "nginx")):
        instructions = dockerfile_instructions(path)
        froms = [rest for keyword, rest in instructions if keyword == "FROM"]
        assert froms == ["${BASE_IMAGE}"], path
        entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
        script = json.loads(entrypoint[0])[0]
        sources = {rest.split()[1]: rest.split()[0] for keyword, rest in instructions if keyword == "COPY"}
        assert (REPO / sources[script]).exists() and os.access(REPO / sources[script], os.X_OK)
        installs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
        # The health check's client is in the image.
        tool = services[service]["healthcheck"]["test"][1]
        assert tool in installs or f"{tool.split('-')[0]}-tools" in installs, (path, tool)
    redis = dockerfile_instructions(REDIS_DOCKERFILE)
    assert ("WORKDIR", "/data") in redis  # the append-only file lands on the volume
    assert "--protected-mode no" in (REPO / "docker" / "redis-entrypoint.sh").read_text(encoding="utf-8")
    entry = (REPO / "docker" / "nginx-entrypoint.sh").read_text(encoding="utf-8")
    assert "/docker-entrypoint.d/*.envsh" in entry and "NGINX_ENVSUBST_OUTPUT_DIR" in entry


def test_dockerfile_copies_only_what_exists_and_dockerignore_keeps_it() -> None:
    instructions = [
        i for path in (DOCKERFILE, REDIS_DOCKERFILE, NGINX_DOCKERFILE) for i in dockerfile_instructions(path)
    ]
    sources = [
        rest.split()[0] for keyword, rest in instructions if keyword == "COPY" and "--from" not in rest
    ]
    sources += [
        rest.split()[1] for keyword, rest in instructions if keyword == "COPY" and "--from" not in rest
    ]
    copied = [s for s in sources if not s.startswith("/") and s not in (".", "./")]
    for source in copied:
        assert (REPO / source).exists(), source
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied:
        top = source.rstrip("/").split("/")[0]
        assert top not in ignored, f".dockerignore drops {source}, which the Dockerfile copies"
    assert ".git" in ignored and ".venv" in ignored


# ------------------------------------------------------------------------------------------ live


def _healthcheck_python(text: str) -> str:
    match = re.search(r'python -c "(.*)"\s*$', text)
    assert match is not None, text
    return match.group(1)


@pytest.mark.integration
def test_service_starts_from_compose_environment_and_passes_both_healthchecks(
    private_redis: Any, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """``ptserve serve`` with compose's service environment (Redis and port mapped to loopback)."""
    port = free_port()
    keys = {"PTSERVE_API_KEYS": "admin:" + "a" * 64}
    env = local_environment(
        "service", redis_url=private_redis.url, port=port, paths={"/data/training": str(tmp_path)}, env=keys
    )
    assert env["PTSERVE_STORE"] == private_redis.url and env["PTSERVE_HOST"] == "127.0.0.1"
    env["PTSERVE_MODEL"] = str(tiny_bert_dir)
    base_env = clean_environment()
    server = PtserveProcess(
        _command(load_compose()["services"]["service"]), {**base_env, **env}, tmp_path / "serve.log"
    )
    try:
        server.wait_ready(f"http://127.0.0.1:{port}")
        check_env = {**base_env, "PTSERVE_PORT": str(port)}
        (health,) = [
            rest for keyword, rest in final_stage(dockerfile_instructions()) if keyword == "HEALTHCHECK"
        ]
        image_check = subprocess.run([sys.executable, "-c", _healthcheck_python(health)], env=check_env)
        assert image_check.returncode == 0
        compose_test = load_compose()["services"]["service"]["healthcheck"]["test"]
        code = compose_test[compose_test.index("-c") + 1].replace(":8000/", f":{port}/")
        assert subprocess.run([sys.executable, "-c", code], env=check_env).returncode == 0
        # Auth is on with compose's defaults: the key entry given above is required.
        assert httpx.get(f"http://127.0.0.1:{port}/v1/prompts").status_code == 401
    finally:
        status = server.stop()
    assert status in (0, -signal.SIGTERM), server.output()
    # The image healthcheck fails once the replica is gone (it must be able to fail).
    gone = subprocess.run(
        [sys.executable, "-c", _healthcheck_python(health)], env=check_env, capture_output=True
    )
    assert gone.returncode != 0
