"""Federated (3 natural NIH sites, FedAvg) vs centralised training with the same total epochs.

Prints pooled-test macro AUC federated / centralised (target >= 1.00), wall time federated /
centralised (target <= 1.2x) and the bytes one client sends and receives per round. Both arms are
scored on the same data, the union of the three sites' test parts, by `pneumofed experiment`.

    .venv/bin/python benchmarks/bench_federated.py [--rounds 4] [--local-epochs 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.state import floating_state
from pneumofed.common.metrics.histogram import ScoreSummary
from pneumofed.simulations.experiment import ExperimentConfig, run_experiment

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
        # From round 2 the train instruction names the model the site kept from the evaluation.
        "received (evaluate instruction; round 1: train too)": arrays,
        "sent (train reply)": arrays + 8 * 3,
        "sent (evaluate reply)": evaluate_reply,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--roi-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="results folder (default: a temporary one)")
    args = parser.parse_args()
    if not (NIH / "annotations.csv").is_file():
        print(f"skipped: the shared NIH set is not at {NIH}")
        return 0
    torch.set_num_threads(1)
    config = ExperimentConfig.model_validate(
        {
            "name": "bench-federated",
            "bootstrap": 200,
            "data": {"kind": "dicom", "dicom_dir": NIH / "dicom", "annotations": NIH / "annotations.csv",
                     "roi_size": args.roi_size},
            "training": {"epochs": args.rounds * args.local_epochs, "learning_rate": 1e-3},
            "federated": {"strategies": ["fedavg"], "rounds": args.rounds, "local_epochs": args.local_epochs},
            "local": False,
            "partitions": {"natural": {"scheme": "natural"}},
        }
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-federated-"))
    results = {result.kind: result for result in run_experiment(config, out)}
    federated, centralised = results["federated"], results["pooled"]
    auc_ratio = federated.summary["macro_auc"] / centralised.summary["macro_auc"]
    time_ratio = federated.wall_s / centralised.wall_s
    print(f"\nNIH, 3 natural sites, {args.rounds} rounds x {args.local_epochs} local epochs vs "
          f"{args.rounds * args.local_epochs} centralised epochs, {args.roi_size}-px ROIs, CPU")
    print(f"macro AUC  federated {federated.summary['macro_auc']:.3f}  centralised {centralised.summary['macro_auc']:.3f}"
          f"  ratio {auc_ratio:.3f} (target >= 1.00)")
    print(f"wall time  federated {federated.wall_s:.1f} s  centralised {centralised.wall_s:.1f} s"
          f"  ratio {time_ratio:.2f}x (target <= 1.2x)")
    eval_rois = max(1, round(0.2 * 146 / 3))
    for what, size in reply_bytes(config.model, 3, eval_rois).items():
        print(f"bytes per client per round, {what}: {size:,}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
