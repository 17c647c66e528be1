"""Many simulated hospitals on one machine: wall time, time per round and peak memory of the whole run.

Cuts 50, 200 and 500 (by default) patient-grouped IID sites of a few ROIs each from three pooled
synthetic hospitals and runs the real Flower simulation (`pneumofed simulate`, Ray) on each, with
`fraction-train` sites training per round. Memory is the peak over the run of the summed resident
set size of every process the run started, the detached SuperLink and Ray's workers included
(`experiment.ProcessTreeMemory`; pages shared between processes count once per process, so this
is an upper bound). Targets (issue #12): peak <= 8 GiB at 500 sites, and a time per round that
grows linearly with the sites taking part.

    .venv/bin/python benchmarks/bench_scale.py [--sites 50 200 500] [--rois-per-site 14] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pneumofed.simulations.experiment import ProcessTreeMemory
from pneumofed.simulations.partition import PartitionConfig, partition_stores
from pneumofed.simulations.sites import synthetic_sites

ROI_SIZE = 32


def round_seconds(run_dir: Path) -> list[float]:
    """Each round's wall time as the run recorded it (metrics.json `timing`)."""
    return [record["timing"]["round-seconds"] for record in json.loads((run_dir / "metrics.json").read_text())]


def run_scale(sites: list[Path], run_dir: Path, fraction_train: float, rounds: int) -> dict[str, float]:
    command = [
        str(Path(sys.executable).parent / "pneumofed"), "simulate", "--sites", *map(str, sites),
        "--rounds", str(rounds), "--local-epochs", "1", "--roi-size", str(ROI_SIZE), "--run-dir", str(run_dir),
        "--set", "model-width=0.5", "--set", "augment=false", "--set", f"fraction-train={fraction_train}",
        "--set", f"fraction-evaluate={fraction_train}",
    ]
    started = time.monotonic()
    with ProcessTreeMemory() as memory:
        completed = subprocess.run(command, check=False, capture_output=True, text=True)
    wall = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"simulate failed with {completed.returncode}:\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}")
    per_round = round_seconds(run_dir)
    return {"wall_s": wall, "round_s": sum(per_round[1:]) / max(1, len(per_round) - 1), "first_round_s": per_round[0],
            "peak_gib": memory.peak_gib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--rois-per-site", type=int, default=14, help="about 10 patients: the fewest a site splits into train/val/test")
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, help="keeps the pooled synthetic hospitals between runs")
    parser.add_argument("--out", type=Path, help="partitions and run directories (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="pneumofed-bench-scale-"))
    data_dir = args.data_dir or out / "pooled"
    pooled_rois = math.ceil(max(args.sites) * args.rois_per_site / 3)
    pooled = synthetic_sites(data_dir, hospitals=3, rois=pooled_rois, roi_size=ROI_SIZE, seed=0)

    print(f"{'sites':>6} {'taking part':>11} {'wall s':>8} {'s/round':>8} {'s/round/site':>13} {'peak GiB':>9}")
    rows = []
    for n_sites in args.sites:
        partition = PartitionConfig(scheme="iid", sites=n_sites, seed=0)
        sites = partition_stores(pooled, partition, out / f"sites-{n_sites}")
        result = run_scale(sites, out / f"run-{n_sites}", args.fraction_train, args.rounds)
        taking_part = max(1, round(n_sites * args.fraction_train))
        rows.append((n_sites, taking_part, result))
        print(f"{n_sites:>6} {taking_part:>11} {result['wall_s']:>8.1f} {result['round_s']:>8.1f} "
              f"{result['round_s'] / taking_part:>13.3f} {result['peak_gib']:>9.2f}", flush=True)
    first, last = rows[0], rows[-1]
    growth = (last[2]["round_s"] / last[1]) / (first[2]["round_s"] / first[1])
    print(f"time per round per participating site, {last[0]} vs {first[0]} sites: {growth:.2f}x (1.00 = linear)")
    print(f"peak memory at {last[0]} sites: {last[2]['peak_gib']:.2f} GiB (target <= 8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
