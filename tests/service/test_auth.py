from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from prompts.backbone import Backbone
from service.app import create_app
from service.auth import KeyRing, hash_key
from service.cli import build_parser, main, settings_from_args
from service.errors import SettingsError
from service.settings import Settings
from tests.factories import random_artifact
from tests.service.test_api import assert_error

ADMIN_KEY = "admin-secret-key"
CLASSIFY_KEY = "classify-secret-key"
KEYS = [f"admin:{hash_key(ADMIN_KEY)}", f"classify:{hash_key(CLASSIFY_KEY)}"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def auth_settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(store=str(tmp_path / "store"), max_wait_ms=1, auth="on", api_keys=KEYS, **extra)


@pytest.fixture
def client(tmp_path: Path, backbone: Backbone) -> Iterator[TestClient]:
    with TestClient(create_app(auth_settings(tmp_path), backbone=backbone)) as c:
        artifact = random_artifact(backbone.spec, task="guarded")
        r = c.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}, headers=bearer(ADMIN_KEY))
        assert r.status_code == 201, r.text
        yield c


CLASSIFY = {"task": "guarded", "text": "hello"}


def test_no_key_is_401_with_a_bearer_challenge(client: TestClient) -> None:
    r = client.post("/v1/classify", json=CLASSIFY)
    assert_error(r, 401, "unauthorized", "Authorization: Bearer", "X-API-Key")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="ptserve"'
    assert_error(client.get("/v1/prompts"), 401, "unauthorized")
    assert_error(client.delete("/v1/prompts/guarded"), 401, "unauthorized")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer not-a-key"},
        {"X-API-Key": "not-a-key"},
        {"Authorization": f"Basic {ADMIN_KEY}"},  # only the Bearer scheme carries a key
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {ADMIN_KEY}x"},
    ],
)
def test_unknown_or_malformed_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    r = client.post("/v1/classify", json=CLASSIFY, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_classify_key_classifies_and_reads_but_gets_403_on_admin_routes(
    client: TestClient, backbone: Backbone
) -> None:
    r = client.post("/v1/classify", json=CLASSIFY, headers=bearer(CLASSIFY_KEY))
    assert r.status_code == 200, r.text
    assert client.get("/v1/prompts", headers=bearer(CLASSIFY_KEY)).status_code == 200
    assert client.get("/v1/prompts/guarded", headers={"X-API-Key": CLASSIFY_KEY}).status_code == 200

    other = random_artifact(backbone.spec, task="guarded", seed=5)
    r = client.post(
        "/v1/prompts", files={"file": ("a.safetensors", other.data)}, headers=bearer(CLASSIFY_KEY)
    )
    assert_error(r, 403, "forbidden", "'classify' scope", "needs 'admin'")
    assert "WWW-Authenticate" not in r.headers
    assert_error(client.delete("/v1/prompts/guarded", headers=bearer(CLASSIFY_KEY)), 403, "forbidden")
    # Nothing changed: the refused upload and delete left the task as it was.
    info = client.get("/v1/prompts/guarded", headers=bearer(CLASSIFY_KEY)).json()
    assert info["versions"] == [random_artifact(backbone.spec, task="guarded").version]


def test_admin_key_implies_classify_and_both_headers_work(client: TestClient) -> None:
    assert client.post("/v1/classify", json=CLASSIFY, headers=bearer(ADMIN_KEY)).status_code == 200
    assert client.post("/v1/classify", json=CLASSIFY, headers={"X-API-Key": ADMIN_KEY}).status_code == 200
    lower = {"authorization": f"bearer {ADMIN_KEY}"}  # scheme names are case-insensitive
    assert client.post("/v1/classify", json=CLASSIFY, headers=lower).status_code == 200
    assert client.delete("/v1/prompts/guarded", headers=bearer(ADMIN_KEY)).status_code == 200


def test_health_probes_and_metrics_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and "ptserve_requests_total" in r.text


def test_private_metrics_need_the_admin_scope(tmp_path: Path, backbone: Backbone) -> None:
    with TestClient(create_app(auth_settings(tmp_path, metrics_public=False), backbone=backbone)) as c:
        assert_error(c.get("/metrics"), 401, "unauthorized")
        assert_error(c.get("/metrics", headers=bearer(CLASSIFY_KEY)), 403, "forbidden")
        assert c.get("/metrics", headers=bearer(ADMIN_KEY)).status_code == 200


def test_auth_on_without_keys_refuses_to_build_the_app(tmp_path: Path, backbone: Backbone) -> None:
    settings = Settings(store=str(tmp_path / "s"), auth="on")
    with pytest.raises(SettingsError, match="PTSERVE_API_KEYS") as caught:
        create_app(settings, backbone=backbone)
    assert "PTSERVE_AUTH=off" in caught.value.message


@pytest.mark.parametrize(
    "entry",
    [
        "admin:abc",  # too short
        "root:" + "0" * 64,  # unknown scope
        "admin:" + "G" * 64,  # not hex
        hash_key("no scope"),
        "admin:" + hash_key("x").upper(),  # digests are lower case, as hash-key prints them
    ],
)
def test_malformed_key_entries_are_invalid_settings(entry: str) -> None:
    with pytest.raises(ValidationError, match="api_keys") as caught:
        Settings(auth="on", api_keys=[entry])
    assert "hash-key" in str(caught.value)


def test_keys_come_from_one_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTSERVE_AUTH", "on")
    monkeypatch.setenv("PTSERVE_API_KEYS", f" {KEYS[0]} ,{KEYS[1]},")
    settings = Settings()
    assert settings.api_keys == KEYS
    ring = KeyRing.from_settings(settings)
    assert ring is not None
    assert ring.scope_of(ADMIN_KEY) == "admin"
    assert ring.scope_of(CLASSIFY_KEY) == "classify"
    assert ring.scope_of("admin") is None and ring.scope_of("") is None


def test_auth_off_is_logged_loudly(
    tmp_path: Path, backbone: Backbone, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(store=str(tmp_path / "s"), auth="off")
    with caplog.at_level(logging.INFO), TestClient(create_app(settings, backbone=backbone)) as c:
        assert c.get("/v1/prompts").status_code == 200  # no key needed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "AUTH IS OFF" in r.getMessage()]
    assert len(warnings) == 1 and "PTSERVE_AUTH=off" in warnings[0].getMessage()


def test_auth_on_is_logged_with_key_counts(
    tmp_path: Path, backbone: Backbone, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), TestClient(create_app(auth_settings(tmp_path), backbone=backbone)):
        pass
    assert any("auth on: 1 admin key(s), 1 classify key(s)" in r.getMessage() for r in caplog.records)


def test_demo_serves_without_keys_unless_auth_or_keys_are_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PTSERVE_AUTH", raising=False)
    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve", "--demo"])).auth == "off"
    assert settings_from_args(parse(["serve"])).auth == "on"
    monkeypatch.setenv("PTSERVE_API_KEYS", KEYS[0])
    assert settings_from_args(parse(["serve", "--demo"])).auth == "on"
    monkeypatch.delenv("PTSERVE_API_KEYS")
    monkeypatch.setenv("PTSERVE_AUTH", "on")  # explicit: the demo refuses to start without keys
    assert settings_from_args(parse(["serve", "--demo"])).auth == "on"


def test_serve_without_keys_stops_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PTSERVE_AUTH", raising=False)
    monkeypatch.delenv("PTSERVE_API_KEYS", raising=False)
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "PTSERVE_API_KEYS" in err and "ptserve hash-key" in err


def test_hash_key_prints_the_entry_for_a_given_or_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "--scope", "admin", "--key", "s3cret"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"entry: admin:{hashlib.sha256(b's3cret').hexdigest()}"]

    assert main(["hash-key"]) == 0
    key_line, entry_line = capsys.readouterr().out.strip().splitlines()
    key = key_line.removeprefix("key:").strip()
    assert len(key) > 40
    entry = entry_line.removeprefix("entry:").strip()
    assert entry == f"classify:{hash_key(key)}"
    # The printed entry is accepted as is, and the printed key authenticates against it.
    ring = KeyRing.from_settings(Settings(auth="on", api_keys=[entry]))
    assert ring is not None and ring.scope_of(key) == "classify"


async def test_keys_are_checked_before_the_body_is_read(tmp_path: Path, backbone: Backbone) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(4):
            pulled += 1
            yield b"{garbage"

    app = create_app(auth_settings(tmp_path), backbone=backbone)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ptserve") as client,
    ):
        # Without auth first these would be 422 (bad JSON) and 422 (bad multipart).
        r = await client.post("/v1/classify", content=body(), headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["request_id"] == r.headers["X-Request-ID"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert pulled == 0
        multipart = {"content-type": "multipart/form-data; boundary=x", **bearer(CLASSIFY_KEY)}
        r = await client.post("/v1/prompts", content=b"garbage", headers=multipart)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await client.post("/v1/prompts", content=b"garbage", headers={**multipart, **bearer(ADMIN_KEY)})
        assert r.status_code == 422  # an admin key gets as far as the body
        assert r.json()["error"]["code"] == "invalid_request"


def test_a_router_included_later_is_guarded_by_its_dependency(tmp_path: Path, backbone: Backbone) -> None:
    from fastapi import APIRouter, Depends

    from service.auth import require_scope

    extra = APIRouter()

    @extra.post("/v1/extra")
    async def extra_route(payload: dict[str, int]) -> dict[str, int]:
        return payload

    app = create_app(auth_settings(tmp_path), backbone=backbone)
    app.include_router(extra, dependencies=[Depends(require_scope("admin"))])
    with TestClient(app) as c:
        assert_error(c.post("/v1/extra", json={"a": 1}), 401, "unauthorized")
        assert_error(c.post("/v1/extra", json={"a": 1}, headers=bearer(CLASSIFY_KEY)), 403, "forbidden")
        r = c.post("/v1/extra", json={"a": 1}, headers=bearer(ADMIN_KEY))
        assert r.status_code == 200 and r.json() == {"a": 1}
