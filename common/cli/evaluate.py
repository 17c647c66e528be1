"""`pneumofed evaluate`: metrics, plots and 95 % CIs of a model file on a ROI store or DICOM folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pneumofed.common.learning.evaluation import (
    DEFAULT_BOOTSTRAP,
    PARTS,
    evaluate_dicom_folder,
    evaluate_model_file,
)
from pneumofed.common.learning.heatmap import prepare_heatmap_dir, write_store_heatmaps


def format_table(summary: dict[str, Any]) -> str:
    """Per-class and macro metrics, with the AUC's bootstrap and DeLong 95 % CIs side by side."""

    def number(value: float | None) -> str:
        return "   -  " if value is None else f"{value:6.3f}"

    def ci(bounds: list[float] | None) -> str:
        return "" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"

    delong = summary.get("auc-ci-delong", {})  # per class; the macro AUC has none
    lines = [
        f"{summary['num-examples']} ROIs, accuracy {summary['accuracy']:.3f}",
        f"{'class':<18}{'n':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'AUC':>6} {'95% CI bootstrap':<16}  95% CI DeLong",
    ]
    for c in summary["per_class"]:
        lines.append(
            f"{c['name']:<18}{c['support']:>6} {number(c['precision'])} {number(c['recall'])} "
            f"{number(c['f1'])} {number(c['auc'])} {ci(summary['auc-ci'][c['name']]):<16}  "
            f"{ci(delong.get(c['name']))}".rstrip()
        )
    lines.append(
        f"{'macro':<18}{'':>6} {number(summary['macro_precision'])} {number(summary['macro_recall'])} "
        f"{number(summary['macro_f1'])} {number(summary['macro_auc'])} {ci(summary['macro-auc-ci'])}".rstrip()
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
    parser.add_argument("--calibrate-bn", action="store_true",
                        help="fit BatchNorm statistics to these ROIs first (for a model trained with bn-mode fedbn)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples for AUC CIs")
    parser.add_argument("--heatmaps", type=Path, default=None, metavar="DIR",
                        help="also write a Grad-CAM heatmap PNG of the predicted class per evaluated ROI, "
                             "DIR/<roi_id>.png (needs --store)")


def run(args: argparse.Namespace) -> int:
    out = args.out or args.model.with_name(args.model.name + ".eval")
    options = {"out_dir": out, "device": args.device, "batch_size": args.batch_size, "n_boot": args.bootstrap,
               "calibrate_bn": args.calibrate_bn}
    try:
        if args.store is not None:
            if args.annotations is not None:
                raise ValueError("--annotations goes with --dicom-dir, not with --store")
            if args.heatmaps is not None:
                prepare_heatmap_dir(args.heatmaps)  # a bad folder fails now, not after the evaluation
            summary = evaluate_model_file(args.model, args.store, part=args.part, split_seed=args.split_seed, **options)
            if args.heatmaps is not None:
                heatmaps = write_store_heatmaps(args.model, args.store, args.heatmaps, part=args.part,
                                                split_seed=args.split_seed, device=args.device,
                                                batch_size=args.batch_size, calibrate_bn=args.calibrate_bn)
        else:
            if args.annotations is None:
                raise ValueError("--dicom-dir needs --annotations")
            if args.part != "all":
                raise ValueError("--part needs --store: a DICOM folder is evaluated whole")
            if args.heatmaps is not None:
                raise ValueError("--heatmaps needs --store: the ROIs of a DICOM folder are not kept")
            summary = evaluate_dicom_folder(args.model, args.dicom_dir, args.annotations, **options)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # PrepareInputError is a ValueError
        print(f"pneumofed evaluate: error: {error}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"written to {out}")
    if args.heatmaps is not None:
        print(f"{len(heatmaps)} heatmaps written to {args.heatmaps}")
    return 0

