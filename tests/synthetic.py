"""A synthetic, separable classification task for the tiny test models: the label is decided by which
keyword a text holds, among filler words all labels share."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from prompts.data import Example, TaskData

KEYWORDS: dict[str, tuple[str, ...]] = {
    "phone": ("phone", "battery", "screen"),
    "shirt": ("shirt", "color", "size"),
    "book": ("book", "movie", "music"),
}
FILLER = [
    "the",
    "a",
    "is",
    "great",
    "bad",
    "good",
    "this",
    "that",
    "it",
    "my",
    "love",
    "hate",
    "fine",
    "okay",
    "price",
    "cheap",
    "fast",
    "slow",
    "quality",
]


def make_examples(count: int, seed: int, labels: tuple[str, ...] = tuple(KEYWORDS)) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = labels[i % len(labels)]
        # Two keywords of the label among a few shared filler words: enough signal for a random model.
        words = rng.sample(FILLER, rng.randint(0, 3)) + rng.choices(KEYWORDS[label], k=2)
        rng.shuffle(words)
        out.append(Example(" ".join(words), label))
    rng.shuffle(out)
    return out


def make_task_data(train: int = 48, dev: int = 24, test: int = 24, seed: int = 0) -> TaskData:
    return TaskData(
        labels=sorted(KEYWORDS),
        train=make_examples(train, seed),
        dev=make_examples(dev, seed + 1),
        test=make_examples(test, seed + 2),
        source="synthetic",
    )


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    return path


def write_data_dir(directory: Path, train: int = 48, dev: int = 24, test: int = 24, seed: int = 0) -> Path:
    data = make_task_data(train, dev, test, seed)
    write_jsonl(directory / "train.jsonl", data.train)
    write_jsonl(directory / "dev.jsonl", data.dev)
    write_jsonl(directory / "test.jsonl", data.test)
    return directory


def make_learnable_bert(directory: Path, *, seed: int = 0) -> Path:
    """A tiny random BERT whose [CLS] output depends on its input enough to learn from.

    With BERT's usual initializer_range of 0.02, a 2-layer 32-wide random model attends almost
    uniformly and its [CLS] vector barely changes with the text (spread across texts ~0.003 against
    ~1 across dimensions), so no method can learn anything. Larger random weights fix that.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from tests.models import write_vocab

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory / "vocab.txt")), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    return [{"text": e.text, "label": e.label} for e in make_examples(count, seed)]


def job_request(epochs: int, **overrides: Any) -> dict[str, Any]:
    """A training-job body: a short prefix run on the synthetic keyword task."""
    return {
        "task": "keywords",
        "method": "prefix",
        "hyperparameters": {"epochs": epochs, "patience": epochs, "batch_size": 8, "prefix_length": 4},
        "train": rows(24),
        "dev": rows(12, seed=1),
        "test": rows(12, seed=2),
        **overrides,
    }
