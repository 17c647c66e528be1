"""Where a federated round's time goes: the sites' compute against the framework's overhead.

Runs the main job's federation (three built-in synthetic hospitals) in Flower's simulation (Ray),
in process, and deployed on loopback (`deploy/loopback.py`: the provisioned kits' SuperLink behind
nginx with TLS and node authentication, one SuperNode per hospital, each message in a new ClientApp
process), and prints per round, from the run directory's `metrics.json`
(`timing`): the round's wall time, the sites' compute as they report it (training, and the
evaluation of the round before's model that its TRAIN messages carry), and the overhead: the rest
of the round beyond the compute the CPUs allow, i.e. beyond max(slowest site, all sites' compute /
parallel workers) (messaging, serialisation, process starts, validation, aggregation, pooling;
the last round adds an exchange of EVALUATE messages for its own model). Two parts of it are printed
as well: the slowest delivery (from sending to a site's handler starting: transport, polling, a
new ClientApp process and its imports) and the collection (from the last reply being made to the
server holding every reply). In process the sites run one
after another (one worker); Flower's simulation and the deployment run one per CPU. Targets (issue
#12): overhead <= 0.5 s per round in simulation and <= 3 s deployed, with 3 sites.

    .venv/bin/python benchmarks/bench_round_overhead.py [--rounds 5] [--engines flower in-process deployment]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.deploy.loopback import LoopbackFederation
from pneumofed.simulations.flower import run_simulation
from pneumofed.simulations.inprocess import run_in_process
from pneumofed.simulations.sites import synthetic_sites


def timings(run_dir: Path) -> list[dict[str, float]]:
    return [record["timing"] for record in json.loads((run_dir / "metrics.json").read_text())]


def overhead(t: dict[str, float], workers: int) -> float:
    return t["round-seconds"] - max(t["slowest-site-seconds"], t["sites-seconds"] / workers)


TARGETS = {"flower": 0.5, "in-process": 0.5, "deployment": 3.0}


def run_deployed(sites: list[Path], config: FederatedConfig, run_dir: Path) -> None:
    """The run on loopback: one provisioned hospital per site, the run started with the coordinator's `flwr run`."""
    hospitals = {f"hospital-{i + 1}": site for i, site in enumerate(sites)}
    with LoopbackFederation(run_dir.parent / "loopback", hospitals) as federation:
        nodes = federation.start_nodes()
        run_id = federation.submit(f"num-server-rounds={config.num_server_rounds} min-nodes={len(sites)} run-dir='{run_dir}'")
        status = federation.wait_for(run_id, nodes, timeout=3600)
        if status != "finished:completed":
            raise RuntimeError(f"the deployed run ended {status}:\n{federation.processes.log('superlink')[-3000:]}")


def report(engine: str, wall: float, rounds: list[dict[str, float]], workers: int) -> None:
    print(f"\n{engine} ({workers} worker(s)): {wall:.1f} s in all")
    print(f"{'round':>5} {'wall s':>7} {'compute s slowest/all':>22} {'aggregate s':>12} {'overhead s':>11} "
          f"{'delivery s':>11} {'collect s':>10} {'evaluate-only s':>16}")
    for number, t in enumerate(rounds, start=1):
        print(f"{number:>5} {t['round-seconds']:>7.2f} {t['slowest-site-seconds']:>11.2f}/{t['sites-seconds']:<10.2f} "
              f"{t['aggregate-seconds']:>12.3f} {overhead(t, workers):>11.2f} {t['slowest-delivery-seconds']:>11.2f} "
              f"{t['collect-seconds']:>10.2f} {t['evaluate-exchange-seconds']:>16.2f}")
    # The first round evaluates nothing and the last adds its own EVALUATE exchange: the rounds
    # between are the steady state of a long run.
    steady = [overhead(t, workers) for t in rounds[1:-1]] or [overhead(t, workers) for t in rounds]
    print(f"overhead per round, rounds between the first and the last: median {statistics.median(steady):.2f} s "
          f"(target <= {TARGETS[engine]} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, help="keeps the synthetic hospitals between runs")
    parser.add_argument("--engines", nargs="+", choices=sorted(TARGETS), default=["flower", "in-process", "deployment"])
    args = parser.parse_args()
    if "deployment" in args.engines and shutil.which("nginx") is None:
        print("nginx is not installed (apt-get install nginx-light): skipping the deployment", file=sys.stderr)
        args.engines.remove("deployment")
    out = Path(tempfile.mkdtemp(prefix="pneumofed-bench-overhead-"))
    config = FederatedConfig(num_server_rounds=args.rounds)
    sites = synthetic_sites(args.data_dir or out / "data", hospitals=3, rois=200, roi_size=config.roi_size, seed=0)
    run_config = config.to_run_config() | {"sites": ",".join(map(str, sites))}

    for engine in args.engines:
        run_dir = out / engine / "run"
        run_dir.parent.mkdir(parents=True)
        started = time.perf_counter()
        if engine == "flower":
            run_simulation(sites, run_config | {"run-dir": str(run_dir)})
        elif engine == "in-process":
            run_in_process(sites, run_config | {"run-dir": str(run_dir)})
        else:
            run_deployed(sites, config, run_dir)
        workers = 1 if engine == "in-process" else min(len(sites), os.cpu_count() or 1)
        report(engine, time.perf_counter() - started, timings(run_dir), workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
