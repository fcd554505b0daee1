"""The FastAPI application: built by :func:`create_app`, everything wired in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts.backbone import Backbone, load_backbone
from prompts.errors import PtserveError
from prompts.store import PromptStore
from service.auth import require_scope
from service.errors import http_status
from service.routes import admin_router, classify_router, public_router
from service.runtime import build_runtime, open_store
from service.settings import Settings

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


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
        # A task name with '/' (or an encoded %2F) splits into more path segments than any route has.
        message += "; a task name is one path segment of 1-64 characters of a-z, 0-9, '_', '.', '-' (no '/')"
    return message


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PtserveError)
    async def _ptserve(_: Request, exc: PtserveError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            logger.error("request failed: %s: %s", exc.code, exc.message)
        return error_response(status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # Undecodable bodies (bad UTF-8, broken multipart) are bad input like malformed JSON:
            # the same status and code, so clients handle one kind of refusal.
            return error_response(422, "invalid_request", _bad_request_message(exc))
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = _not_found_message(request)
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


def create_app(
    settings: Settings | None = None,
    *,
    backbone: Backbone | None = None,
    store: PromptStore | None = None,
) -> FastAPI:
    """Build the app. ``backbone`` and ``store`` may be injected (tests share one tiny backbone)."""
    settings = settings if settings is not None else Settings()

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
        opened = store if store is not None else open_store(settings.store, settings.keep_versions)
        runtime = build_runtime(settings, loaded, opened)
        runtime.batcher.start()
        app.state.runtime = runtime
        logger.info("ptserve ready: backbone %s, store %s", loaded.spec.describe(), settings.store)
        try:
            yield
        finally:
            # Admitted requests finish before the store closes.
            await runtime.batcher.stop(drain=True)
            if store is None:
                opened.close()
            del app.state.runtime

    app = FastAPI(
        title="ptserve",
        version="0.1.0",
        summary="One frozen encoder serving many prompt-tuned classification tasks in mixed batches.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(public_router)
    app.include_router(classify_router, dependencies=[Depends(require_scope("classify"))])
    app.include_router(admin_router, dependencies=[Depends(require_scope("admin"))])
    return app
