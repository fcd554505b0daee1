"""Logging: one configuration for ptserve and uvicorn (text or JSON lines), request ids, and one
access line per request written by :class:`RequestLogMiddleware`."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed only when it is short and printable, so it cannot forge log lines.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,128}$")

access_logger = logging.getLogger("ptserve.access")
logger = logging.getLogger(__name__)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


@dataclass(frozen=True)
class RequestRecord:
    """What one finished HTTP request did; logged as the access line and fed to the metrics."""

    request_id: str
    method: str
    path: str
    route: str  # the route template (``/v1/prompts/{task}``), or "" when no route matched
    task: str | None
    version: str | None
    status: int
    latency_ms: float
    key: str | None = None  # the public id of the request's key (None: no key checked)
    tenant: str | None = None  # the key's tenant (None: a platform key, or no key)
    # Answered by another process's app, which counts it itself (a front end's relay to the engine).
    relayed: bool = False


def request_id_from(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is valid, else a fresh one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


def request_state(scope: Scope) -> dict[str, Any]:
    """The per-request dict behind ``request.state`` (routes put ``task`` and ``version`` there)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


class RouteTemplates:
    """Maps a raw path to its route template, for requests refused before routing (413, 429).

    Built on first use from ``paths`` (the app's OpenAPI paths), so routes added later are included.
    """

    def __init__(self, paths: Callable[[], Iterable[str]]) -> None:
        self._paths = paths
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    def __call__(self, path: str) -> str:
        if self._patterns is None:
            self._patterns = [
                (re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t)) + "$"), t)
                for t in self._paths()
            ]
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return ""


class RequestLogMiddleware:
    """Outermost ASGI middleware: request id in and out, latency, one access line, observers.

    An exception nothing else handled becomes a 500 JSON error carrying the request id, so every
    response, failed ones included, has the X-Request-ID header and an access line.
    """

    def __init__(
        self,
        app: ASGIApp,
        observers: Sequence[Callable[[RequestRecord], None]] = (),
        route_of: Callable[[str], str] | None = None,
    ) -> None:
        self.app = app
        self.observers = list(observers)
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope.get("headers", []))
        state = request_state(scope)
        state["request_id"] = request_id
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.exception("unhandled error in request %s", request_id, exc_info=exc)
            if response_started:
                raise
            status = 500
            body = error_body("internal_error", f"internal error: {type(exc).__name__}", request_id)
            await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        finally:
            # The decoded path could carry "%0A" as a newline into a text log line: log it as the
            # client sent it (percent-encoded), and escape what is left.
            decoded = str(scope.get("path", ""))
            raw = scope.get("raw_path")
            path = raw.decode("latin-1") if isinstance(raw, bytes) else decoded
            path = path.encode("unicode_escape").decode("ascii")
            # A route may name its own template (a front end's relay: the engine's, not its catch-all).
            route = state.get("route")
            if route is None:
                route = str(getattr(scope.get("route"), "path", ""))
            if not route and self.route_of is not None:
                try:
                    route = self.route_of(decoded)
                except Exception:  # a label is not worth failing the request's bookkeeping
                    logger.exception("cannot match %s to a route template", path)
            record = RequestRecord(
                request_id=request_id,
                method=str(scope.get("method", "")),
                path=path,
                route=route,
                task=state.get("task"),
                version=state.get("version"),
                status=status,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                relayed=bool(state.get("relayed", False)),
            )
            principal = state.get("principal")
            if principal is not None:
                record = dataclasses.replace(record, key=principal.key_id, tenant=principal.tenant)
            self._finish(record)

    def _finish(self, record: RequestRecord) -> None:
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                logger.exception("request observer failed")
        if not access_logger.isEnabledFor(logging.INFO):
            return  # asdict alone is ~5% of a single-text request's CPU
        fields = asdict(record)
        fields["latency_ms"] = round(record.latency_ms, 3)
        access_logger.info(
            "%s %s %s %.1fms task=%s version=%s id=%s",
            record.method,
            record.path,
            record.status,
            record.latency_ms,
            record.task or "-",
            record.version or "-",
            record.request_id,
            extra=fields,
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def make_handler(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    return handler


def configure_logging(level: str, fmt: str) -> None:
    """Route ptserve's and uvicorn's loggers through one root handler in ``fmt`` ('text' or 'json').

    uvicorn's own access log is silenced: the access line comes from RequestLogMiddleware, which
    knows the request id, task and version. Pass ``log_config=None`` to ``uvicorn.run`` so it keeps this.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(fmt))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
