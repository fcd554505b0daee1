"""HTTP request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prompts.names import TASK_NAME_PATTERN, TENANT_PATTERN

# The document states the rules the handlers enforce (so clients and fuzzers can follow them), but
# pydantic does not check them: the handlers' own errors name the problem better.
_ONE_OF_TEXT_OR_TEXTS: dict[str, Any] = {
    "oneOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["texts"], "properties": {"texts": {"type": "array"}}},
    ]
}


class ClassifyRequest(BaseModel):
    """Either ``text`` (one) or ``texts`` (several) for one task."""

    # strict: no coercion, so true is not top_k=1 and 2.0 is not 2, as the document says.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_ONE_OF_TEXT_OR_TEXTS)

    task: str = Field(
        description="task name",
        examples=["product_type"],
        json_schema_extra={"pattern": f"^{TASK_NAME_PATTERN.pattern}$"},
    )
    text: str | None = Field(
        default=None,
        description="one text to classify (not blank)",
        json_schema_extra={"minLength": 1},
    )
    texts: list[str] | None = Field(
        default=None,
        description="several texts of the same task (each not blank)",
        json_schema_extra={"minItems": 1},
    )
    top_k: int | None = Field(
        default=None, ge=1, description="only return the k highest label scores per text"
    )

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' must hold at least one text")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class ClassifyResult(BaseModel):
    label: str = Field(description="the most probable label")
    score: float = Field(description="its probability")
    scores: dict[str, float] = Field(
        description="probability per label, highest first (top_k of them if asked)"
    )
    truncated: bool = Field(description="the text was cut to fit the model's positions")


class ClassifyResponse(BaseModel):
    task: str
    version: str = Field(description="the task version that served every text of this request")
    results: list[ClassifyResult]


class PromptInfo(BaseModel):
    task: str
    version: str
    labels: list[str]
    method: str
    prefix_length: int
    prompt_length: int
    scales: str | None = Field(
        default=None,
        description='"ia3": the task scales every layer\'s keys, values and feed-forward activation',
    )
    lora: dict[str, Any] | None = Field(
        default=None,
        description='{"rank": r, "targets": [...]}: LoRA on those projections of every layer',
    )
    created_at: str
    size_bytes: int
    versions: list[str] = Field(description="stored versions, newest first")
    metrics: dict[str, Any] | None = None


class PromptListResponse(BaseModel):
    tasks: list[PromptInfo]


class UploadResponse(BaseModel):
    task: str
    version: str
    labels: list[str]
    method: str


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        default=None, description="version to make current; default: the one before the current version"
    )


class RollbackResponse(BaseModel):
    task: str
    version: str = Field(description="the version now current")
    previous: str = Field(description="the version that was current before the rollback")


class DeleteResponse(BaseModel):
    task: str
    deleted: bool


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = Field(default=None, description="the request's X-Request-ID")


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class KeyCreateRequest(BaseModel):
    """A new API key: a platform key (no ``tenant``) or one tenant's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, description="what the key is for (shown in listings)")
    scope: Literal["classify", "admin"] = Field(description="classify, or admin (which may also classify)")
    tenant: str | None = Field(
        default=None,
        description="the tenant whose tasks the key sees and changes; none: a platform key (every tenant)",
        json_schema_extra={"pattern": f"^{TENANT_PATTERN.pattern}$"},
    )
    rate_per_s: float | None = Field(default=None, gt=0, description="token-bucket rate of this key")
    burst: int | None = Field(default=None, ge=1, description="token-bucket size of this key")


class KeyInfo(BaseModel):
    id: str = Field(description="the key's public id (in the audit trail and logs); not the key")
    name: str
    scope: str
    tenant: str | None
    created_at: str
    created_by: str = Field(description="the public id of the key that created it")
    revoked_at: str | None
    rate_per_s: float | None
    burst: int | None


class KeyCreatedResponse(KeyInfo):
    key: str = Field(description="the key itself: shown this once, never stored or shown again")


class KeyListResponse(BaseModel):
    keys: list[KeyInfo]


class AuditEntryInfo(BaseModel):
    time: str
    actor: str = Field(description="public id of the key that made the change")
    actor_tenant: str | None
    action: str = Field(description="upload, rollback, delete, job.submit, key.create or key.revoke")
    tenant: str | None = Field(description="the namespace changed (none: the platform's)")
    task: str | None
    version: str | None
    detail: dict[str, Any] | None


class AuditResponse(BaseModel):
    entries: list[AuditEntryInfo] = Field(description="newest first")
