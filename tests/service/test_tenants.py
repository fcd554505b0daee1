"""Tenants through the real app: namespaces, keys bound to a tenant, the cross-tenant matrix over every
route, stored keys created and revoked at run time, rate limits, shares, the audit trail, metrics.

The matrix keys: a platform admin, tenant A's admin and classify keys, tenant B's admin. Every cell
asserts the exact status and, for A and B, that the body names nothing of the other tenant (task
names, versions, metrics). Requests for another tenant's task must be indistinguishable from
requests for a task that does not exist.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from service.app import create_app
from service.auth import hash_key
from service.cli import main
from service.settings import Settings
from tests.factories import random_artifact
from tests.synthetic import make_examples, write_data_dir

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

PLATFORM, A_ADMIN, A_READ, B_ADMIN = "platform-key", "team-a-admin", "team-a-reader", "team-b-admin"
ENTRIES = [
    f"admin:{hash_key(PLATFORM)}",
    f"admin@team-a:{hash_key(A_ADMIN)}",
    f"classify@team-a:{hash_key(A_READ)}",
    f"admin@team-b:{hash_key(B_ADMIN)}",
]


def key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def upload(client: TestClient, artifact: PromptArtifact, who: str) -> httpx.Response:
    return client.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}, headers=key(who))


def rows(count: int) -> list[dict[str, str]]:
    return [{"text": e.text, "label": e.label} for e in make_examples(count, 0)]


class World:
    """The app with three tasks: team-a/alpha, team-b/beta (two versions each) and platform 'shared'."""

    def __init__(self, client: TestClient, backbone: Backbone) -> None:
        self.client = client
        spec = backbone.spec
        # A tenant's admin uploads artifacts named bare; the platform may name a namespace in full.
        self.alpha = [random_artifact(spec, task="alpha", seed=s) for s in (1, 2)]
        self.beta = [random_artifact(spec, task="team-b/beta", seed=s) for s in (3, 4)]
        self.shared = random_artifact(spec, task="shared", seed=5)
        for artifact in self.alpha:
            assert upload(client, artifact, A_ADMIN).json()["task"] == "team-a/alpha"
        for artifact in self.beta:
            assert upload(client, artifact, PLATFORM).json()["task"] == "team-b/beta"
        assert upload(client, self.shared, PLATFORM).status_code == 201

    def secrets_of_b(self) -> list[str]:
        return ["team-b", "beta", *(a.version for a in self.beta)]

    def secrets_of_a(self) -> list[str]:
        return ["team-a", "alpha", *(a.version for a in self.alpha)]


@pytest.fixture
def world(private_redis: RedisServer, tmp_path: Path, backbone: Backbone) -> Iterator[World]:
    data_root = tmp_path / "data"
    write_data_dir(data_root / "team-a" / "keywords")
    write_data_dir(data_root / "team-b" / "keywords")
    settings = Settings(
        store=private_redis.url, data_root=data_root, auth="on", api_keys=ENTRIES, max_wait_ms=1
    )
    with TestClient(create_app(settings, backbone=backbone)) as client:
        yield World(client, backbone)


def call(client: TestClient, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return client.request(method, path, headers=key(who), **kwargs)


def leaks(response: httpx.Response, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in response.text]


# (who, method, path, body) -> expected status; "team-b/beta" is B's, "team-a/alpha" A's.
MATRIX: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
    # classify: own task bare or in full; another tenant's or the platform's is "unknown"
    (A_READ, "POST", "/v1/classify", {"task": "alpha", "text": "hello"}, 200),
    (A_READ, "POST", "/v1/classify", {"task": "team-a/alpha", "text": "hello"}, 200),
    (A_READ, "POST", "/v1/classify", {"task": "team-b/beta", "text": "hello"}, 404),
    (A_READ, "POST", "/v1/classify", {"task": "shared", "text": "hello"}, 404),
    (B_ADMIN, "POST", "/v1/classify", {"task": "alpha", "text": "hello"}, 404),
    (B_ADMIN, "POST", "/v1/classify", {"task": "beta", "text": "hello"}, 200),
    (PLATFORM, "POST", "/v1/classify", {"task": "team-a/alpha", "text": "hello"}, 200),
    (PLATFORM, "POST", "/v1/classify", {"task": "alpha", "text": "hello"}, 404),  # the platform's own
    # one task
    (A_READ, "GET", "/v1/prompts/alpha", None, 200),
    (A_READ, "GET", "/v1/prompts/team-a/alpha", None, 200),
    (A_READ, "GET", "/v1/prompts/team-b/beta", None, 404),
    (B_ADMIN, "GET", "/v1/prompts/team-a/alpha", None, 404),
    (PLATFORM, "GET", "/v1/prompts/team-b/beta", None, 200),
    # rollback and delete: admin scope, own namespace only
    (A_READ, "POST", "/v1/prompts/alpha/rollback", None, 403),
    (B_ADMIN, "POST", "/v1/prompts/team-a/alpha/rollback", None, 404),
    (A_ADMIN, "POST", "/v1/prompts/team-b/beta/rollback", None, 404),
    (A_ADMIN, "DELETE", "/v1/prompts/team-b/beta", None, 404),
    (B_ADMIN, "DELETE", "/v1/prompts/alpha", None, 404),
    (A_READ, "DELETE", "/v1/prompts/alpha", None, 403),
    # keys: platform admins only
    (A_ADMIN, "GET", "/v1/keys", None, 403),
    (A_READ, "GET", "/v1/keys", None, 403),
    (PLATFORM, "GET", "/v1/keys", None, 200),
    (A_ADMIN, "POST", "/v1/keys", {"name": "x", "scope": "admin"}, 403),
    # audit: admins, their own tenant's trail
    (A_READ, "GET", "/v1/audit", None, 403),
    (A_ADMIN, "GET", "/v1/audit", None, 200),
    (A_ADMIN, "GET", "/v1/audit?tenant=team-b", None, 403),
    (PLATFORM, "GET", "/v1/audit?tenant=team-b", None, 200),
    # training jobs: a tenant's job trains into its own namespace, on its own data
    (A_ADMIN, "POST", "/v1/training-jobs", {"task": "team-b/x", "train": rows(12)}, 403),
    (A_ADMIN, "POST", "/v1/training-jobs", {"task": "shared", "train": rows(12)}, 202),  # -> team-a/shared
    (A_ADMIN, "POST", "/v1/training-jobs", {"task": "x", "data_path": "../team-b/keywords"}, 422),
    (A_ADMIN, "POST", "/v1/training-jobs", {"task": "x", "data_path": "keywords"}, 202),
    (A_READ, "POST", "/v1/training-jobs", {"task": "x", "train": rows(12)}, 403),
]


@pytest.mark.parametrize(("who", "method", "path", "body", "status"), MATRIX)
def test_cross_tenant_matrix(
    world: World, who: str, method: str, path: str, body: dict[str, Any] | None, status: int
) -> None:
    r = call(world.client, who, method, path, json=body)
    assert r.status_code == status, r.text
    if who in (A_ADMIN, A_READ):
        # The request names B's task or not: the answer never shows B's versions or metrics.
        assert not leaks(r, [a.version for a in world.beta]), r.text
    if who == B_ADMIN:
        assert not leaks(r, [a.version for a in world.alpha]), r.text


def test_another_tenants_task_answers_as_one_that_does_not_exist(world: World) -> None:
    c = world.client
    for path, missing in [("/v1/prompts/team-b/beta", "/v1/prompts/team-b/nothing")]:
        there, absent = call(c, A_ADMIN, "GET", path), call(c, A_ADMIN, "GET", missing)
        assert there.status_code == absent.status_code == 404
        assert there.json()["error"]["code"] == absent.json()["error"]["code"] == "task_not_found"
        assert (
            there.json()["error"]["message"].replace("beta", "nothing") == absent.json()["error"]["message"]
        )
    body = {"task": "team-b/beta", "text": "hi"}
    there = call(c, A_READ, "POST", "/v1/classify", json=body)
    absent = call(c, A_READ, "POST", "/v1/classify", json={**body, "task": "team-b/nothing"})
    assert there.json()["error"]["message"].replace("beta", "nothing") == absent.json()["error"]["message"]


def test_listings_show_each_key_its_own_namespace(world: World) -> None:
    def names(who: str) -> set[str]:
        r = call(world.client, who, "GET", "/v1/prompts")
        assert r.status_code == 200
        return {t["task"] for t in r.json()["tasks"]}

    assert names(A_READ) == {"team-a/alpha"}
    assert names(B_ADMIN) == {"team-b/beta"}
    assert names(PLATFORM) == {"team-a/alpha", "team-b/beta", "shared"}
    assert not leaks(call(world.client, A_READ, "GET", "/v1/prompts"), world.secrets_of_b())


def test_writes_stay_in_the_keys_namespace(world: World, backbone: Backbone) -> None:
    c = world.client
    foreign = random_artifact(backbone.spec, task="team-b/beta", seed=9)
    r = upload(c, foreign, A_ADMIN)
    assert r.status_code == 403 and "tenant 'team-a'" in r.json()["error"]["message"]
    # ... and B's task is untouched.
    assert call(c, B_ADMIN, "GET", "/v1/prompts/beta").json()["version"] == world.beta[1].version
    # A's rollback and delete act on A's task.
    r = call(c, A_ADMIN, "POST", "/v1/prompts/alpha/rollback")
    assert r.status_code == 200 and r.json() == {
        "task": "team-a/alpha",
        "version": world.alpha[0].version,
        "previous": world.alpha[1].version,
    }
    assert call(c, A_ADMIN, "DELETE", "/v1/prompts/alpha").json() == {"task": "team-a/alpha", "deleted": True}
    assert call(c, A_READ, "POST", "/v1/classify", json={"task": "alpha", "text": "x"}).status_code == 404
    assert call(c, B_ADMIN, "POST", "/v1/classify", json={"task": "beta", "text": "x"}).status_code == 200


def test_job_status_is_the_submitting_tenants(world: World) -> None:
    c = world.client
    r = call(c, A_ADMIN, "POST", "/v1/training-jobs", json={"task": "x", "data_path": "keywords"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    mine = call(c, A_ADMIN, "GET", f"/v1/training-jobs/{job}")
    assert mine.status_code == 200 and mine.json()["task"] == "team-a/x"
    theirs = call(c, B_ADMIN, "GET", f"/v1/training-jobs/{job}")
    unknown = call(c, B_ADMIN, "GET", f"/v1/training-jobs/{'0' * 32}")
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["message"].replace(job, "0" * 32) == unknown.json()["error"]["message"]
    assert call(c, PLATFORM, "GET", f"/v1/training-jobs/{job}").status_code == 200


def test_the_audit_trail_records_who_did_what_and_each_tenant_reads_its_own(world: World) -> None:
    c = world.client
    call(c, A_ADMIN, "POST", "/v1/prompts/alpha/rollback")
    created = call(
        c, PLATFORM, "POST", "/v1/keys", json={"name": "ci", "scope": "classify", "tenant": "team-b"}
    )
    assert created.status_code == 201
    call(c, PLATFORM, "DELETE", f"/v1/keys/{created.json()['id']}")

    def trail(who: str, query: str = "") -> list[dict[str, Any]]:
        r = call(c, who, "GET", f"/v1/audit{query}")
        assert r.status_code == 200, r.text
        entries: list[dict[str, Any]] = r.json()["entries"]
        return entries

    a_id = "k_" + __import__("hashlib").sha256(bytes.fromhex(hash_key(A_ADMIN))).hexdigest()[:12]
    mine = trail(A_ADMIN)
    assert [e["action"] for e in mine] == ["rollback", "upload", "upload"]  # newest first
    assert all(e["tenant"] == "team-a" and e["task"] == "team-a/alpha" for e in mine)
    assert mine[0]["actor"] == a_id and mine[0]["version"] == world.alpha[0].version
    assert A_ADMIN not in json.dumps(mine) and hash_key(A_ADMIN) not in json.dumps(mine)  # ids, never keys
    theirs = trail(B_ADMIN)
    assert [e["action"] for e in theirs] == ["key.revoke", "key.create", "upload", "upload"]
    assert not any("team-a" in json.dumps(e) for e in theirs)
    everything = trail(PLATFORM)
    assert {e["action"] for e in everything} == {"upload", "rollback", "key.create", "key.revoke"}
    assert len(everything) == 8


def test_stored_keys_work_and_stop_at_once_when_revoked(world: World) -> None:
    c = world.client
    r = call(
        c, PLATFORM, "POST", "/v1/keys", json={"name": "b reader", "scope": "classify", "tenant": "team-b"}
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert (
        created["key"].startswith("pts_") and created["tenant"] == "team-b" and created["revoked_at"] is None
    )
    new = created["key"]
    assert call(c, new, "POST", "/v1/classify", json={"task": "beta", "text": "x"}).status_code == 200
    assert call(c, new, "POST", "/v1/classify", json={"task": "team-a/alpha", "text": "x"}).status_code == 404
    assert call(c, new, "DELETE", "/v1/prompts/beta").status_code == 403
    listed = call(c, PLATFORM, "GET", "/v1/keys").json()["keys"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert new not in json.dumps(listed) and hash_key(new) not in json.dumps(listed)
    revoked = call(c, PLATFORM, "DELETE", f"/v1/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    r = call(c, new, "POST", "/v1/classify", json={"task": "beta", "text": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert call(c, PLATFORM, "DELETE", "/v1/keys/k_000000000000").status_code == 404


def test_the_cli_manages_keys_that_a_running_replica_honours(
    tmp_path: Path, backbone: Backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    settings = Settings(store=str(store), auth="on", api_keys=ENTRIES[:1], max_wait_ms=1, key_refresh_s=0.001)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        assert upload(c, random_artifact(backbone.spec, task="team-c/gamma"), PLATFORM).status_code == 201
        argv = [
            "keys",
            "create",
            "--store",
            str(store),
            "--name",
            "c",
            "--scope",
            "classify",
            "--tenant",
            "team-c",
        ]
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        new = lines[0].removeprefix("key:").strip()
        record_id = lines[1].split()[1]
        assert call(c, new, "POST", "/v1/classify", json={"task": "gamma", "text": "x"}).status_code == 200
        assert main(["keys", "list", "--store", str(store)]) == 0
        assert record_id in capsys.readouterr().out
        assert main(["keys", "revoke", "--store", str(store), record_id]) == 0
        assert call(c, new, "POST", "/v1/classify", json={"task": "gamma", "text": "x"}).status_code == 401
        trail = call(c, PLATFORM, "GET", "/v1/audit").json()["entries"]
        assert [(e["action"], e["actor"]) for e in trail[:2]] == [
            ("key.revoke", "cli"),
            ("key.create", "cli"),
        ]


def test_a_keys_rate_is_shared_by_replicas_on_one_redis(
    private_redis: RedisServer, backbone: Backbone
) -> None:
    settings = Settings(store=private_redis.url, auth="on", api_keys=ENTRIES, max_wait_ms=1)
    with (
        TestClient(create_app(settings, backbone=backbone)) as one,
        TestClient(create_app(settings, backbone=backbone)) as two,
    ):
        r = call(
            one,
            PLATFORM,
            "POST",
            "/v1/keys",
            json={"name": "slow", "scope": "admin", "rate_per_s": 0.01, "burst": 2},
        )
        limited = r.json()["key"]
        # Two requests fit the burst, on either replica; the third is refused wherever it goes.
        assert call(one, limited, "GET", "/v1/prompts").status_code == 200
        assert call(two, limited, "GET", "/v1/prompts").status_code == 200
        refused = call(one, limited, "GET", "/v1/prompts")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 90  # a token every 100 s
        assert "rate of 0.01 requests/s (burst 2)" in refused.json()["error"]["message"]
        assert call(two, limited, "GET", "/v1/prompts").status_code == 429
        # Other keys are not affected.
        assert call(two, PLATFORM, "GET", "/v1/prompts").status_code == 200
        metrics = one.get("/metrics").text
        assert 'ptserve_tenant_refusals_total{reason="rate_limited",tenant="platform"} 1.0' in metrics


def test_default_key_rate_applies_to_every_key_without_its_own(tmp_path: Path, backbone: Backbone) -> None:
    settings = Settings(
        store=str(tmp_path / "s"),
        auth="on",
        api_keys=ENTRIES,
        max_wait_ms=1,
        key_rate_per_s=0.01,
        key_burst=1,
    )
    with TestClient(create_app(settings, backbone=backbone)) as c:
        assert call(c, A_READ, "GET", "/v1/prompts").status_code == 200
        assert call(c, A_READ, "GET", "/v1/prompts").status_code == 429
        assert call(c, B_ADMIN, "GET", "/v1/prompts").status_code == 200  # a bucket per key


# --- shares: one tenant cannot take every concurrency slot, nor every cached byte ----------------------


async def test_a_tenant_holds_at_most_its_share_of_the_concurrent_requests(
    tmp_path: Path, backbone: Backbone
) -> None:
    from tests.service.test_limits import assert_json_error, gate_forward, serving

    settings = Settings(
        store=str(tmp_path / "s"),
        auth="on",
        api_keys=ENTRIES,
        max_wait_ms=1,
        max_concurrent_requests=4,
        tenant_concurrency_share=0.5,
    )
    async with serving(settings, backbone) as (app, client):
        for task in ("team-a/gated", "team-b/gated"):
            artifact = random_artifact(backbone.spec, task=task)
            r = await client.post("/v1/prompts", files={"file": ("a", artifact.data)}, headers=key(PLATFORM))
            assert r.status_code == 201
        entered, release = gate_forward(app)
        body = {"task": "gated", "text": "wait"}
        a_first = asyncio.create_task(client.post("/v1/classify", json=body, headers=key(A_READ)))
        assert await asyncio.to_thread(entered.wait, 10)
        a_second = asyncio.create_task(client.post("/v1/classify", json=body, headers=key(A_ADMIN)))
        b_first = asyncio.create_task(client.post("/v1/classify", json=body, headers=key(B_ADMIN)))
        try:
            runtime = app.state.runtime
            async with asyncio.timeout(10):
                while runtime.batcher.queue_depth < 2:
                    await asyncio.sleep(0.001)
            # A holds two of four slots, its share: its third request is refused, not queued ...
            r = await asyncio.wait_for(client.post("/v1/classify", json=body, headers=key(A_READ)), 10)
            assert_json_error(
                r, 429, "too_many_requests", "tenant 'team-a' has 2 requests", "tenant_concurrency_share"
            )
            assert r.headers["Retry-After"] == "1"
            # ... while B, holding one, and the platform are still admitted (they queue behind the gate).
            b_second = asyncio.create_task(client.post("/v1/classify", json=body, headers=key(B_ADMIN)))
            async with asyncio.timeout(10):
                while runtime.batcher.queue_depth < 3:
                    await asyncio.sleep(0.001)
        finally:
            release.set()
        for task in (a_first, a_second, b_first, b_second):
            assert (await task).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'ptserve_tenant_refusals_total{reason="too_many_requests",tenant="team-a"} 1.0' in metrics
        assert 'ptserve_tenant_requests_total{status="200",tenant="team-b"} 2.0' in metrics
        assert 'ptserve_tenant_rows_total{tenant="team-a"} 2.0' in metrics
        assert 'ptserve_tenant_cache_bytes{tenant="team-b"}' in metrics


async def test_one_tenants_cold_tasks_do_not_evict_anothers_hot_ones(
    tmp_path: Path, backbone: Backbone
) -> None:
    from prompts.disk_store import DiskPromptStore
    from service.cache import PromptCache
    from service.pool import PromptPool

    store = DiskPromptStore(tmp_path / "s")
    tasks = {f"team-a/cold-{i}": random_artifact(backbone.spec, task=f"cold-{i}", seed=i) for i in range(6)}
    tasks |= {
        f"team-b/hot-{i}": random_artifact(backbone.spec, task=f"hot-{i}", seed=10 + i) for i in range(2)
    }
    for name, artifact in tasks.items():
        store.put(name, artifact.version, artifact.data, artifact.manifest_json())
    size = next(iter(tasks.values())).tensors["prefix"].numel() * 4 + 200  # about one task's device bytes
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype)
    cache = PromptCache(
        store, backbone, pool, budget_bytes=size * 5, max_artifact_bytes=1 << 20, tenant_share=0.5
    )
    for name in ("team-b/hot-0", "team-b/hot-1"):
        await cache.resolve(name)
    for name in [n for n in tasks if n.startswith("team-a/")]:
        assert (await cache.resolve(name)).task == name
    kept = {task for task, _ in cache._entries}
    # B's two hot tasks stayed; A's cold ones evicted A's own beyond half the budget.
    assert {"team-b/hot-0", "team-b/hot-1"} <= kept
    bytes_by_tenant = cache.tenant_bytes()
    assert bytes_by_tenant["team-a"] <= size * 5 * 0.5
    assert cache.evictions >= 3
    # The platform namespace (every task of a single-tenant deployment) is not capped.
    assert PromptCache(store, backbone, pool, budget_bytes=1, max_artifact_bytes=1).tenant_bytes() == {}


def test_tenant_series_are_bounded(tmp_path: Path, backbone: Backbone) -> None:
    settings = Settings(
        store=str(tmp_path / "s"), auth="on", api_keys=ENTRIES, max_wait_ms=1, max_tenant_series=1
    )
    with TestClient(create_app(settings, backbone=backbone)) as c:
        for who in (A_READ, B_ADMIN, PLATFORM):
            assert call(c, who, "GET", "/v1/prompts").status_code == 200
        metrics = c.get("/metrics").text
    assert 'ptserve_tenant_requests_total{status="200",tenant="team-a"} 1.0' in metrics
    assert 'ptserve_tenant_requests_total{status="200",tenant="other"} 1.0' in metrics  # team-b
    assert 'ptserve_tenant_requests_total{status="200",tenant="platform"} 1.0' in metrics
    assert "team-b" not in metrics


@pytest.mark.integration
def test_revoking_a_key_stops_it_on_every_replica(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone, private_redis: RedisServer
) -> None:
    """Two real replicas on one Redis: a key created on one works on both; revoked on one, refused by both."""
    from prompts.redis_store import RedisPromptStore
    from tests.processes import PtserveProcess, clean_environment, eventually
    from tests.redis_server import free_port

    store = RedisPromptStore(private_redis.url)
    artifact = random_artifact(backbone.spec, task="team-a/gamma")
    store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    store.close()
    bases, servers = [], []
    try:
        for i in range(2):
            port = free_port()
            env = clean_environment(
                PTSERVE_AUTH="on",
                PTSERVE_API_KEYS=ENTRIES[0],
                PTSERVE_STORE=private_redis.url,
                PTSERVE_MODEL=str(tiny_bert_dir),
                PTSERVE_PORT=str(port),
                PTSERVE_MAX_WAIT_MS="1",
            )
            servers.append(PtserveProcess(["serve"], env, tmp_path / f"replica-{i}.log"))
            bases.append(f"http://127.0.0.1:{port}")
        for server, base in zip(servers, bases, strict=True):
            server.wait_ready(base)
        body = {"name": "a reader", "scope": "classify", "tenant": "team-a"}
        created = httpx.post(f"{bases[0]}/v1/keys", json=body, headers=key(PLATFORM), timeout=30).json()

        def status(base: str) -> int:
            r = httpx.post(
                f"{base}/v1/classify", json={"task": "gamma", "text": "x"}, headers=key(created["key"])
            )
            return r.status_code

        for base in bases:
            eventually(lambda base=base: status(base) == 200, f"the new key to work on {base}", 10)
        revoked = httpx.delete(f"{bases[0]}/v1/keys/{created['id']}", headers=key(PLATFORM), timeout=30)
        assert revoked.status_code == 200
        assert status(bases[0]) == 401  # at once where it was revoked
        eventually(lambda: status(bases[1]) == 401, "the other replica to refuse the revoked key", 5)
    finally:
        for server in servers:
            server.stop()
