"""``pneumofed train``: the centralised baseline, one model trained on the pooled ROI stores.

Two protocols, both split by patient:

* hold-out (default): 70/20/10 train/val/test as federated sites split their own data; the epoch
  with the best validation macro AUC is kept and tested once.
* ``--folds k``: k-fold cross-validation as in the seed paper, reported as per-fold test metrics
  and their mean and standard deviation. Each fold keeps a fifth of its training patients for
  validation so the best epoch is chosen without looking at the fold's test patients.

Patient keys are pseudonyms local to a site (HMACs under each site's own secret), so keys are
prefixed with the store's position before pooling: two sites can never merge two patients.

Outputs (``--out``; one ``fold-NN/`` folder per fold in k-fold mode):
  history.json, history.csv   per-epoch train/val loss and accuracy, val macro AUC
  curves.png                  loss, accuracy and AUC per epoch (the seed's Figs 4-5)
  model.pt                    the best epoch as a pneumofed model file
  test_metrics.json, test_roc.png, test_confusion.png
  cv_summary.json             k-fold only: per-fold metrics, mean and sd
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from pneumofed.common.data.splits import patient_kfold, train_val_test_split
from pneumofed.common.data.store import PooledRois, pool_stores
from pneumofed.common.files import write_csv, write_json
from pneumofed.common.learning.augment import (
    DEFAULT_AUGMENTATION,
    AugmentationConfig,
    build_augmentation,
    expanded,
)
from pneumofed.common.learning.evaluation import (
    DEFAULT_BOOTSTRAP,
    summarise,
    write_summary,
)
from pneumofed.common.learning.modelfile import ModelCard, load_model_file, require_compatible, save_model_file
from pneumofed.common.learning.models import NormLayer, build_model
from pneumofed.common.learning.state import floating_state, load_floating_state
from pneumofed.common.learning.training import (
    TrainConfig,
    TrainHistory,
    evaluate,
    seed_everything,
    train,
)
from pneumofed.common.metrics.plots import plot_curves
from pneumofed.common.metrics.report import classification_report, selection_key

HOLDOUT_FRACTIONS = (0.7, 0.2, 0.1)
INNER_VAL_FRACTIONS = (0.8, 0.2, 0.0)  # k-fold: validation patients carved from each fold's training part
SUMMARY_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc")


class CentralisedSettings(BaseModel):
    """What ``train_centralised`` does; ``training`` holds the seed's defaults (Adam 1e-4, 30 epochs, batch 16)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: Path
    model: str = "shufflenet_v2_eca"
    width: float = 1.0
    norm_layer: NormLayer = "batch"
    training: TrainConfig = TrainConfig()
    augmentation: AugmentationConfig | None = DEFAULT_AUGMENTATION  # None: no augmentation
    folds: int | None = Field(None, ge=2)  # None: 70/20/10 hold-out
    # Grow each training part offline to this many ROIs (the seed: ~520 -> 12,000) before training;
    # None trains on the ROIs themselves. Online augmentation still applies on top.
    expand: int | None = Field(None, ge=1)
    split_seed: int = Field(0, ge=0)
    bootstrap: int = Field(DEFAULT_BOOTSTRAP, ge=1)
    # A pneumofed model file every model (every fold's) starts from instead of a seeded random
    # initialisation; its card must match model, width, norm layers and the stores' classes and ROI size.
    init: Path | None = None

    @model_validator(mode="after")
    def _buildable(self) -> CentralisedSettings:
        with torch.device("meta"):  # no weights allocated: only build_model's checks of name and width matter
            build_model(self.model, width=self.width, norm_layer=self.norm_layer)
        return self


@dataclass(frozen=True)
class FoldResult:
    """One trained model: its per-epoch history, best epoch and test metrics (see ``evaluate.summarise``)."""

    out_dir: Path
    model_path: Path
    best_epoch: int  # 1-based
    history: list[dict[str, float | None]]
    test: dict[str, Any]
    train_patients: frozenset[str]
    val_patients: frozenset[str]
    test_patients: frozenset[str]


