"""Training jobs: a queue on Redis Streams with one consumer group, and each job's state in a hash.

Key layout (``prefix`` defaults to ``ptserve``, the prompt store's; job ids are hex, so keys never
collide with the store's)::

    {prefix}:jobs:stream     stream   one entry per submitted (or re-queued) job: {"id": job id}
    {prefix}:jobs:counts     hash     state -> number of jobs in that state
    {prefix}:job:{id}        hash     the job: state, spec (JSON, inline examples included), progress,
                                      metrics, version, error, worker, attempts, timestamps

Workers read the stream through the consumer group ``workers``, so each entry goes to one worker and
stays *pending* (owned by it) until acknowledged. A worker that dies leaves its entry pending; once the
entry has been idle longer than a claim timeout, another worker takes it over (``XAUTOCLAIM``). A live
worker keeps its entry fresh by re-claiming it for itself (``XCLAIM ... JUSTID``) every heartbeat, so
long jobs are not stolen. Attempts are counted per take: a job whose workers keep dying fails after
``max_attempts``. Errors raised by training (bad data, bad hyperparameters) fail the job at once: they
would fail the same way again.

Every state change is a Lua script that checks the job's current state (and owner) and moves the
per-state count in the same step, so counts never drift and a worker that lost its job (taken over
after a stall) cannot overwrite the new owner's state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.exceptions import RedisError, ResponseError

from prompts.data import (
    DataError,
    Example,
    TaskData,
    cap_rows,
    check_labels,
    load_task_data,
    stratified_split,
)
from prompts.errors import InvalidInputError, NotFoundError, PtserveError, StoreUnavailableError
from prompts.names import validate_task_name
from prompts.redis_store import DEFAULT_PREFIX
from prompts.redis_target import UNAVAILABLE, RedisTarget, Replicated, ReplicationError, redact_url

__all__ = [
    "GROUP",
    "JOB_STATES",
    "Hyperparameters",
    "InlineExample",
    "JobNotFoundError",
    "JobQueue",
    "JobQueueError",
    "JobSpec",
    "JobStatus",
    "Lease",
    "LeaseLostError",
    "job_task_data",
    "resolve_data_path",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

JobState = Literal["queued", "running", "succeeded", "failed"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed")
TERMINAL_STATES = frozenset({"succeeded", "failed"})
GROUP = "workers"
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
# The names the CLI accepts too; prompts.methods.resolve_method maps them to the canonical ones, and
# "auto" is chosen from the job's data (prompts.trainer.plan_for_data).
Method = Literal[
    "auto",
    "prefix",
    "ptuning",
    "prompt",
    "probe",
    "p-tuning-v2",
    "p-tuning",
    "prompt-tuning",
    "linear-probe",
]
# How the linear probe's head is fitted: prompts.trainer.PROBE_HEADS (a test keeps the two alike).
ProbeHead = Literal["trained", "standardized"]


class JobNotFoundError(NotFoundError):
    code = "job_not_found"


class JobQueueError(PtserveError):
    """The job queue's Redis failed a command for another reason than being unreachable."""

    code = "job_queue_error"


class LeaseLostError(PtserveError):
    """The job was taken over by another worker (this one stalled past the claim timeout)."""

    code = "lease_lost"


# ------------------------------------------------------------------------------------------- spec


class InlineExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="the text")
    label: str | int = Field(description="its label (integers are read as strings)")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty or whitespace only")
        return value

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | int) -> str | int:
        if isinstance(value, str) and not value.strip():
            raise ValueError("label is empty")
        return value

    def example(self) -> Example:
        # The same normalisation prompts.data applies to file rows, so inline and file data train alike.
        return Example(" ".join(self.text.split()), str(self.label).strip())


