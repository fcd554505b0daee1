"""Build ptserve's image with podman, run it, then the compose topology with podman-compose.

Run through ``scripts/image_check.sh`` (it installs podman, makes the local Debian base image and
configures podman); this file is the check itself, standard library only so that the host needs
nothing but python3. Prints one PASS or FAIL line per check with its timing; exits 1 on a FAIL.

1. Images: ptserve (docker/Dockerfile on BASE_IMAGE, torch from docker/wheels), Redis and nginx
   (docker/redis.Dockerfile, docker/nginx.Dockerfile: Debian's packages on the same base).
2. One container: ready (/readyz), its HEALTHCHECK passes, runs as non-root, refuses a missing key,
   takes an upload and classifies with it, stops on SIGTERM.
3. docker-compose.yml with two service replicas, the worker, Redis and nginx: every health check
   passes, an upload on one replica is served by the other and through nginx (which balances over
   both), and a training job posted through nginx is trained by the worker and served by both.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("PTSERVE_IMAGE_WORK", "/var/tmp/ptserve-image"))
IMAGE = "localhost/ptserve:latest"  # compose's `image: ptserve:latest` resolves to it
REDIS_IMAGE = "localhost/ptserve-redis:bookworm"
NGINX_IMAGE = "localhost/ptserve-nginx:bookworm"
PROJECT = "ptserve-check"
SINGLE = "ptserve-check-single"
TASK = "image-check"
LABELS = ["label_0", "label_1", "label_2"]

# Runs inside the image: a random but valid artifact for the image's own backbone, base64 on stdout.
ARTIFACT_SCRIPT = """
import base64, sys, torch
from prompts.artifact import build_artifact
from prompts.backbone import load_backbone
spec = load_backbone().spec
g = torch.Generator().manual_seed(int(sys.argv[2]))
labels = sys.argv[3].split(",")
artifact = build_artifact(
    task=sys.argv[1], labels=labels, spec=spec,
    head_weight=torch.randn(len(labels), spec.hidden_size, generator=g),
    head_bias=torch.randn(len(labels), generator=g),
    prefix=torch.randn((spec.num_layers, 2, spec.num_kv_heads, 4, spec.head_dim), generator=g),
)
sys.stdout.write(base64.b64encode(artifact.data).decode())
"""

# A tiny training set: two classes told apart by topic (the worker's job must finish in seconds).
TRAIN = [
    *(
        {"text": t, "label": "sports"}
        for t in (
            "the striker scored twice in the final",
            "a late goal won the match",
            "the team lost on penalties",
            "she ran the marathon in record time",
            "the coach praised his defenders",
            "a tennis final in five sets",
            "the keeper saved a penalty",
            "fans cheered the winning lap",
        )
    ),
    *(
        {"text": t, "label": "cooking"}
        for t in (
            "simmer the onions in butter",
            "bake the bread for forty minutes",
            "season the soup with pepper",
            "whisk the eggs with sugar",
            "roast the vegetables until golden",
            "knead the dough for ten minutes",
            "add garlic to the hot pan",
            "serve the pasta with basil",
        )
    ),
]


class CheckFailed(Exception):
    pass


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def ok(self, what: str, since: float | None = None) -> None:
        self.passed += 1
        timing = f" ({time.monotonic() - since:.1f} s)" if since is not None else ""
        print(f"PASS {what}{timing}", flush=True)

    def fail(self, what: str) -> None:
        self.failed.append(what)
        print(f"FAIL {what}", flush=True)


# ------------------------------------------------------------------------------------------ helpers


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]  # names in lower case

    def json(self) -> Any:
        return json.loads(self.body)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local addresses: no proxy


def http(
    method: str,
    url: str,
    *,
    key: str | None = None,
    body: bytes | None = None,
    json_body: Any = None,
    content_type: str | None = None,
    timeout: float = 60,
) -> Response:
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if json_body is not None:
        body = json.dumps(json_body).encode()
        content_type = "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            return Response(answer.status, answer.read(), {k.lower(): v for k, v in answer.headers.items()})
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read(), {k.lower(): v for k, v in error.headers.items()})


def multipart(name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return (
        head.encode() + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def wait_for(check: Callable[[], bool], what: str, deadline_s: float, interval_s: float = 1.0) -> None:
    """Poll ``check`` until it is true; connection errors count as not yet."""
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
            last = error
        time.sleep(interval_s)
    raise CheckFailed(f"{what}: not within {deadline_s:.0f} s" + (f" (last error: {last})" if last else ""))


def run(*args: str, check: bool = True, env: dict[str, str] | None = None, log: Path | None = None) -> str:
    """Run a command; its stdout is returned (or all its output written to ``log``); a failure raises
    CheckFailed with the output's tail."""
    if log is not None:
        with log.open("w") as out:
            code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        stdout = output = log.read_text(errors="replace")
    else:
        done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
        code, stdout, output = done.returncode, done.stdout, done.stdout + done.stderr
    if check and code != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise CheckFailed(f"{' '.join(args[:3])}... exited {code}:\n{tail}")
    return stdout


