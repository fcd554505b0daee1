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
from service.jobs_routes import jobs_router
from service.routes import admin_router, classify_router, public_router
from service.runtime import build_runtime, open_job_queue, open_store
from service.settings import Settings

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"] or ["body"]
        parts.append(f"{'.'.join(loc)}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail)
        )

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
        runtime.jobs = open_job_queue(settings)
        runtime.batcher.start()
        if runtime.watcher is not None:
            runtime.watcher.start()
        app.state.runtime = runtime
        logger.info("ptserve ready: backbone %s, store %s", loaded.spec.describe(), settings.store)
        try:
            yield
        finally:
            # Admitted requests finish before the store closes.
            await runtime.batcher.stop(drain=True)
            if runtime.watcher is not None:
                await runtime.watcher.stop()
            if store is None:
                opened.close()
            if runtime.jobs is not None:
                runtime.jobs.close()
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
    app.include_router(jobs_router, dependencies=[Depends(require_scope("admin"))])
    return app