@dataclass(frozen=True)
class CentralisedResult:
    out_dir: Path
    folds: list[FoldResult]  # one in hold-out mode
    summary: dict[str, Any]  # hold-out: the test metrics; k-fold: per-fold metrics with mean and sd

    @property
    def model_path(self) -> Path:
        if len(self.folds) != 1:
            raise AttributeError("k-fold training has one model per fold: use folds[i].model_path")
        return self.folds[0].model_path


def train_centralised(stores: list[Path], settings: CentralisedSettings) -> CentralisedResult:
    """Train on the pooled stores with the settings' protocol and write the outputs to ``settings.out_dir``."""
    data = pool_stores(stores)
    start = _starting_state(data, settings)  # checked before any training
    labels, patients = data.labels.numpy(), data.site_patient_keys
    out = settings.out_dir
    if settings.folds is None:
        parts = train_val_test_split(labels, patients, HOLDOUT_FRACTIONS, seed=settings.split_seed)
        fold = _train_one(data, parts, settings, out, title="centralised", start=start)
        return CentralisedResult(out, [fold], fold.test)

    results = []
    for number, (train_part, test_part) in enumerate(
        patient_kfold(labels, patients, settings.folds, seed=settings.split_seed), start=1
    ):
        inner_train, inner_val, _ = train_val_test_split(
            labels[train_part], patients[train_part], INNER_VAL_FRACTIONS, seed=settings.split_seed
        )
        parts = (train_part[inner_train], train_part[inner_val], test_part)
        title = f"centralised, fold {number} of {settings.folds}"
        results.append(_train_one(data, parts, settings, out / f"fold-{number:02d}", title=title, start=start))
    summary = _cross_validation_summary(results)
    write_json(out / "cv_summary.json", summary)
    return CentralisedResult(out, results, summary)


def train_keeping_best_epoch(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    class_names: list[str],
    config: TrainConfig,
    augment: Callable[[Tensor], Tensor] | None,
) -> tuple[list[dict[str, float | None]], int]:
    """Train `model` and leave it at its best epoch by `selection_key`, the rule by which the
    federated server keeps its best round.

    Returns the per-epoch history (train and val loss/accuracy, val macro AUC) and the best epoch (1-based).
    """
    history: list[dict[str, float | None]] = []
    best: dict[str, Any] = {"key": (-math.inf, -math.inf)}

    def validate(epoch: int, trained: TrainHistory) -> None:
        evaluation = evaluate(model, val_set, config)
        macro_auc = classification_report(evaluation.labels, evaluation.probs, class_names).macro_auc
        history.append({
            "epoch": epoch + 1,
            "train loss": trained.loss[-1],
            "train accuracy": trained.accuracy[-1],
            "val loss": evaluation.loss,
            "val accuracy": evaluation.accuracy,
            "val auc": macro_auc,
        })
        key = selection_key(macro_auc, evaluation.loss)
        if key > best["key"]:
            best.update(key=key, epoch=epoch + 1, state=copy.deepcopy(model.state_dict()))

    train(model, train_set, config, augment=augment, on_epoch_end=validate)
    model.load_state_dict(best["state"])
    return history, best["epoch"]


def _starting_state(data: PooledRois, settings: CentralisedSettings) -> dict[str, Tensor] | None:
    """The floating state of `settings.init` once it is known to fit the settings and the pooled
    stores; None for a seeded random initialisation."""
    if settings.init is None:
        return None
    model, card = load_model_file(settings.init)
    require_compatible(
        card, f"--init {settings.init}",
        model=settings.model, width=settings.width, class_names=data.class_names, roi_size=data.roi_size,
        norm_layer=settings.norm_layer,
        fixes={"model": "use --model {file}", "width": "use --width {file}", "norm_layer": "use --norm-layer {file}",
               "class_names": "train on stores prepared with the classes {file}",
               "roi_size": "train on stores prepared with --roi-size {file}"},
    )
    return floating_state(model)