def podman(*args: str, check: bool = True) -> str:
    return run("podman", *args, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def step(report: Report, title: str) -> Iterator[None]:
    print(f"\n== {title}", flush=True)
    try:
        yield
    except CheckFailed as error:
        report.fail(f"{title}: {error}")
        raise
    except Exception as error:  # a surprise (an answer without a field...) is a failed check too
        report.fail(f"{title}: {type(error).__name__}: {error}")
        raise CheckFailed(str(error)) from error


def make_artifact(container: str, task: str, seed: int) -> bytes:
    encoded = podman("exec", container, "python", "-c", ARTIFACT_SCRIPT, task, str(seed), ",".join(LABELS))
    return base64.b64decode(encoded)


def served_version(base: str, key: str, task: str) -> str | None:
    r = http("POST", f"{base}/v1/classify", key=key, json_body={"task": task, "text": "a late goal"})
    if r.status == 404:
        return None
    if r.status != 200:
        raise CheckFailed(f"classify on {base}: {r.status} {r.body[:300]!r}")
    version: str = r.json()["version"]
    return version


def ready(base: str, container: str | None = None) -> bool:
    """/readyz answers 200; a container that has exited fails the wait at once."""
    if container and podman("inspect", container, "--format", "{{.State.Running}}").strip() != "true":
        raise CheckFailed(f"{container} exited:\n{logs(container)}")
    return http("GET", f"{base}/readyz", timeout=5).status == 200


def logs(container: str, tail: int = 30) -> str:
    """The container's output, stdout and stderr together (ptserve logs to stderr)."""
    done = subprocess.run(["podman", "logs", "--tail", str(tail), container], capture_output=True, text=True)
    return done.stdout + done.stderr


def serves(base: str, key: str, task: str, version: str) -> bool:
    return served_version(base, key, task) == version


def healthy(container: str) -> bool:
    """The container's health check, run now (podman without systemd runs none on its own)."""
    done = subprocess.run(["podman", "healthcheck", "run", container], capture_output=True, text=True)
    return done.returncode == 0


def classify_count(metrics: str) -> float:
    """ptserve_requests_total for /v1/classify answered 200, summed over tasks."""
    total = 0.0
    for line in metrics.splitlines():
        wanted = 'route="/v1/classify"' in line and 'status="200"' in line
        if line.startswith("ptserve_requests_total{") and wanted:
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------------------ phases


def build_images(report: Report, base_image: str, torch_index_url: str, with_compose: bool) -> None:
    builds = [("ptserve", IMAGE, "docker/Dockerfile")]
    if with_compose:
        builds += [
            ("redis", REDIS_IMAGE, "docker/redis.Dockerfile"),
            ("nginx", NGINX_IMAGE, "docker/nginx.Dockerfile"),
        ]
    for name, tag, dockerfile in builds:
        with step(report, f"build {tag} from {dockerfile} on {base_image}"):
            t0 = time.monotonic()
            args = ["--build-arg", f"BASE_IMAGE={base_image}"]
            if name == "ptserve":
                args += ["--build-arg", f"TORCH_INDEX_URL={torch_index_url}"]
            # docker format: OCI images drop HEALTHCHECK. Host network: the build reaches the mirrors.
            run(
                "podman", "build", "--network", "host", "--format", "docker", "-f", dockerfile, "-t", tag,
                *args, ".", log=WORK / f"build-{name}.log",
            )  # fmt: skip
            size = podman("image", "inspect", tag, "--format", "{{.Size}}").strip()
            report.ok(f"image {tag} built, {int(size) / 2**30:.2f} GiB", t0)


def new_key() -> tuple[str, str]:
    """A key and its PTSERVE_API_KEYS entry, from the image's own `ptserve hash-key`."""
    out = podman("run", "--rm", IMAGE, "hash-key", "--scope", "admin")
    key = re.search(r"key:\s+(\S+)", out)
    entry = re.search(r"entry:\s+(\S+)", out)
    if not key or not entry:
        raise CheckFailed(f"hash-key printed {out!r}")
    return key.group(1), entry.group(1)


def single_container(report: Report, key: str, entry: str) -> None:
    podman("rm", "-f", "-v", SINGLE, check=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        with step(report, f"one container ({IMAGE}) on {base}"):
            t0 = time.monotonic()
            podman(
                "run",
                "-d",
                "--name",
                SINGLE,
                "-p",
                f"127.0.0.1:{port}:8000",
                "-e",
                f"PTSERVE_API_KEYS={entry}",
                IMAGE,
            )
            wait_for(partial(ready, base, SINGLE), "/readyz answers 200", 300)
            report.ok("container ready (/readyz 200)", t0)
            config = json.loads(podman("image", "inspect", IMAGE))[0]
            health = config.get("Healthcheck") or config.get("Config", {}).get("Healthcheck")
            if not health:
                raise CheckFailed("the image has no HEALTHCHECK")
            t0 = time.monotonic()
            podman("healthcheck", "run", SINGLE)
            report.ok("the image's HEALTHCHECK passes", t0)
            user = podman("exec", SINGLE, "id", "-un").strip()
            if user != "ptserve":
                raise CheckFailed(f"runs as {user}")
            report.ok("runs as the non-root user ptserve")
            status = http("GET", f"{base}/v1/prompts").status
            if status != 401:
                raise CheckFailed(f"GET /v1/prompts without a key: {status}, expected 401")
            report.ok("auth on: no key -> 401")
            t0 = time.monotonic()
            data = make_artifact(SINGLE, TASK, seed=1)
            body, content_type = multipart("file", "task.safetensors", data)
            r = http("POST", f"{base}/v1/prompts", key=key, body=body, content_type=content_type)
            if r.status != 201:
                raise CheckFailed(f"upload: {r.status} {r.body[:300]!r}")
            version = r.json()["version"]
            r = http("POST", f"{base}/v1/classify", key=key, json_body={"task": TASK, "text": "hello"})
            if r.status != 200 or r.json()["version"] != version:
                raise CheckFailed(f"classify: {r.status} {r.body[:300]!r}")
            scores = r.json()["results"][0]["scores"]
            report.ok(f"upload (201, version {version[:12]}) and classify (200, {sorted(scores)})", t0)
            t0 = time.monotonic()
            podman("stop", "-t", "70", SINGLE)
            code = podman("inspect", SINGLE, "--format", "{{.State.ExitCode}}").strip()
            if code not in ("0", "143"):
                raise CheckFailed(f"exit code {code} after SIGTERM")
            report.ok(f"stops on SIGTERM (exit code {code})", t0)
    finally:
        if report.failed:
            print(logs(SINGLE), file=sys.stderr)
        podman("rm", "-f", "-v", SINGLE, check=False)


@dataclass
class Topology:
    env: dict[str, str]
    nginx: str
    replicas: dict[str, str]  # container name -> http://IP:8000
    containers: dict[str, str]  # container name -> compose service

    def compose(self, *args: str, check: bool = True) -> str:
        return run(
            "podman-compose", "-p", PROJECT, "-f", "docker-compose.yml", *args, check=check, env=self.env
        )


def project_containers() -> dict[str, str]:
    listed = json.loads(
        podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format", "json")
    )
    return {c["Names"][0]: c["Labels"].get("com.docker.compose.service", "") for c in listed}


def container_ip(name: str) -> str:
    networks = json.loads(podman("inspect", name, "--format", "{{json .NetworkSettings.Networks}}"))
    (ip,) = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    return str(ip)


def down(topo: Topology) -> None:
    """Everything of the project gone: podman-compose down leaves scaled replicas behind, and a
    container others depend on (podman-compose's --requires) goes only after them, so leftovers are
    removed one at a time, dependants first, over a few passes; then the network and named volumes,
    and the anonymous volumes of the images' VOLUMEs, which podman-compose leaves."""
    ids = podman("ps", "-aq", "--filter", f"label=io.podman.compose.project={PROJECT}").split()
    volumes = set()
    for container in ids:
        mounts = podman("inspect", container, "--format", "{{range .Mounts}}{{.Name}} {{end}}", check=False)
        volumes |= {v for v in mounts.split() if re.fullmatch(r"[0-9a-f]{64}", v)}
    topo.compose("down", "-v", check=False)
    for _ in range(5):
        ids = podman("ps", "-aq", "--filter", f"label=io.podman.compose.project={PROJECT}").split()
        if not ids:
            break
        for container in ids:
            podman("rm", "-f", "-v", container, check=False)
    topo.compose("down", "-v", check=False)
    if volumes:
        podman("volume", "rm", "-f", *sorted(volumes), check=False)


def compose_topology(report: Report, key: str, entry: str, keep: bool) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PTSERVE_API_KEYS": entry,
        "REDIS_IMAGE": REDIS_IMAGE,
        "NGINX_IMAGE": NGINX_IMAGE,
        "PTSERVE_HTTP_PORT": str(port),
    }
    topo = Topology(env, f"http://127.0.0.1:{port}", {}, {})
    down(topo)
    try:
        with step(report, "compose up: redis, 2 service replicas, worker, nginx (podman-compose)"):
            t0 = time.monotonic()
            topo.compose("up", "-d", "--scale", "service=2")
            topo.containers = project_containers()
            services = sorted(topo.containers.values())
            if services != ["nginx", "redis", "service", "service", "worker"]:
                raise CheckFailed(f"containers: {topo.containers}")
            topo.replicas = {
                n: f"http://{container_ip(n)}:8000" for n, s in topo.containers.items() if s == "service"
            }
            for name, base in topo.replicas.items():
                wait_for(
                    partial(ready, base, name),
                    f"{name} ready",
                    300,
                )
            wait_for(
                partial(ready, topo.nginx),
                "/readyz through nginx",
                60,
            )
            report.ok(f"topology up, both replicas ready, nginx on :{port} answers /readyz", t0)
            # podman without systemd runs no health checks on its own: run each one as compose defines it.
            for name, service in sorted(topo.containers.items()):
                if service == "worker":
                    continue
                t0 = time.monotonic()
                wait_for(
                    partial(healthy, name),
                    f"{name} healthy",
                    60,
                )
                report.ok(f"{name}: compose health check passes", t0)

        with step(report, "an upload on one replica is served by the other and through nginx"):
            (a, a_base), (b, b_base) = sorted(topo.replicas.items())
            t0 = time.monotonic()
            data = make_artifact(a, TASK, seed=2)
            body, content_type = multipart("file", "task.safetensors", data)
            r = http("POST", f"{a_base}/v1/prompts", key=key, body=body, content_type=content_type)
            if r.status != 201:
                raise CheckFailed(f"upload on {a}: {r.status} {r.body[:300]!r}")
            version = r.json()["version"]
            wait_for(partial(serves, b_base, key, TASK, version), f"{b} to serve {version[:12]}", 30, 0.2)
            report.ok(f"uploaded on {a}, served by {b} (version {version[:12]})", t0)
            before = {
                n: classify_count(http("GET", f"{u}/metrics").body.decode()) for n, u in topo.replicas.items()
            }
            for _ in range(12):
                if served_version(topo.nginx, key, TASK) != version:
                    raise CheckFailed("nginx answered another version")
            after = {
                n: classify_count(http("GET", f"{u}/metrics").body.decode()) for n, u in topo.replicas.items()
            }
            spread = {n: int(after[n] - before[n]) for n in after}
            if sum(spread.values()) != 12 or min(spread.values()) == 0:
                raise CheckFailed(f"12 classifications through nginx reached the replicas as {spread}")
            report.ok(
                f"12 classifications through nginx, all that version, balanced over both replicas {spread}"
            )

        with step(report, "a training job posted through nginx is trained by the worker and served"):
            t0 = time.monotonic()
            job = {
                "task": "image-check-topic",
                "method": "prefix",
                "hyperparameters": {"epochs": 2, "batch_size": 8, "prefix_length": 4, "seed": 0},
                "train": TRAIN,
            }
            r = http("POST", f"{topo.nginx}/v1/training-jobs", key=key, json_body=job)
            if r.status != 202:
                raise CheckFailed(f"submit: {r.status} {r.body[:300]!r}")
            job_url = f"{topo.nginx}{r.headers['location']}"
            status: dict[str, Any] = {}

            def done() -> bool:
                status.update(http("GET", job_url, key=key).json())
                if status["state"] == "failed":
                    raise CheckFailed(f"the job failed: {status.get('error')}")
                return bool(status["state"] == "succeeded")

            wait_for(done, "the training job to succeed", 300)
            trained = status["version"]
            metrics = status.get("metrics") or {}
            accuracy = metrics.get("dev", {}).get("accuracy")
            worker_id = status.get("worker")
            report.ok(
                f"job {status['id'][:8]} trained by worker {worker_id} "
                f"(version {trained[:12]}, dev accuracy {accuracy})",
                t0,
            )
            worker = next(n for n, s in topo.containers.items() if s == "worker")
            if status["id"] not in logs(worker, 1000):
                raise CheckFailed(f"{worker}'s log does not mention job {status['id']}")
            report.ok(f"{worker}'s log names the job")
            t0 = time.monotonic()
            for base in (topo.nginx, *topo.replicas.values()):
                wait_for(
                    partial(serves, base, key, "image-check-topic", trained),
                    f"{base} to serve it",
                    30,
                    0.2,
                )
            report.ok("the trained version is served through nginx and by both replicas", t0)
    finally:
        if report.failed:
            for name in project_containers():
                print(f"--- {name}\n{logs(name)}", file=sys.stderr)
        if not keep:
            t0 = time.monotonic()
            down(topo)
            print(f"compose down ({time.monotonic() - t0:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-image", default="python:3.11-slim")
    parser.add_argument("--torch-index-url", default="", help="empty: torch from docker/wheels")
    parser.add_argument("--image-only", action="store_true", help="skip the compose topology")
    parser.add_argument("--keep", action="store_true", help="leave the topology running")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    report = Report()
    try:
        build_images(report, args.base_image, args.torch_index_url, not args.image_only)
        key, entry = new_key()
        single_container(report, key, entry)
        if not args.image_only:
            compose_topology(report, key, entry, args.keep)
    except CheckFailed:
        pass
    total = time.monotonic() - report.started
    verdict = "FAIL" if report.failed else "PASS"
    print(f"\n{verdict}: {report.passed} checks passed, {len(report.failed)} failed, {total:.0f} s in all")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
