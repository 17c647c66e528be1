"""``pneumofed evaluate``: a model file against a prepared ROI store or a DICOM folder + annotations.

The metrics are those of federated evaluation (``classification_report``), computed here on every
score, plus 95 % percentile-bootstrap confidence intervals for each class's AUC and the macro AUC.
Outputs in ``--out`` (default ``<model>.eval/``): ``metrics.json``, ``roc.png``, ``confusion.png``.

A DICOM folder is prepared on the fly, into a temporary store, with the model card's ROI size and
spacing, so the model sees ROIs cut exactly as at training time. Patient keys are irrelevant to
evaluation, so that store uses a throw-away secret and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pneumofed.common.metrics import (
    ClassificationReport,
    bootstrap_auc_ci,
    bootstrap_macro_auc_ci,
    classification_report,
)
from pneumofed.common.modelfile import ModelCard, load_model_file
from pneumofed.common.plots import plot_confusion, plot_roc
from pneumofed.common.prepare import prepare_site
from pneumofed.common.roistore import RoiDataset, RoiStore
from pneumofed.common.site import load_site
from pneumofed.common.training import TrainConfig, evaluate

PARTS = ("all", "train", "val", "test")
DEFAULT_BOOTSTRAP = 1000


class IncompatibleData(ValueError):
    """The ROIs were not prepared the way the model expects (size, spacing or classes differ)."""


def check_compatible(card: ModelCard, store: RoiStore) -> None:
    index = store.index
    if index.roi_size != card.roi_size:
        raise IncompatibleData(
            f"store {store.path} holds {index.roi_size}-px ROIs but the model expects {card.roi_size}-px ROIs; "
            f"prepare the data again with --roi-size {card.roi_size}"
        )
    if list(index.class_names) != list(card.class_names):
        raise IncompatibleData(
            f"store {store.path} has classes {list(index.class_names)} but the model predicts "
            f"{list(card.class_names)} (same names in the same order are required)"
        )
    if card.spacing_mm is not None and index.spacing_mm != card.spacing_mm:
        raise IncompatibleData(
            f"store {store.path} was prepared at spacing {index.spacing_mm} mm but the model expects "
            f"{card.spacing_mm} mm; prepare the data again with --spacing-mm {card.spacing_mm}"
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

    ROC curves stay out of the JSON (they are plotted from the report).
    """
    report = classification_report(labels, probs, class_names)
    auc_ci = {
        metrics.name: None if metrics.auc is None else list(bootstrap_auc_ci(labels, probs, k, n_boot, seed))
        for k, metrics in enumerate(report.per_class)
    }
    macro_ci = None if report.macro_auc is None else list(bootstrap_macro_auc_ci(labels, probs, n_boot, seed))
    summary = {
        "eval-loss": loss,
        "num-examples": len(labels),
        **report.model_dump(mode="json", exclude={"per_class": {"__all__": {"roc"}}}),
        "auc-ci": auc_ci,
        "macro-auc-ci": macro_ci,
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
    paths["metrics"].write_text(json.dumps({**summary, "outputs": outputs}, indent=1, allow_nan=False))
    return outputs


def evaluate_model_file(
    model_path: str | Path,
    data: RoiStore | RoiDataset | str | Path,
    *,
    part: str = "all",
    split_seed: int = 0,
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    data_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model file on a store (path or opened) or on a dataset drawn from one.

    ``part`` picks the patient-grouped 70/20/10 part of a store exactly as federated sites do
    (``load_site`` with ``split_seed``); it must be "all" when ``data`` is already a dataset.
    Returns the JSON-able summary of ``summarise`` plus ``model``, ``card``, ``data``, ``part``
    (and ``outputs`` when ``out_dir`` is given, which receives the files of ``write_summary``).
    ``data_name`` overrides how the data are named in the summary (default: the store's path).
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
    model_path = Path(model_path)
    model, card = load_model_file(model_path)
    dataset = _dataset(data, part, split_seed)
    check_compatible(card, dataset.store)
    if len(dataset) == 0:
        raise ValueError(f"the {part} part of {dataset.store.path} holds no ROIs")

    evaluation = evaluate(model, dataset, TrainConfig(device=device, batch_size=batch_size))
    metrics, report = summarise(
        evaluation.labels, evaluation.probs, card.class_names, loss=evaluation.loss, n_boot=n_boot, seed=seed
    )
    data_name = data_name or str(dataset.store.path)
    summary = {"model": str(model_path), "card": card.model_dump(), "data": data_name, "part": part, **metrics}
    if out_dir is not None:
        title = f"{model_path.name} on {Path(data_name).name} ({part})"
        summary["outputs"] = write_summary(Path(out_dir), summary, report, title)
    return summary


def _dataset(data: RoiStore | RoiDataset | str | Path, part: str, split_seed: int) -> RoiDataset:
    if isinstance(data, RoiDataset):
        if part != "all":
            raise ValueError("pass a whole store, not a dataset, to select a part")
        return data
    if part != "all":
        path = data.path if isinstance(data, RoiStore) else Path(data)
        return load_site(path.resolve(), split_seed).part(part)
    return RoiDataset(data if isinstance(data, RoiStore) else RoiStore.open(data))


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


def format_table(summary: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "   -  " if value is None else f"{value:6.3f}"

    def ci(bounds: list[float] | None) -> str:
        return "" if bounds is None else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"

    lines = [
        f"{summary['num-examples']} ROIs, accuracy {summary['accuracy']:.3f}",
        f"{'class':<18}{'n':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'AUC':>6} 95% CI",
    ]
    for c in summary["per_class"]:
        lines.append(
            f"{c['name']:<18}{c['support']:>6} {number(c['precision'])} {number(c['recall'])} "
            f"{number(c['f1'])} {number(c['auc'])}{ci(summary['auc-ci'][c['name']])}"
        )
    lines.append(
        f"{'macro':<18}{'':>6} {number(summary['macro_precision'])} {number(summary['macro_recall'])} "
        f"{number(summary['macro_f1'])} {number(summary['macro_auc'])}{ci(summary['macro-auc-ci'])}"
    )
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="pneumofed model file (e.g. a run's models/best.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path, help="prepared ROI store folder")
    source.add_argument("--dicom-dir", type=Path, help="DICOM folder, prepared on the fly (needs --annotations)")
    parser.add_argument("--annotations", type=Path, help="annotation CSV for --dicom-dir")
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="patient-grouped 70/20/10 part of --store, as federated sites split it (default all)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of that split (the run's seed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <model>.eval/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples for AUC CIs")


def run(args: argparse.Namespace) -> int:
    out = args.out or args.model.with_name(args.model.name + ".eval")
    options = dict(out_dir=out, device=args.device, batch_size=args.batch_size, n_boot=args.bootstrap)
    try:
        if args.store is not None:
            if args.annotations is not None:
                raise ValueError("--annotations goes with --dicom-dir, not with --store")
            summary = evaluate_model_file(args.model, args.store, part=args.part, split_seed=args.split_seed, **options)
        else:
            if args.annotations is None:
                raise ValueError("--dicom-dir needs --annotations")
            if args.part != "all":
                raise ValueError("--part needs --store: a DICOM folder is evaluated whole")
            summary = evaluate_dicom_folder(args.model, args.dicom_dir, args.annotations, **options)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # PrepareInputError is a ValueError
        print(f"pneumofed evaluate: error: {error}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"written to {out}")
    return 0