def _train_one(
    data: PooledRois,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
    settings: CentralisedSettings,
    out: Path,
    title: str,
    start: dict[str, Tensor] | None = None,
) -> FoldResult:
    train_idx, val_idx, test_idx = parts
    for name, part in zip(("train", "val", "test"), parts, strict=True):
        if len(part) == 0:
            raise ValueError(f"the {name} part is empty: too few patients for this protocol")
    train_set, val_set, test_set = (data.subset(part) for part in parts)
    if settings.expand is not None:
        if settings.expand < len(train_set):
            raise ValueError(f"--expand {settings.expand} is smaller than the training part ({len(train_set)} ROIs)")
        train_set = expanded(train_set, settings.expand, settings.augmentation or DEFAULT_AUGMENTATION, settings.training.seed)
    seed_everything(settings.training.seed)  # weight initialisation repeats with the seed
    model = build_model(settings.model, len(data.class_names), width=settings.width, norm_layer=settings.norm_layer)
    if start is not None:
        load_floating_state(model, start)
    augment = None if settings.augmentation is None else build_augmentation(settings.augmentation)

    history, best_epoch = train_keeping_best_epoch(
        model, train_set, val_set, list(data.class_names), settings.training, augment
    )

    card = ModelCard(
        model=settings.model,
        width=settings.width,
        norm_layer=settings.norm_layer,
        class_names=list(data.class_names),
        roi_size=data.roi_size,
        spacing_mm=data.spacing_mm,
        provenance={
            "trainer": "centralised",
            "epoch": best_epoch,
            "val_macro_auc": history[best_epoch - 1]["val auc"],
            "seed": settings.training.seed,
            "init": None if settings.init is None else str(settings.init),
        },
    )
    model_path = save_model_file(out / "model.pt", model, card)
    _write_history(out, history, title)

    evaluation = evaluate(model, test_set, settings.training)
    test, report = summarise(
        evaluation.labels, evaluation.probs, list(data.class_names),
        loss=evaluation.loss, n_boot=settings.bootstrap, seed=settings.training.seed,
    )
    test = {"split": "test", "best-epoch": best_epoch, **test}
    test["outputs"] = write_summary(out, test, report, f"{title}, test (epoch {best_epoch})", prefix="test_")
    keys = data.site_patient_keys
    return FoldResult(
        out_dir=out,
        model_path=model_path,
        best_epoch=best_epoch,
        history=history,
        test=test,
        train_patients=frozenset(keys[train_idx]),
        val_patients=frozenset(keys[val_idx]),
        test_patients=frozenset(keys[test_idx]),
    )


def _write_history(out: Path, history: list[dict[str, float | None]], title: str) -> None:
    write_json(out / "history.json", history)
    write_csv(out / "history.csv", history)
    series = {name: [row[name] for row in history] for name in history[0] if name != "epoch"}
    plot_curves(out / "curves.png", [row["epoch"] for row in history], series, "epoch", title)


def _cross_validation_summary(folds: list[FoldResult]) -> dict[str, Any]:
    per_fold = [
        {"fold": number, "best-epoch": fold.best_epoch, "num-examples": fold.test["num-examples"],
         **{name: fold.test[name] for name in SUMMARY_METRICS},
         **{f"auc {c['name']}": c["auc"] for c in fold.test["per_class"]}}
        for number, fold in enumerate(folds, start=1)
    ]
    summary: dict[str, Any] = {"folds": per_fold}
    for name in per_fold[0]:
        if name in ("fold", "best-epoch", "num-examples"):
            continue
        values = [row[name] for row in per_fold if row[name] is not None]
        # Sample sd (ddof=1), as cross-validation results are usually reported.
        summary[name] = {
            "mean": float(np.mean(values)) if values else None,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "folds-defined": len(values),
        }
    return summary
