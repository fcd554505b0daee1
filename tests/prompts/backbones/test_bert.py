"""BERT layout (BERT, RoBERTa) against Hugging Face's own forward.

Hugging Face's BERT-family models take a cache: a row whose prefix is that cache numbers its text from
the cache length (RoBERTa from padding_idx + 1 + the cache length) and attends to every cache slot.
ptserve's loop must give every row of one mixed batch, whatever its prefix length, what Hugging Face
gives that row alone, and the gradients the trainer follows must be Hugging Face's too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from prompts.backbone import Backbone
from prompts.backbones import Layout
from tests.peft_support import cache_kwargs, prefix_cache

TEXTS = [
    "this phone is great",
    "terrible battery and the screen is broken",
    "a",
    "the delivery was slow but the quality of the shirt is fine",
]
PREFIX_LENGTHS = [4, 0, 7, 2]


def _loop(
    backbone: Backbone, ids: list[list[int]], prefix: torch.Tensor, lengths: list[int], offsets: list[int]
) -> torch.Tensor:
    family = backbone.family
    width = max(map(len, ids))
    x = torch.tensor([row + [backbone.pad_token_id] * (width - len(row)) for row in ids])  # [B, S]
    layout = Layout(
        prefix=prefix.shape[4],
        seq=width,
        prefix_len=torch.tensor(lengths),
        seq_len=torch.tensor([len(row) for row in ids]),
    )
    positions = family.positions(torch.tensor(offsets), width)
    return family.layers(family.word_embeddings(x), positions, family.masks(layout, torch.float32), prefix)


def _reference(backbone: Backbone, row: list[int], prefix: torch.Tensor | None) -> torch.Tensor:
    plen = 0 if prefix is None else prefix.shape[4]
    extra = {} if prefix is None else cache_kwargs(backbone.model, prefix_cache(prefix))
    mask = torch.ones(1, plen + len(row), dtype=torch.long)
    hidden: torch.Tensor = backbone.model(
        input_ids=torch.tensor([row]), attention_mask=mask, **extra
    ).last_hidden_state
    return hidden[0]  # [T, hidden]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_rows_with_different_prefixes_equal_hugging_face_with_the_prefix_as_cache(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    s = backbone.spec
    ids = [e.input_ids for e in backbone.encode(TEXTS, 40)]
    gen = torch.Generator().manual_seed(0)
    shape = (len(ids), s.num_layers, 2, s.num_kv_heads, max(PREFIX_LENGTHS), s.head_dim)
    prefix = torch.randn(shape, generator=gen)  # [B, layers, 2, heads, P, head_dim]
    with torch.inference_mode():
        ours = _loop(backbone, ids, prefix, PREFIX_LENGTHS, PREFIX_LENGTHS)
        from_zero = _loop(backbone, ids, prefix, PREFIX_LENGTHS, [0] * len(ids))
        for b, (row, plen) in enumerate(zip(ids, PREFIX_LENGTHS, strict=True)):
            ref = _reference(backbone, row, prefix[b : b + 1, ..., :plen, :] if plen else None)
            torch.testing.assert_close(ours[b, : len(row)], ref, rtol=0, atol=1e-5)
            if plen:  # a wrong position offset is caught
                assert (from_zero[b, : len(row)] - ref).abs().max() > 1e-3

    # The trainer backpropagates through the same loop: prefix gradients agree with Hugging Face's.
    trained = prefix[:1, ..., :4, :].clone().requires_grad_(True)
    padded = torch.cat([trained, trained.new_zeros(1, *shape[1:4], 3, shape[5])], 4)  # 3 masked slots more
    # A fixed random readout: a plain sum of LayerNorm outputs is constant and has no gradient.
    readout = torch.randn(len(ids[0]), s.hidden_size, generator=gen)  # [T, hidden]
    (_loop(backbone, ids[:1], padded, [4], [4])[0, : len(ids[0])] * readout).sum().backward()
    theirs = prefix[:1, ..., :4, :].clone().requires_grad_(True)
    (_reference(backbone, ids[0], theirs) * readout).sum().backward()
    assert trained.grad is not None and theirs.grad is not None and trained.grad.abs().sum() > 0
    torch.testing.assert_close(trained.grad, theirs.grad, rtol=0, atol=1e-5)
