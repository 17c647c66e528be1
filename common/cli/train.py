"""`pneumofed train`: the centralised baseline on pooled ROI stores (see `learning.centralised`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from pneumofed.common.learning.augment import DEFAULT_AUGMENTATION
from pneumofed.common.learning.centralised import (
    SUMMARY_METRICS,
    CentralisedSettings,
    train_centralised,
)
from pneumofed.common.learning.evaluation import DEFAULT_BOOTSTRAP
from pneumofed.common.learning.models import MODEL_NAMES, NormLayer
from pneumofed.common.learning.training import TrainConfig


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, action="append", required=True,
                        help="prepared ROI store; repeat to pool several sites")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--model", choices=MODEL_NAMES, default="shufflenet_v2_eca")
    parser.add_argument("--width", type=float, default=1.0, help="ShuffleNet width multiplier (0.5, 1.0, 1.5, 2.0)")
    parser.add_argument("--norm-layer", choices=get_args(NormLayer), default="batch",
                        help="batch (BatchNorm, as published) or group (GroupNorm, as DP-SGD needs)")
    parser.add_argument("--folds", type=int, default=None,
                        help="k-fold cross-validation by patient (e.g. 10); default: 70/20/10 hold-out")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--class-weighting", action="store_true", help="inverse-frequency class weights in the loss")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="online augmentation with the seven ops of the seed's Table 4 (default on)")
    parser.add_argument("--expand", type=int, default=None, metavar="N",
                        help="grow each training part offline to N augmented ROIs first (the seed: 520 -> 12,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--init", type=Path, default=None, metavar="MODEL_FILE",
                        help="start from this pneumofed model file instead of a random initialisation "
                             "(its model, width, norm layers, classes and ROI size must match)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples for AUC CIs")


def run(args: argparse.Namespace) -> int:
    try:
        settings = CentralisedSettings(
            out_dir=args.out,
            model=args.model,
            width=args.width,
            norm_layer=args.norm_layer,
            training=TrainConfig(
                epochs=args.epochs,
                learning_rate=args.lr,
                batch_size=args.batch_size,
                weight_decay=args.weight_decay,
                class_weighting=args.class_weighting,
                seed=args.seed,
                device=args.device,
            ),
            augmentation=DEFAULT_AUGMENTATION if args.augment else None,
            folds=args.folds,
            expand=args.expand,
            split_seed=args.seed,
            bootstrap=args.bootstrap,
            init=args.init,
        )
        result = train_centralised(args.store, settings)
    except ValidationError as error:
        print(f"pneumofed train: invalid settings:\n{error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"pneumofed train: error: {error}", file=sys.stderr)
        return 2
    summary = result.summary
    if settings.folds is None:
        auc = summary["macro_auc"]
        print(f"best epoch {result.folds[0].best_epoch}: test accuracy {summary['accuracy']:.3f}, "
              f"macro AUC {'undefined' if auc is None else f'{auc:.3f}'}; model {result.model_path}")
    else:
        for name in SUMMARY_METRICS:
            stats = summary[name]
            if stats["mean"] is not None:
                sd = "" if stats["sd"] is None else f" ± {stats['sd']:.3f}"
                print(f"{name}: {stats['mean']:.3f}{sd} over {stats['folds-defined']} folds")
    print(f"written to {settings.out_dir}")
    return 0
