"""The prompt artifact: one safetensors file whose metadata holds a JSON manifest.

Tensors (all float32, float16 or bfloat16):

- ``prefix``      [layers, 2, kv_heads, prefix_length, head_dim]  deep prefix keys (index 0) and values (1);
                 kv_heads: the backbone's key/value heads (fewer than its heads under grouped-query attention)
- ``prompt``      [prompt_length, hidden]                      input-prompt embeddings placed before the text
- ``head.weight`` [num_labels, hidden]                         linear head on the pooled position
- ``head.bias``   [num_labels]
  (a verbalizer head: each label's mean masked-LM decoder row and bias, see :class:`VerbalizerSpec`)
- ``scales``      [layers, 2 * kv_heads * head_dim + ffn]          (IA)^3 multipliers of each layer's keys,
                 values and feed-forward activation, in that order (manifest ``scales: "ia3"``; the
                 convention is ``prompts.backbones.base.layer_scales``)
- ``lora.<target>.down`` [layers, in, rank], ``lora.<target>.up`` [layers, rank, out]
                 LoRA of each projection the backbone family adapts (its ``lora_targets``, named in
                 the manifest's ``lora``): ``linear(x) + x @ down @ up``, alpha / rank already in ``up``

The manifest lives under the metadata key ``ptserve.manifest``. Artifacts are data only: no pickle is
ever read, and every check below fails with a message that says what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prompts.backbone import BackboneSpec
from prompts.backbones import family_by_name
from prompts.errors import ArtifactError, ArtifactTooLargeError, IncompatibleArtifactError
from prompts.names import TASK_NAME_PATTERN

FORMAT = "ptserve.prompt/1"
MANIFEST_KEY = "ptserve.manifest"
DEFAULT_MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
MAX_LABELS = 10_000
ALLOWED_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

Method = Literal["p-tuning-v2", "p-tuning", "prompt-tuning", "linear-probe", "custom"]
Pooling = Literal["cls", "first", "mean", "last", "mask"]


def _without_none(data: dict[str, Any], field: str) -> dict[str, Any]:
    """``data`` without ``field`` where it is None: a field added after the first release then changes
    neither the JSON nor the content version of artifacts that do not use it."""
    if data.get(field) is None:
        data.pop(field, None)
    return data


class LoRASpec(BaseModel):
    """LoRA beside the prompt: its rank and the projections it adapts (the family's target names)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=1, le=256)
    targets: list[str] = Field(min_length=1, max_length=16)


class VerbalizerSpec(BaseModel):
    """Label words predicted at a ``[MASK]`` of the template by the backbone's masked-LM head.

    The template is ``prompt[:mask_position] [MASK] prompt[mask_position + 1:] [CLS] text [SEP]``:
    the ``[MASK]`` is the input prompt's row ``mask_position``, the real [MASK] embedding. A label's
    score is the mean of its words' masked-LM logits there; ``head.weight`` / ``head.bias`` hold each
    label's mean decoder row and bias (the mean is linear, so it folds exactly), and the serving path
    reads only those rows after the head's transform, never the whole vocabulary. Mean rather than
    max: the fold makes a verbalizer row an ordinary head row in a mixed batch, and the label
    distribution equals that of the words' mean log-probabilities (the vocabulary's log-sum-exp is
    one constant per row).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    words: list[list[str]] = Field(
        min_length=2, max_length=MAX_LABELS
    )  # per label, as the vocabulary spells them
    token_ids: list[list[int]] = Field(min_length=2, max_length=MAX_LABELS)  # per label, their vocabulary ids
    aggregate: Literal["mean"] = "mean"
    mask_position: int = Field(ge=0, le=4096)
    mlm_fingerprint: str = Field(min_length=1, max_length=200)  # the masked-LM head the rows came from


class HeadSpec(BaseModel):
    """Which position is pooled and whether the backbone's own pooler (dense + tanh) runs first.

    ``cls`` pools the text's first token (after any input prompt), ``first`` pools sequence
    position 0 (the first input-prompt token when there is one: PEFT's sequence-classification
    convention), ``mean`` averages the text tokens, ``last`` pools the text's last token (decoders:
    the only token that has seen the whole text), ``mask`` reads the input prompt's ``[MASK]`` row
    through the backbone's masked-LM transform (a verbalizer: ``verbalizer`` says which words).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pooling: Pooling = "cls"
    pooler: Literal["none", "backbone"] = "none"
    verbalizer: VerbalizerSpec | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_verbalizer(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Head-based manifests serialise exactly as before verbalizers existed (same JSON, same hash).
        return _without_none(handler(self), "verbalizer")


class BackboneRef(BaseModel):
    """The backbone an artifact was trained on. ``family`` and ``num_kv_heads`` are absent (None) in
    artifacts made before backbone families existed: those were all BERT layout, every head a prefix head."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str = Field(min_length=1, max_length=200)
    model_type: str = Field(min_length=1, max_length=64)
    family: str | None = Field(default=None, min_length=1, max_length=64)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int | None = Field(default=None, ge=1)
    head_dim: int = Field(ge=1)
    hidden_size: int = Field(ge=1)

    @property
    def family_name(self) -> str:
        return self.family or "bert"

    @property
    def prefix_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


class Manifest(BaseModel):
    """Everything needed to serve the tensors exactly as they were trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["ptserve.prompt/1"] = "ptserve.prompt/1"
    task: str
    labels: list[str] = Field(min_length=2, max_length=MAX_LABELS)
    method: Method
    prefix_length: int = Field(ge=0, le=4096)
    prompt_length: int = Field(ge=0, le=4096)
    head: HeadSpec = HeadSpec()
    # "after_prefix": text positions start at prefix_length (the HF / PEFT / P-tuning v2 convention,
    # where BERT offsets position ids by the cache length); "from_zero": they start at 0.
    positions: Literal["after_prefix", "from_zero"] = "after_prefix"
    backbone: BackboneRef
    # How the family applies prompts (prompts/backbones), as the trainer's backbone stated it; compared
    # with the serving backbone's. None in artifacts made before families: the BERT layout's rules.
    conventions: dict[str, str] | None = None
    version: str = ""
    created_at: str = ""
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    # "ia3": the artifact holds ``scales``. Absent (None) from every artifact without them, so their
    # JSON and versions are what they were before scales existed.
    scales: Literal["ia3"] | None = None
    # Set where the artifact holds LoRA tensors; absent otherwise, as ``scales``.
    lora: LoRASpec | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(_without_none(handler(self), "scales"), "lora")

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if TASK_NAME_PATTERN.fullmatch(value) is None:
            raise ValueError(
                f"invalid task name {value[:80]!r}: expected 1-64 characters of a-z, 0-9, '_', '.', '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        for label in value:
            if not label.strip() or len(label) > 200:
                raise ValueError(f"label {label[:80]!r} must be 1-200 characters and not blank")
        dupes = sorted(label for label, n in Counter(value).items() if n > 1)
        if dupes:
            raise ValueError(f"duplicate labels: {dupes[:10]}")
        return value


@dataclass(frozen=True)
class PromptArtifact:
    """A parsed, internally consistent artifact; ``data`` is its exact serialised form."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    data: bytes

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def version(self) -> str:
        return self.manifest.version

    def manifest_json(self) -> str:
        return self.manifest.model_dump_json()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.data)


def content_version(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> str:
    """A hash of everything that defines the artifact except the version field and creation time."""
    h = hashlib.sha256()
    payload = manifest.model_dump(mode="json", exclude={"version", "created_at"})
    # Fields added after the first release count only when set, so older artifacts keep their version.
    if payload["conventions"] is None:
        del payload["conventions"]
    for field in ("family", "num_kv_heads"):
        if payload["backbone"][field] is None:
            del payload["backbone"][field]
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{ALLOWED_DTYPES.get(t.dtype, str(t.dtype))}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def expected_shapes(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    b = manifest.backbone
    shapes: dict[str, tuple[int, ...]] = {
        "head.weight": (len(manifest.labels), b.hidden_size),
        "head.bias": (len(manifest.labels),),
    }
    if manifest.prefix_length:
        shapes["prefix"] = (b.num_layers, 2, b.prefix_heads, manifest.prefix_length, b.head_dim)
    if manifest.prompt_length:
        shapes["prompt"] = (manifest.prompt_length, b.hidden_size)
    if manifest.scales is not None:
        # The FFN width is not in the manifest: -1 takes any width here; check_compatible compares it
        # with the backbone's exactly.
        shapes["scales"] = (b.num_layers, -1)
    if manifest.lora is not None:
        # Widths depend on the family's projections: check_compatible compares them exactly.
        for target in manifest.lora.targets:
            shapes[f"lora.{target}.down"] = (b.num_layers, -1, manifest.lora.rank)
            shapes[f"lora.{target}.up"] = (b.num_layers, manifest.lora.rank, -1)
    return shapes


def build_artifact(
    *,
    task: str,
    labels: list[str],
    spec: BackboneSpec,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    prefix: torch.Tensor | None = None,
    prompt: torch.Tensor | None = None,
    method: Method = "p-tuning-v2",
    pooling: Pooling = "cls",
    pooler: Literal["none", "backbone"] = "none",
    positions: Literal["after_prefix", "from_zero"] = "after_prefix",
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    verbalizer: VerbalizerSpec | None = None,
    scales: torch.Tensor | None = None,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PromptArtifact:
    """Write an artifact from tensors (shapes as in the module docstring); validated like any upload.
    ``lora``: target -> (down [layers, in, rank], up [layers, rank, out])."""
    tensors: dict[str, torch.Tensor] = {
        "head.weight": head_weight.detach().to("cpu", torch.float32).contiguous(),
        "head.bias": head_bias.detach().to("cpu", torch.float32).contiguous(),
    }
    if prefix is not None:
        tensors["prefix"] = prefix.detach().to("cpu", torch.float32).contiguous()
    if prompt is not None:
        tensors["prompt"] = prompt.detach().to("cpu", torch.float32).contiguous()
    if scales is not None:
        tensors["scales"] = scales.detach().to("cpu", torch.float32).contiguous()
    lora_spec = None
    if lora:
        for target, (down, up) in lora.items():
            tensors[f"lora.{target}.down"] = down.detach().to("cpu", torch.float32).contiguous()
            tensors[f"lora.{target}.up"] = up.detach().to("cpu", torch.float32).contiguous()
        lora_spec = LoRASpec(rank=int(next(iter(lora.values()))[0].shape[-1]), targets=list(lora))
    try:
        manifest = Manifest(
            task=task,
            labels=list(labels),
            method=method,
            prefix_length=int(prefix.shape[3]) if prefix is not None and prefix.dim() == 5 else 0,
            prompt_length=int(prompt.shape[0]) if prompt is not None else 0,
            head=HeadSpec(pooling=pooling, pooler=pooler, verbalizer=verbalizer),
            positions=positions,
            backbone=BackboneRef(**spec.as_manifest()),
            conventions=family_conventions(spec.family),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            metrics=metrics,
            training=training,
            scales="ia3" if scales is not None else None,
            lora=lora_spec,
        )
    except ValidationError as exc:
        raise ArtifactError(f"invalid manifest: {_pydantic_message(exc)}") from exc
    manifest = manifest.model_copy(update={"version": content_version(manifest, tensors)})
    data = st_save(tensors, metadata={MANIFEST_KEY: manifest.model_dump_json()})
    artifact = parse_artifact(data)
    check_compatible(artifact, spec)
    return artifact


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"]) or "manifest"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _read_header(data: bytes) -> dict[str, Any]:
    """Parse the safetensors header ourselves: it is the only way to read metadata from bytes."""
    if len(data) == 0:
        raise ArtifactError("the upload is empty (0 bytes); expected a safetensors file")
    if len(data) < 8:
        raise ArtifactError(
            f"not a safetensors file: {len(data)} bytes is shorter than the 8-byte header length"
        )
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len == 0 or header_len > len(data) - 8:
        # Pickles open with the PROTO opcode (0x80) and a protocol number; judged only once the
        # bytes fail as safetensors, since a valid header length can start with 0x80 too.
        if data[0] == 0x80 and data[1] in range(2, 6):
            raise ArtifactError(
                "not a safetensors file: it looks like a Python pickle, which is never loaded"
            )
        raise ArtifactError(
            f"not a safetensors file (or truncated): header length {header_len} "
            f"but only {len(data) - 8} bytes follow"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"not a safetensors file: the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ArtifactError("not a safetensors file: the header is not a JSON object")
    return header


def parse_artifact(data: bytes, *, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> PromptArtifact:
    """Validate everything that can be checked without a backbone; raise ArtifactError on any fault."""
    if len(data) > max_bytes:
        raise ArtifactTooLargeError(f"artifact is {len(data)} bytes; the limit is {max_bytes} bytes")
    header = _read_header(data)
    metadata = header.get("__metadata__") or {}
    raw_manifest = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if raw_manifest is None:
        raise ArtifactError(f"safetensors file has no ptserve manifest (metadata key {MANIFEST_KEY!r})")
    try:
        manifest = Manifest.model_validate_json(raw_manifest)
    except ValidationError as exc:
        raise ArtifactError(f"invalid manifest: {_pydantic_message(exc)}") from exc
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise ArtifactError(f"corrupt or truncated tensor data: {exc}") from exc

    expected = expected_shapes(manifest)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(
            f"tensor names do not match the manifest (prefix_length={manifest.prefix_length}, "
            f"prompt_length={manifest.prompt_length}, scales={manifest.scales}, "
            f"lora={None if manifest.lora is None else manifest.lora.targets}): missing {missing}, "
            f"unexpected {extra}"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if t.dtype not in ALLOWED_DTYPES:
            raise ArtifactError(f"tensor {name!r} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        fits = t.dim() == len(shape) and all(w in (-1, n) for w, n in zip(shape, t.shape, strict=True))
        if not fits:
            implied = ", ".join("any width" if n == -1 else str(n) for n in shape)
            raise ArtifactError(
                f"tensor {name!r} has shape {list(t.shape)}; the manifest implies [{implied}]"
            )
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ArtifactError(f"tensor {name!r} holds {bad} non-finite values (NaN or Inf)")
    if (
        manifest.prefix_length == 0
        and manifest.prompt_length == 0
        and manifest.method
        not in (
            "linear-probe",
            "custom",
        )
    ):
        raise ArtifactError(
            f"method {manifest.method!r} needs a prefix or an input prompt; the artifact has neither"
        )

    _check_verbalizer(manifest)
    if "scales" in tensors:
        b = manifest.backbone
        least = 2 * b.prefix_heads * b.head_dim + 1
        if tensors["scales"].shape[1] < least:
            raise ArtifactError(
                f"tensor 'scales' is {tensors['scales'].shape[1]} wide; keys, values and a feed-forward "
                f"part need at least {least} (2 x {b.prefix_heads} key/value heads x {b.head_dim} + 1)"
            )

    actual = content_version(manifest, tensors)
    if manifest.version != actual:
        raise ArtifactError(
            f"manifest version {manifest.version!r} does not match the content hash {actual!r}: "
            "the file is corrupt or was edited after export"
        )
    return PromptArtifact(manifest=manifest, tensors=tensors, data=data)


def _check_verbalizer(manifest: Manifest) -> None:
    head, verbalizer = manifest.head, manifest.head.verbalizer
    if (head.pooling == "mask") != (verbalizer is not None):
        raise ArtifactError(
            "head pooling 'mask' and head.verbalizer go together: one is set without the other"
        )
    if verbalizer is None:
        return
    labels = len(manifest.labels)
    if len(verbalizer.words) != labels or len(verbalizer.token_ids) != labels:
        raise ArtifactError(
            f"verbalizer lists words for {len(verbalizer.words)} and token ids for "
            f"{len(verbalizer.token_ids)} labels; the task has {labels}"
        )
    for label, words, ids in zip(manifest.labels, verbalizer.words, verbalizer.token_ids, strict=True):
        if not ids or len(words) != len(ids) or min(ids) < 0:
            raise ArtifactError(f"verbalizer for label {label!r}: needs one non-negative token id per word")
    if verbalizer.mask_position >= manifest.prompt_length:
        raise ArtifactError(
            f"verbalizer mask_position {verbalizer.mask_position} is outside the input prompt "
            f"(prompt_length {manifest.prompt_length})"
        )
    if head.pooler != "none":
        raise ArtifactError("a verbalizer head reads the masked-LM head, not the backbone's pooler")


def family_conventions(family: str) -> dict[str, str]:
    found = family_by_name(family)
    if found is None:
        raise ArtifactError(f"unknown backbone family {family!r}")
    return found.conventions()


def check_compatible(artifact: PromptArtifact, spec: BackboneSpec) -> None:
    """Refuse an artifact that does not fit this backbone, naming the first mismatch."""
    ref = artifact.manifest.backbone
    mine = spec.as_manifest()
    theirs_by_field = {"family": ref.family_name, "num_kv_heads": ref.prefix_heads}
    for field in (
        "family",
        "model_type",
        "num_layers",
        "hidden_size",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
        theirs = theirs_by_field.get(field, getattr(ref, field))
        if theirs != mine[field]:
            raise IncompatibleArtifactError(
                f"artifact for task {artifact.task!r} was built for a backbone with {field}={theirs}; "
                f"this service runs {spec.describe()} ({field}={mine[field]})"
            )
    stated = artifact.manifest.conventions or family_conventions("bert")
    expected = family_conventions(spec.family)
    for key in sorted(set(stated) | set(expected)):
        if stated.get(key) != expected.get(key):
            raise IncompatibleArtifactError(
                f"artifact for task {artifact.task!r} was trained with the {key} convention "
                f"{stated.get(key)!r}; this service's {spec.family} backbone applies {expected.get(key)!r}"
            )
    if ref.fingerprint != spec.fingerprint:
        raise IncompatibleArtifactError(
            f"artifact for task {artifact.task!r} was trained on backbone {ref.fingerprint}; "
            f"this service runs {spec.fingerprint} (same shapes, different weights)"
        )
    if artifact.manifest.head.pooler == "backbone" and not spec.has_pooler:
        # Refused here, not at forward time, where it would fail every task's rows in the batch.
        raise IncompatibleArtifactError(
            f"artifact for task {artifact.task!r} uses the backbone's pooler, but this backbone "
            f"({spec.fingerprint}) has no pooler weights"
        )
    verbalizer = artifact.manifest.head.verbalizer
    if verbalizer is not None:
        if spec.mlm_fingerprint is None:
            raise IncompatibleArtifactError(
                f"task {artifact.task!r} has a verbalizer head (label words at a [MASK]), but this "
                f"backbone ({spec.fingerprint}) has no masked-LM head; serve it on a checkpoint saved "
                "with one (e.g. BertForMaskedLM)"
            )
        if verbalizer.mlm_fingerprint != spec.mlm_fingerprint:
            raise IncompatibleArtifactError(
                f"task {artifact.task!r} was trained on masked-LM head {verbalizer.mlm_fingerprint}; "
                f"this backbone's is {spec.mlm_fingerprint}"
            )
    scales = artifact.tensors.get("scales")
    if scales is not None and scales.shape[1] != spec.scales_width:
        raise IncompatibleArtifactError(
            f"artifact for task {artifact.task!r} has (IA)^3 scales {scales.shape[1]} wide; this "
            f"backbone's keys, values and feed-forward block need {spec.scales_width}"
        )
    if artifact.manifest.lora is not None:
        _check_lora(artifact, spec)
    if max_text_tokens(artifact.manifest, spec) < 2:
        raise IncompatibleArtifactError(
            f"artifact for task {artifact.task!r} uses {artifact.manifest.prefix_length} prefix and "
            f"{artifact.manifest.prompt_length} prompt positions, leaving no room for text within "
            f"the backbone's {spec.max_positions} positions"
        )


def _check_lora(artifact: PromptArtifact, spec: BackboneSpec) -> None:
    lora = artifact.manifest.lora
    assert lora is not None
    family = family_by_name(spec.family)
    assert family is not None
    targets = family.lora_targets(spec.shape())
    if lora.targets != list(targets):
        raise IncompatibleArtifactError(
            f"artifact for task {artifact.task!r} has LoRA on {lora.targets}; this {spec.family} "
            f"backbone's LoRA targets are {list(targets)}"
        )
    for target, (width_in, width_out) in targets.items():
        down = artifact.tensors[f"lora.{target}.down"]
        up = artifact.tensors[f"lora.{target}.up"]
        if down.shape[1] != width_in or up.shape[2] != width_out:
            raise IncompatibleArtifactError(
                f"artifact for task {artifact.task!r} has LoRA {target!r} from {down.shape[1]} to "
                f"{up.shape[2]} wide; this backbone's projection is {width_in} to {width_out}"
            )


def max_text_tokens(manifest: Manifest, spec: BackboneSpec) -> int:
    """How many text tokens (special tokens included) fit in the position table for this task."""
    used = manifest.prompt_length + (manifest.prefix_length if manifest.positions == "after_prefix" else 0)
    return spec.max_positions - used
