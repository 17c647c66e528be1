"""Where a federated round's time goes: the sites' compute against the framework's overhead.

Runs the main job's federation (three built-in synthetic hospitals) once in Flower's simulation
(Ray) and once in process, and prints per round, from the run directory's `metrics.json`
(`timing`): the round's wall time, the sites' train and evaluate compute as they report it, and
the overhead: the rest of the round beyond the compute the CPUs allow, i.e. beyond
max(slowest site, all sites' compute / parallel workers) in each phase (messaging,
serialisation, process starts, validation, aggregation, pooling). In process the sites run one
after another (one worker); Flower's simulation runs one worker per CPU. Target (issue #12):
overhead <= 0.5 s per round in simulation with 3 sites.

    .venv/bin/python benchmarks/bench_round_overhead.py [--rounds 5] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.simulations.flower import run_simulation
from pneumofed.simulations.inprocess import run_in_process
from pneumofed.simulations.sites import synthetic_sites


def timings(run_dir: Path) -> list[dict[str, float]]:
    return [record["timing"] for record in json.loads((run_dir / "metrics.json").read_text())]


def overhead(t: dict[str, float], workers: int) -> float:
    needed = sum(max(t[f"slowest-{phase}-seconds"], t[f"sites-{phase}-seconds"] / workers) for phase in ("train", "eval"))
    return t["round-seconds"] - needed


def report(engine: str, wall: float, rounds: list[dict[str, float]], workers: int) -> None:
    print(f"\n{engine} ({workers} worker(s)): {wall:.1f} s in all")
    print(f"{'round':>5} {'wall s':>7} {'train s slowest/all':>20} {'eval s slowest/all':>19} {'aggregate s':>12} {'overhead s':>11}")
    for number, t in enumerate(rounds, start=1):
        print(f"{number:>5} {t['round-seconds']:>7.2f} {t['slowest-train-seconds']:>10.2f}/{t['sites-train-seconds']:<9.2f} "
              f"{t['slowest-eval-seconds']:>9.2f}/{t['sites-eval-seconds']:<9.2f} {t['aggregate-seconds']:>12.3f} "
              f"{overhead(t, workers):>11.2f}")
    later = [overhead(t, workers) for t in rounds[1:]] or [overhead(rounds[0], workers)]
    print(f"overhead per round after the first: median {statistics.median(later):.2f} s (target <= 0.5 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, help="keeps the synthetic hospitals between runs")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="pneumofed-bench-overhead-"))
    config = FederatedConfig(num_server_rounds=args.rounds)
    sites = synthetic_sites(args.data_dir or out / "data", hospitals=3, rois=200, roi_size=config.roi_size, seed=0)
    run_config = config.to_run_config() | {"sites": ",".join(map(str, sites))}

    for engine in ("flower", "in-process"):
        run_dir = out / engine
        started = time.perf_counter()
        if engine == "flower":
            run_simulation(sites, run_config | {"run-dir": str(run_dir)})
        else:
            run_in_process(sites, run_config | {"run-dir": str(run_dir)})
        workers = min(len(sites), os.cpu_count() or 1) if engine == "flower" else 1
        report(engine, time.perf_counter() - started, timings(run_dir), workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
