"""`pneumofed simulate`: the main job, a local multicentre Flower simulation.

With no sites given it uses the built-in synthetic hospitals (`simulations.sites`), writing and
preparing them on first use (later runs reuse both). `--cross-site` first trains each site's
local-only model, which the simulated site then shares for cross-site validation.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from pneumofed.common.data.site import load_site
from pneumofed.common.data.store import StoreRequirements
from pneumofed.common.federation.config import PRESETS, FederatedConfig, StrategyName
from pneumofed.common.learning.augment import DEFAULT_AUGMENTATION, build_augmentation
from pneumofed.common.learning.batchnorm import recalibrate_batchnorm
from pneumofed.common.learning.centralised import train_keeping_best_epoch
from pneumofed.common.learning.modelfile import ModelCard, save_model_file
from pneumofed.common.learning.models import MODEL_NAMES
from pneumofed.common.learning.training import TrainConfig, seed_everything, select_device
from pneumofed.simulations.flower import SimulationFailed, run_simulation
from pneumofed.simulations.partition import prepare_natural_sites
from pneumofed.simulations.sites import synthetic_sites

DEFAULTS = FederatedConfig()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=Path, nargs="+", help="prepared ROI stores, one per simulated hospital "
                        "(default: the built-in synthetic hospitals)")
    parser.add_argument("--natural", nargs=2, type=Path, metavar=("DICOM_DIR", "ANNOTATIONS"),
                        help="a pooled DICOM folder + annotation CSV, split into one site per InstitutionName "
                        "(stores written under --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/synthetic"),
                        help="where the synthetic hospitals (or --natural site stores) live (default: %(default)s)")
    parser.add_argument("--hospitals", type=int, default=3, help="number of synthetic hospitals (default: 3)")
    parser.add_argument("--rois", type=int, default=200, help="ROIs per synthetic hospital (default: 200)")
    parser.add_argument("--roi-size", type=int, default=DEFAULTS.roi_size,
                        help="ROI edge in pixels (default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named settings, e.g. 'seed' (Dong et al.'s "
                        "Adam 1e-4, batch 16, 30 epochs in total); explicit options override them")
    parser.add_argument("--rounds", type=int, help=f"federated rounds (default: {DEFAULTS.num_server_rounds})")
    parser.add_argument("--local-epochs", type=int, help=f"local epochs per round (default: {DEFAULTS.local_epochs})")
    parser.add_argument("--strategy", choices=get_args(StrategyName), help=f"Flower strategy (default: {DEFAULTS.strategy})")
    parser.add_argument("--model", choices=MODEL_NAMES, help=f"(default: {DEFAULTS.model})")
    parser.add_argument("--learning-rate", type=float, help=f"local Adam learning rate (default: {DEFAULTS.learning_rate})")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--run-dir", type=Path, help="output directory (default: runs/<strategy>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last round")
    parser.add_argument("--cross-site", action="store_true",
                        help="train each site's local-only model first (as many epochs as the federation, best "
                        "epoch on the site's validation part; RUN_DIR/local-models/), then end the run with "
                        "cross-site validation: every site scores the global and the local models on its test part")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run-config key of pyproject.toml, e.g. --set batch-size=32")


def run(args: argparse.Namespace) -> int:
    if args.resume and args.run_dir is None:
        print("--resume needs --run-dir (the run to continue)")
        return 2
    if args.sites:
        sites = args.sites
    elif args.natural:
        sites = prepare_natural_sites(*args.natural, args.data_dir.resolve(), roi_size=args.roi_size)
    else:
        sites = synthetic_sites(args.data_dir.resolve(), args.hospitals, args.rois, args.roi_size, args.seed)
    given = {
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "strategy": args.strategy,
        "model": args.model,
        "learning-rate": args.learning_rate,
    }
    run_config = (
        PRESETS.get(args.preset, {})
        | {key: value for key, value in given.items() if value is not None}
        | {"roi-size": args.roi_size, "seed": args.seed, "resume": args.resume}
        | dict(_parse_override(item) for item in args.overrides)
    )
    strategy = run_config.get("strategy", DEFAULTS.strategy)
    run_dir = (args.run_dir or Path("runs") / f"{strategy}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_config["run-dir"] = str(run_dir)
    if args.cross_site:
        started = time.perf_counter()
        config = FederatedConfig.from_run_config(run_config)
        models = train_local_models([Path(site).resolve() for site in sites], config, run_dir / "local-models")
        print(f"local-only models trained in {time.perf_counter() - started:.0f} s", flush=True)
        run_config |= {"cross-site-validation": True, "local-models": ",".join(map(str, models))}
    try:
        run_simulation(sites, run_config)
    except SimulationFailed as error:
        print(f"simulation failed: {error}")
        return 1
    if not (run_dir / "metrics.json").is_file():
        print(f"simulation finished without results in {run_dir}; see the log above")
        return 1
    print(learning_summary(run_dir))
    print(f"run directory: {run_dir}")
    print(f"plots: {run_dir / 'plots'}")
    if (run_dir / "report.html").is_file():
        print(f"report: {run_dir / 'report.html'} (open it in a browser)")
    return 0


def train_local_models(sites: Sequence[Path], config: FederatedConfig, out_dir: Path) -> list[Path]:
    """Each site's local-only model as `out_dir/<site>.pt`, as the experiments' local-only arms train
    it: on the site's own training part alone, for as many epochs as the federation trains (rounds x
    local epochs), kept at its best epoch on the site's validation part, its BatchNorm statistics then
    recalibrated on its training ROIs as a federated site's are after each round. The parts are those
    the site's node uses, so its test part stays unseen."""
    required = StoreRequirements(roi_size=config.roi_size, class_names=tuple(config.classes), required_by="the run")
    settings = TrainConfig(epochs=config.num_server_rounds * config.local_epochs, learning_rate=config.learning_rate,
                           batch_size=config.batch_size, class_weighting=config.class_weighting, seed=config.seed,
                           progress=False)
    augment = build_augmentation(DEFAULT_AUGMENTATION) if config.augment else None
    paths = []
    for store in sites:
        print(f"training the local-only model of {store.name} ({settings.epochs} epochs) ...", flush=True)
        site = load_site(store, config.seed, required)
        seed_everything(settings.seed)
        model = config.build_model()
        history, best_epoch = train_keeping_best_epoch(model, site.train, site.val, config.classes, settings, augment)
        recalibrate_batchnorm(model, site.train, max(config.batch_size, 64), select_device(settings.device))
        card = ModelCard(model=config.model, width=config.model_width, norm_layer=config.norm_layer, class_names=config.classes,
                         roi_size=config.roi_size, provenance={"trainer": "local", "site": store.name, "epoch": best_epoch,
                                                               "val_macro_auc": history[best_epoch - 1]["val auc"]})
        paths.append(save_model_file(out_dir / f"{store.name}.pt", model, card))
    return paths


