"""The trainable parametrisations of a task's prompt, one per method, over a frozen backbone.

Each method is a small ``torch.nn.Module`` whose :meth:`PromptMethod.task_prompt` returns a
:class:`~prompts.forward.TaskPrompt` built from (differentiable) tensors, so training runs the very
``prompted_forward`` the service runs. :meth:`PromptMethod.export` evaluates the parametrisation once
in eval mode and keeps plain tensors: an MLP reparameterisation or a P-tuning prompt encoder exists
only while training, and folding it away changes no logit.

- ``p-tuning-v2``: deep prefix keys/values at every layer ``[layers, 2, heads, P, head_dim]``, optionally
  produced by an MLP from ``[P, hidden]`` embeddings (Li & Liang / P-tuning v2 reparameterisation).
- ``p-tuning``: ``K`` input embeddings produced by a bi-LSTM + MLP prompt encoder (Liu et al. 2021).
- ``prompt-tuning``: ``K`` free input embeddings initialised from real token embeddings (Lester et al.).
- ``linear-probe``: no prompt at all, only the head.

The backbone is never a submodule here: ``module.train()`` must not switch on the backbone's dropout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prompts.artifact import Method, VerbalizerSpec
from prompts.backbone import Backbone, BackboneSpec, MaskedLMHead
from prompts.backbones import Collected, Layout, family_by_name
from prompts.errors import InvalidInputError
from prompts.forward import TaskPrompt

__all__ = [
    "METHODS",
    "METHOD_ALIASES",
    "DeepPrefix",
    "ExportedPrompt",
    "HeadStyle",
    "LabelWords",
    "LinearProbe",
    "MethodName",
    "PTuningEncoder",
    "PromptMethod",
    "SoftPrompt",
    "check_label_words",
    "label_word_embeddings",
    "label_words",
    "prefix_from_tokens",
    "resolve_method",
    "vocabulary_sample",
]

MethodName = Literal["p-tuning-v2", "p-tuning", "prompt-tuning", "linear-probe"]
METHODS: tuple[MethodName, ...] = ("p-tuning-v2", "p-tuning", "prompt-tuning", "linear-probe")
METHOD_ALIASES: dict[str, MethodName] = {
    "prefix": "p-tuning-v2",
    "ptuning": "p-tuning",
    "prompt": "prompt-tuning",
    "probe": "linear-probe",
    **{m: m for m in METHODS},
}
# "cls": the text's [CLS] straight into the head (P-tuning v2). "mean": the mean of the text tokens,
# what sentence-embedding backbones (all-MiniLM-L6-v2) were trained to produce: the stronger linear
# probe on such a backbone. "last": the text's last token, the only one a decoder's causal attention
# lets see the whole text. "peft": the head PEFT's SEQ_CLS models have, so the task exports to PEFT
# unchanged: BERT layout, sequence position 0 through the backbone's pooler (BertForSequenceClassification);
# decoders, the last token into a bias-free head (LlamaForSequenceClassification's ``score``).
# "verbalizer": label words predicted at a [MASK] after the input prompt by the backbone's masked-LM
# head (P-tuning with label words); the head is frozen to the words' decoder rows (LabelWords).
HeadStyle = Literal["cls", "peft", "mean", "last", "verbalizer"]
Pooling = Literal["cls", "first", "mean", "last", "mask"]
PEFT_HEAD_FAMILIES = ("bert", "decoder")
# LoRA's alpha (Hu et al. 2021): the update is scaled by alpha / rank, so a rank change keeps the
# size of the first steps. 2 x the default rank 8, as in the experiment that measured it.
LORA_ALPHA = 16.0


def resolve_method(name: str) -> MethodName:
    try:
        return METHOD_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHOD_ALIASES)}") from None


@dataclass(frozen=True)
class ExportedPrompt:
    """Plain detached float32 CPU tensors and conventions: what an artifact is built from."""

    method: MethodName
    prefix: torch.Tensor | None  # [layers, 2, heads, P, head_dim]
    prompt: torch.Tensor | None  # [K, hidden]
    head_weight: torch.Tensor  # [C, hidden]
    head_bias: torch.Tensor  # [C]
    pooling: Pooling
    pooler: Literal["none", "backbone"]
    verbalizer: VerbalizerSpec | None = None
    scales: torch.Tensor | None = None  # [layers, 2 * kv_dim + ffn]: (IA)^3 multipliers
    # target -> (down [layers, in, r], up [layers, r, out]), alpha / r already in ``up``
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def parameter_count(self) -> int:
        tensors = [self.prefix, self.prompt, self.head_weight, self.head_bias, self.scales]
        tensors += [t for pair in (self.lora or {}).values() for t in pair]
        return sum(t.numel() for t in tensors if t is not None)


@dataclass(frozen=True)
class LabelWords:
    """A verbalizer on a backbone: each label's words, their ids, and what the head is built from."""

    words: list[list[str]]  # per label
    token_ids: list[list[int]]  # per label, one vocabulary id per word
    head_weight: torch.Tensor  # [C, hidden]: each label's mean masked-LM decoder row
    head_bias: torch.Tensor  # [C]
    mask_embedding: torch.Tensor  # [hidden]: the [MASK] token's word embedding
    mlm_fingerprint: str

    def spec(self, mask_position: int) -> VerbalizerSpec:
        return VerbalizerSpec(
            words=self.words,
            token_ids=self.token_ids,
            mask_position=mask_position,
            mlm_fingerprint=self.mlm_fingerprint,
        )


