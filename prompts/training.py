"""Training a task and publishing it: the steps ``ptserve train`` and the training worker share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prompts.backbone import Backbone
from prompts.data import TaskData
from prompts.errors import InvalidInputError
from prompts.jobs import JobSpec
from prompts.methods import HeadStyle
from prompts.store import PromptStore
from prompts.trainer import AUTO, Progress, TrainConfig, TrainResult, plan_for_data, search, train_task


@dataclass(frozen=True)
class SearchGrid:
    """Learning rates x prefix lengths to try; the best dev accuracy is kept."""

    lrs: Sequence[float]
    lengths: Sequence[int]


def make_train_config(
    method: str,
    *,
    length: int | None = None,
    epochs: int | None = None,
    patience: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    head_lr: float | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    reparam: bool = False,
    class_balanced: bool = False,
    head: HeadStyle | None = None,
    max_seconds: float | None = None,
    label_words: dict[str, list[str]] | None = None,
    objective: str | None = None,
    scales: bool | None = None,
    lora_rank: int | None = None,
    probe_head: str | None = None,
) -> TrainConfig:
    """A checked TrainConfig; ``length`` is the prefix length or the number of virtual tokens.

    Method "auto" stays "auto" (``run_training`` chooses from the data); its other values are checked
    against P-tuning v2, which "auto" always trains except with head "verbalizer" (P-tuning).

    Raises InvalidInputError naming the bad value (the CLI prints it, the API answers 422 with it).
    """
    config = TrainConfig(
        method=method,
        epochs=epochs,
        patience=patience,
        seed=seed,
        lr=lr,
        head_lr=head_lr,
        batch_size=batch_size,
        max_length=max_length,
        reparam=reparam,
        class_balanced=class_balanced,
        head=head,
        max_seconds=max_seconds,
        label_words=label_words,
        objective=objective,
        scales=scales,
        lora_rank=lora_rank,
        probe_head=probe_head,
    )
    if length is not None:
        config = dataclasses.replace(config, prefix_length=length, prompt_length=length)
    try:
        if config.method == AUTO:
            # The probe head is read by auto's probe candidate, not by the prefix checked here.
            dataclasses.replace(
                config, method="p-tuning" if head == "verbalizer" else "p-tuning-v2", probe_head=None
            ).resolved()
            TrainConfig(method="linear-probe", probe_head=probe_head).resolved()
        else:
            config.resolved()
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    return config


def run_training(
    backbone: Backbone,
    task: str,
    data: TaskData,
    config: TrainConfig,
    *,
    progress_factory: Callable[[TrainConfig], Progress] | None = None,
    grid: SearchGrid | None = None,
) -> TrainResult:
    """Train ``task`` once, or once per grid point keeping the best; the artifact is not stored yet.

    Method "auto" is chosen from ``data`` first (:func:`prompts.trainer.plan_for_data`)."""
    if grid is not None:
        config = plan_for_data(config, data)  # each grid point trains what the plan chose
        return search(
            backbone,
            task,
            data,
            config,
            lrs=grid.lrs,
            lengths=grid.lengths,
            progress_factory=progress_factory,
        )
    progress = progress_factory(config) if progress_factory is not None else None
    return train_task(backbone, task, data, config, progress=progress)


def store_result(store: PromptStore, result: TrainResult) -> str:
    """Publish the trained artifact (``put`` is atomic: readers see the old version or this one)."""
    artifact = result.artifact
    store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    return artifact.version


def job_train_config(spec: JobSpec) -> TrainConfig:
    """The TrainConfig a training job asks for (InvalidInputError if the trainer refuses it)."""
    hp = spec.hyperparameters
    return make_train_config(
        spec.method,
        length=hp.prefix_length,
        epochs=hp.epochs,
        patience=hp.patience,
        seed=hp.seed,
        lr=hp.lr,
        head_lr=hp.head_lr,
        batch_size=hp.batch_size,
        max_length=hp.max_length,
        reparam=hp.reparam,
        class_balanced=hp.class_balanced,
        head=hp.head,
        max_seconds=hp.max_seconds,
        objective=hp.objective,
        label_words=hp.label_words,
        scales=hp.scales,
        lora_rank=hp.lora_rank,
        probe_head=hp.probe_head,
    )


def result_metrics(result: TrainResult, data: TaskData) -> dict[str, Any]:
    """What a finished job reports: dev/test scores, where training stopped, its cost and data sizes."""
    metrics: dict[str, Any] = {
        "dev": result.dev.as_dict(),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 3),
        "trainable_parameters": result.trainable_parameters,
        "rows": {"train": len(data.train), "dev": len(data.dev), "test": len(data.test)},
    }
    if result.test is not None:
        metrics["test"] = result.test.as_dict()
    return metrics
