"""Mixed batches of prompted rows and ptserve's hidden states for them, for the backbone tests.

Provides the texts (``TEXTS``, ``text_ids``), tasks from random artifacts (``make_task``, and
``mixed_tasks``: one task per text, prefix lengths 0 to 5, input prompts, a ``from_zero`` row), random
values in padded prefix slots (``noisy_padding``), ptserve's final hidden states read from inside
``run_prompted`` (``ptserve_hidden``), the row-by-row reference run through Hugging Face's model once a
test module has patched its attention to read ``RowPrefix.prefix`` (``reference_rows``), and the
checks on them: every position of every row against the reference (``assert_rows_equal_reference``),
the largest error over chosen rows (``max_error``, ``prefixed_and_plain_errors``), and a fully masked
prefix against none (``assert_fully_masked_prefix_is_no_prefix``). The family-specific parts (the
patched attention and the rules it applies) stay in each test module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prompts.backbone import Backbone
from prompts.backbones import Layout, LowRank
from prompts.forward import PromptBatch, TaskPrompt, batch_from_tasks, prompted_forward, run_prompted
from tests.factories import random_artifact

# 6, 21, 3, 9, 10 and 8 tokens with [CLS]/[SEP] on the tiny encoders: rows longer and shorter than
# the prefixes of ``mixed_tasks``.
TEXTS = [
    "this phone is great",
    "the delivery was slow but the quality of the shirt is fine and the price was cheap",
    "a",
    "terrible battery and the screen is broken",
    "what time is the game",
    "free offer call now hello world",
]
ATOL = 1e-5


def make_task(backbone: Backbone, **kwargs: Any) -> TaskPrompt:
    """The task prompt of ``random_artifact(backbone.spec, **kwargs)`` on the backbone's device."""
    artifact = random_artifact(backbone.spec, **kwargs)
    return TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)


def text_ids(backbone: Backbone, texts: Sequence[str] = TEXTS) -> list[list[int]]:
    """The token ids of ``texts``, special tokens included."""
    return [e.input_ids for e in backbone.encode(list(texts), 40)]


def mixed_tasks(backbone: Backbone) -> list[TaskPrompt]:
    """One task per text: prefix lengths 0 to 5 (the longest), input prompts, a from_zero row."""
    return [
        make_task(backbone, task="none", prefix_length=0, seed=1),
        make_task(backbone, task="short", prefix_length=2, seed=2),
        make_task(backbone, task="longest", prefix_length=5, seed=3),
        make_task(backbone, task="both", prefix_length=3, prompt_length=2, seed=4),
        make_task(backbone, task="prompt", prefix_length=0, prompt_length=3, seed=5),
        make_task(backbone, task="zero", prefix_length=4, positions="from_zero", seed=6),
    ]


def noisy_padding(batch: PromptBatch, seed: int) -> PromptBatch:
    """The batch with random values in every padded prefix slot: masking, not zeros, must hide them."""
    if batch.prefix is None:
        return batch
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.prefix.shape, generator=g).to(batch.prefix)  # [B, layers, 2, heads, P, d]
    slot = torch.arange(batch.prefix.shape[4], device=batch.prefix.device)
    real = (slot < batch.prefix_len[:, None]).view(-1, 1, 1, 1, slot.shape[0], 1)  # [B, 1, 1, 1, P, 1]
    return dataclasses.replace(batch, prefix=torch.where(real, batch.prefix, noise))


def ptserve_hidden(
    backbone: Backbone, ids: Sequence[Sequence[int]], tasks: Sequence[TaskPrompt]
) -> torch.Tensor:
    """ptserve's final hidden states [B, S, hidden] for a mixed batch, read from inside run_prompted so
    the prompt gathering, positions and layout are ptserve's own. Row b holds its input prompt (K_b)
    then its text (T_b) from position 0; padded prefix slots hold random values (``noisy_padding``)."""
    family = backbone.family
    captured: list[torch.Tensor] = []

    def encoder(
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: Layout,
        prefix: torch.Tensor | None,
        scales: torch.Tensor | None = None,
        lora: LowRank | None = None,
    ) -> torch.Tensor:
        hidden = family.layers(
            embeds, positions, family.masks(layout, embeds.dtype), prefix, scales, lora=lora
        )
        captured.append(hidden)
        return hidden

    batch = noisy_padding(batch_from_tasks(tasks, backbone.device), seed=99)
    run_prompted(backbone, ids, batch, encoder)
    return captured[0]


class RowPrefix:
    """The prefix [layers, 2, heads, P, head_dim] of the row the reference is running (None: none)."""

    prefix: torch.Tensor | None = None


def reference_rows(
    backbone: Backbone, ids: Sequence[Sequence[int]], tasks: Sequence[TaskPrompt], row: RowPrefix
) -> list[torch.Tensor]:
    """Row by row, unpadded, through ``backbone.model`` itself, whose attention the caller has patched
    to read ``row.prefix`` (set here to each row's prefix): [K_b + T_b, hidden] per row, the input prompt
    then the text, numbered after the prefix unless the task counts from zero."""
    out: list[torch.Tensor] = []
    for text, task in zip(ids, tasks, strict=True):
        row.prefix = task.prefix
        tokens = backbone.word_embeddings(torch.tensor([text]))  # [1, T, hidden]
        embeds = tokens if task.prompt is None else torch.cat([task.prompt[None], tokens], dim=1)
        length = embeds.shape[1]  # K + T
        offset = task.prefix_length if task.positions_after_prefix else 0
        hidden = backbone.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, length, dtype=torch.long),
            position_ids=offset + torch.arange(length)[None],  # [1, K + T]
        ).last_hidden_state
        out.append(hidden[0])
    return out