class Hyperparameters(BaseModel):
    """What a job may set of :class:`prompts.trainer.TrainConfig`; None is the method's default."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1, le=10_000, description="maximum epochs")
    patience: int | None = Field(
        default=None, ge=1, description="epochs without a better dev accuracy before stopping"
    )
    lr: float | None = Field(default=None, gt=0, le=1, description="learning rate of the prompt")
    head_lr: float | None = Field(default=None, gt=0, le=1, description="learning rate of the head")
    prefix_length: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="prefix length (prefix) or virtual tokens (ptuning, prompt); default 16, "
        "32 for objective pairs",
    )
    batch_size: int = Field(default=32, ge=1, le=1024)
    max_length: int = Field(default=128, ge=2, le=4096, description="text tokens per example")
    seed: int = Field(default=0, ge=0)
    max_train_rows: int | None = Field(default=None, ge=2, description="cap the train set (stratified)")
    dev_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="dev split cut off the train set when no dev set is given"
    )
    reparam: bool = Field(default=False, description="prefix: MLP reparameterisation while training")
    class_balanced: bool = Field(default=False, description="weight the loss by inverse label frequency")
    max_seconds: float | None = Field(default=None, gt=0, description="stop training after this long")
    objective: Literal["labels", "pairs"] | None = Field(
        default=None,
        description="what a prefix is trained on: labels (cross-entropy) or pairs (SetFit's sentence pairs, "
        "then a fitted head: label prototypes, or (auto, 5 labels or more) logistic regression on "
        "standardised vectors); default labels, auto chooses by the data's size",
    )
    scales: bool | None = Field(
        default=None,
        description="train (IA)^3 scales of every layer's keys, values and feed-forward activation beside "
        "the prompt (not with the linear probe); default off, auto turns them on for few-shot data of "
        "fewer than 100 rows per label",
    )
    lora_rank: int | None = Field(
        default=None,
        ge=0,
        le=256,
        description="train LoRA of this rank on every layer's attention and feed-forward projections "
        "beside the prompt (0: none; not with the linear probe); default none, auto trains it on "
        "few-shot data of at least 5 labels: rank 8 from 12 train rows per label, rank 16 from 24",
    )
    probe_head: ProbeHead | None = Field(
        default=None,
        description="how the linear probe's head is fitted (method probe, and auto's probe candidate on "
        "few-shot data): standardized (logistic regression on standardised frozen vectors to convergence; "
        "the default of both) or trained (cross-entropy by epochs, early stopping on dev)",
    )
    head: Literal["cls", "mean", "last", "peft", "verbalizer"] | None = Field(
        default=None,
        description="what the linear head reads (default: decoders the last token; encoders mean for the "
        "probe, for prefix the pooling the backbone declares, else cls); peft makes the task exportable "
        "to PEFT; verbalizer reads label words at a [MASK] (method auto, ptuning or prompt, and a "
        "backbone with a masked-LM head)",
    )
    label_words: dict[str, list[str]] | None = Field(
        default=None,
        description="head verbalizer: each label's words, each one token of the vocabulary (a label "
        "without words is spelled by its own name)",
        examples=[{"phone": ["phone", "mobile"], "book": ["book"]}],
    )

    @field_validator("label_words", mode="before")
    @classmethod
    def _label_words(cls, value: Any) -> Any:
        # {"label": "word"} is accepted as {"label": ["word"]}, as the CLI's JSON file is.
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("label_words")
    @classmethod
    def _words(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if value is None:
            return None
        for label, words in value.items():
            if not label.strip():
                raise ValueError("label_words has an empty label")
            if not [w for w in words if w.strip()]:
                raise ValueError(f"label_words[{label!r}] has no word")
        return value


class JobSpec(BaseModel):
    """A training job: a task, a method, hyperparameters, and inline examples or a server-side path."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="task name to publish", examples=["product_type"])
    method: Method = Field(
        default="auto",
        description="auto (P-tuning v2; below 100 train rows per label on sentence pairs; the choice is "
        "recorded in the artifact's training.plan), prefix (P-tuning v2), ptuning, prompt or probe",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    train: list[InlineExample] | None = Field(default=None, min_length=1, description="training examples")
    dev: list[InlineExample] | None = Field(
        default=None, min_length=1, description="dev examples (default: a stratified split of train)"
    )
    test: list[InlineExample] | None = Field(default=None, min_length=1, description="test examples")
    data_path: str | None = Field(
        default=None,
        min_length=1,
        description="a data file or directory on the server, relative to (and inside) its data root",
    )

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        try:
            return validate_task_name(value)
        except InvalidInputError as exc:
            raise ValueError(exc.message) from exc

    @model_validator(mode="after")
    def _one_source(self) -> JobSpec:
        if (self.train is None) == (self.data_path is None):
            raise ValueError("give exactly one of 'train' (inline examples) or 'data_path'")
        if self.data_path is not None and (self.dev is not None or self.test is not None):
            raise ValueError("'dev' and 'test' go with inline 'train' examples, not with 'data_path'")
        return self

    def example_count(self) -> int:
        return sum(len(rows or []) for rows in (self.train, self.dev, self.test))


def resolve_data_path(data_root: Path | None, data_path: str) -> Path:
    """``data_path`` under ``data_root`` with symlinks and ``..`` resolved; refused if it leaves the root."""
    if data_root is None:
        raise InvalidInputError(
            "data_path is not accepted: this server has no data root configured (PTSERVE_DATA_ROOT); "
            "send the examples inline as 'train' (and optional 'dev', 'test')"
        )
    root = data_root.resolve()
    try:
        # An absolute data_path is taken as is (and must still lie inside the root).
        path = (root / data_path).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise InvalidInputError(f"data_path {data_path!r} is not a usable path: {exc}") from exc
    if not path.is_relative_to(root):
        raise InvalidInputError(f"data_path {data_path!r} lies outside the server's data root")
    if not path.exists():
        raise InvalidInputError(f"data_path {data_path!r} does not exist under the server's data root")
    return path


def _inline_task_data(spec: JobSpec) -> TaskData:
    assert spec.train is not None
    seed = spec.hyperparameters.seed
    train = [e.example() for e in spec.train]
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise DataError(
            f"train: every example has the label {labels[0]!r}; a classifier needs at least two labels"
        )
    notes: list[str] = []
    if spec.dev is not None:
        dev = [e.example() for e in spec.dev]
        check_labels(dev, labels, "dev")
    else:
        if len(train) < 4:
            raise DataError(f"train: {len(train)} examples are too few to split a dev set off")
        fraction = spec.hyperparameters.dev_fraction
        train, dev = stratified_split(train, fraction, seed)
        notes.append(f"dev set: {len(dev)} rows split off train ({fraction:.0%}, seed {seed})")
    test = [e.example() for e in spec.test] if spec.test is not None else []
    check_labels(test, labels, "test")
    cap = spec.hyperparameters.max_train_rows
    if cap is not None and len(train) > cap:
        notes.append(f"train capped from {len(train)} to {cap} rows (stratified, seed {seed})")
        train = cap_rows(train, cap, seed)
    return TaskData(labels=labels, train=train, dev=dev, test=test, source="inline", notes=notes)


def job_task_data(spec: JobSpec, data_root: Path | None) -> TaskData:
    """The job's examples, checked as the ``train`` command checks files; raises DataError."""
    if spec.train is not None:
        return _inline_task_data(spec)
    assert spec.data_path is not None
    hp = spec.hyperparameters
    return load_task_data(
        resolve_data_path(data_root, spec.data_path),
        dev_fraction=hp.dev_fraction,
        seed=hp.seed,
        max_train_rows=hp.max_train_rows,
    )


# ------------------------------------------------------------------------------------------ state


@dataclass(frozen=True)
class JobStatus:
    """What a client sees of a job (the spec's examples are left out)."""

    id: str
    task: str
    method: str
    state: JobState
    attempts: int
    worker: str | None
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    version: str | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class Lease:
    """A job a worker holds: the stream entry it must keep fresh and acknowledge."""

    job_id: str
    entry_id: str
    consumer: str
    spec: JobSpec
    attempt: int


# KEYS: job hash, counts hash. ARGV: new state, required owner ('' = anyone), allowed old states
# (comma-separated), then field/value pairs to set. Returns 1 on change, 0 if refused, -1 if no job.
_TRANSITION = """
local old = redis.call('HGET', KEYS[1], 'state')
if not old then return -1 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then return 0 end
if not string.find(',' .. ARGV[3] .. ',', ',' .. old .. ',', 1, true) then return 0 end
if old ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[2], old, -1)
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: stream. ARGV: group, consumer, entry id. Re-claims the entry (resetting its idle time) only
# if this consumer still owns it: a plain XCLAIM with min-idle 0 would steal it back from a new owner.
_HEARTBEAT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_or_none(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


class JobQueue:
    """Submit, take, track and finish training jobs in one Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        claim_idle_s: float = 60.0,
        max_attempts: int = 3,
        socket_timeout: float = 5.0,
        write_replicas: int | None = None,
        retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        if retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        if claim_idle_s <= 0:
            raise ValueError(f"claim_idle_s must be positive, got {claim_idle_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        try:
            self.target = RedisTarget.parse(url)
        except ValueError as exc:
            raise JobQueueError(f"invalid job queue URL {redact_url(url)}: {exc}") from exc
        # Hash-tagged on a Cluster: the stream, its group and every job hash on one slot.
        self.prefix = self.target.key_prefix(prefix)
        self.claim_idle_s = claim_idle_s
        self.max_attempts = max_attempts
        self.retention_s = retention_s
        self.stream = f"{self.prefix}:jobs:stream"
        self.counts_key = f"{self.prefix}:jobs:counts"
        self._shown_url = self.target.shown
        # Blocking reads wait up to their own timeout; the socket timeout must outlast them.
        self._socket_timeout = socket_timeout
        try:
            self._client: redis.Redis = self.target.client(socket_timeout=socket_timeout)
        except (ValueError, RedisError) as exc:
            raise JobQueueError(f"invalid job queue URL {self._shown_url}: {exc}") from exc
        replicas = self.target.replicas_to_wait(write_replicas)
        # Where a failover can happen, a job's writes are done only once a replica has them.
        self._replicated = (
            Replicated(self.target, replicas, socket_timeout=socket_timeout) if replicas else None
        )
        self._transition = self._client.register_script(_TRANSITION)
        self._heartbeat = self._client.register_script(_HEARTBEAT)
        self._group_ready = False

    def __repr__(self) -> str:
        return f"JobQueue({self._shown_url!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._client.close()
        if self._replicated is not None:
            self._replicated.close()

    def _durable(self, write: Callable[[redis.Redis], T]) -> T:
        """``write(client)``, acknowledged by a replica where one is asked for (see Replicated)."""
        if self._replicated is None:
            return write(self._client)
        try:
            return self._replicated.run(self.stream, write)
        except ReplicationError as exc:
            raise StoreUnavailableError(f"job queue {exc}") from exc

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @contextlib.contextmanager
    def _redis(self, action: str) -> Iterator[None]:
        try:
            yield
        except UNAVAILABLE as exc:
            raise StoreUnavailableError(f"job queue {self._shown_url} is unreachable: {exc}") from exc
        except RedisError as exc:
            raise JobQueueError(f"job queue {self._shown_url} failed to {action}: {exc}") from exc

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with self._redis("create the consumer group"):
            try:
                # From id 0, so jobs submitted before any worker ever started are taken too.
                self._client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    # ------------------------------------------------------------------------------- clients

    def submit(self, spec: JobSpec) -> str:
        """Store the job and queue it; returns its id."""
        self._ensure_group()
        job_id = uuid.uuid4().hex
        fields: dict[str, str | int] = {
            "id": job_id,
            "task": spec.task,
            "method": spec.method,
            "state": "queued",
            "spec": spec.model_dump_json(exclude_none=True),
            "attempts": 0,
            "created_at": repr(time.time()),
        }

        def write(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hset(self.job_key(job_id), mapping=cast(dict[Any, Any], fields))
            pipe.hincrby(self.counts_key, "queued", 1)
            pipe.xadd(self.stream, {"id": job_id})
            pipe.execute()

        with self._redis("submit a job"):
            self._durable(write)
        return job_id

    def status(self, job_id: str) -> JobStatus:
        """The job's state; JobNotFoundError for an unknown (or malformed) id."""
        if JOB_ID_PATTERN.fullmatch(job_id) is None:
            raise JobNotFoundError(f"no training job {job_id!r} (job ids are 32 hex characters)")
        fields = [
            "task", "method", "state", "attempts", "worker", "progress", "metrics", "version", "error",
            "created_at", "started_at", "finished_at",
        ]  # fmt: skip
        with self._redis("read a job"):
            raw = self._client.hmget(self.job_key(job_id), fields)
        row = {name: (_text(v) if v is not None else None) for name, v in zip(fields, raw, strict=True)}
        if row["state"] is None:
            raise JobNotFoundError(f"no training job {job_id!r}")
        state = cast(JobState, row["state"])
        assert state in JOB_STATES, state

        def stamp(name: str) -> float | None:
            value = row[name]
            return float(value) if value else None

        return JobStatus(
            id=job_id,
            task=row["task"] or "",
            method=row["method"] or "",
            state=state,
            attempts=int(row["attempts"] or 0),
            worker=row["worker"] or None,
            progress=_json_or_none(row["progress"]),
            metrics=_json_or_none(row["metrics"]),
            version=row["version"] or None,
            error=row["error"] or None,
            created_at=float(row["created_at"] or 0.0),
            started_at=stamp("started_at"),
            finished_at=stamp("finished_at"),
        )

    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every state listed, zeros included)."""
        with self._redis("count jobs"):
            raw = self._client.hgetall(self.counts_key)
        counts = Counter({_text(k): int(v) for k, v in raw.items()})
        return {state: counts[state] for state in JOB_STATES}

    # ------------------------------------------------------------------------------- workers

    def _move(self, job_id: str, state: JobState, *, owner: str, allowed: str, **fields: object) -> int:
        args: list[str] = [state, owner, allowed]
        for name, value in fields.items():
            args += [name, str(value)]
        with self._redis(f"mark job {job_id} {state}"):
            keys = [self.job_key(job_id), self.counts_key]
            result: int = self._durable(lambda client: self._transition(keys=keys, args=args, client=client))
        return result

    def _finish_entry(self, entry_id: str, job_id: str | None = None) -> None:
        """Acknowledge a stream entry; a finished job's hash (inline examples included) then
        expires after ``retention_s``, so finished jobs do not pile up in Redis."""
        with self._redis("acknowledge a job"):
            pipe = self._client.pipeline(transaction=True)
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)  # keeps the stream as short as the work in flight
            if job_id is not None:
                pipe.expire(self.job_key(job_id), max(1, round(self.retention_s)))
            pipe.execute()

    def take(self, consumer: str, *, block_s: float = 1.0) -> Lease | None:
        """The next job for ``consumer``: one abandoned by a dead worker first, else a new one.

        Waits up to ``block_s`` for a new job; None if there was none (or the entry was stale).
        """
        self._ensure_group()
        claim_ms = max(1, int(self.claim_idle_s * 1000))
        with self._redis("take a job"):
            claimed = self._client.xautoclaim(self.stream, GROUP, consumer, claim_ms, "0-0", count=1)
            entries = claimed[1]
            if not entries:
                block_ms = max(1, int(min(block_s, self._socket_timeout / 2) * 1000))
                read: Any = self._client.xreadgroup(
                    GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms
                )
                entries = read[0][1] if read else []
        if not entries:
            return None
        entry_id, payload = entries[0]
        entry_id = _text(entry_id)
        job_id = _text((payload or {}).get(b"id", b""))
        return self._start(job_id, entry_id, consumer)

    def _start(self, job_id: str, entry_id: str, consumer: str) -> Lease | None:
        key = self.job_key(job_id)
        with self._redis("start a job"):
            state, spec_json = self._client.hmget(key, ["state", "spec"])
        if state is None or _text(state) in TERMINAL_STATES or spec_json is None:
            # Finished (a worker died between finishing and acknowledging) or deleted: nothing to do.
            self._finish_entry(entry_id)
            return None
        with self._redis("count an attempt"):
            attempt = int(self._client.hincrby(key, "attempts", 1))
        if attempt > self.max_attempts:
            self._move(
                job_id,
                "failed",
                owner="",
                allowed="queued,running",
                error=f"gave up after {self.max_attempts} attempts: the workers that took this job "
                "stopped without finishing it (killed, or out of memory?)",
                finished_at=repr(time.time()),
                worker="",
            )
            self._finish_entry(entry_id, job_id)
            logger.warning("job %s failed: %d attempts", job_id, self.max_attempts)
            return None
        moved = self._move(
            job_id,
            "running",
            owner="",
            allowed="queued,running",
            worker=consumer,
            started_at=repr(time.time()),
        )
        if moved != 1:
            # The job finished (its stalled worker woke up and completed it) between the claim and
            # this move: it must not run a second time.
            self._finish_entry(entry_id)
            return None
        spec = JobSpec.model_validate_json(spec_json)
        return Lease(job_id, entry_id, consumer, spec, attempt)

    def heartbeat(self, lease: Lease) -> bool:
        """Keep ``lease``'s entry from being claimed by others; False if another worker took it."""
        with self._redis("renew a job"):
            result = self._heartbeat(keys=[self.stream], args=[GROUP, lease.consumer, lease.entry_id])
        return bool(result)

    def report_progress(self, lease: Lease, progress: dict[str, Any]) -> None:
        """Record training progress; LeaseLostError if the job is no longer this worker's."""
        changed = self._move(
            lease.job_id, "running", owner=lease.consumer, allowed="running", progress=json.dumps(progress)
        )
        if changed != 1:
            raise LeaseLostError(f"job {lease.job_id} is no longer held by worker {lease.consumer}")

    def succeed(self, lease: Lease, *, version: str, metrics: dict[str, Any]) -> bool:
        """Mark the job succeeded and acknowledge it; False if it was no longer this worker's."""
        changed = self._move(
            lease.job_id,
            "succeeded",
            owner=lease.consumer,
            allowed="running",
            version=version,
            metrics=json.dumps(metrics),
            finished_at=repr(time.time()),
        )
        if changed == 1:
            self._finish_entry(lease.entry_id, lease.job_id)
        return changed == 1

    def fail(self, lease: Lease, error: str) -> bool:
        """Mark the job failed with ``error`` and acknowledge it (no retry); False if not this worker's."""
        changed = self._move(
            lease.job_id,
            "failed",
            owner=lease.consumer,
            allowed="running",
            error=error,
            finished_at=repr(time.time()),
        )
        if changed == 1:
            self._finish_entry(lease.entry_id, lease.job_id)
        return changed == 1

    def release(self, lease: Lease) -> bool:
        """Give the job back to the queue (a worker stopping): queued again, this attempt not counted."""
        changed = self._move(lease.job_id, "queued", owner=lease.consumer, allowed="running", worker="")
        if changed != 1:
            return False

        def write(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hincrby(self.job_key(lease.job_id), "attempts", -1)
            pipe.xack(self.stream, GROUP, lease.entry_id)
            pipe.xdel(self.stream, lease.entry_id)
            pipe.xadd(self.stream, {"id": lease.job_id})
            pipe.execute()

        with self._redis("re-queue a job"):
            self._durable(write)
        return True

    def pending_idle_s(self, lease: Lease) -> float | None:
        """How long the lease's entry has gone without a heartbeat (None if nobody holds it)."""
        with self._redis("inspect a job"):
            rows = self._client.xpending_range(
                self.stream, GROUP, min=lease.entry_id, max=lease.entry_id, count=1
            )
        if not rows:
            return None
        return float(rows[0]["time_since_delivered"]) / 1000.0
