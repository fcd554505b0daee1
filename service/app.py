"""The FastAPI application: built by :func:`create_app`, everything wired in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts.backbone import Backbone, load_backbone
from prompts.errors import PtserveError
from prompts.store import PromptStore
from service.auth import AuthMiddleware, KeyRing, ScopeTable, log_auth_mode, require_scope
from service.errors import error_body, http_headers, http_status
from service.frontends.link import EngineEndpoint
from service.jobs_routes import jobs_router
from service.limits import Limits, LimitsMiddleware
from service.logs import RequestLogMiddleware, RouteTemplates
from service.memory import freeze_startup_objects
from service.metrics import CONTENT_TYPE, Metrics
from service.routes import admin_router, classify_router, public_router
from service.runtime import build_runtime, open_job_queue, open_store, open_tenancy
from service.settings import Settings
from service.tenant_routes import audit_router, keys_router

logger = logging.getLogger(__name__)


def error_response(
    request: Request, status: int, code: str, message: str, retry_after_s: int = 1
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(
        error_body(code, message, request_id),
        status_code=status,
        headers=http_headers(status, retry_after_s),
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            # FastAPI puts the character offset where a field name would be: say what it is.
            position = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            parts.append(f"body is not valid JSON: {reason} at character {position}")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"] or ["body"]
        message = f"{'.'.join(loc)}: {err.get('msg', 'invalid')}"
        if loc == ["body"] and err.get("type") == "model_attributes_type":
            message += " (send a JSON object with Content-Type: application/json)"
        parts.append(message)
    return "; ".join(parts)


def _bad_request_message(exc: StarletteHTTPException) -> str:
    """What a 400 from FastAPI or Starlette (an unparseable body) was really about, from its cause."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"request body is not valid UTF-8: byte 0x{cause.object[cause.start]:02x} "
            f"at position {cause.start}"
        )
    if cause is not None:
        return f"request body could not be parsed: {type(cause).__name__}: {cause}"
    return f"request body could not be parsed: {exc.detail}"


def _not_found_message(request: Request) -> str:
    message = f"no route for {request.method} {request.url.path}"
    if request.url.path.startswith("/v1/prompts/"):
        # More path segments than any route has: a '/' (or an encoded %2F) past the tenant's.
        message += (
            "; a task name is 1-64 characters of a-z, 0-9, '_', '.', '-', after at most one "
            "'<tenant>/' (no other '/')"
        )
    return message


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    @app.exception_handler(PtserveError)
    async def _ptserve(request: Request, exc: PtserveError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            logger.error("request failed: %s: %s", exc.code, exc.message)
        # A key's bucket knows when its next token is due; other refusals retry after the setting.
        due = getattr(exc, "retry_after_s", None)
        retry = max(1, math.ceil(due)) if due else retry_after_s
        return error_response(request, status, exc.code, exc.message, retry)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # Undecodable bodies (bad UTF-8, broken multipart) are bad input like malformed JSON:
            # the same status and code, so clients handle one kind of refusal.
            return error_response(request, 422, "invalid_request", _bad_request_message(exc))
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = _not_found_message(request)
        return error_response(
            request, exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), message
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(request, 500, "internal_error", f"internal error: {type(exc).__name__}")


def route_templates() -> list[str]:
    """The path templates of every route of the app ``create_app`` builds, without building one (a
    front end labels the requests it answers for the engine with them)."""
    routers = (public_router, classify_router, admin_router, jobs_router, audit_router, keys_router)
    paths = [str(getattr(route, "path", "")) for router in routers for route in router.routes]
    return list(dict.fromkeys([*paths, "/metrics"]))


def install_metrics_route(app: FastAPI, metrics: Metrics, public: bool, scopes: ScopeTable) -> None:
    """``GET /metrics``: public by default, as Prometheus scrapes expect; else the admin scope."""
    guard = [] if public else [Depends(require_scope("admin"))]
    if not public:
        scopes.add_path("/metrics", {"GET"}, "admin")

    @app.get(
        "/metrics",
        dependencies=guard,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
        tags=["health"],
    )
    async def metrics_route() -> Response:
        """Prometheus metrics of this replica."""
        # A scrape may ask Redis for the training-job counts: off the event loop.
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)