def assert_rows_equal_reference(
    ours: torch.Tensor,
    reference: list[torch.Tensor],
    ids: Sequence[Sequence[int]],
    tasks: Sequence[TaskPrompt],
) -> None:
    """Every position of every row: its input prompt (K_b) and its text (T_b), within ATOL."""
    for b, (text, task) in enumerate(zip(ids, tasks, strict=True)):
        assert reference[b].shape[0] == task.prompt_length + len(text)
        torch.testing.assert_close(ours[b, : reference[b].shape[0]], reference[b], atol=ATOL, rtol=0)


def max_error(ours: torch.Tensor, reference: list[torch.Tensor], rows: Sequence[int]) -> float:
    """The largest absolute difference between ``ours[b]`` and ``reference[b]`` over ``rows``."""
    return max(float((ours[b, : len(reference[b])] - reference[b]).abs().max()) for b in rows)


def prefixed_and_plain_errors(
    ours: torch.Tensor, reference: list[torch.Tensor], tasks: Sequence[TaskPrompt]
) -> tuple[float, float]:
    """``max_error`` over the rows whose task has a prefix, then over the rows whose task has none."""
    with_prefix = [b for b, task in enumerate(tasks) if task.prefix_length]
    without = [b for b, task in enumerate(tasks) if not task.prefix_length]
    return max_error(ours, reference, with_prefix), max_error(ours, reference, without)


def assert_fully_masked_prefix_is_no_prefix(backbone: Backbone) -> None:
    """A row with no prefix gives the same hidden states in a batch whose other row has a 5-slot prefix
    (its own 5 slots then hold random values, masked) as in a batch with no prefix at all."""
    ids = text_ids(backbone)[:2]
    plain = make_task(backbone, task="plain", prefix_length=0, prompt_length=2, seed=7)
    longest = make_task(backbone, task="longest", prefix_length=5, seed=8)
    other = make_task(backbone, task="other", prefix_length=0, seed=9)

    with_prefix = ptserve_hidden(backbone, ids, [plain, longest])
    without = ptserve_hidden(backbone, ids, [plain, other])
    rows = plain.prompt_length + len(ids[0])
    torch.testing.assert_close(with_prefix[0, :rows], without[0, :rows], atol=1e-6, rtol=0)


def assert_hooked_model_agrees(
    backbone: Backbone,
    task: TaskPrompt,
    hooks: Callable[[], list[Any]],
    texts: Sequence[str],
    *,
    atol: float = 1e-5,
) -> None:
    """``task`` (an identity head: its logits are its pooled vector, "cls" or, on decoders, "last")
    gives what Hugging Face's own model gives with ``hooks()`` installed, for every one of ``texts``; and
    not what the model gives without them (a loop that ignored the task's tensors would agree only by
    chance)."""
    last = task.pooling == "last"
    for row in text_ids(backbone, texts):
        ours = prompted_forward(backbone, [row], [task])[0]  # [hidden]
        handles = hooks()
        try:
            theirs = backbone.model(input_ids=torch.tensor([row])).last_hidden_state[0]  # [S, hidden]
        finally:
            for handle in handles:
                handle.remove()
        plain = backbone.model(input_ids=torch.tensor([row])).last_hidden_state[0]
        torch.testing.assert_close(ours, theirs[-1] if last else theirs[0], rtol=0, atol=atol)
        assert (ours - (plain[-1] if last else plain[0])).abs().max() > 1e-3


def remember_attention_inputs(backbone: Backbone) -> tuple[dict[int, torch.Tensor], list[Any]]:
    """DeBERTa projects its relative-position embeddings with the same query/key projections as the
    content: hooks tell the content calls apart by identity with the attention module's own input,
    which these pre-hooks record per layer (empty for other families). Returns the record and handles."""
    seen: dict[int, torch.Tensor] = {}
    handles: list[Any] = []
    if backbone.spec.family != "deberta-v2":
        return seen, handles

    def remember(index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            seen[index] = kwargs.get("hidden_states", args[0] if args else None)

        return hook

    for index, layer in enumerate(backbone.model.encoder.layer):
        handles.append(layer.attention.self.register_forward_pre_hook(remember(index), with_kwargs=True))
    return seen, handles


def assert_mixed_equals_alone(
    backbone: Backbone, tasks: Sequence[TaskPrompt], texts: Sequence[str]
) -> list[list[int]]:
    """Eight rows cycling through ``tasks`` and ``texts`` in one batch: each row's logits are what its
    task gives its text alone. Returns the rows' token ids."""
    ids = text_ids(backbone, texts)
    rows = [tasks[i % len(tasks)] for i in range(8)]
    row_ids = [ids[(i * 3) % len(ids)] for i in range(8)]
    mixed = prompted_forward(backbone, row_ids, rows)
    for r, (task, text) in enumerate(zip(rows, row_ids, strict=True)):
        alone = prompted_forward(backbone, [text], [task])[0]
        c = task.num_labels
        torch.testing.assert_close(mixed[r, :c], alone[:c], rtol=0, atol=1e-5)
    return row_ids
