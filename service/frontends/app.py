"""A front end's app: ``/v1/classify`` answered here with the engine's forward, everything else relayed.

What runs here per classify request is what one process would do around the forward: keys and limits
(the same middleware), validation, tokenising (untruncated: the engine cuts each text to the room of
the task version it pins the request to) and the JSON response. Uploads, rollbacks, deletes, listings,
jobs, keys, the audit trail, readiness and ``/metrics`` go to the engine's own app, byte for byte, so
they behave, and change its caches, exactly as with one process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import Depends, FastAPI, Request, Response

from prompts.backbone import TextTokenizer
from service.app import install_error_handlers, route_templates
from service.auth import AuthMiddleware, KeyRing, ScopeTable, principal_of, require_scope
from service.errors import EngineUnavailableError, RelayedError
from service.frontends.link import EngineClient
from service.frontends.protocol import Observed
from service.limits import Limits, LimitsMiddleware
from service.logs import REQUEST_ID_HEADER, RequestLogMiddleware, RequestRecord, RouteTemplates
from service.memory import freeze_startup_objects
from service.ratelimit import RateLimiter
from service.routes import (
    INLINE_TOKENIZE_CHARS,
    INLINE_TOKENIZE_TEXTS,
    check_texts,
    check_tokens,
    classify_response,
)
from service.runtime import open_store, open_tenancy
from service.schemas import ClassifyRequest, ClassifyResponse, HealthResponse
from service.settings import Settings
from service.tenancy import Principal

FRONTEND_HEADER = "X-Ptserve-Frontend"
# Hop-by-hop headers and those the relay recomputes; the rest pass through both ways.
_DROPPED = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"})


@dataclass
class Frontend:
    """What a front end's lifespan opens."""

    index: int
    tokenizer: TextTokenizer
    engine: EngineClient
    relay: httpx.AsyncClient
    # Shared buckets (Redis) are taken here; local ones (a directory store) in the engine, the one
    # process every front end reaches (Call.bucket): None then, and the limits middleware skips them.
    limiter: RateLimiter | None


def _frontend(request: Request) -> Frontend:
    frontend: Frontend = request.app.state.frontend
    return frontend


