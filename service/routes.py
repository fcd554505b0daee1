"""HTTP routes. Every blocking step (tokenising, store I/O, artifact parsing) runs off the event loop.

Short classify requests are the exception: tokenising them costs less than the hop to a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, File, Request, UploadFile
from fastapi.responses import JSONResponse

from prompts.artifact import PromptArtifact, check_compatible, parse_artifact
from prompts.errors import ArtifactTooLargeError, InvalidInputError, VersionNotFoundError
from prompts.names import tenant_of
from prompts.store import PromptStore, TaskRecord
from service.auth import principal_of
from service.engine import Row
from service.runtime import Runtime
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    DeleteResponse,
    ErrorResponse,
    HealthResponse,
    PromptInfo,
    PromptListResponse,
    RollbackRequest,
    RollbackResponse,
    UploadResponse,
)
from service.settings import Settings
from service.tenancy import Principal, resolve, visible, writable

T = TypeVar("T")

# Requests of at most this many texts and characters are tokenised on the event loop: that blocks it
# for ~0.4 ms of English (~1.2 ms of CJK) at most, while asyncio.to_thread costs 45-80 us of CPU per
# call, about what tokenising a one-sentence request costs.
INLINE_TOKENIZE_TEXTS = 16
INLINE_TOKENIZE_CHARS = 1024

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        404: "unknown task or version",
        409: "the stored task cannot be served by this replica",
        413: "payload too large",
        422: "invalid request or artifact",
        429: "overloaded",
        500: "store or server fault",
        503: "store unavailable",
        507: "store full",
    }.items()
}

# Three routers so app.py can guard each with its auth scope in one place.
public_router = APIRouter()  # health probes: no key
classify_router = APIRouter()  # classify and read-only prompt listing: the ``classify`` scope
admin_router = APIRouter()  # uploads, deletes, rollbacks: the ``admin`` scope


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def unabandoned(change: Coroutine[Any, Any, T]) -> T:
    """Run a store change to its end even if the request is cancelled (timeout, client gone).

    Otherwise a 504 could leave the store written but this replica's cache not told, with the upload
    lock already released to the next change.
    """
    return await asyncio.shield(asyncio.ensure_future(change))


def check_texts(texts: list[str], limits: Settings) -> None:
    """Texts per request and characters per text (the front ends of serve --frontends check too)."""
    if len(texts) > limits.max_texts_per_request:
        raise InvalidInputError(
            f"{len(texts)} texts in one request; the limit is {limits.max_texts_per_request}"
        )
    for i, text in enumerate(texts):
        where = _where(texts, i)
        if not text.strip():
            raise InvalidInputError(f"{where} is empty or whitespace only")
        if len(text) > limits.max_text_chars:
            raise InvalidInputError(
                f"{where} has {len(text)} characters; the limit is {limits.max_text_chars}"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON escapes can spell a lone surrogate ("\ud800"), which no tokenizer accepts.
            raise InvalidInputError(
                f"{where} is not valid Unicode: an unpaired surrogate {text[exc.start]!r} "
                f"at character {exc.start}"
            ) from None


def _where(texts: list[str], i: int) -> str:
    return "text" if len(texts) == 1 else f"texts[{i}]"


def check_tokens(texts: list[str], rows: list[list[int]], special_ids: frozenset[int]) -> None:
    """Refuse texts that leave nothing but special tokens (control or format characters only, say):
    the task would answer for an empty input, which is never what the caller meant."""
    for i, ids in enumerate(rows):
        if all(token in special_ids for token in ids):
            raise InvalidInputError(
                f"{_where(texts, i)} has no tokens to classify: it holds only control, format or "
                "whitespace characters (or special tokens)"
            )


@classify_router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS, tags=["classify"])
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Classify one or several texts with a task's current version (one version for the whole request)."""
    runtime = _runtime(request)
    texts = body.all_texts()
    check_texts(texts, runtime.settings)
    task = await runtime.cache.resolve(resolve(principal_of(request), body.task))
    # For the access line and the metrics (service/logs.py): only resolved tasks become labels.
    request.state.task, request.state.version = task.task, task.version
    if len(texts) <= INLINE_TOKENIZE_TEXTS and sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
        encodings = runtime.backbone.encode(texts, task.max_text_tokens)
    else:
        encodings = await asyncio.to_thread(runtime.backbone.encode, texts, task.max_text_tokens)
    check_tokens(texts, [e.input_ids for e in encodings], runtime.backbone.special_ids)
    probabilities = await runtime.batcher.submit_many([Row(task, e.input_ids) for e in encodings])
    truncated = [e.truncated for e in encodings]
    return classify_response(body, task.task, task.version, task.labels, probabilities, truncated)


