"""Tiny random encoders with real tokenizers, written to disk like any Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel

_WORDS_TEXT = """
the a an is are was of to and in on for with this that it my your great bad good terrible love hate
phone laptop shirt shoe book movie food music price cheap expensive fast slow battery screen size
color red blue quality delivery refund broken works fine okay what where when who why how question
answer sport game team win lose market stock money hello world test text label class spam free offer
call now
"""
WORDS = tuple(_WORDS_TEXT.split())


def write_vocab(path: Path) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = [*specials, *letters, *pieces, *WORDS]
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def make_tiny_bert(
    directory: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    max_positions: int = 64,
    seed: int = 0,
) -> Path:
    """A random BERT with a WordPiece tokenizer, saved to ``directory``; deterministic per seed."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory / "vocab.txt")), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_roberta(directory: Path, *, seed: int = 0) -> Path:
    """A random RoBERTa-architecture encoder (position ids offset by padding_idx + 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory / "vocab.txt")), do_lower_case=True)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)
    RobertaModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