def _parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def learning_summary(run_dir: Path) -> str:
    """Whether the federation learned: the pooled validation macro AUC of every round, and the
    best round's on the sites' test parts, with how far the sites' coarse score summaries let
    each be from the exact AUC."""
    def line(label: str, records: list[dict]) -> str:
        values = ", ".join("-" if r.get("macro_auc") is None else f"{r['macro_auc']:.3f}" for r in records)
        bounds = [r["macro_auc_bound"] for r in records if r.get("macro_auc_bound") is not None]
        within = f" (within {max(bounds):.2f} of the exact AUC)" if bounds else ""
        return f"{label}: {values}{within}"

    lines = [line("pooled validation macro AUC by round", json.loads((run_dir / "metrics.json").read_text()))]
    final = run_dir / "final.json"
    if final.is_file():
        summary = json.loads(final.read_text())
        lines.append(line(f"macro AUC of the best round ({summary.get('best-round', '?')}) on the sites' test parts", [summary]))
    cross_site = run_dir / "cross_site.json"
    if cross_site.is_file():
        matrix = json.loads(cross_site.read_text())
        for model in matrix["models"]:
            name = "global model" if model["kind"] == "global" else f"local model of {model['site']}"
            lines.append(line(f"cross-site: {name} on the test parts of {', '.join(matrix['sites'])}, then pooled",
                              [*model["cells"], model["pooled"] or {}]))
    return "\n".join(lines)
