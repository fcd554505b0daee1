"""Tiny random backbones of every family with real tokenizers, written to disk like any Hugging Face model
directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    DebertaV2Config,
    DebertaV2Model,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    ModernBertModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    RobertaModel,
)

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


# --- the other families: tiny random models from each family's real config, scaled down ------------

DECODER_SPECIALS = ["<unk>", "<s>", "</s>"]


def write_word_tokenizer(directory: Path, *, bos: bool, pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer like a decoder's: lower-cased words, ``<s>`` in front when ``bos``
    (Llama, Mistral) or nothing (Qwen), and no pad token unless ``pad`` (many Llama configs have none)."""
    vocab = {
        token: i
        for i, token in enumerate(dict.fromkeys([*DECODER_SPECIALS, *WORDS, *"abcdefghijklmnopqrstuvwxyz"]))
    }
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>" if pad else None,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_tiny_decoder(directory: Path, kind: str, *, seed: int = 0, classifier: bool = False) -> Path:
    """A random Llama / Mistral / Qwen2 / Qwen3 with grouped-query attention (4 heads, 2 key/value heads).

    Qwen3 gets an explicit head_dim (16, so heads x head_dim != hidden); Mistral a sliding window of 4
    tokens and Qwen2 sliding windows on its second layer, so texts longer than the window exercise it.
    ``classifier`` saves the ``*ForSequenceClassification`` checkpoint (keys under ``model.``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_word_tokenizer(directory, bos=kind in ("llama", "mistral"))
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": None,
        "tie_word_embeddings": False,
    }
    config: Any
    if kind == "llama":
        config = LlamaConfig(**common, rope_theta=500000.0)
    elif kind == "mistral":
        config = MistralConfig(**common, sliding_window=4)
    elif kind == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    elif kind == "qwen3":
        config = Qwen3Config(**common, head_dim=16)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    if classifier:
        config.num_labels = 3
        config.pad_token_id = tokenizer.eos_token_id
        AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    else:
        AutoModel.from_config(config).save_pretrained(directory)
    return directory


def make_tiny_deberta(directory: Path, *, seed: int = 0, v2: bool = False) -> Path:
    """A random DeBERTa-v3 (relative attention with log buckets, shared attention keys, no absolute
    positions); ``v2``: DeBERTa-v2's layout (absolute positions too, separate position projections,
    the convolution after the first layer)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory / "vocab.txt")), do_lower_case=True)
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=8 if not v2 else -1,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm" if not v2 else "none",
        share_att_key=not v2,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=v2,
        type_vocab_size=0,
        conv_kernel_size=3 if v2 else 0,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    DebertaV2Model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_modernbert(directory: Path, *, seed: int = 0, pooling: str = "cls") -> Path:
    """A random ModernBERT: global attention every third layer, local windows of 4 tokens (2 each side)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory / "vocab.txt")), do_lower_case=True)
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        local_attention=4,
        global_attn_every_n_layers=3,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        classifier_pooling=pooling,
    )
    torch.manual_seed(seed)
    ModernBertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_bert_mlm(directory: Path, *, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A random ``BertForMaskedLM`` (encoder + ``cls.predictions``), saved as Hugging Face saves one.

    ``initializer_range`` 0.2 makes the tiny random model's outputs depend on its input enough to
    learn from (see tests.synthetic.make_learnable_bert).
    """
    from transformers import BertForMaskedLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory / "vocab.txt")), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=initializer_range,
        architectures=["BertForMaskedLM"],
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    with torch.no_grad():  # a zero bias would hide a bias read from the wrong place
        model.cls.predictions.bias.normal_(0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
