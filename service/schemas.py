"""HTTP request and response bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ClassifyRequest(BaseModel):
    """Either ``text`` (one) or ``texts`` (several) for one task."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="task name", examples=["product_type"])
    text: str | None = Field(default=None, description="one text to classify")
    texts: list[str] | None = Field(default=None, description="several texts of the same task")
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
