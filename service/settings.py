"""All service settings: one pydantic-settings object, built at start-up (env prefix ``PTSERVE_``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from prompts.redis_target import is_redis_url

# An API-key entry: ``<scope>:<sha256 hex of the key>`` (``ptserve hash-key`` prints one).
# SCOPE[@TENANT]:SHA256HEX; a tenant as prompts.names.TENANT_PATTERN has it.
API_KEY_ENTRY = re.compile(r"^(classify|admin)(?:@([a-z0-9][a-z0-9_-]{0,31}))?:([0-9a-f]{64})$")


class Settings(BaseSettings):
    """Every knob of a ptserve replica. CLI flags override environment variables, which override defaults."""

    model_config = SettingsConfigDict(env_prefix="PTSERVE_", extra="forbid", validate_default=True)

    # Backbone
    model: Path | None = Field(
        default=None,
        description="local Hugging Face model directory of a supported family: BERT layout (BERT, RoBERTa, "
        "XLM-R, CamemBERT), decoders (Llama, Mistral, Qwen2, Qwen3), DeBERTa-v2/v3, ModernBERT; default: "
        "the packaged all-MiniLM-L6-v2",
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="backbone dtype: 'float32', 'float16' or 'bfloat16'"
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="intra-op threads for the forward; default: torch's (all cores); fewer than the "
        "cores leaves the event loop a core",
    )
    frontends: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="HTTP front-end processes feeding one engine process that holds the backbone "
        "(serve --frontends N; service/frontends/); 1: one process does everything. Default: 1 on a "
        "CPU, which measured best on 2 cores; on CUDA min(4, cores // 4), since an H200 host's 4 front "
        "ends answered 4.4x the single-text requests of one and 8 no more than 4",
    )
    frontend_coalesce_ms: float = Field(
        default=1.0,
        ge=0.0,
        le=50.0,
        description="with frontends > 1: how long a front end gathers classify requests into one "
        "message to the engine (0: one message per request)",
    )

    # Prompt store
    store: str = Field(
        default="./ptserve-data",
        description="prompt store: a directory, or a Redis URL: redis://host:port/db, "
        "redis+sentinel://h1:26379,h2:26379/<service>/db (Sentinel) or redis+cluster://h1:6379,h2:6379 "
        "(Cluster); rediss+... for TLS. Artifacts and pointers change atomically in Lua scripts",
    )
    keep_versions: int = Field(default=10, ge=1, le=1000, description="versions kept per task")
    write_replicas: int | None = Field(
        default=None,
        ge=0,
        le=16,
        description="Redis replicas that must acknowledge a store or job-queue write (WAIT) before it "
        "counts as done, so a failover cannot lose it; default 1 under Sentinel and Cluster, 0 on one "
        "server. With fewer live replicas, writes answer 503 until one is back",
    )

    # HTTP
    host: str = Field(default="127.0.0.1", description="address to bind ('0.0.0.0' in containers)")
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind")

    # Batching
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="rows per forward pass")
    max_batch_tokens: int = Field(default=8192, ge=16, description="padded tokens per forward pass")
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000, description="how long a batch waits to fill")
    max_queue: int = Field(
        default=4096, ge=1, description="rows queued before requests get 429 (at least max_texts_per_request)"
    )
    length_grouping: bool = Field(
        default=True,
        description="fill batches with queued texts of similar length (window of 32 batches, at most "
        "1,024 rows): less padding",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on a GPU, replay the backbone's layers as CUDA graphs (one per padded batch shape, "
        "captured on first use): the eager forward is bound by the host launching kernels",
    )
    pipeline_depth: int | None = Field(
        default=None,
        ge=1,
        le=4,
        description="batches in flight at once; a second one starts only when full, so its host work "
        "overlaps the running forward. Default: 2 where the layers replay as CUDA graphs (H100: x1.03-1.14 "
        "engine rows/s), else 1 (eager GPU forward: no gain; 2-core CPU, MiniLM: x1.01-1.05, within noise)",
    )

    # Cache
    cache_bytes: int = Field(
        default=512 * 1024 * 1024, ge=0, description="device prompt-cache budget in bytes"
    )
    pointer_ttl_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "how long a task's current-version pointer is trusted before re-reading it from the store; "
            "a safety net behind the change watcher (set it to ~1 s if watch_changes is off)"
        ),
    )

    heap_trim_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="give memory freed by the forward back to the OS (glibc malloc_trim) at most this "
        "often; 0: never (resident memory then keeps the high-water mark of every batch shape)",
    )

    # Hot swap
    host_cache_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="host-memory tier: parsed artifacts kept so a device miss does not read the store",
    )
    watch_changes: bool = Field(
        default=True,
        description=(
            "follow changes made by other replicas and processes (Redis pub/sub, or polling the "
            "disk store's change token) so they are served within milliseconds"
        ),
    )
    disk_change_poll_s: float = Field(
        default=0.05,
        ge=0.005,
        le=60,
        description="how often the disk store's change token is read (one small file read)",
    )
    watch_max_backoff_s: float = Field(
        default=2.0,
        ge=0.05,
        le=300,
        description="longest wait between attempts to restore a lost Redis change subscription",
    )

    # Limits
    max_texts_per_request: int = Field(default=256, ge=1, description="texts in one classify request")
    max_text_chars: int = Field(default=20_000, ge=1, description="characters in one text")
    max_artifact_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="size of an uploaded artifact"
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="request body size of JSON routes (uploads: max_artifact_bytes plus 1 MiB of "
        "multipart overhead); larger bodies get 413",
    )
    max_concurrent_requests: int = Field(
        default=1024,
        ge=1,
        description="requests handled at once (health probes and /metrics excluded); more get 429 "
        "with Retry-After",
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=3600, description="Retry-After seconds sent with 429 and 503 answers"
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="time for one request, body upload included; then 504"
    )

    # Training jobs
    jobs_url: str | None = Field(
        default=None,
        description="Redis URL of the training-job queue; default: the store's URL when the store is "
        "redis://, otherwise training jobs are disabled (the job routes answer 503)",
    )
    data_root: Path | None = Field(
        default=None,
        description="directory that server-side job data paths must lie inside; default: none, so jobs "
        "must send their examples inline",
    )
    max_job_examples: int = Field(
        default=100_000, ge=1, description="inline examples (train + dev + test) in one training job"
    )
    worker_name: str | None = Field(
        default=None, description="this worker's consumer name in the job queue; default: host-pid"
    )
    worker_claim_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="a job whose worker sent no heartbeat for this long is taken over by another worker",
    )
    worker_heartbeat_s: float = Field(
        default=10.0, gt=0, description="how often a worker renews its hold on the job it trains"
    )
    job_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="how long a finished training job's record (state, metrics, inline examples) "
        "stays readable in Redis",
    )
    worker_max_attempts: int = Field(
        default=3, ge=1, le=100, description="takes of one job (workers that died) before it is failed"
    )

    # Auth
    auth: Literal["on", "off"] = Field(
        default="on",
        description="'off' serves every route without a key (logged loudly at start-up); 'on' (the "
        "default) needs api_keys, or 'ptserve serve' refuses to start ('serve --demo' without keys: off)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated 'SCOPE[@TENANT]:SHA256HEX' entries: SCOPE 'classify' or 'admin' (admin "
        "may also classify), TENANT binds the key to one tenant's tasks (none: a platform key), SHA256HEX "
        "the key's sha256 in lower-case hex; 'ptserve hash-key' prints one. Keys stored with 'ptserve keys' "
        "or POST /v1/keys work besides these",
    )
    key_refresh_s: float = Field(
        default=0.25,
        gt=0,
        le=60,
        description="how often a replica checks the stored API keys for changes: a key created or revoked "
        "anywhere is honoured or refused everywhere within this time",
    )
    key_rate_per_s: float | None = Field(
        default=None,
        gt=0,
        description="requests per second a key may make (token bucket, shared by the replicas on one Redis; "
        "a key's own rate_per_s overrides it); default: unlimited",
    )
    key_burst: int | None = Field(
        default=None,
        ge=1,
        description="requests a key may make at once before key_rate_per_s applies; default: one "
        "second's worth",
    )
    tenant_concurrency_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="fraction of max_concurrent_requests one tenant's keys may hold at once (429 beyond it); "
        "platform keys are not counted",
    )
    tenant_cache_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="fraction of the device and host prompt caches one tenant's tasks may hold: its cold "
        "tasks then evict its own before anyone else's (the platform namespace is not capped)",
    )
    audit_max_entries: int = Field(
        default=100_000, ge=100, description="audit entries kept in a Redis store (oldest dropped first)"
    )
    max_tenant_series: int = Field(
        default=100,
        ge=1,
        description="tenants named in per-tenant metrics; the traffic of any further tenant counts as "
        "'other'",
    )
    metrics_public: bool = Field(
        default=True, description="serve GET /metrics without a key (else the admin scope is needed)"
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="'debug', 'info', 'warning' or 'error'"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="'text' lines or one JSON object per line"
    )

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("store must be a directory path or a redis:// URL")
        return value

    @field_validator("jobs_url")
    @classmethod
    def _jobs_url(cls, value: str | None) -> str | None:
        if value is not None and not is_redis_url(value):
            raise ValueError(
                "jobs_url must be a Redis URL (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://)"
            )
        return value

    @field_validator("data_root")
    @classmethod
    def _data_root(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"data_root {str(value)!r} is not a directory")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # The environment holds one comma-separated string; Python callers may pass a list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for i, entry in enumerate(value):
            if not API_KEY_ENTRY.match(entry):
                shown = entry.split(":", 1)[0]
                raise ValueError(
                    f"entry {i + 1} (scope {shown!r}) is not '<classify|admin>[@<tenant>]:<64 lowercase hex "
                    "digits>', the sha256 of the key; 'ptserve hash-key' prints one"
                )
        return value

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue < self.max_texts_per_request:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_texts_per_request "
                f"({self.max_texts_per_request}), or the largest request could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_within_claim(self) -> Settings:
        if self.worker_heartbeat_s >= self.worker_claim_idle_s:
            raise ValueError(
                f"worker_heartbeat_s ({self.worker_heartbeat_s}) must be below worker_claim_idle_s "
                f"({self.worker_claim_idle_s}), or live workers would lose their jobs to others"
            )
        return self

    def job_queue_url(self) -> str | None:
        """Where training jobs queue: ``jobs_url``, else a redis:// store's URL, else None (disabled)."""
        if self.jobs_url is not None:
            return self.jobs_url
        if is_redis_url(self.store):
            return self.store
        return None


def default_frontends(cuda: bool, cores: int) -> int:
    """``frontends`` when unset. With CUDA one process's event loop, not the device, bounds
    single-text traffic (~1,000 requests/s on a core); past ~4 front ends the engine's own loop is the
    bound (benchmarks/RESULTS.md, H200), and each front end wants a core of its own."""
    return max(1, min(4, cores // 4)) if cuda else 1