def create_frontend_app(
    settings: Settings, index: int, engine_address: str, engine_socket: str, freeze_gc: bool = False
) -> FastAPI:
    """Front end number ``index`` of ``settings.frontends``, talking to the engine at ``engine_address``
    (ZeroMQ) and ``engine_socket`` (its app, HTTP over a unix socket). ``freeze_gc``: as ``create_app``'s."""
    keyring = KeyRing.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tokenizer = await asyncio.to_thread(TextTokenizer.load, settings.model)
        # The store only for what auth and limits read: stored keys and shared rate-limit buckets.
        store = open_store(settings.store, settings.keep_versions, settings.write_replicas)
        tenancy = open_tenancy(settings, store)
        if keyring is not None:
            keyring.attach(tenancy.keys)
        engine = EngineClient(
            engine_address,
            identity=f"frontend-{index}-{os.getpid()}",
            coalesce_s=settings.frontend_coalesce_ms / 1000.0,
        )
        engine.start()
        relay = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=engine_socket), base_url="http://engine", timeout=None
        )
        shared = tenancy.limiter.needs_io  # Redis: every process takes from the same buckets
        app.state.frontend = Frontend(index, tokenizer, engine, relay, tenancy.limiter if shared else None)
        if freeze_gc:
            freeze_startup_objects()
        try:
            yield
        finally:
            await relay.aclose()
            await engine.close()
            if keyring is not None:
                keyring.attach(None)
            store.close()

    app = FastAPI(title="ptserve front end", version="0.1.0", lifespan=lifespan, openapi_url=None)
    app.state.keyring = keyring
    install_error_handlers(app, settings.retry_after_s)

    def frontend_or_none() -> Frontend | None:
        return getattr(app.state, "frontend", None)

    def observe(record: RequestRecord) -> None:
        # Every request is counted once, in the engine's registry, which /metrics (relayed) exposes:
        # relayed requests by the engine's own middleware, the rest (classify, refusals before the
        # relay, the engine not answering, /healthz) from here.
        frontend = frontend_or_none()
        if frontend is not None and not record.relayed:
            frontend.engine.observe(
                Observed(
                    record.route, record.task, record.status, record.latency_ms, record.key, record.tenant
                )
            )

    def refused(principal: Principal, reason: str) -> None:
        frontend = frontend_or_none()
        if frontend is not None:
            frontend.engine.observe(
                Observed("/v1/classify", None, 429, 0.0, principal.key_id, principal.tenant, reason)
            )

    scopes = ScopeTable()
    scopes.add_path("/v1/classify", {"POST"}, "classify")
    # The engine's route templates: requests answered here (refusals before the relay, the engine not
    # answering) are labelled with the route the engine would have counted them under.
    templates = RouteTemplates(route_templates)
    limits = Limits.from_settings(settings)
    app.add_middleware(
        LimitsMiddleware,
        limits=limits,
        limiter=lambda: getattr(frontend_or_none(), "limiter", None),
        on_refusal=refused,
    )
    app.add_middleware(AuthMiddleware, ring=keyring, table=scopes)
    app.add_middleware(
        RequestLogMiddleware,
        observers=[observe],
        route_of=templates,
    )

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(response: Response) -> HealthResponse:
        """This front end's event loop answers (the engine's state: /readyz)."""
        response.headers[FRONTEND_HEADER] = str(index)
        return HealthResponse(status="ok", checks={"frontend": str(index), "pid": str(os.getpid())})

    @app.post(
        "/v1/classify", response_model=ClassifyResponse, dependencies=[Depends(require_scope("classify"))]
    )
    async def classify(body: ClassifyRequest, request: Request, response: Response) -> ClassifyResponse:
        frontend = _frontend(request)
        response.headers[FRONTEND_HEADER] = str(index)
        texts = body.all_texts()
        check_texts(texts, settings)
        if len(texts) <= INLINE_TOKENIZE_TEXTS and sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            rows = frontend.tokenizer.untruncated(texts)
        else:
            rows = await asyncio.to_thread(frontend.tokenizer.untruncated, texts)
        check_tokens(texts, rows, frontend.tokenizer.special_ids)
        request_id = str(getattr(request.state, "request_id", ""))
        # Keys limited as the limits middleware limits them: only a checked key (auth on) has a bucket.
        checked: Principal | None = getattr(request.state, "principal", None)
        bucket = limits.bucket(checked) if checked is not None and frontend.limiter is None else None
        reply = await frontend.engine.classify(request_id, body.task, principal_of(request), rows, bucket)
        if reply.error_status:
            retry_after_s = reply.error_retry_after_s or None
            raise RelayedError(reply.error_status, reply.error_code, reply.error_message, retry_after_s)
        request.state.task, request.state.version = reply.task, reply.version
        return classify_response(
            body, reply.task, reply.version, reply.labels, reply.probabilities, reply.truncated
        )

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    async def relay(path: str, request: Request) -> Response:
        """Every other route: the engine's app answers, as it would without front ends."""
        frontend = _frontend(request)
        request.state.route = templates(request.url.path)  # not this catch-all's template
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED]
        headers.append((REQUEST_ID_HEADER, str(getattr(request.state, "request_id", ""))))
        try:
            query = request.url.query
            answer = await frontend.relay.request(
                request.method,
                request.url.path + (f"?{query}" if query else ""),
                headers=headers,
                content=await request.body(),
            )
        except httpx.TransportError as exc:
            raise EngineUnavailableError(
                f"the engine process is not answering ({type(exc).__name__}); retry shortly"
            ) from exc
        request.state.relayed = True  # the engine's middleware counted it
        out = Response(content=answer.content, status_code=answer.status_code)
        for key, value in answer.headers.multi_items():
            if key.lower() not in _DROPPED and key.lower() != REQUEST_ID_HEADER.lower():
                out.headers.append(key, value)
        out.headers[FRONTEND_HEADER] = str(index)
        return out

    return app