def classify_response(
    body: ClassifyRequest,
    task: str,
    version: str,
    labels: Sequence[str],
    probabilities: Sequence[Sequence[float]],
    truncated: Sequence[bool],
) -> ClassifyResponse:
    """The response of one classify request: each text's labels by probability (``top_k`` of them)."""
    results = []
    for probs, cut in zip(probabilities, truncated, strict=True):
        order = sorted(range(len(labels)), key=lambda i: probs[i], reverse=True)
        if body.top_k is not None:
            order = order[: body.top_k]
        results.append(
            ClassifyResult(
                label=labels[order[0]],
                score=probs[order[0]],
                scores={labels[i]: probs[i] for i in order},
                truncated=cut,
            )
        )
    return ClassifyResponse(task=task, version=version, results=results)


@admin_router.post(
    "/v1/prompts", status_code=201, response_model=UploadResponse, responses=ERRORS, tags=["prompts"]
)
async def upload_prompt(
    request: Request, file: Annotated[UploadFile, File(description="a ptserve artifact (.safetensors)")]
) -> UploadResponse:
    """Upload a task artifact; once this returns, new requests for the task are served with it."""
    runtime = _runtime(request)
    limit = runtime.settings.max_artifact_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ArtifactTooLargeError(f"artifact is larger than the limit of {limit} bytes")

    def validate() -> PromptArtifact:
        artifact = parse_artifact(data, max_bytes=limit)
        check_compatible(artifact, runtime.backbone.spec)
        return artifact

    principal = principal_of(request)
    artifact = await asyncio.to_thread(validate)
    # A tenant's key uploads into its own namespace, whatever the artifact's (bare) name.
    task = writable(principal, artifact.task)
    request.state.task, request.state.version = task, artifact.version

    async def publish() -> None:
        # One upload at a time per replica: the store's pointer and this cache's move in the same order.
        async with runtime.upload_lock:
            with runtime.cache.changing(task) as since:
                await asyncio.to_thread(
                    runtime.store.put, task, artifact.version, artifact.data, artifact.manifest_json()
                )
                await runtime.cache.install(artifact, since, task)
        await _audit(runtime, principal, "upload", task, artifact.version)

    await unabandoned(publish())
    m = artifact.manifest
    return UploadResponse(task=task, version=m.version, labels=m.labels, method=m.method)


async def _audit(runtime: Runtime, principal: Principal, action: str, task: str, version: str | None) -> None:
    if runtime.audit is not None:
        await asyncio.to_thread(
            runtime.audit.record, principal, action, tenant=tenant_of(task), task=task, version=version
        )


def _info(record: TaskRecord) -> PromptInfo:
    m = record.manifest
    return PromptInfo(
        task=record.task,
        version=record.version,
        labels=list(m.get("labels", [])),
        method=str(m.get("method", "")),
        prefix_length=int(m.get("prefix_length", 0)),
        prompt_length=int(m.get("prompt_length", 0)),
        scales=m.get("scales"),
        lora=m.get("lora"),
        created_at=str(m.get("created_at", "")),
        size_bytes=record.size_bytes,
        versions=list(record.versions),
        metrics=m.get("metrics"),
    )


@classify_router.get("/v1/prompts", response_model=PromptListResponse, tags=["prompts"])
async def list_prompts(request: Request) -> PromptListResponse:
    """Every task the key may see: its tenant's (a platform key: all of them)."""
    principal = principal_of(request)
    records = await asyncio.to_thread(_runtime(request).store.list_tasks)
    return PromptListResponse(tasks=[_info(r) for r in records if visible(principal, r.task)])


@classify_router.get("/v1/prompts/{task}", response_model=PromptInfo, responses=ERRORS, tags=["prompts"])
async def get_prompt(task: str, request: Request) -> PromptInfo:
    """One task with its stored versions (a tenant's key may name its tasks bare)."""
    name = resolve(principal_of(request), task)
    record = await asyncio.to_thread(_runtime(request).store.record, name)
    return _info(record)


