"""Decoders (Llama, Mistral, Qwen2, Qwen3) against Hugging Face's own forward.

Hugging Face runs a row with a prefix when the prefix is its cache: positions continue from the cache
length, every text token sees the whole cache, rotary embeddings and Qwen3's key norm apply to the new
keys only, and sliding windows count cache slots. ptserve's loop must give every row of one mixed
batch, whatever its prefix length, exactly what Hugging Face gives that row alone with its prefix as
the cache. The tiny models have grouped-query attention (4 heads, 2 key/value heads), Qwen3 an explicit
head_dim, and Mistral/Qwen2 sliding windows of 4 tokens, shorter than most texts here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prompts.backbone import Backbone
from prompts.backbones import Layout
from prompts.backbones.decoder import layer_windows
from prompts.forward import TaskPrompt, prompted_forward
from tests.conftest import DECODER_KINDS
from tests.peft_support import cache_kwargs, prefix_cache

TEXTS = [
    "this phone is great",
    "terrible battery and the screen is broken and the delivery was slow",
    "a",
    "what time is the game",
]
PREFIX_LENGTHS = [3, 0, 5, 2]


def _hidden(
    backbone: Backbone,
    ids: list[list[int]],
    prefix: torch.Tensor | None,
    lengths: list[int],
    *,
    offsets: list[int] | None = None,
) -> torch.Tensor:
    """ptserve's loop over one right-padded batch: [B, S, hidden]."""
    family = backbone.family
    width = max(map(len, ids))
    x = torch.tensor([row + [backbone.pad_token_id] * (width - len(row)) for row in ids])  # [B, S]
    prefix_len = torch.tensor(lengths)
    layout = Layout(
        prefix=0 if prefix is None else prefix.shape[4],
        seq=width,
        prefix_len=prefix_len,
        seq_len=torch.tensor([len(row) for row in ids]),
    )
    positions = family.positions(torch.tensor(offsets) if offsets is not None else prefix_len, width)
    return family.layers(family.word_embeddings(x), positions, family.masks(layout, torch.float32), prefix)


def _reference(backbone: Backbone, ids: list[int], prefix: torch.Tensor | None) -> torch.Tensor:
    """Hugging Face's forward of one row, ``prefix`` [1, layers, 2, kv_heads, P, head_dim] as its cache."""
    plen = 0 if prefix is None else prefix.shape[4]
    extra = {} if prefix is None else cache_kwargs(backbone.model, prefix_cache(prefix))
    mask = torch.ones(1, plen + len(ids), dtype=torch.long)
    out = backbone.model(input_ids=torch.tensor([ids]), attention_mask=mask, **extra)
    hidden: torch.Tensor = out.last_hidden_state[0]  # [T, hidden]
    return hidden


@pytest.mark.parametrize("kind", DECODER_KINDS)
@torch.inference_mode()
def test_rows_with_different_prefixes_equal_hugging_face_with_the_prefix_as_cache(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    s = backbone.spec
    assert (s.family, s.num_heads, s.num_kv_heads) == ("decoder", 4, 2)
    ids = [e.input_ids for e in backbone.encode(TEXTS, 60)]
    gen = torch.Generator().manual_seed(0)
    # [B, layers, 2, kv_heads, P, head_dim]; slots past a row's own length hold noise, masked.
    prefix = torch.randn(
        len(ids), s.num_layers, 2, s.num_kv_heads, max(PREFIX_LENGTHS), s.head_dim, generator=gen
    )
    ours = _hidden(backbone, ids, prefix, PREFIX_LENGTHS)
    wrong_offset = _hidden(backbone, ids, prefix, PREFIX_LENGTHS, offsets=[0] * len(ids))
    for b, (row, plen) in enumerate(zip(ids, PREFIX_LENGTHS, strict=True)):
        ref = _reference(backbone, row, prefix[b : b + 1, ..., :plen, :] if plen else None)
        torch.testing.assert_close(ours[b, : len(row)], ref, rtol=0, atol=1e-5)
        if plen:
            # Text positions numbered from 0 instead of after the prefix: the rotated queries meet the
            # unrotated prefix keys at other angles, and the comparison catches it.
            assert (wrong_offset[b, : len(row)] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_windows_are_the_model_classes_own(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    windows = layer_windows(backbone.model.config)
    # Mistral slides every layer; Qwen2 from max_window_layers (1) on.
    assert windows == ([4, 4] if kind == "mistral" else [None, 4])
    # The texts are longer than the window: without it the first tokens would be visible to the last.
    assert max(len(e.input_ids) for e in backbone.encode(TEXTS, 60)) > 8


@pytest.mark.parametrize("kind", DECODER_KINDS)
@torch.inference_mode()
def test_last_token_head_equals_the_sequence_classifier(
    kind: str, kind_dir: Callable[[str], object], kind_backbone: Callable[[str], Backbone]
) -> None:
    """Served rows pool the last real token, as ``*ForSequenceClassification`` does with its ``score``."""
    backbone = kind_backbone(kind)
    s = backbone.spec
    classifier = AutoModelForSequenceClassification.from_pretrained(
        kind_dir(kind), num_labels=3, pad_token_id=backbone.pad_token_id
    ).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        classifier.score.weight.normal_(0, 1.0, generator=gen)
    prefix = torch.randn(s.num_layers, 2, s.num_kv_heads, 3, s.head_dim, generator=gen)  # [L, 2, kv, P, hd]
    task = TaskPrompt(prefix, None, classifier.score.weight.detach().clone(), torch.zeros(3), pooling="last")
    ids = [e.input_ids for e in backbone.encode(TEXTS, 60)]
    ours = prompted_forward(backbone, ids, [task] * len(ids))
    for b, row in enumerate(ids):
        cache = prefix_cache(prefix.unsqueeze(0))
        mask = torch.ones(1, 3 + len(row), dtype=torch.long)
        ref = classifier(
            input_ids=torch.tensor([row]), attention_mask=mask, **cache_kwargs(classifier, cache)
        )
        torch.testing.assert_close(ours[b], ref.logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_tokenizers_without_a_pad_token_still_batch(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    assert backbone.tokenizer.pad_token_id is None  # as in many Llama configs
    assert backbone.pad_token_id == backbone.tokenizer.eos_token_id
    # Llama and Mistral put <s> in front of a text; Qwen nothing. Nothing closes a text.
    bos = backbone.tokenizer.bos_token_id
    assert backbone.opening_ids == ([bos] if kind in ("llama", "mistral") else [])
    assert backbone.closing_ids == []
    cut = backbone.encode([TEXTS[1]], 4)[0]
    assert cut.truncated and cut.input_ids == backbone.encode([TEXTS[1]], 100)[0].input_ids[:4]


def test_a_classifier_checkpoint_loads_as_the_backbone(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A ``*ForSequenceClassification`` directory (weights under ``model.``) is a backbone too."""
    from prompts.backbone import load_backbone
    from tests.models import make_tiny_decoder

    backbone = load_backbone(
        make_tiny_decoder(tmp_path_factory.mktemp("cls") / "llama", "llama", classifier=True)
    )
    assert backbone.spec.family == "decoder" and backbone.spec.num_kv_heads == 2
