"""Federated (FedAvg, 3 natural sites) vs pooled training with the same total epochs, over seeds.

Prints, per seed and as mean +- sd over the seeds: pooled-test macro AUC federated / pooled
(targets: >= 0.99 at convergence, issue #10), macro recall of both (a one-class model scores 1/3),
the paired AUC difference with its 95 % CI, wall time federated / pooled (target <= 1.3x at 20
rounds, issue #12) and the bytes one client sends and receives per round. Both arms of a seed are
scored on the same ROIs, the union of the three sites' test parts, by `pneumofed experiment`.

    .venv/bin/python benchmarks/bench_federated.py [--data nih|synthetic] [--rounds 20] [--local-epochs 1]
        [--roi-size 128] [--seeds 0 1 2] [--out DIR]

`nih` is the shared NIH set (146 CXRs); `synthetic` is three built-in hospitals of 1,000 ROIs each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.state import floating_state
from pneumofed.common.metrics.histogram import ScoreSummary
from pneumofed.simulations.experiment import ExperimentConfig, run_experiment, summarise_seeds

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr-abc"


def reply_bytes(model_name: str, classes: int, eval_rois: int) -> dict[str, int]:
    """Payload sizes of one round for one client (arrays in float32, metrics as 8-byte numbers)."""
    arrays = ArrayRecord(floating_state(build_model(model_name, classes))).count_bytes()
    # The score summary at the sites' defaults: at most one interval per five ROIs and class.
    probs = torch.softmax(torch.randn(eval_rois, classes), 1).numpy()
    labels = probs.argmax(1)
    histogram_values = sum(len(v) if isinstance(v, list) else 1 for v in ScoreSummary.from_scores(labels, probs).to_flat().values())
    evaluate_reply = 8 * (histogram_values + classes * classes + 4)
    return {
        # One message per round: the train instruction carries the model, and from round 2 its reply
        # the evaluation of that model (the last round's model has an evaluate message of its own).
        "received (train instruction)": arrays,
        "sent (train reply)": arrays + 8 * 4,
        "sent (evaluation, in the train reply from round 2)": evaluate_reply,
    }


def data_config(kind: str, roi_size: int) -> dict:
    if kind == "nih":
        return {"kind": "dicom", "dicom_dir": NIH / "dicom", "annotations": NIH / "annotations.csv", "roi_size": roi_size}
    return {"kind": "synthetic", "hospitals": 3, "rois_per_hospital": 1000, "roi_size": roi_size}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("nih", "synthetic"), default="nih")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--roi-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="results folder (default: a temporary one)")
    args = parser.parse_args()
    if args.data == "nih" and not (NIH / "annotations.csv").is_file():
        print(f"skipped: the shared NIH set is not at {NIH}")
        return 0
    config = ExperimentConfig.model_validate(
        {
            "name": "bench-federated",
            "seeds": args.seeds,
            "bootstrap": 200,
            "data": data_config(args.data, args.roi_size),
            "training": {"epochs": args.rounds * args.local_epochs, "learning_rate": 1e-3, "class_weighting": True},
            "federated": {"strategies": ["fedavg"], "rounds": args.rounds, "local_epochs": args.local_epochs,
                          "engine": "in-process"},
            "local": False,
            "partitions": {"natural": {"scheme": "natural"}},
        }
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-federated-"))
    arms = {(r.kind, seed): r for seed in args.seeds for r in run_experiment(config, out, seeds=[seed])}
    print(f"\n{args.data}, 3 natural sites, FedAvg {args.rounds} rounds x {args.local_epochs} local epochs vs "
          f"{args.rounds * args.local_epochs} pooled epochs, {args.roi_size}-px ROIs, CPU, seeds {args.seeds}")
    ratios, times = [], []
    for seed in args.seeds:
        federated, pooled = arms["federated", seed], arms["pooled", seed]
        ratios.append(federated.summary["macro_auc"] / pooled.summary["macro_auc"])
        times.append(federated.wall_s / pooled.wall_s)
        print(f"seed {seed}: {federated.summary['num-examples']} test ROIs; macro AUC federated "
              f"{federated.summary['macro_auc']:.3f} pooled {pooled.summary['macro_auc']:.3f} (ratio {ratios[-1]:.3f}); "
              f"macro recall federated {federated.summary['macro_recall']:.3f} pooled {pooled.summary['macro_recall']:.3f}; "
              f"wall {federated.wall_s:.1f} s vs {pooled.wall_s:.1f} s")
    federated_row = next(row for row in summarise_seeds(config, out) if row["arm"] == "federated")
    print(f"macro AUC federated / pooled: {mean_sd(ratios)} (target >= 0.99)")
    if federated_row["auc - reference ci-low"] is not None:
        print(f"macro AUC federated - pooled, paired by seed: {federated_row['auc - reference']:+.3f} "
              f"[{federated_row['auc - reference ci-low']:+.3f}, {federated_row['auc - reference ci-high']:+.3f}]")
    print(f"macro recall federated {federated_row['macro recall mean']:.3f} (one class for every ROI: 0.333)")
    print(f"wall time federated / pooled: {mean_sd(times)}x (target <= 1.3x at 20 rounds)")
    # A site evaluates its validation part, twice its test part (70/20/10).
    eval_rois = max(1, round(2 * federated.summary["num-examples"] / 3))
    for what, size in reply_bytes(config.model, 3, eval_rois).items():
        print(f"bytes per client per round, {what}: {size:,}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
