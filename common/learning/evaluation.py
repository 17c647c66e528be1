"""``pneumofed evaluate``: a model file against a prepared ROI store or a DICOM folder + annotations.

The metrics are those of federated evaluation (``classification_report``), computed here on every
score, plus 95 % percentile-bootstrap confidence intervals for each class's AUC and the macro AUC.
Outputs in ``--out`` (default ``<model>.eval/``): ``metrics.json``, ``roc.png``, ``confusion.png``.

A DICOM folder is prepared on the fly, into a temporary store, with the model card's ROI size and
spacing, so the model sees ROIs cut exactly as at training time. Patient keys are irrelevant to
evaluation, so that store uses a throw-away secret and is deleted afterwards.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pneumofed.common.data.prepare import prepare_site
from pneumofed.common.data.site import load_site
from pneumofed.common.data.store import RoiDataset, StoreRequirements, open_stores
from pneumofed.common.files import write_json
from pneumofed.common.learning.batchnorm import recalibrate_batchnorm
from pneumofed.common.learning.modelfile import ModelCard, load_model_file
from pneumofed.common.learning.training import TrainConfig, evaluate, select_device
from pneumofed.common.metrics.delong import delong_auc_ci
from pneumofed.common.metrics.intervals import bootstrap_auc_ci, bootstrap_macro_auc_ci
from pneumofed.common.metrics.plots import plot_confusion, plot_roc
from pneumofed.common.metrics.report import ClassificationReport, classification_report

PARTS = ("all", "train", "val", "test")
DEFAULT_BOOTSTRAP = 1000


def store_requirements(card: ModelCard) -> StoreRequirements:
    """What a model file needs of the ROIs it scores: its ROI size, classes and (when set) spacing."""
    return StoreRequirements(
        roi_size=card.roi_size, class_names=tuple(card.class_names), spacing_mm=card.spacing_mm, required_by="the model"
    )


def summarise(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    *,
    loss: float | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> tuple[dict[str, Any], ClassificationReport]:
    """JSON-able metrics with 95 % AUC CIs (keys as in a federated run's ``final.json``), and the report.

    ``auc-ci`` and ``macro-auc-ci`` are percentile-bootstrap CIs; ``auc-ci-delong`` holds each class's
    DeLong CI (normal approximation, clipped to [0, 1]; None where the class has fewer than 2
    positives or negatives). There is no DeLong CI of the macro AUC: it would need covariances
    between AUCs that split the cases into positives and negatives differently, which DeLong's
    two-sample formula does not give.

    ROC curves stay out of the JSON (they are plotted from the report).
    """
    report = classification_report(labels, probs, class_names)
    auc_ci = {
        metrics.name: None if metrics.auc is None else list(bootstrap_auc_ci(labels, probs, k, n_boot, seed))
        for k, metrics in enumerate(report.per_class)
    }
    macro_ci = None if report.macro_auc is None else list(bootstrap_macro_auc_ci(labels, probs, n_boot, seed))
    delong_ci = {  # DeLong's variance needs at least 2 positives and 2 negatives
        metrics.name: list(delong_auc_ci(labels, probs, k).ci)
        if metrics.auc is not None and min(metrics.support, report.num_samples - metrics.support) >= 2
        else None
        for k, metrics in enumerate(report.per_class)
    }
    summary = {
        "eval-loss": loss,
        "num-examples": len(labels),
        **report.model_dump(mode="json", exclude={"per_class": {"__all__": {"roc"}}}),
        "auc-ci": auc_ci,
        "macro-auc-ci": macro_ci,
        "auc-ci-delong": delong_ci,
        "bootstrap": {"resamples": n_boot, "seed": seed, "confidence": 0.95},
    }
    return summary, report


def write_summary(
    out_dir: Path, summary: dict[str, Any], report: ClassificationReport, title: str, prefix: str = ""
) -> dict[str, str]:
    """``<prefix>metrics.json``, ``<prefix>roc.png`` (per class, AUC in legend), ``<prefix>confusion.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / f"{prefix}metrics.json",
        "roc": out_dir / f"{prefix}roc.png",
        "confusion": out_dir / f"{prefix}confusion.png",
    }
    curves = {c.name: (c.roc.fpr, c.roc.tpr) for c in report.per_class if c.roc is not None}
    plot_roc(paths["roc"], curves, {c.name: c.auc for c in report.per_class}, f"ROC: {title}")
    plot_confusion(paths["confusion"], report.confusion_matrix, report.class_names, f"Confusion: {title}")
    outputs = {name: str(path) for name, path in paths.items()}
    write_json(paths["metrics"], {**summary, "outputs": outputs})
    return outputs