def _masked_lm(backbone: Backbone) -> tuple[MaskedLMHead, int]:
    mlm = backbone.mlm
    if mlm is None:
        raise InvalidInputError(
            f"the verbalizer head needs a backbone with a masked-LM head (e.g. a BertForMaskedLM "
            f"checkpoint); {backbone.path} has none"
        )
    mask_id = backbone.tokenizer.mask_token_id
    if mask_id is None:
        raise InvalidInputError(f"the tokenizer of {backbone.path} has no [MASK] token")
    return mlm, int(mask_id)


def check_label_words(
    backbone: Backbone, labels: list[str] | None, words: dict[str, list[str]] | None
) -> None:
    """Refuse now what :func:`label_words` would refuse when training starts (a training job is
    checked when it is submitted, not minutes later on a worker). ``labels`` None: the data is read
    later, so only the backbone and the words given are checked."""
    named = labels if labels is not None else sorted(words or {})
    if named:
        label_words(backbone, named, words)
    else:  # no labels and no words yet: the backbone alone
        _masked_lm(backbone)


def label_words(backbone: Backbone, labels: list[str], words: dict[str, list[str]] | None) -> LabelWords:
    """The verbalizer for ``labels``: ``words[label]`` (default: the label itself), each word one token.

    Raises InvalidInputError on a backbone without a masked-LM head, a label without words, or a word
    the vocabulary splits into several pieces (one [MASK] predicts one token).
    """
    mlm, mask_id = _masked_lm(backbone)
    chosen = words or {}
    unknown = sorted(set(chosen) - set(labels))
    if unknown:
        raise InvalidInputError(f"label words given for labels the data does not have: {unknown[:10]}")
    all_words: list[list[str]] = []
    all_ids: list[list[int]] = []
    for label in labels:
        spelled = [w.strip() for w in chosen.get(label, [label]) if w.strip()]
        if not spelled:
            raise InvalidInputError(f"label {label!r} has no label words")
        ids: list[int] = []
        for word in spelled:
            pieces = backbone.token_ids(word, special=False)
            if len(pieces) != 1 or pieces[0] == backbone.tokenizer.unk_token_id:
                shown = backbone.tokenizer.convert_ids_to_tokens(pieces)
                raise InvalidInputError(
                    f"label word {word!r} (label {label!r}) is not one token of the vocabulary (it is "
                    f"{shown}); a [MASK] predicts one token: choose another word with --label-words"
                )
            ids.append(pieces[0])
        all_words.append(spelled)
        all_ids.append(ids)
    weight, bias = mlm.label_rows(all_ids)
    with torch.no_grad():
        mask = backbone.word_embeddings.weight[mask_id].detach().float().clone()
    return LabelWords(all_words, all_ids, weight, bias, mask, mlm.fingerprint)


