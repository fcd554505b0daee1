"""The artifact format: round trips, content versions, and every way an upload can be wrong.

Forged artifacts are written with ``safetensors.torch.save`` directly, so each test exercises
``parse_artifact`` exactly as an upload would. Where the edited manifest can still be constructed, its
version is recomputed so the content-hash check (the last one) cannot mask the check under test.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save as st_save

from prompts.artifact import (
    MANIFEST_KEY,
    Manifest,
    PromptArtifact,
    build_artifact,
    check_compatible,
    content_version,
    max_text_tokens,
    parse_artifact,
)
from prompts.backbone import Backbone, BackboneSpec, load_backbone
from prompts.errors import ArtifactError, ArtifactTooLargeError, IncompatibleArtifactError
from tests.factories import random_artifact
from tests.models import make_tiny_bert, make_tiny_roberta

Tensors = dict[str, torch.Tensor]
ManifestDict = dict[str, Any]
Edit = Callable[[ManifestDict, Tensors], None]


@pytest.fixture(scope="module")
def base(backbone: Backbone) -> PromptArtifact:
    """An artifact with every tensor: prefix [2, 2, 4, 4, 8], prompt [2, 32], head [3, 32] and [3]."""
    return random_artifact(backbone.spec, num_labels=3, prefix_length=4, prompt_length=2, seed=0)


def _parts(artifact: PromptArtifact) -> tuple[ManifestDict, Tensors]:
    manifest: ManifestDict = json.loads(artifact.manifest_json())
    return manifest, {name: t.clone() for name, t in artifact.tensors.items()}


def _rehash(manifest: ManifestDict, tensors: Tensors) -> ManifestDict:
    """Set the version the content implies, when the manifest is still constructible."""
    try:
        model = Manifest.model_validate({**manifest, "version": ""})
    except ValidationError:
        return manifest  # the manifest check fires before the hash check anyway
    return {**manifest, "version": content_version(model, tensors)}


def _forge(manifest: ManifestDict, tensors: Tensors, *, rehash: bool = True) -> bytes:
    if rehash:
        manifest = _rehash(manifest, tensors)
    return st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})


def _expect(exc: type[Exception], data: bytes, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(exc) as info:
        parse_artifact(data, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- round trip and versions -------------------------------------------------------------------------


def test_build_parse_round_trip(base: PromptArtifact) -> None:
    parsed = parse_artifact(base.data)
    assert parsed.manifest == base.manifest
    assert parsed.data == base.data
    assert sorted(parsed.tensors) == ["head.bias", "head.weight", "prefix", "prompt"]
    for name, tensor in base.tensors.items():
        assert parsed.tensors[name].dtype == torch.float32
        assert torch.equal(parsed.tensors[name], tensor), name
    assert re.fullmatch(r"[0-9a-f]{16}", parsed.version)
    assert parsed.version == content_version(parsed.manifest, parsed.tensors)
    assert parsed.task == "demo"
    assert parsed.manifest.prefix_length == 4 and parsed.manifest.prompt_length == 2
    assert parsed.manifest.labels == ["label_0", "label_1", "label_2"]


def test_same_content_gives_same_version(backbone: Backbone, base: PromptArtifact) -> None:
    again = random_artifact(backbone.spec, num_labels=3, prefix_length=4, prompt_length=2, seed=0)
    assert again.version == base.version
    other_seed = random_artifact(backbone.spec, num_labels=3, prefix_length=4, prompt_length=2, seed=1)
    assert other_seed.version != base.version


def test_created_at_does_not_affect_version(base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    manifest["created_at"] = "1999-12-31T23:59:59+00:00"
    parsed = parse_artifact(_forge(manifest, tensors, rehash=False))
    assert parsed.version == base.version
    assert parsed.manifest.created_at == "1999-12-31T23:59:59+00:00"


def test_changing_one_tensor_value_changes_version(base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    tensors["prefix"][1, 0, 2, 3, 7] += 0.5
    model = Manifest.model_validate({**manifest, "version": ""})
    assert content_version(model, tensors) != base.version
    # The same edit with the old version left in place is caught as tampering.
    _expect(
        ArtifactError,
        _forge(manifest, tensors, rehash=False),
        f"manifest version {base.version!r} does not match the content hash",
        "edited after export",
    )


def test_changing_the_manifest_changes_version(base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    manifest["labels"] = ["neg", "neu", "pos"]
    relabelled = parse_artifact(_forge(manifest, tensors))
    assert relabelled.version != base.version
    assert relabelled.manifest.labels == ["neg", "neu", "pos"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_tensors_parse(base: PromptArtifact, dtype: torch.dtype) -> None:
    manifest, tensors = _parts(base)
    half = {name: t.to(dtype) for name, t in tensors.items()}
    parsed = parse_artifact(_forge(manifest, half))
    assert {t.dtype for t in parsed.tensors.values()} == {dtype}
    for name, tensor in half.items():
        assert torch.equal(parsed.tensors[name], tensor), name
    # The dtype is part of the content, so the version differs from the fp32 original.
    assert parsed.version != base.version
    assert parsed.version == content_version(parsed.manifest, parsed.tensors)


def test_linear_probe_needs_no_prefix_or_prompt(backbone: Backbone) -> None:
    artifact = random_artifact(backbone.spec, prefix_length=0, prompt_length=0)
    assert artifact.manifest.method == "linear-probe"
    assert sorted(parse_artifact(artifact.data).tensors) == ["head.bias", "head.weight"]


# --- forged and edited artifacts ---------------------------------------------------------------------


def _set(key: str, value: Any) -> Edit:
    def edit(manifest: ManifestDict, tensors: Tensors) -> None:
        manifest[key] = value

    return edit


def _set_tensor(name: str, value: torch.Tensor) -> Edit:
    def edit(manifest: ManifestDict, tensors: Tensors) -> None:
        tensors[name] = value

    return edit


def _del_tensor(name: str) -> Edit:
    def edit(manifest: ManifestDict, tensors: Tensors) -> None:
        del tensors[name]

    return edit


def _poison(name: str, index: tuple[int, ...], value: float) -> Edit:
    def edit(manifest: ManifestDict, tensors: Tensors) -> None:
        tensors[name][index] = value

    return edit


def _add_label(manifest: ManifestDict, tensors: Tensors) -> None:
    manifest["labels"] = [*manifest["labels"], "label_3"]


def _no_prefix_or_prompt(manifest: ManifestDict, tensors: Tensors) -> None:
    manifest.update(prefix_length=0, prompt_length=0, method="p-tuning-v2")
    del tensors["prefix"], tensors["prompt"]


def _backbone_extra(manifest: ManifestDict, tensors: Tensors) -> None:
    manifest["backbone"] = {**manifest["backbone"], "vocab": 123}


FORGERIES: list[tuple[str, Edit, list[str]]] = [
    (
        "prefix-length-lies",
        _set("prefix_length", 6),
        ["tensor 'prefix' has shape [2, 2, 4, 4, 8]", "the manifest implies [2, 2, 4, 6, 8]"],
    ),
    (
        "prompt-length-lies",
        _set("prompt_length", 3),
        ["tensor 'prompt' has shape [2, 32]", "the manifest implies [3, 32]"],
    ),
    (
        "head-rows-not-labels",
        _add_label,
        ["tensor 'head.weight' has shape [3, 32]", "the manifest implies [4, 32]"],
    ),
    (
        "head-bias-shape",
        _set_tensor("head.bias", torch.zeros(3, 1)),
        ["tensor 'head.bias' has shape [3, 1]", "the manifest implies [3]"],
    ),
    (
        "duplicate-labels",
        _set("labels", ["yes", "no", "yes"]),
        ["invalid manifest", "labels", "duplicate labels: ['yes']"],
    ),
    ("single-label", _set("labels", ["only"]), ["invalid manifest", "labels", "at least 2"]),
    (
        "blank-label",
        _set("labels", ["label_0", "   ", "label_2"]),
        ["invalid manifest", "labels", "label '   ' must be 1-200 characters and not blank"],
    ),
    ("task-upper-case", _set("task", "Demo"), ["invalid manifest", "task", "invalid task name 'Demo'"]),
    ("task-path", _set("task", "../x"), ["invalid manifest", "task", "invalid task name '../x'"]),
    ("task-65-chars", _set("task", "a" * 65), ["invalid manifest", "task", "1-64 characters"]),
    ("unknown-method", _set("method", "lora"), ["invalid manifest", "method", "'p-tuning-v2'"]),
    ("unknown-field", _set("bogus", 1), ["invalid manifest", "bogus", "Extra inputs are not permitted"]),
    (
        "unknown-backbone-field",
        _backbone_extra,
        ["invalid manifest", "backbone.vocab", "Extra inputs are not permitted"],
    ),
    ("other-format", _set("format", "ptserve.prompt/2"), ["invalid manifest", "format", "ptserve.prompt/1"]),
    (
        "negative-prefix",
        _set("prefix_length", -1),
        ["invalid manifest", "prefix_length", "greater than or equal to 0"],
    ),
    (
        "missing-tensor",
        _del_tensor("prompt"),
        ["tensor names do not match", "prompt_length=2", "missing ['prompt'], unexpected []"],
    ),
    (
        "unexpected-tensor",
        _set_tensor("extra", torch.zeros(2)),
        ["tensor names do not match", "missing [], unexpected ['extra']"],
    ),
    (
        "int64-tensor",
        _set_tensor("head.bias", torch.tensor([1, 2, 3], dtype=torch.int64)),
        ["tensor 'head.bias' has dtype torch.int64", "expected float32, float16 or bfloat16"],
    ),
    (
        "float64-tensor",
        _set_tensor("head.weight", torch.zeros(3, 32, dtype=torch.float64)),
        ["tensor 'head.weight' has dtype torch.float64", "expected float32, float16 or bfloat16"],
    ),
    (
        "nan",
        _poison("head.bias", (1,), float("nan")),
        ["tensor 'head.bias' holds 1 non-finite values (NaN or Inf)"],
    ),
    (
        "inf",
        _poison("prefix", (1, 1, 3, 2, 0), float("-inf")),
        ["tensor 'prefix' holds 1 non-finite values (NaN or Inf)"],
    ),
    (
        "neither-prefix-nor-prompt",
        _no_prefix_or_prompt,
        ["method 'p-tuning-v2' needs a prefix or an input prompt", "has neither"],
    ),
]


@pytest.mark.parametrize(
    ("edit", "fragments"), [(edit, frags) for _, edit, frags in FORGERIES], ids=[n for n, _, _ in FORGERIES]
)
def test_forged_artifact_is_rejected(base: PromptArtifact, edit: Edit, fragments: list[str]) -> None:
    manifest, tensors = _parts(base)
    edit(manifest, tensors)
    message = _expect(ArtifactError, _forge(manifest, tensors), *fragments)
    # Each check is reached on its own: none of these is reported as a hash mismatch.
    assert "content hash" not in message


def test_manifest_version_not_matching_content(base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    manifest["version"] = "0123456789abcdef"
    _expect(
        ArtifactError,
        _forge(manifest, tensors, rehash=False),
        "manifest version '0123456789abcdef' does not match the content hash",
        repr(base.version),
    )


def test_forged_artifacts_do_not_touch_the_original(base: PromptArtifact) -> None:
    """Guards the test helpers: edits work on copies, so the shared fixture stays valid."""
    assert parse_artifact(base.data).version == base.version
    assert torch.isfinite(base.tensors["prefix"]).all()


# --- inputs that are not safetensors artifacts ------------------------------------------------------


def _random_bytes() -> bytes:
    data = random.Random(1234).randbytes(1000)
    assert data[0] != 0x80  # keep this case about the header, not the pickle sniff
    return data


def _minimal_safetensors(metadata: dict[str, str] | None) -> bytes:
    return st_save({"head.weight": torch.zeros(2, 2)}, metadata=metadata)


NOT_ARTIFACTS: list[tuple[str, Callable[[PromptArtifact], bytes], list[str]]] = [
    ("empty", lambda a: b"", ["the upload is empty (0 bytes)", "expected a safetensors file"]),
    ("three-bytes", lambda a: b"abc", ["3 bytes is shorter than the 8-byte header length"]),
    (
        "pickle",
        lambda a: pickle.dumps({"prefix": [1.0, 2.0], "labels": ["a", "b"]}),
        ["looks like a Python pickle", "never loaded"],
    ),
    (
        "random-bytes",
        lambda a: _random_bytes(),
        ["not a safetensors file (or truncated)", "992 bytes follow"],
    ),
    ("cut-in-half", lambda a: a.data[: len(a.data) // 2], ["corrupt or truncated tensor data"]),
    ("cut-by-one", lambda a: a.data[:-1], ["corrupt or truncated tensor data"]),
    (
        "cut-in-header",
        lambda a: a.data[:100],
        ["not a safetensors file (or truncated)", "but only 92 bytes follow"],
    ),
    (
        "header-past-end",
        lambda a: struct.pack("<Q", 1_000_000) + b'{"a": 1}',
        ["header length 1000000 but only 8 bytes follow"],
    ),
    ("zero-header", lambda a: struct.pack("<Q", 0) + b"{}", ["header length 0"]),
    ("header-not-json", lambda a: struct.pack("<Q", 6) + b"{nope}", ["the header is not JSON"]),
    ("header-not-utf8", lambda a: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", ["the header is not JSON"]),
    ("header-a-list", lambda a: struct.pack("<Q", 2) + b"[]", ["the header is not a JSON object"]),
    (
        "no-manifest",
        lambda a: _minimal_safetensors(None),
        ["has no ptserve manifest", f"metadata key {MANIFEST_KEY!r}"],
    ),
    (
        "other-metadata-only",
        lambda a: _minimal_safetensors({"format": "pt"}),
        ["has no ptserve manifest"],
    ),
    (
        "manifest-not-json",
        lambda a: _minimal_safetensors({MANIFEST_KEY: "{not json"}),
        ["invalid manifest", "Invalid JSON"],
    ),
    (
        "manifest-a-list",
        lambda a: _minimal_safetensors({MANIFEST_KEY: "[1, 2]"}),
        ["invalid manifest", "Input should be an object"],
    ),
]


@pytest.mark.parametrize(
    ("make", "fragments"), [(m, f) for _, m, f in NOT_ARTIFACTS], ids=[n for n, _, _ in NOT_ARTIFACTS]
)
def test_not_an_artifact_is_rejected(
    base: PromptArtifact, make: Callable[[PromptArtifact], bytes], fragments: list[str]
) -> None:
    _expect(ArtifactError, make(base), *fragments)


def test_size_limit(base: PromptArtifact) -> None:
    size = len(base.data)
    _expect(
        ArtifactTooLargeError,
        base.data,
        f"artifact is {size} bytes",
        f"the limit is {size - 1} bytes",
        max_bytes=size - 1,
    )
    assert parse_artifact(base.data, max_bytes=size).version == base.version


def test_size_limit_is_checked_before_parsing() -> None:
    """A huge upload is refused on its size alone, whatever it holds."""
    _expect(
        ArtifactTooLargeError, b"\x00" * 101, "artifact is 101 bytes; the limit is 100 bytes", max_bytes=100
    )


def _header_length_ending_in_0x80(manifest: ManifestDict, tensors: Tensors) -> bytes:
    """A valid artifact whose 8-byte little-endian header length starts with the byte 0x80."""
    for n in range(512):
        data = _forge({**manifest, "metrics": {"note": "x" * n}}, tensors)
        if data[0] == 0x80:
            return data
    raise AssertionError("no padding gave a header length of 128 mod 256")


def test_valid_artifact_whose_header_length_starts_with_0x80(base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    data = _header_length_ending_in_0x80(manifest, tensors)
    (header_len,) = struct.unpack("<Q", data[:8])
    assert header_len % 256 == 128 and header_len <= len(data) - 8
    parsed = parse_artifact(data)
    assert parsed.manifest.metrics is not None


def test_build_artifact_rejects_scalar_head_bias(backbone: Backbone) -> None:
    with pytest.raises(ArtifactError, match=r"head\.bias"):
        build_artifact(
            task="demo",
            labels=["a", "b"],
            spec=backbone.spec,
            head_weight=torch.zeros(2, backbone.spec.hidden_size),
            head_bias=torch.tensor(0.0),
            prompt=torch.zeros(1, backbone.spec.hidden_size),
            method="prompt-tuning",
        )


def test_build_artifact_rejects_invalid_manifest(backbone: Backbone) -> None:
    with pytest.raises(ArtifactError, match=r"invalid manifest: task: .*invalid task name 'Bad Name'"):
        build_artifact(
            task="Bad Name",
            labels=["a", "b"],
            spec=backbone.spec,
            head_weight=torch.zeros(2, backbone.spec.hidden_size),
            head_bias=torch.zeros(2),
            prompt=torch.zeros(1, backbone.spec.hidden_size),
        )


# --- compatibility with the running backbone --------------------------------------------------------


@pytest.fixture(scope="module")
def other_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("other-models")


def _spec_of(directory: Path) -> BackboneSpec:
    return load_backbone(directory).spec


def _incompatible(artifact: PromptArtifact, spec: BackboneSpec, *fragments: str) -> None:
    with pytest.raises(IncompatibleArtifactError) as info:
        check_compatible(artifact, spec)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value!s}"


def test_compatible_with_its_own_backbone(backbone: Backbone, base: PromptArtifact) -> None:
    check_compatible(base, backbone.spec)
    check_compatible(parse_artifact(base.data), backbone.spec)


def test_same_shapes_different_weights(backbone: Backbone, other_models: Path) -> None:
    spec = _spec_of(make_tiny_bert(other_models / "seed1", seed=1))
    artifact = random_artifact(spec)
    _incompatible(
        artifact,
        backbone.spec,
        f"was trained on backbone {spec.fingerprint}",
        f"this service runs {backbone.spec.fingerprint}",
        "same shapes, different weights",
    )


def test_different_hidden_size(backbone: Backbone, other_models: Path) -> None:
    spec = _spec_of(make_tiny_bert(other_models / "hidden48", hidden=48))
    _incompatible(
        random_artifact(spec),
        backbone.spec,
        "built for a backbone with hidden_size=48",
        f"this service runs {backbone.spec.describe()}",
        "(hidden_size=32)",
    )


def test_different_layer_count(backbone: Backbone, other_models: Path) -> None:
    spec = _spec_of(make_tiny_bert(other_models / "layers3", layers=3))
    _incompatible(
        random_artifact(spec), backbone.spec, "built for a backbone with num_layers=3", "(num_layers=2)"
    )


def test_roberta_artifact_on_bert(backbone: Backbone, other_models: Path) -> None:
    spec = _spec_of(make_tiny_roberta(other_models / "roberta"))
    assert spec.model_type == "roberta"
    _incompatible(
        random_artifact(spec),
        backbone.spec,
        "built for a backbone with model_type=roberta",
        "(model_type=bert)",
    )


def test_prefix_and_prompt_leave_no_room_for_text(backbone: Backbone) -> None:
    roomy = dataclasses.replace(backbone.spec, max_positions=512)  # same fingerprint, longer table
    artifact = random_artifact(roomy, prefix_length=40, prompt_length=30, positions="after_prefix")
    assert max_text_tokens(artifact.manifest, backbone.spec) == 64 - 70
    _incompatible(
        artifact,
        backbone.spec,
        "uses 40 prefix and 30 prompt positions",
        "no room for text within the backbone's 64 positions",
    )
    # build_artifact checks against the spec it is given, so the same tensors cannot be built there.
    with pytest.raises(IncompatibleArtifactError, match="no room for text"):
        random_artifact(backbone.spec, prefix_length=40, prompt_length=30)


def test_room_for_text_boundary(backbone: Backbone) -> None:
    # [CLS] + [SEP] is the least text there is: 64 - 40 - 22 = 2 fits, one position more does not.
    fits = random_artifact(backbone.spec, prefix_length=40, prompt_length=22)
    assert max_text_tokens(fits.manifest, backbone.spec) == 2
    with pytest.raises(IncompatibleArtifactError, match="uses 40 prefix and 23 prompt positions"):
        random_artifact(backbone.spec, prefix_length=40, prompt_length=23)


def test_from_zero_prefix_uses_no_positions(backbone: Backbone) -> None:
    artifact = random_artifact(backbone.spec, prefix_length=40, prompt_length=10, positions="from_zero")
    check_compatible(artifact, backbone.spec)
    assert max_text_tokens(artifact.manifest, backbone.spec) == 64 - 10
    # Even a prefix longer than the position table is fine when it consumes no positions.
    long_prefix = random_artifact(backbone.spec, prefix_length=100, prompt_length=0, positions="from_zero")
    check_compatible(long_prefix, backbone.spec)


# --- families: what artifacts made before them, and artifacts of other families, get -------------


def _hash_before_families(manifest: ManifestDict, tensors: Tensors) -> str:
    """``content_version`` as the first release computed it (no family, key/value heads, conventions)."""
    import hashlib

    h = hashlib.sha256()
    payload = {k: v for k, v in manifest.items() if k not in ("version", "created_at")}
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"|{name}|F32|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def test_artifacts_from_before_families_keep_their_version_and_are_served(
    backbone: Backbone, base: PromptArtifact
) -> None:
    manifest, tensors = _parts(base)
    del manifest["conventions"]
    del manifest["backbone"]["family"], manifest["backbone"]["num_kv_heads"]
    manifest["version"] = _hash_before_families(manifest, tensors)
    old = parse_artifact(_forge(manifest, tensors, rehash=False))
    assert old.version == manifest["version"]
    assert old.manifest.backbone.family is None and old.manifest.conventions is None
    assert old.manifest.backbone.family_name == "bert"
    check_compatible(old, backbone.spec)  # BERT layout, every head a prefix head: what they all were


def test_edited_conventions_are_refused_by_name(backbone: Backbone, base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    manifest["conventions"]["position_encoding"] = "rotary"
    artifact = parse_artifact(_forge(manifest, tensors))
    _incompatible(
        artifact,
        backbone.spec,
        "trained with the position_encoding convention 'rotary'",
        "applies 'absolute'",
    )


def test_prefix_heads_are_the_backbones_key_value_heads(backbone: Backbone, base: PromptArtifact) -> None:
    manifest, tensors = _parts(base)
    manifest["backbone"]["num_kv_heads"] = 2  # as if grouped-query attention: [L, 2, 2, P, D] expected
    _expect(
        ArtifactError,
        _forge(manifest, tensors),
        "tensor 'prefix' has shape [2, 2, 4, 4, 8]",
        "[2, 2, 2, 4, 8]",
    )


# --- (IA)^3 scales -----------------------------------------------------------------------------------


def test_scales_round_trip_and_leave_unscaled_manifests_as_they_were(
    backbone: Backbone, base: PromptArtifact
) -> None:
    spec = backbone.spec
    scaled = random_artifact(spec, num_labels=3, prefix_length=4, prompt_length=2, seed=0, scales=True)
    parsed = parse_artifact(scaled.data)
    assert parsed.manifest.scales == "ia3"
    assert parsed.tensors["scales"].shape == (spec.num_layers, spec.scales_width)
    assert spec.scales_width == 2 * spec.num_kv_heads * spec.head_dim + spec.ffn_size
    check_compatible(parsed, spec)
    # The other tensors are the unscaled artifact's (drawn first), yet the version differs.
    assert torch.equal(parsed.tensors["prefix"], base.tensors["prefix"])
    assert parsed.version != base.version
    # An artifact without scales says nothing about them: its JSON is what it was before they existed.
    assert "scales" not in json.loads(base.manifest_json())
    assert '"scales"' in scaled.manifest_json()


def test_scales_without_the_manifest_saying_so_and_the_reverse_are_refused(backbone: Backbone) -> None:
    scaled = random_artifact(backbone.spec, seed=0, scales=True)
    manifest, tensors = _parts(scaled)
    del manifest["scales"]
    _expect(ArtifactError, _forge(manifest, tensors), "unexpected ['scales']")
    manifest, tensors = _parts(scaled)
    del tensors["scales"]
    _expect(ArtifactError, _forge(manifest, tensors), "missing ['scales']", "scales=ia3")


def test_scales_of_a_wrong_shape_or_value_are_refused(backbone: Backbone) -> None:
    spec = backbone.spec
    scaled = random_artifact(spec, seed=0, scales=True)
    manifest, tensors = _parts(scaled)
    tensors["scales"] = tensors["scales"][:1]
    _expect(
        ArtifactError,
        _forge(manifest, tensors),
        "tensor 'scales' has shape",
        f"[{spec.num_layers}, any width]",
    )
    manifest, tensors = _parts(scaled)
    tensors["scales"] = tensors["scales"][:, :10].contiguous()
    _expect(ArtifactError, _forge(manifest, tensors), "tensor 'scales' is 10 wide")
    manifest, tensors = _parts(scaled)
    tensors["scales"][0, 0] = float("nan")
    _expect(ArtifactError, _forge(manifest, tensors), "'scales' holds 1 non-finite")
    # Wide enough for keys and values but not this backbone's feed-forward block: parsed, then
    # refused by the backbone.
    manifest, tensors = _parts(scaled)
    tensors["scales"] = torch.ones(spec.num_layers, spec.scales_width + 4)
    wrong = parse_artifact(_forge(manifest, tensors))
    _incompatible(wrong, spec, f"(IA)^3 scales {spec.scales_width + 4} wide", f"need {spec.scales_width}")


# --- LoRA --------------------------------------------------------------------------------------------


def test_lora_round_trips_with_the_familys_targets(backbone: Backbone, base: PromptArtifact) -> None:
    spec = backbone.spec
    adapted = random_artifact(spec, num_labels=3, prefix_length=4, prompt_length=2, seed=0, lora_rank=3)
    parsed = parse_artifact(adapted.data)
    assert parsed.manifest.lora is not None and parsed.manifest.lora.rank == 3
    targets = backbone.family.lora_targets(spec.shape())
    assert (
        parsed.manifest.lora.targets
        == list(targets)
        == [
            "query",
            "key",
            "value",
            "attention_output",
            "ffn_in",
            "ffn_out",
        ]
    )
    for name, (width_in, width_out) in targets.items():
        assert parsed.tensors[f"lora.{name}.down"].shape == (spec.num_layers, width_in, 3)
        assert parsed.tensors[f"lora.{name}.up"].shape == (spec.num_layers, 3, width_out)
    check_compatible(parsed, spec)
    assert torch.equal(parsed.tensors["prefix"], base.tensors["prefix"])
    assert parsed.version != base.version
    assert "lora" not in json.loads(base.manifest_json())
    assert json.loads(adapted.manifest_json())["lora"] == {"rank": 3, "targets": list(targets)}


def test_lora_tensors_must_match_the_manifest_and_the_backbone(backbone: Backbone) -> None:
    spec = backbone.spec
    adapted = random_artifact(spec, seed=0, lora_rank=2)
    manifest, tensors = _parts(adapted)
    del manifest["lora"]
    _expect(ArtifactError, _forge(manifest, tensors), "unexpected ['lora.attention_output.down'")
    manifest, tensors = _parts(adapted)
    del tensors["lora.key.up"]
    _expect(ArtifactError, _forge(manifest, tensors), "missing ['lora.key.up']", "lora=['query'")
    manifest, tensors = _parts(adapted)
    tensors["lora.query.down"] = tensors["lora.query.down"][..., :1].contiguous()  # rank 1, manifest 2
    _expect(ArtifactError, _forge(manifest, tensors), "tensor 'lora.query.down' has shape", ", any width, 2]")
    manifest, tensors = _parts(adapted)
    tensors["lora.value.up"][0, 0, 0] = float("inf")
    _expect(ArtifactError, _forge(manifest, tensors), "'lora.value.up' holds 1 non-finite")
    manifest, tensors = _parts(adapted)
    manifest["lora"]["rank"] = 0
    _expect(ArtifactError, _forge(manifest, tensors), "lora.rank")
    # Parsed, then refused by the backbone: a target this family does not have, a wrong width.
    manifest, tensors = _parts(adapted)
    manifest["lora"]["targets"] = ["query", "key"]
    for name in ("value", "attention_output", "ffn_in", "ffn_out"):
        del tensors[f"lora.{name}.down"], tensors[f"lora.{name}.up"]
    _incompatible(parse_artifact(_forge(manifest, tensors)), spec, "LoRA on ['query', 'key']", "targets are")
    manifest, tensors = _parts(adapted)
    tensors["lora.ffn_out.down"] = torch.zeros(spec.num_layers, spec.ffn_size + 1, 2)
    _incompatible(
        parse_artifact(_forge(manifest, tensors)),
        spec,
        f"LoRA 'ffn_out' from {spec.ffn_size + 1} to {spec.hidden_size}",
    )


def test_manifests_without_scales_keep_their_fields(base: PromptArtifact) -> None:
    """The fields a version hashes are those of artifacts made before scales existed."""
    fields = set(json.loads(base.manifest_json()))
    assert fields == {
        "format",
        "task",
        "labels",
        "method",
        "prefix_length",
        "prompt_length",
        "head",
        "positions",
        "backbone",
        "conventions",
        "version",
        "created_at",
        "metrics",
        "training",
    }


def test_scales_are_served_as_deltas_that_half_precision_keeps(backbone: Backbone) -> None:
    from prompts.forward import TaskPrompt

    spec = backbone.spec
    artifact = random_artifact(spec, seed=0, scales=True)
    served = TaskPrompt.from_artifact(artifact, backbone.device, torch.bfloat16)
    assert served.scale_delta is not None and served.scale_delta.dtype == torch.bfloat16
    want = artifact.tensors["scales"] - 1
    # bfloat16 keeps 8 significant bits of the delta itself; a multiplier near 1 would keep 2^-8 of 1.
    torch.testing.assert_close(served.scale_delta.float(), want, rtol=2**-8, atol=0)