def create_app(
    settings: Settings | None = None,
    *,
    backbone: Backbone | None = None,
    store: PromptStore | None = None,
    engine_address: str | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the app. ``backbone`` and ``store`` may be injected (tests share one tiny backbone).

    ``engine_address``: this is the engine process of ``serve --frontends N``, which also answers
    tokenised classify calls from the front ends on that ZeroMQ address (service/frontends/).
    ``freeze_gc``: a serving process's app, whose start-up objects the collector then leaves alone
    (service/memory.py); never in a test process.

    Raises SettingsError when auth is on without API keys.
    """
    settings = settings if settings is not None else Settings()
    keyring = KeyRing.from_settings(settings)
    metrics = Metrics(lambda: getattr(app.state, "runtime", None), settings.max_tenant_series)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            # Fewer forward threads than cores leaves the event loop and tokenizer a core of their own.
            torch.set_num_threads(settings.torch_threads)
        loaded = backbone
        if loaded is None:
            loaded = await asyncio.to_thread(
                load_backbone, settings.model, device=settings.device, dtype=settings.dtype
            )
        opened = (
            store
            if store is not None
            else open_store(settings.store, settings.keep_versions, settings.write_replicas)
        )
        runtime = build_runtime(
            settings, loaded, opened, on_batch=metrics.observe_batch, on_rows=metrics.observe_rows
        )
        runtime.jobs = open_job_queue(settings)
        tenancy = open_tenancy(settings, opened)
        runtime.keys, runtime.audit, runtime.limiter = tenancy.keys, tenancy.audit, tenancy.limiter
        if keyring is not None:
            keyring.attach(tenancy.keys)
        runtime.batcher.start()
        if runtime.watcher is not None:
            runtime.watcher.start()
        endpoint = None
        if engine_address is not None:
            endpoint = EngineEndpoint(runtime, metrics, engine_address)
            endpoint.start()
            app.state.engine_endpoint = endpoint
        app.state.runtime = runtime
        log_auth_mode(keyring)
        if freeze_gc:
            logger.debug("start-up objects frozen: %d", freeze_startup_objects())
        logger.info("ptserve ready: backbone %s, store %s", loaded.spec.describe(), settings.store)
        try:
            yield
        finally:
            runtime.draining = True
            if endpoint is not None:
                await endpoint.stop()  # the front ends' admitted calls finish first
            # Admitted requests finish before the store closes.
            await runtime.batcher.stop(drain=True)
            if runtime.watcher is not None:
                await runtime.watcher.stop()
            if store is None:
                opened.close()
            if runtime.jobs is not None:
                runtime.jobs.close()
            if keyring is not None:
                keyring.attach(None)
            del app.state.runtime

    app = FastAPI(
        title="ptserve",
        version="0.1.0",
        summary="One frozen encoder serving many prompt-tuned classification tasks in mixed batches.",
        lifespan=lifespan,
    )
    app.state.keyring = keyring
    app.state.metrics = metrics
    install_error_handlers(app, settings.retry_after_s)
    scopes = ScopeTable()
    # The last middleware added runs first: request ids and access lines wrap everything, keys are
    # checked before the limits (an unauthenticated flood takes no concurrency slots) and before
    # any body is read.
    app.add_middleware(
        LimitsMiddleware,
        limits=Limits.from_settings(settings),
        limiter=lambda: getattr(getattr(app.state, "runtime", None), "limiter", None),
        on_refusal=metrics.observe_refusal,
    )
    app.add_middleware(AuthMiddleware, ring=keyring, table=scopes)
    app.add_middleware(
        RequestLogMiddleware,
        observers=[metrics.observe_request],
        route_of=RouteTemplates(lambda: app.openapi()["paths"]),
    )
    app.include_router(public_router)
    install_metrics_route(app, metrics, settings.metrics_public, scopes)
    # Each guarded router: the dependency and the middleware's table (see service/auth.py).
    app.include_router(classify_router, dependencies=[Depends(require_scope("classify"))])
    scopes.add(classify_router, "classify")
    app.include_router(admin_router, dependencies=[Depends(require_scope("admin"))])
    scopes.add(admin_router, "admin")
    app.include_router(jobs_router, dependencies=[Depends(require_scope("admin"))])
    scopes.add(jobs_router, "admin")
    app.include_router(audit_router, dependencies=[Depends(require_scope("admin"))])
    scopes.add(audit_router, "admin")
    app.include_router(keys_router, dependencies=[Depends(require_scope("platform"))])
    scopes.add(keys_router, "platform")
    return app