@classify_router.get(
    "/v1/prompts/{tenant}/{task}", response_model=PromptInfo, responses=ERRORS, tags=["prompts"]
)
async def get_tenant_prompt(tenant: str, task: str, request: Request) -> PromptInfo:
    """One tenant's task by its full name."""
    return await get_prompt(f"{tenant}/{task}", request)


@admin_router.delete("/v1/prompts/{task}", response_model=DeleteResponse, responses=ERRORS, tags=["prompts"])
async def delete_prompt(task: str, request: Request) -> DeleteResponse:
    """Delete a task: new requests get 404; requests already admitted finish on their version."""
    runtime = _runtime(request)
    principal = principal_of(request)
    name = resolve(principal, task)

    async def remove() -> None:
        async with runtime.upload_lock:
            await asyncio.to_thread(runtime.store.delete, name)
            runtime.cache.forget(name)
        await _audit(runtime, principal, "delete", name, None)

    await unabandoned(remove())
    return DeleteResponse(task=name, deleted=True)


@admin_router.delete(
    "/v1/prompts/{tenant}/{task}", response_model=DeleteResponse, responses=ERRORS, tags=["prompts"]
)
async def delete_tenant_prompt(tenant: str, task: str, request: Request) -> DeleteResponse:
    """Delete one tenant's task by its full name."""
    return await delete_prompt(f"{tenant}/{task}", request)


def _rollback_target(store: PromptStore, task: str, version: str | None) -> tuple[str, str]:
    """(current, target): the named version, else the one after the current in the history."""
    record = store.record(task)
    if version is not None:
        return record.version, version
    versions = list(record.versions)
    position = versions.index(record.version)
    if position + 1 >= len(versions):
        raise VersionNotFoundError(
            f"task {task!r} has no version older than its current version {record.version!r} to roll back to"
        )
    return record.version, versions[position + 1]


@admin_router.post(
    "/v1/prompts/{task}/rollback", response_model=RollbackResponse, responses=ERRORS, tags=["prompts"]
)
async def rollback_prompt(
    task: str, request: Request, body: Annotated[RollbackRequest | None, Body()] = None
) -> RollbackResponse:
    """Make an older stored version current; once this returns, new requests here are served with it."""
    runtime = _runtime(request)
    principal = principal_of(request)
    name = resolve(principal, task)

    async def roll_back() -> tuple[str, str]:
        async with runtime.upload_lock:
            previous, target = await asyncio.to_thread(
                _rollback_target, runtime.store, name, body.version if body is not None else None
            )
            # Loaded before the pointer moves, so a version this replica cannot serve is refused
            # (404 unknown, 409 unusable) without changing what every replica serves.
            await runtime.cache.load(name, target)
            with runtime.cache.changing(name) as since:
                await asyncio.to_thread(runtime.store.set_current, name, target)
                await runtime.cache.activate(name, target, since)
        await _audit(runtime, principal, "rollback", name, target)
        return previous, target

    previous, target = await unabandoned(roll_back())
    return RollbackResponse(task=name, version=target, previous=previous)


@admin_router.post(
    "/v1/prompts/{tenant}/{task}/rollback",
    response_model=RollbackResponse,
    responses=ERRORS,
    tags=["prompts"],
)
async def rollback_tenant_prompt(
    tenant: str, task: str, request: Request, body: Annotated[RollbackRequest | None, Body()] = None
) -> RollbackResponse:
    """Roll back one tenant's task by its full name."""
    return await rollback_prompt(f"{tenant}/{task}", request, body)


@public_router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """The process is alive and its event loop answers."""
    return HealthResponse(status="ok")


@public_router.get(
    "/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["health"]
)
async def readyz(request: Request) -> HealthResponse | JSONResponse:
    """Ready when this replica can serve: the backbone is loaded and it is not draining.

    The prompt store's state is reported (``checks.store``, metric ``ptserve_store_up``) but does not
    decide readiness: while Redis fails over, cached tasks keep serving, and an orchestrator that
    took every replica out of rotation would turn a partial outage into a total one.
    """
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        body = HealthResponse(status="starting", checks={"backbone": "loading"})
        return JSONResponse(body.model_dump(), status_code=503)
    checks = {"backbone": runtime.backbone.spec.fingerprint}
    checks["store"] = await runtime.store_health.check(runtime.store)
    if runtime.draining:
        checks["draining"] = "yes"
        return JSONResponse(HealthResponse(status="draining", checks=checks).model_dump(), status_code=503)
    status = "ready" if checks["store"] == "ok" else "degraded"
    return HealthResponse(status=status, checks=checks)
