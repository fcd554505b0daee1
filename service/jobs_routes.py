"""Training-job routes: submit a job (202 + its id), read its state. Training happens in workers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from prompts.jobs import JobNotFoundError, JobQueue, JobSpec, JobStatus, job_task_data, resolve_data_path
from prompts.methods import check_label_words
from prompts.names import tenant_of
from prompts.training import job_train_config
from service.auth import principal_of
from service.errors import JobsDisabledError, PayloadTooLargeError
from service.runtime import Runtime
from service.schemas import ErrorResponse
from service.tenancy import Principal, visible, writable

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        404: "unknown job",
        413: "too many inline examples",
        422: "invalid job: task, method, hyperparameters or data",
        503: "training jobs are not configured, or the job queue is unreachable",
    }.items()
}

jobs_router = APIRouter()


class TrainingJobRequest(JobSpec):
    """``task``, ``method``, ``hyperparameters``, and either inline ``train`` (+ ``dev``, ``test``)
    examples or a server-side ``data_path`` inside the server's data root."""


class TrainingJobCreatedResponse(BaseModel):
    id: str = Field(description="the job id, for GET /v1/training-jobs/{id}")
    state: str


class TrainingJobResponse(BaseModel):
    id: str
    task: str
    method: str
    state: str = Field(description="queued, running, succeeded or failed")
    attempts: int = Field(description="times a worker took the job")
    worker: str | None = Field(description="the worker that holds (or last held) the job")
    progress: dict[str, Any] | None = Field(
        description="epoch, epochs, step, total_steps, last loss and dev accuracy"
    )
    metrics: dict[str, Any] | None = Field(description="dev/test scores of the published version")
    version: str | None = Field(description="the published task version, once succeeded")
    error: str | None = Field(description="why the job failed")
    created_at: str
    started_at: str | None
    finished_at: str | None

    @classmethod
    def from_status(cls, status: JobStatus) -> TrainingJobResponse:
        return cls(
            id=status.id,
            task=status.task,
            method=status.method,
            state=status.state,
            attempts=status.attempts,
            worker=status.worker,
            progress=status.progress,
            metrics=status.metrics,
            version=status.version,
            error=status.error,
            created_at=_iso(status.created_at),
            started_at=_iso(status.started_at) if status.started_at is not None else None,
            finished_at=_iso(status.finished_at) if status.finished_at is not None else None,
        )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _queue(request: Request) -> tuple[Runtime, JobQueue]:
    runtime: Runtime = request.app.state.runtime
    if runtime.jobs is None:
        raise JobsDisabledError(
            "training jobs are not configured on this server: set PTSERVE_JOBS_URL to a redis:// URL "
            "(or use a redis:// PTSERVE_STORE) and run `ptserve worker` against it"
        )
    return runtime, runtime.jobs


def _check(spec: JobSpec, runtime: Runtime, principal: Principal) -> JobSpec:
    """Refuse now what a worker would refuse later (bad hyperparameters, unusable inline data, bad
    paths), and confine a tenant's job: its task to the tenant's namespace, its data path to the
    tenant's folder of the data root (``<data root>/<tenant>/``). Returns the spec to queue."""
    job_train_config(spec)
    task = writable(principal, spec.task)
    data_path = spec.data_path
    root = runtime.settings.data_root
    labels: list[str] | None = None  # known here for inline data only
    if data_path is not None:
        # The file is read by the worker; here only where it is, so a huge file costs the API nothing.
        if principal.tenant is not None and root is not None:
            own = resolve_data_path(root, principal.tenant)
            path = resolve_data_path(own, data_path)
            data_path = str(path.relative_to(root.resolve()))  # what the worker resolves under the root
        else:
            resolve_data_path(root, data_path)
    else:
        labels = job_task_data(spec, root).labels
    if spec.hyperparameters.head == "verbalizer":
        # Workers run this server's backbone: its masked-LM head and vocabulary decide the label words.
        check_label_words(runtime.backbone, labels, spec.hyperparameters.label_words)
    return spec.model_copy(update={"task": task, "data_path": data_path})


@jobs_router.post(
    "/v1/training-jobs",
    status_code=202,
    response_model=TrainingJobCreatedResponse,
    responses=ERRORS,
    tags=["training"],
)
async def submit_training_job(
    body: TrainingJobRequest, request: Request, response: Response
) -> TrainingJobCreatedResponse:
    """Queue a training job; a worker trains it and publishes the task (served without a restart)."""
    runtime, queue = _queue(request)
    limit = runtime.settings.max_job_examples
    if body.example_count() > limit:
        raise PayloadTooLargeError(
            f"{body.example_count()} inline examples in one job; the limit is {limit} "
            "(PTSERVE_MAX_JOB_EXAMPLES): put larger data sets under the data root and send data_path"
        )
    principal = principal_of(request)
    spec = await asyncio.to_thread(_check, body, runtime, principal)
    job_id = await asyncio.to_thread(queue.submit, spec)
    if runtime.audit is not None:
        detail = {"job": job_id, "method": spec.method}
        await asyncio.to_thread(
            runtime.audit.record,
            principal,
            "job.submit",
            tenant=tenant_of(spec.task),
            task=spec.task,
            detail=detail,
        )
    response.headers["Location"] = f"/v1/training-jobs/{job_id}"
    return TrainingJobCreatedResponse(id=job_id, state="queued")


@jobs_router.get(
    "/v1/training-jobs/{job_id}", response_model=TrainingJobResponse, responses=ERRORS, tags=["training"]
)
async def get_training_job(job_id: str, request: Request) -> TrainingJobResponse:
    """A job's state, progress, metrics, published version or error (a tenant's key: its own jobs)."""
    _, queue = _queue(request)
    status = await asyncio.to_thread(queue.status, job_id)
    if not visible(principal_of(request), status.task):
        raise JobNotFoundError(f"no training job {job_id!r}")  # as for an id that does not exist
    return TrainingJobResponse.from_status(status)