def evaluated_part(store: str | Path, card: ModelCard, part: str, split_seed: int) -> RoiDataset:
    """The ROIs of `store` that `part` names: all of them, or its patient-grouped 70/20/10 part
    exactly as federated sites split it (``load_site`` with ``split_seed``)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
    required = store_requirements(card)
    if part == "all":
        (opened,) = open_stores([store], required)
        dataset = RoiDataset(opened)
    else:
        dataset = load_site(Path(store).resolve(), split_seed, required).part(part)
    if len(dataset) == 0:
        raise ValueError(f"the {part} part of {store} holds no ROIs")
    return dataset


def evaluate_model_file(
    model_path: str | Path,
    store: str | Path,
    *,
    part: str = "all",
    split_seed: int = 0,
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    data_name: str | None = None,
    calibrate_bn: bool = False,
) -> dict[str, Any]:
    """Evaluate a model file on a ROI store, whole or one of its parts.

    ``calibrate_bn`` first fits the BatchNorm statistics to the evaluated ROIs (images only, no
    labels): what a hospital does with a `fedbn` global model, whose BatchNorm stayed at the sites.

    ``part`` picks the patient-grouped 70/20/10 part of the store exactly as federated sites do
    (``load_site`` with ``split_seed``). Returns the JSON-able summary of ``summarise`` plus
    ``model``, ``card``, ``data``, ``part`` (and ``outputs`` when ``out_dir`` is given, which
    receives the files of ``write_summary``). ``data_name`` overrides how the data are named in
    the summary (default: the store's path).
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
    model_path = Path(model_path)
    model, card = load_model_file(model_path)
    dataset = evaluated_part(store, card, part, split_seed)

    if calibrate_bn:
        recalibrate_batchnorm(model, dataset, batch_size, select_device(device))
    evaluation = evaluate(model, dataset, TrainConfig(device=device, batch_size=batch_size))
    metrics, report = summarise(
        evaluation.labels, evaluation.probs, card.class_names, loss=evaluation.loss, n_boot=n_boot, seed=seed
    )
    data_name = data_name or str(store)
    summary = {"model": str(model_path), "card": card.model_dump(), "data": data_name, "part": part,
               "calibrated-bn": calibrate_bn, **metrics}
    if out_dir is not None:
        title = f"{model_path.name} on {Path(data_name).name} ({part})"
        summary["outputs"] = write_summary(Path(out_dir), summary, report, title)
    return summary


def evaluate_dicom_folder(
    model_path: str | Path, dicom_dir: str | Path, annotations_csv: str | Path, **options: Any
) -> dict[str, Any]:
    """Prepare ``dicom_dir`` + annotations as the model card says, then ``evaluate_model_file`` on it."""
    _, card = load_model_file(model_path)
    label_map = {name: label for label, name in enumerate(card.class_names)}
    with tempfile.TemporaryDirectory(prefix="pneumofed-eval-") as scratch:
        store = Path(scratch) / "store"
        report = prepare_site(
            dicom_dir,
            annotations_csv,
            store,
            label_map=label_map,
            roi_size=card.roi_size,
            spacing_mm=card.spacing_mm,
            secret_path=Path(scratch) / "secret",
        )
        print(report.summary(), file=sys.stderr)
        if report.rois == 0:
            raise ValueError(f"no usable ROI in {dicom_dir} with {annotations_csv}")
        return evaluate_model_file(model_path, store, data_name=str(dicom_dir), **options)