class PromptMethod(nn.Module):
    """Base: a linear head on the pooled position; subclasses add a prefix or an input prompt.

    With ``verbalizer`` (head "verbalizer", input-prompt methods only) the input prompt ends with the
    frozen [MASK] embedding and the head is frozen to the label words' masked-LM decoder rows: only
    the prompt is trained, as in P-tuning with label words.
    """

    method: MethodName = "linear-probe"
    artifact_method: Method = "linear-probe"

    def __init__(
        self,
        spec: BackboneSpec,
        num_labels: int,
        *,
        head: HeadStyle = "cls",
        verbalizer: LabelWords | None = None,
    ) -> None:
        super().__init__()
        if (head == "verbalizer") != (verbalizer is not None):
            raise ValueError("head 'verbalizer' needs label words, and label words need head 'verbalizer'")
        if head == "peft":
            if spec.family not in PEFT_HEAD_FAMILIES:
                raise ValueError(
                    f"head 'peft' is for BERT-layout and decoder backbones; PEFT's classifier on a "
                    f"{spec.family} backbone is not one linear layer"
                )
            if spec.family == "bert" and not spec.has_pooler:
                raise ValueError("head 'peft' needs the backbone's pooler, and this backbone has none")
        self.spec = spec
        self.head_style: HeadStyle = head
        self.head = nn.Linear(spec.hidden_size, num_labels)  # weight [C, hidden], bias [C]
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if head == "peft" and spec.family == "decoder":
            self.head.bias.requires_grad_(False)  # the score layer PEFT exports to has no bias
        self.verbalizer = verbalizer
        if verbalizer is not None:
            with torch.no_grad():
                self.head.weight.copy_(verbalizer.head_weight)
                self.head.bias.copy_(verbalizer.head_bias)
            self.head.requires_grad_(False)
            self.register_buffer("mask_embedding", verbalizer.mask_embedding.clone())  # [hidden]
        self.scale_delta: nn.Parameter | None = None
        self.lora_down: nn.ParameterDict | None = None
        self.lora_up: nn.ParameterDict | None = None

    def add_lora(self, rank: int, generator: torch.Generator) -> None:
        """Train LoRA of ``rank`` on every projection the family adapts (its ``lora_targets``) beside
        the prompt. ``up`` starts at zero (the backbone unchanged), ``down`` at random (LoRA's start);
        the update is ``x @ down @ up * LORA_ALPHA / rank``."""
        s = self.spec
        family = family_by_name(s.family)
        assert family is not None
        device = self.head.weight.device
        self.lora_down, self.lora_up = nn.ParameterDict(), nn.ParameterDict()
        for name, (width_in, width_out) in family.lora_targets(s.shape()).items():
            down = torch.randn(s.num_layers, width_in, rank, generator=generator) / width_in**0.5
            self.lora_down[name] = nn.Parameter(down.to(device))  # [layers, in, r]
            self.lora_up[name] = nn.Parameter(torch.zeros(s.num_layers, rank, width_out, device=device))

    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The LoRA matrices as a forward reads them: alpha / rank folded into ``up``."""
        if self.lora_down is None or self.lora_up is None:
            return None
        return {
            name: (down, self.lora_up[name] * (LORA_ALPHA / down.shape[-1]))
            for name, down in self.lora_down.items()
        }

    def lora_parameters(self) -> list[nn.Parameter]:
        if self.lora_down is None or self.lora_up is None:
            return []
        return [*self.lora_down.values(), *self.lora_up.values()]

    def add_scales(self) -> None:
        """Train (IA)^3 multipliers beside the prompt: every layer's keys, values and FFN activation
        times ``1 + delta``. Delta starts at 0 (the backbone unchanged), so weight decay pulls the
        multipliers back towards 1, not towards 0 as it would a multiplier trained directly."""
        s = self.spec
        self.scale_delta = nn.Parameter(
            torch.zeros(s.num_layers, s.scales_width, device=self.head.weight.device)
        )  # [layers, 2 * kv_dim + ffn]

    def scales(self) -> torch.Tensor | None:
        """The multipliers, as the artifact stores them."""
        return None if self.scale_delta is None else 1 + self.scale_delta

    @property
    def pooling(self) -> Pooling:
        if self.head_style == "verbalizer":
            return "mask"
        if self.head_style == "peft":
            return "last" if self.spec.family == "decoder" else "first"
        return self.head_style

    @property
    def pooler(self) -> Literal["none", "backbone"]:
        return "backbone" if self.head_style == "peft" and self.spec.family == "bert" else "none"

    def prefix(self) -> torch.Tensor | None:
        return None

    def prompt(self) -> torch.Tensor | None:
        return None

    def mask_position(self) -> int:
        """Where the [MASK] sits in the input prompt: its last row (the text follows it)."""
        return self.lengths()[1] - 1 if self.verbalizer is not None else 0

    def _with_mask(self, prompt: torch.Tensor) -> torch.Tensor:
        """``prompt`` [K, hidden], then the [MASK] embedding when there is a verbalizer: [K + 1, hidden]."""
        if self.verbalizer is None:
            return prompt
        mask = self.mask_embedding
        assert isinstance(mask, torch.Tensor)
        return torch.cat([prompt, mask.to(prompt.dtype).unsqueeze(0)])

    def task_prompt(self) -> TaskPrompt:
        """The task as ``prompted_forward`` takes it, built from the current parameters (differentiable)."""
        return TaskPrompt(
            prefix=self.prefix(),
            prompt=self.prompt(),
            head_weight=self.head.weight,
            head_bias=self.head.bias,
            pooling=self.pooling,
            use_pooler=self.pooler == "backbone",
            positions_after_prefix=True,
            mask_position=self.mask_position(),
            scale_delta=self.scale_delta,
            lora=self.lora(),
        )

    def lengths(self) -> tuple[int, int]:
        """(prefix length, input-prompt length) this method produces."""
        return 0, 0

    def prompt_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def trainable_parameter_count(self) -> int:
        """Everything the optimiser updates, the training-only reparameterisation included."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def export(self) -> ExportedPrompt:
        """Evaluate the parametrisation once (eval mode: no dropout) and keep only its outputs."""
        was_training = self.training
        self.eval()
        try:
            prefix, prompt, lora = self.prefix(), self.prompt(), self.lora()
        finally:
            self.train(was_training)

        def plain(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else _plain(x)

        weight, bias = plain(self.head.weight), plain(self.head.bias)
        assert weight is not None and bias is not None
        return ExportedPrompt(
            method=self.method,
            prefix=plain(prefix),
            prompt=plain(prompt),
            head_weight=weight,
            head_bias=bias,
            pooling=self.pooling,
            pooler=self.pooler,
            verbalizer=None if self.verbalizer is None else self.verbalizer.spec(self.mask_position()),
            scales=plain(self.scales()),
            lora=None if lora is None else {n: (_plain(d), _plain(u)) for n, (d, u) in lora.items()},
        )


class LinearProbe(PromptMethod):
    """The frozen backbone's pooled vector into a trained linear head: the baseline every prompt must beat."""

    method: MethodName = "linear-probe"
    artifact_method: Method = "linear-probe"


class DeepPrefix(PromptMethod):
    """P-tuning v2: trainable keys/values prepended at every layer.

    Without reparameterisation the prefix is one parameter ``[layers, 2, kv_heads, P, head_dim]``. With
    it, ``P`` embeddings ``[P, hidden]`` pass through Linear -> tanh -> Linear to ``[P, layers * 2 *
    kv_heads * head_dim]``, read in PEFT's order ``[P, layers, 2, kv_heads, head_dim]``; the MLP is
    dropped at export.
    """

    method: MethodName = "p-tuning-v2"
    artifact_method: Method = "p-tuning-v2"

    def __init__(
        self,
        spec: BackboneSpec,
        num_labels: int,
        *,
        length: int = 16,
        reparam: bool = False,
        reparam_hidden: int = 512,
        dropout: float = 0.1,
        init: torch.Tensor | None = None,
        head: HeadStyle = "cls",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(spec, num_labels, head=head)
        if length < 1:
            raise ValueError(f"prefix length must be at least 1, got {length}")
        self.length = length
        self.reparam = reparam
        shape = (spec.num_layers, 2, spec.num_kv_heads, length, spec.head_dim)
        width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        if init is not None and tuple(init.shape) != shape:
            raise ValueError(f"prefix init has shape {list(init.shape)}; expected {list(shape)}")
        self.table: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if reparam:
            # [P, hidden] -> [P, reparam_hidden] -> [P, layers * 2 * kv_heads * head_dim]
            self.embedding = nn.Parameter(torch.randn(length, spec.hidden_size, generator=generator) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(spec.hidden_size, reparam_hidden),
                nn.Tanh(),
                nn.Linear(reparam_hidden, width),
            )
            if init is not None:
                # Start the MLP's output at the given prefix: its last bias carries it, the weights
                # start small so the embeddings still steer it.
                last = self.mlp[2]
                assert isinstance(last, nn.Linear)
                with torch.no_grad():
                    flat = init.permute(3, 0, 1, 2, 4).reshape(length, -1)  # [P, width]
                    last.weight.mul_(0.1)
                    # One bias for all P rows: the mean row; the embeddings differentiate positions.
                    last.bias.copy_(flat.mean(0))
        else:
            start = init if init is not None else torch.randn(shape, generator=generator) * 0.5
            self.table = nn.Parameter(start.clone().float())  # [layers, 2, kv_heads, P, head_dim]
        self.dropout = nn.Dropout(dropout)

    def lengths(self) -> tuple[int, int]:
        return self.length, 0

    def prefix(self) -> torch.Tensor:
        if self.table is not None:
            prefix = self.table
        else:
            assert self.mlp is not None and self.embedding is not None
            s = self.spec
            flat = self.mlp(self.embedding)  # [P, layers * 2 * kv_heads * head_dim]
            prefix = flat.view(self.length, s.num_layers, 2, s.num_kv_heads, s.head_dim).permute(
                1, 2, 3, 0, 4
            )
        dropped: torch.Tensor = self.dropout(prefix)  # [layers, 2, kv_heads, P, head_dim]
        return dropped


class SoftPrompt(PromptMethod):
    """Prompt tuning: ``K`` free embeddings ``[K, hidden]`` placed before the text."""

    method: MethodName = "prompt-tuning"
    artifact_method: Method = "prompt-tuning"

    def __init__(
        self,
        spec: BackboneSpec,
        num_labels: int,
        *,
        init: torch.Tensor,
        head: HeadStyle = "cls",
        verbalizer: LabelWords | None = None,
    ) -> None:
        super().__init__(spec, num_labels, head=head, verbalizer=verbalizer)
        if init.dim() != 2 or init.shape[1] != spec.hidden_size or init.shape[0] < 1:
            raise ValueError(f"prompt init must be [K >= 1, {spec.hidden_size}], got {list(init.shape)}")
        self.embedding = nn.Parameter(init.detach().clone().float())  # [K, hidden]

    def lengths(self) -> tuple[int, int]:
        return 0, int(self.embedding.shape[0]) + (self.verbalizer is not None)

    def prompt(self) -> torch.Tensor:
        return self._with_mask(self.embedding)


class PTuningEncoder(PromptMethod):
    """P-tuning: virtual-token embeddings from a prompt encoder (bi-LSTM then a two-layer MLP).

    The encoder ties the virtual tokens together while training; at export only its output
    ``[K, hidden]`` is kept as the artifact's input prompt.
    """

    method: MethodName = "p-tuning"
    artifact_method: Method = "p-tuning"

    def __init__(
        self,
        spec: BackboneSpec,
        num_labels: int,
        *,
        init: torch.Tensor,
        lstm_layers: int = 2,
        dropout: float = 0.0,
        head: HeadStyle = "cls",
        verbalizer: LabelWords | None = None,
    ) -> None:
        super().__init__(spec, num_labels, head=head, verbalizer=verbalizer)
        hidden = spec.hidden_size
        if init.dim() != 2 or init.shape[1] != hidden or init.shape[0] < 1:
            raise ValueError(f"prompt init must be [K >= 1, {hidden}], got {list(init.shape)}")
        self.embedding = nn.Parameter(init.detach().clone().float())  # [K, hidden]
        half = max(1, hidden // 2)
        # Both directions concatenated: [1, K, 2 * half].
        self.lstm = nn.LSTM(
            input_size=hidden,
            hidden_size=half,
            num_layers=lstm_layers,
            bidirectional=True,
            batch_first=True,
            dropout=dropout if lstm_layers > 1 else 0.0,
        )
        self.mlp = nn.Sequential(nn.Linear(2 * half, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def lengths(self) -> tuple[int, int]:
        return 0, int(self.embedding.shape[0]) + (self.verbalizer is not None)

    def prompt(self) -> torch.Tensor:
        encoded, _ = self.lstm(self.embedding.unsqueeze(0))  # [1, K, 2 * half]
        # A residual to the embeddings: starting from real token embeddings, the encoder learns a
        # correction instead of having to reproduce the embedding scale from scratch.
        prompt: torch.Tensor = self.embedding + self.mlp(encoded[0])  # [K, hidden]
        return self._with_mask(prompt)  # [K (+ 1 [MASK]), hidden]


# ------------------------------------------------------------------------------------- initialisers

_WORD = re.compile(r"[a-z]{3,}")


def _word_token_ids(backbone: Backbone) -> list[int]:
    """Ids of whole-word, alphabetic, non-special vocabulary entries (WordPiece or BPE spellings)."""
    tokenizer = backbone.tokenizer
    special = backbone.special_ids
    ids: list[int] = []
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or token.startswith("##") or token.startswith("[") or token.startswith("<"):
            continue
        word = token.lstrip("Ġ▁").lower()
        if _WORD.fullmatch(word):
            ids.append(int(idx))
    ids.sort()
    return ids


def vocabulary_sample(backbone: Backbone, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` embeddings ``[count, hidden]`` of random whole-word vocabulary tokens."""
    candidates = _word_token_ids(backbone)
    if not candidates:
        special = backbone.special_ids
        candidates = [i for i in range(backbone.word_embeddings.num_embeddings) if i not in special]
    # Low ids are the frequent words in WordPiece vocabularies ordered by frequency; Lester et al.
    # sample from the 5,000 most common tokens.
    pool = torch.tensor(candidates[:5000])
    picks = pool[torch.randint(len(pool), (count,), generator=generator)]
    with torch.no_grad():
        return backbone.word_embeddings.weight[picks.to(backbone.device)].detach().float().cpu()


def label_word_embeddings(backbone: Backbone, labels: list[str]) -> torch.Tensor | None:
    """One embedding per label ``[C, hidden]``: the mean of its word pieces, or None if any label has
    no real-word pieces (e.g. opaque codes such as "LABEL_3" or digits)."""
    tokenizer = backbone.tokenizer
    special = backbone.special_ids
    unk = tokenizer.unk_token_id
    rows: list[torch.Tensor] = []
    for label in labels:
        words = re.sub(r"[_\-/.:]+", " ", label).strip()
        ids = [i for i in tokenizer(words, add_special_tokens=False)["input_ids"] if i not in special]
        if not ids or unk in ids or not re.search(r"[A-Za-z]{3,}", words):
            return None
        with torch.no_grad():
            vectors = backbone.word_embeddings.weight[torch.tensor(ids, device=backbone.device)]
        rows.append(vectors.float().mean(0).cpu())
    return torch.stack(rows)  # [C, hidden]


@torch.no_grad()
def prefix_from_tokens(backbone: Backbone, length: int, generator: torch.Generator) -> torch.Tensor:
    """A deep prefix ``[layers, 2, kv_heads, P, head_dim]`` made of the keys/values the frozen backbone
    computes for ``P`` random vocabulary words (framed by the tokenizer's own special tokens), as its
    family's attention uses them: the right scale at every layer from step one."""
    candidates = torch.tensor(_word_token_ids(backbone)[:5000] or [backbone.pad_token_id])
    words = candidates[torch.randint(len(candidates), (length,), generator=generator)].tolist()
    ids = [*backbone.opening_ids, *words, *backbone.closing_ids]
    start = len(backbone.opening_ids)
    family = backbone.family
    device = backbone.device
    embeds = family.word_embeddings(torch.tensor([ids], device=device))  # [1, S, hidden]
    zero = torch.zeros(1, dtype=torch.long, device=device)
    layout = Layout(prefix=0, seq=len(ids), prefix_len=zero, seq_len=zero + len(ids))
    collected: Collected = []
    family.layers(
        embeds,
        family.positions(zero, len(ids)),
        family.masks(layout, backbone.dtype),
        None,
        collect=collected,
    )
    keys_values = [
        torch.stack([key[0, :, start : start + length], value[0, :, start : start + length]]).float()
        for key, value in collected
    ]  # per layer [2, kv_heads, P, head_dim]
    return torch.stack(keys_values).cpu()  # [layers, 2, kv_heads, P, head_dim]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy: what an artifact is built from."""
    return x.detach().to("cpu", torch.float32).clone().contiguous()
