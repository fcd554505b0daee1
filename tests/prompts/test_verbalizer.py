"""The verbalizer head: label words at a [MASK] of the input prompt, through the masked-LM head."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM

from prompts.artifact import PromptArtifact, parse_artifact
from prompts.backbone import Backbone, load_backbone
from prompts.errors import ArtifactError, IncompatibleArtifactError, InvalidInputError
from prompts.forward import TaskPrompt, prompted_forward
from prompts.methods import label_words
from prompts.trainer import TrainConfig, train_task
from tests.factories import forge_artifact, make_verbalizer_artifact, random_artifact
from tests.models import make_tiny_bert_mlm
from tests.synthetic import make_task_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = {"book": ["book", "movie"], "phone": ["phone"], "shirt": ["shirt", "size", "color"]}
LABELS = sorted(WORDS)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert_mlm(tmp_path_factory.mktemp("models") / "mlm")


@pytest.fixture(scope="module")
def mlm(mlm_dir: Path) -> Backbone:
    return load_backbone(mlm_dir)


def verbalizer_artifact(
    backbone: Backbone, prompt_words: list[str], task: str = "verb"
) -> tuple[PromptArtifact, list[int]]:
    return make_verbalizer_artifact(backbone, WORDS, prompt_words, task=task)


def test_label_word_logits_equal_hugging_faces_masked_lm(mlm: Backbone, mlm_dir: Path) -> None:
    assert mlm.spec.mlm_fingerprint is not None and mlm.mlm is not None
    artifact, prompt_ids = verbalizer_artifact(mlm, ["it", "is", "a"])
    task = TaskPrompt.from_artifact(parse_artifact(artifact.data), mlm.device, mlm.dtype)
    texts = ["my phone battery is great", "a red shirt", "the book"]
    ids = [e.input_ids for e in mlm.encode(texts, 40)]
    with torch.no_grad():
        ours = prompted_forward(mlm, ids, [task] * len(ids))  # [B, 3]

    reference = BertForMaskedLM.from_pretrained(mlm_dir, attn_implementation="sdpa").eval()
    mask_id = mlm.tokenizer.mask_token_id
    for row, text_ids in enumerate(ids):
        # HF sees the same template as tokens: prompt words, [MASK], then [CLS] text [SEP].
        full = torch.tensor([[*prompt_ids, mask_id, *text_ids]])
        with torch.no_grad():
            vocab = reference(input_ids=full).logits[0, len(prompt_ids)]  # [vocab]
        verbalizer = artifact.manifest.head.verbalizer
        assert verbalizer is not None
        expected = torch.stack([vocab[torch.tensor(w)].mean() for w in verbalizer.token_ids])
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=1e-5)


def test_mixed_batch_gives_each_row_what_it_gets_alone(mlm: Backbone) -> None:
    verbal, _ = verbalizer_artifact(mlm, ["this", "is"])
    others = [
        random_artifact(mlm.spec, task="prefix", prefix_length=4, num_labels=4, seed=1),
        random_artifact(mlm.spec, task="mean", prefix_length=0, prompt_length=3, pooling="mean", seed=2),
    ]
    tasks = [TaskPrompt.from_artifact(a, mlm.device, mlm.dtype) for a in (verbal, *others)]
    texts = ["phone screen", "a cheap shirt that is great", "book", "what is the price of the movie", "ok"]
    ids = [e.input_ids for e in mlm.encode(texts, 40)]
    rows = [tasks[i % 3] for i in range(len(ids))]
    with torch.no_grad():
        mixed = prompted_forward(mlm, ids, rows)
        for b, (text_ids, task) in enumerate(zip(ids, rows, strict=True)):
            alone = prompted_forward(mlm, [text_ids], [task])[0]
            n = task.num_labels
            torch.testing.assert_close(mixed[b, :n], alone[:n], rtol=0, atol=1e-5)
            assert torch.isinf(mixed[b, n:]).all()


def test_training_ptuning_with_label_words_fits_the_task(tmp_path: Path) -> None:
    backbone = load_backbone(make_tiny_bert_mlm(tmp_path / "learnable", initializer_range=0.2))
    data = make_task_data(train=60, dev=30, test=30)
    # Only the prompt trains against a frozen random masked-LM head: a small lr, more epochs.
    config = TrainConfig(
        method="p-tuning", head="verbalizer", epochs=20, batch_size=16, lr=0.02, patience=100, prompt_length=4
    )
    result = train_task(backbone, "verbal", data, config)
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < 0.6 * losses[0]  # from ~ln 3 + the random head's offsets
    assert (
        result.dev.accuracy >= 0.8 and result.test is not None and result.test.accuracy >= 0.7
    )  # chance 1/3
    m = result.artifact.manifest
    assert m.head.pooling == "mask" and m.prompt_length == 5 and m.head.verbalizer is not None
    assert m.head.verbalizer.mask_position == 4 and m.head.verbalizer.words == [
        ["book"],
        ["phone"],
        ["shirt"],
    ]
    # The head stayed the label words' decoder rows; only the prompt trained.
    assert backbone.mlm is not None
    rows, bias = backbone.mlm.label_rows(m.head.verbalizer.token_ids)
    torch.testing.assert_close(result.artifact.tensors["head.weight"], rows, rtol=0, atol=0)
    torch.testing.assert_close(result.artifact.tensors["head.bias"], bias, rtol=0, atol=0)
    mask_row = result.artifact.tensors["prompt"][4]
    torch.testing.assert_close(mask_row, backbone.word_embeddings.weight[backbone.tokenizer.mask_token_id])


def test_verbalizer_is_refused_without_a_masked_lm_head(mlm: Backbone, backbone: Backbone) -> None:
    assert backbone.spec.mlm_fingerprint is None and backbone.mlm is None
    with pytest.raises(InvalidInputError, match="needs a backbone with a masked-LM head"):
        label_words(backbone, LABELS, None)
    config = TrainConfig(method="p-tuning", head="verbalizer", epochs=1)
    with pytest.raises(InvalidInputError, match="masked-LM head"):
        train_task(backbone, "verbal", make_task_data(train=12, dev=6, test=0), config)
    # An artifact made on the MLM checkpoint is refused by a backbone with other weights or no head.
    from prompts.artifact import check_compatible

    verbal, _ = verbalizer_artifact(mlm, ["a"])
    spec = dataclasses.replace(mlm.spec, mlm_fingerprint=None)
    with pytest.raises(IncompatibleArtifactError, match="has no masked-LM head"):
        check_compatible(verbal, spec)
    with pytest.raises(IncompatibleArtifactError, match="masked-LM head mlm-"):
        check_compatible(verbal, dataclasses.replace(mlm.spec, mlm_fingerprint="mlm-other"))


def test_label_words_are_checked(mlm: Backbone) -> None:
    with pytest.raises(InvalidInputError, match="not one token of the vocabulary"):
        label_words(mlm, LABELS, {"book": ["bookshelf"]})
    with pytest.raises(InvalidInputError, match="labels the data does not have"):
        label_words(mlm, LABELS, {"toys": ["game"]})
    with pytest.raises(ValueError, match="method p-tuning or prompt-tuning"):
        TrainConfig(method="p-tuning-v2", head="verbalizer").resolved()
    words = label_words(mlm, LABELS, {"phone": ["phone", "screen"]})
    assert words.words == [["book"], ["phone", "screen"], ["shirt"]]


def test_manifest_verbalizer_is_validated(mlm: Backbone) -> None:
    verbal, _ = verbalizer_artifact(mlm, ["a", "the"])

    def outside(manifest: dict, tensors: dict) -> None:  # type: ignore[type-arg]
        manifest["head"]["verbalizer"]["mask_position"] = 3

    with pytest.raises(ArtifactError, match="outside the input prompt"):
        parse_artifact(forge_artifact(verbal, outside))

    def no_words(manifest: dict, tensors: dict) -> None:  # type: ignore[type-arg]
        manifest["head"]["verbalizer"] = None

    with pytest.raises(ArtifactError, match="go together"):
        parse_artifact(forge_artifact(verbal, no_words))
