"""`pneumofed experiment CONFIG.toml`: centralised vs federated vs local-only (see `simulations.experiment`)."""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

from pydantic import ValidationError

from pneumofed.common.metrics.tracking import MlflowNotInstalled
from pneumofed.simulations.experiment import check_seeds, load_config, run_experiment


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment TOML (see simulations/configs/)")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<name>)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="N",
                        help="run only these of the config's seeds (e.g. one per process, in parallel)")
    parser.add_argument("--mlflow", action="store_true",
                        help="track the experiment in MLflow: a parent run, a nested run per arm and seed "
                             "(default store: mlflow.db beside the results folder)")
    parser.add_argument("--mlflow-tracking-uri", metavar="URI", default="",
                        help="the MLflow tracking URI to log to (sqlite:///..., http(s)://...; implies --mlflow)")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as error:
        print(f"pneumofed experiment: invalid config {args.config}:\n{error}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / config.name
    started = time.perf_counter()
    try:
        check_seeds(config, args.seeds)
    except ValueError as error:
        print(f"pneumofed experiment: {error}", file=sys.stderr)
        return 2
    try:
        run_experiment(config, out, args.seeds, mlflow=args.mlflow or bool(args.mlflow_tracking_uri),
                       mlflow_tracking_uri=args.mlflow_tracking_uri)
    except MlflowNotInstalled as error:  # raised when tracking starts, before any arm runs
        print(f"pneumofed experiment: {error}", file=sys.stderr)
        return 2
    print(f"results in {out.resolve()} (report.html, results.md, results.csv; {time.perf_counter() - started:.0f} s)")
    return 0
