"""`pneumofed experiment CONFIG.toml`: centralised vs federated vs local-only training, from one config.

Two tables come out (Markdown and CSV, plus curves and per-arm ROC/confusion plots):

* the seed's comparison (its Table 5): every configured model trained centrally on the pooled data
  with patient-grouped k-fold cross-validation (`pneumofed train --folds k`); metrics of the pooled
  out-of-fold predictions with bootstrap 95 % CIs, and the folds' mean +- sd of the macro AUC.
* per partition of the data into simulated hospitals: pooled training on the union of the sites'
  training parts, federated training with each strategy (a real Flower simulation), and each site
  training alone. Every row is scored on the same held-out data: the union of the sites' test parts
  (`load_site`, as the federated final evaluation). Per-sample scores of the federated model come
  from evaluating its best.pt centrally on that union, which is legitimate in simulation (this
  machine holds every simulated site), so federated rows get bootstrap CIs like the others.

Each arm records its wall time and the peak resident memory of its whole process tree (Flower's
SuperLink and Ray workers included). An arm whose outputs exist with identical settings is reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import threading
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats
from torch.utils.data import ConcatDataset, Dataset

from pneumofed.client.app import LOCAL_BATCHNORM
from pneumofed.common.data.site import SiteData, load_site
from pneumofed.common.data.store import StoreRequirements, open_stores, pool_stores
from pneumofed.common.federation.config import FederatedConfig, StrategyName
from pneumofed.common.files import atomic_write, write_csv, write_json
from pneumofed.common.learning.augment import DEFAULT_AUGMENTATION, build_augmentation
from pneumofed.common.learning.centralised import (
    CentralisedSettings,
    train_centralised,
    train_keeping_best_epoch,
)
from pneumofed.common.learning.evaluation import summarise, write_summary
from pneumofed.common.learning.modelfile import (
    ModelCard,
    load_model_file,
    save_model_file,
)
from pneumofed.common.learning.models import MODEL_NAMES, build_model
from pneumofed.common.learning.training import TrainConfig, evaluate, seed_everything
from pneumofed.common.metrics.html_report import ExperimentFiles, experiment_report_html
from pneumofed.common.metrics.plots import plot_curves
from pneumofed.common.metrics.tracking import MlflowTracker, flat_metrics, flat_params, local_tracking_uri, run_status
from pneumofed.simulations.flower import run_simulation
from pneumofed.simulations.inprocess import run_in_process
from pneumofed.simulations.partition import (
    PartitionConfig,
    partition_stores,
    prepare_natural_sites,
    site_summary,
)
from pneumofed.simulations.sites import synthetic_sites

# ------------------------------------------------------------------------------ configuration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the natural sites come from: synthetic hospitals, a DICOM folder split by a header, or stores."""

    kind: Literal["synthetic", "dicom", "stores"]
    roi_size: int = Field(64, ge=16)
    hospitals: int = Field(3, ge=1)  # synthetic
    rois_per_hospital: int = Field(200, ge=10)  # synthetic
    dicom_dir: Path | None = None  # dicom
    annotations: Path | None = None  # dicom
    site_header: str = "InstitutionName"  # dicom
    stores: list[Path] = []  # stores

    @model_validator(mode="after")
    def _complete(self) -> DataConfig:
        if self.kind == "dicom" and (self.dicom_dir is None or self.annotations is None):
            raise ValueError("data of kind 'dicom' needs dicom_dir and annotations")
        if self.kind == "stores" and not self.stores:
            raise ValueError("data of kind 'stores' needs a non-empty stores list")
        return self


class TrainingConfig(_Strict):
    """Local training shared by every arm: a federated site trains `local_epochs` per round with these."""

    epochs: int = Field(5, ge=1)  # centralised and local-only
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    class_weighting: bool = False
    augment: bool = True


class CentralisedArm(_Strict):
    models: list[str] = Field(["shufflenet_v2_eca"], min_length=1)
    folds: int = Field(10, ge=2)
    expand: int | None = Field(None, ge=1)  # offline expansion of each fold's training part (`train --expand`)

    @model_validator(mode="after")
    def _known(self) -> CentralisedArm:
        unknown = sorted(set(self.models) - set(MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_NAMES)}")
        return self


class FederatedArm(_Strict):
    strategies: list[StrategyName] = Field(["fedavg"], min_length=1)
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    run_config: dict[str, Any] = {}  # any other FederatedConfig key, hyphenated (e.g. "proximal-mu")
    # More federated arms by name, each the run config of `run_config` plus its own keys, e.g.
    # fedbn = { "bn-mode" = "fedbn" } (strategy fedavg unless it says otherwise).
    variants: dict[str, dict[str, Any]] = {}
    # "flower": a real Flower simulation (Ray) per arm; "in-process": the same ServerApp round loop and
    # ClientApp handlers in this process (`simulations.inprocess`), without Ray's start-up per arm.
    engine: Literal["flower", "in-process"] = "flower"

    def arms(self) -> dict[str, dict[str, Any]]:
        """Arm name -> its extra run config (the strategy arms first, then the variants)."""
        named = {strategy: {"strategy": strategy} for strategy in self.strategies}
        clash = sorted(set(named) & set(self.variants))
        if clash:
            raise ValueError(f"federated.variants may not reuse strategy names {clash}")
        return named | self.variants


class ExperimentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    bootstrap: int = Field(1000, ge=1)
    # torch threads for in-process training: on a small shared CPU more threads than free cores
    # slow small models down many times over (oversubscription); Ray workers get one CPU each.
    threads: int = Field(1, ge=1)
    model: str = "shufflenet_v2_eca"  # of the per-partition arms
    model_width: float = 1.0  # ShuffleNet width multiplier of every arm
    # Repeat everything (data, splits, initialisation, training) per seed into seed-<n>/, and
    # summarise across seeds; unset: the one `seed`, written straight into the output folder.
    seeds: list[int] | None = Field(None, min_length=1)
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    centralised: CentralisedArm | None = None
    federated: FederatedArm | None = None
    pooled: bool = True
    local: bool = True
    partitions: dict[str, PartitionConfig] = {}
    # The arm (by name) every other arm of its partition is compared with, paired by seed, in the
    # summary across seeds: "pooled", or a federated arm such as the non-private one of a DP study.
    reference: str = "pooled"

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODEL_NAMES)}")
        if (self.federated or self.pooled or self.local) and not self.partitions:
            raise ValueError("pooled, federated and local arms need at least one [partitions.<name>] table")
        federated_arms = set(self.federated.arms() if self.federated else ())
        if self.reference != "pooled" and self.reference not in federated_arms:  # pooled off: no comparison
            raise ValueError(f"reference {self.reference!r} is not an arm of this experiment; "
                             f"choose from {', '.join(sorted(federated_arms | {'pooled'}))}")
        for name in self.partitions:
            if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"partition name {name!r} must be letters, digits, '-', '_' or '.'")
        if self.federated:
            # Tracking too: an experiment's runs are tracked by `pneumofed experiment --mlflow`.
            reserved = {"sites", "run-dir", "num-server-rounds", "local-epochs", "model", "model-width", "seed",
                        "mlflow", "mlflow-tracking-uri"}
            for name, extra in {"run_config": self.federated.run_config, **self.federated.variants}.items():
                clash = sorted((reserved | ({"strategy"} if name == "run_config" else set())) & set(extra))
                if clash:
                    raise ValueError(f"federated {name} may not set {clash}: the experiment sets them")
                # Validate the extra keys now rather than minutes later inside the simulation.
                FederatedConfig.model_validate({"model": self.model} | self.federated.run_config | extra)
            for name, extra in self.federated.arms().items():
                mode = (self.federated.run_config | extra).get("bn-mode", "shared")
                if mode != "shared" and self.federated.engine != "in-process":
                    raise ValueError(f"federated arm {name!r} (bn-mode {mode}) is scored with each site's own "
                                     "BatchNorm, which needs engine = \"in-process\"")
        return self


def load_config(path: Path) -> ExperimentConfig:
    """Parse and validate a TOML file; relative paths in [data] are relative to the file's folder."""
    raw = tomllib.loads(Path(path).read_text())
    data = raw.get("data", {})
    base = Path(path).resolve().parent
    for key in ("dicom_dir", "annotations"):
        if key in data:
            data[key] = str((base / data[key]).resolve())
    if "stores" in data:
        data["stores"] = [str((base / s).resolve()) for s in data["stores"]]
    return ExperimentConfig.model_validate(raw)


# ------------------------------------------------------------------------------ measurement


class ProcessTreeMemory:
    """Peak resident memory of this process, its descendants and the Flower SuperLink it launched.

    `flwr run` detaches the SuperLink (which starts Ray), so it is not our descendant; it is found by
    the FLWR_HOME of the `flwr run` children, which appears in the SuperLink's command line.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> dict[int, psutil.Process]:
        me = psutil.Process()
        found = {p.pid: p for p in [me, *me.children(recursive=True)]}
        homes = set()
        for process in list(found.values()):
            try:
                if "flwr" in " ".join(process.cmdline()):
                    home = process.environ().get("FLWR_HOME")
                    if home:
                        homes.add(home)
            except psutil.Error:
                continue
        if homes:
            for process in psutil.process_iter(["cmdline"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                if any(home in cmdline for home in homes):
                    found |= {p.pid: p for p in [process, *process.children(recursive=True)]}
        return found

    def sample(self) -> None:
        total = 0
        for process in self._tree().values():
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)

    def _sample_until_stopped(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


# ------------------------------------------------------------------------------ arms


@dataclass(frozen=True)
class ArmResult:
    name: str
    group: str  # "centralised-cv" or a partition name
    kind: str  # "centralised (k-fold)", "pooled", "federated", "local"
    model: str
    summary: dict[str, Any]  # `evaluate.summarise` of its test predictions
    curve: list[tuple[float, float | None]]  # (epochs of training, validation macro AUC)
    wall_s: float
    peak_gib: float
    extra: dict[str, Any]


def _cached(arm_dir: Path, settings: dict[str, Any]) -> ArmResult | None:
    path = arm_dir / "arm.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != json.loads(json.dumps(settings, default=str)):
        return None
    return ArmResult(**saved["result"])


def _run_arm(arm_dir: Path, settings: dict[str, Any], work, tracking: ExperimentTracking | None) -> ArmResult:
    """Run `work() -> ArmResult` (wall time and memory measured) unless identical results exist."""
    result = _cached(arm_dir, settings)
    if result is not None:
        print(f"[experiment] reusing {arm_dir}", flush=True)
    else:
        print(f"[experiment] running {arm_dir} ...", flush=True)
        started = time.perf_counter()
        with ProcessTreeMemory() as memory:
            result = work()
        result = ArmResult(**{**result.__dict__, "wall_s": time.perf_counter() - started, "peak_gib": memory.peak_gib})
        arm_dir.mkdir(parents=True, exist_ok=True)
        write_json(arm_dir / "arm.json", json.loads(json.dumps({"settings": settings, "result": result.__dict__}, default=str)))
    if tracking is not None:
        tracking.log_arm(arm_dir, settings, result)
    return result


class ExperimentTracking:
    """MLflow tracking of an experiment: one parent run per results folder (reopened by every later
    `pneumofed experiment` into that folder, e.g. one process per seed) and a nested run per arm and
    seed with its settings, test metrics, validation curve and plots."""

    def __init__(self, tracker: MlflowTracker, out: Path) -> None:
        self.tracker = tracker
        self.out = out

    @classmethod
    def start(cls, config: ExperimentConfig, out: Path, tracking_uri: str) -> ExperimentTracking:
        """The parent run, in the store at `tracking_uri` ("" = a SQLite store beside `out`)."""
        out = out.resolve()
        uri = tracking_uri or local_tracking_uri(out.parent)
        record = out / "mlflow.json"
        earlier = json.loads(record.read_text()) if record.is_file() else {}
        tracker = MlflowTracker.start(
            uri, config.name, config.name, flat_params(config.model_dump(mode="json")),
            continue_run_id=earlier.get("run-id") if earlier.get("tracking-uri") == uri else None,
            tags={"pneumofed.results": str(out)},
        )
        write_json(record, {"tracking-uri": uri, "run-id": tracker.run_id})
        return cls(tracker, out)

    def log_arm(self, arm_dir: Path, settings: dict[str, Any], result: ArmResult) -> None:
        """The arm's nested run, unless this very result (its arm.json) is logged under the parent already."""
        logged = {"tracking-uri": self.tracker.tracking_uri, "parent-run-id": self.tracker.run_id,
                  "arm": hashlib.sha256((arm_dir / "arm.json").read_bytes()).hexdigest()}
        record = arm_dir / "mlflow.json"
        if record.is_file() and {k: v for k, v in json.loads(record.read_text()).items() if k in logged} == logged:
            return
        nested = self.tracker.start_nested(str(arm_dir.relative_to(self.out)),
                                           flat_params(json.loads(json.dumps(settings, default=str))),
                                           tags={"pneumofed.arm-kind": result.kind})
        if nested is None:  # the store failed (logged once); the experiment goes on without it
            return
        nested.log_metrics(flat_metrics(result.summary, prefix="test-")
                           | {"wall-seconds": result.wall_s, "peak-rss-gib": result.peak_gib})
        for epochs, auc in result.curve:
            if auc is not None:
                nested.log_metrics({"val-macro_auc": auc}, step=int(epochs))
        federated_run = arm_dir / "run"
        nested.log_artifacts([*map(Path, result.summary.get("outputs", {}).values()),
                              federated_run / "report.html", federated_run / "plots"])
        nested.finish()
        if not nested.failed:
            write_json(record, logged | {"run-id": nested.run_id})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """End the parent run with the experiment's tables and report as they are now."""
        self.tracker.log_artifacts([self.out / name for name in (
            "report.html", "results.md", "results.csv", "summary.md", "summary.csv")])
        self.tracker.finish(run_status(kind))


def _train_config(config: ExperimentConfig, seed: int) -> TrainConfig:
    t = config.training
    return TrainConfig(epochs=t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size,
                       class_weighting=t.class_weighting, seed=seed, progress=False)


def fit_best_epoch(
    model_name: str, width: float, train_set: Dataset, val_set: Dataset, class_names: list[str], settings: TrainConfig,
    augment: bool,
) -> tuple[Any, list[tuple[float, float | None]], int]:
    """A fresh seeded model trained to its best validation epoch (`train_keeping_best_epoch`).
    Returns (model, [(epoch, val macro AUC)], best epoch)."""
    seed_everything(settings.seed)
    model = build_model(model_name, len(class_names), width=width)
    history, best_epoch = train_keeping_best_epoch(
        model, train_set, val_set, class_names, settings, build_augmentation(DEFAULT_AUGMENTATION) if augment else None
    )
    return model, [(row["epoch"], row["val auc"]) for row in history], best_epoch


def _scored(config: ExperimentConfig, model, test_set: Dataset, class_names: list[str], out: Path, title: str) -> dict[str, Any]:
    return _scored_per_site(config, [(model, test_set)], class_names, out, title)


def _scored_per_site(config: ExperimentConfig, scorers: list[tuple[Any, Dataset]], class_names: list[str], out: Path,
                     title: str) -> dict[str, Any]:
    """Summary (bootstrap CIs) of the scores of each (model, ROIs) pair, pooled in order."""
    settings = _train_config(config, config.seed).model_copy(update={"batch_size": 64})
    results = [evaluate(model, data, settings) for model, data in scorers]
    labels = np.concatenate([r.labels for r in results])
    loss = float(sum(r.loss * r.num_examples for r in results) / len(labels))
    summary, report = summarise(labels, np.concatenate([r.probs for r in results]), class_names, loss=loss,
                                n_boot=config.bootstrap, seed=config.seed)
    summary["outputs"] = write_summary(out, summary, report, title, prefix="test_")
    return summary


def centralised_cv_arm(config: ExperimentConfig, stores: list[Path], model_name: str, out: Path) -> ArmResult:
    """The seed's protocol via `train_centralised` (k-fold); scores are its pooled out-of-fold predictions."""
    arm = config.centralised
    settings = CentralisedSettings(
        out_dir=out, model=model_name, width=config.model_width, training=_train_config(config, config.seed),
        augmentation=DEFAULT_AUGMENTATION if config.training.augment else None,
        folds=arm.folds, expand=arm.expand, split_seed=config.seed, bootstrap=config.bootstrap,
    )
    result = train_centralised(stores, settings)
    data = pool_stores(stores)
    labels, probs = [], []
    for fold in result.folds:
        model, _ = load_model_file(fold.model_path)
        test_idx = np.flatnonzero(np.isin(data.site_patient_keys, list(fold.test_patients)))
        scored = evaluate(model, data.subset(test_idx), settings.training)
        labels.append(scored.labels)
        probs.append(scored.probs)
    summary, report = summarise(np.concatenate(labels), np.concatenate(probs), data.class_names,
                                n_boot=config.bootstrap, seed=config.seed)
    summary["outputs"] = write_summary(out, summary, report, f"{model_name}, {arm.folds}-fold out-of-fold", prefix="oof_")
    curve = [(row["epoch"], row["val auc"]) for row in result.folds[0].history]
    fold_auc = result.summary["macro_auc"]
    return ArmResult(f"{model_name}", "centralised-cv", f"centralised ({arm.folds}-fold CV)", model_name, summary, curve,
                     0.0, 0.0, {"fold-macro-auc-mean": fold_auc["mean"], "fold-macro-auc-sd": fold_auc["sd"]})


def pooled_arm(config: ExperimentConfig, sites: list[SiteData], test_set: Dataset, class_names: list[str], out: Path) -> ArmResult:
    settings = _train_config(config, config.seed)
    model, curve, best = fit_best_epoch(config.model, config.model_width, ConcatDataset([s.train for s in sites]),
                                        ConcatDataset([s.val for s in sites]), class_names, settings, config.training.augment)
    _save(out / "model.pt", model, config, class_names, {"trainer": "pooled", "epoch": best})
    summary = _scored(config, model, test_set, class_names, out, f"pooled, epoch {best}")
    return ArmResult("pooled", out.parent.name, "pooled", config.model, summary, curve, 0.0, 0.0, {"best-epoch": best})


def local_arm(config: ExperimentConfig, site: SiteData, test_set: Dataset, class_names: list[str], out: Path) -> ArmResult:
    settings = _train_config(config, config.seed)
    model, curve, best = fit_best_epoch(config.model, config.model_width, site.train, site.val, class_names, settings, config.training.augment)
    _save(out / "model.pt", model, config, class_names, {"trainer": "local", "epoch": best})
    summary = _scored(config, model, test_set, class_names, out, f"{out.name}, epoch {best}")
    return ArmResult(out.name, out.parent.name, "local", config.model, summary, curve, 0.0, 0.0,
                     {"best-epoch": best, "train-rois": len(site.train)})


def federated_run_config(config: ExperimentConfig, name: str, class_names: list[str]) -> dict[str, Any]:
    """The run config of federated arm `name`, but for its run directory."""
    arm, t = config.federated, config.training
    return {
        "num-server-rounds": arm.rounds, "local-epochs": arm.local_epochs,
        "model": config.model, "model-width": config.model_width, "class-names": ",".join(class_names),
        "roi-size": config.data.roi_size, "learning-rate": t.learning_rate, "batch-size": t.batch_size,
        "class-weighting": t.class_weighting, "augment": t.augment, "seed": config.seed,
    } | arm.run_config | arm.arms()[name]


def federated_arm(config: ExperimentConfig, name: str, site_paths: list[Path], sites: list[SiteData],
                  class_names: list[str], out: Path) -> ArmResult:
    """A federated run, its best round scored on the sites' test parts. Under `fedbn`/`silobn` there
    is no one global model: each site's test part is scored by the global weights with that site's
    own BatchNorm (FedBN's protocol), which needs the in-process engine to read the sites' state."""
    arm = config.federated
    run_dir = out / "run"
    if run_dir.exists():  # a stale or interrupted run: start afresh rather than resume other settings
        shutil.rmtree(run_dir)
    run_config = federated_run_config(config, name, class_names) | {"run-dir": str(run_dir.resolve())}
    arm_config = FederatedConfig.from_run_config(run_config | {"sites": ",".join(map(str, site_paths))})
    if arm.engine == "in-process":
        _, grid = run_in_process(site_paths, run_config)
    else:
        run_simulation(site_paths, run_config, cpus_per_client=1)  # Flower wants a whole number of CPUs
    final = json.loads((run_dir / "final.json").read_text())
    rounds = json.loads((run_dir / "metrics.json").read_text())
    model, _ = load_model_file(run_dir / "models" / "best.pt")
    title = f"{name}, round {final['best-round']}"
    if arm_config.bn_mode == "shared":
        summary = _scored(config, model, ConcatDataset([s.test for s in sites]), class_names, out, title)
    else:
        scorers = []
        for node, site in zip(grid.get_node_ids(), sites, strict=True):
            personal = copy.deepcopy(model)
            local = grid.states[node][LOCAL_BATCHNORM].to_torch_state_dict()
            personal.load_state_dict(local, strict=False)
            scorers.append((personal, site.test))
        summary = _scored_per_site(config, scorers, class_names, out, title + ", each site with its own BatchNorm")
    # The federated final evaluation pooled the same test parts site by site: counts must agree.
    agrees = summary["confusion_matrix"] == final["confusion_matrix"]
    if not agrees:
        print(f"[experiment] warning: {run_dir}: central re-evaluation of best.pt differs from final.json", flush=True)
    curve = [(r["round"] * arm.local_epochs, r.get("macro_auc")) for r in rounds]
    return ArmResult(name, out.parent.name, "federated", config.model, summary, curve, 0.0, 0.0,
                     {"best-round": final["best-round"], "agrees-with-final-json": agrees,
                      "federated-macro-auc": final["macro_auc"]})


def _save(path: Path, model, config: ExperimentConfig, class_names: list[str], provenance: dict[str, Any]) -> None:
    card = ModelCard(model=config.model, width=config.model_width, class_names=class_names,
                     roi_size=config.data.roi_size, provenance=provenance)
    save_model_file(path, model, card)


# ------------------------------------------------------------------------------ orchestration


def natural_sites(config: ExperimentConfig, data_dir: Path) -> list[Path]:
    data = config.data
    if data.kind == "synthetic":
        return [p.resolve() for p in synthetic_sites(data_dir / "synthetic", data.hospitals, data.rois_per_hospital,
                                                     data.roi_size, config.seed)]
    if data.kind == "dicom":
        return prepare_natural_sites(data.dicom_dir, data.annotations, data_dir / "natural", roi_size=data.roi_size,
                                     tag=data.site_header)
    stores = [p.resolve() for p in data.stores]
    open_stores(stores, StoreRequirements(roi_size=data.roi_size, required_by="the experiment (data.roi_size)"))
    return stores


def check_seeds(config: ExperimentConfig, seeds: list[int] | None) -> None:
    """A subset of seeds to run must be among the config's `seeds`."""
    if seeds and config.seeds is None:
        raise ValueError("--seeds needs `seeds = [...]` in the experiment config")
    unknown = sorted(set(seeds or []) - set(config.seeds or []))
    if unknown:
        raise ValueError(f"seeds {unknown} are not among the config's seeds {config.seeds}")


def run_experiment(config: ExperimentConfig, out: Path, seeds: list[int] | None = None, *, mlflow: bool = False,
                   mlflow_tracking_uri: str = "") -> list[ArmResult]:
    """Every arm of `config` into `out`; with `config.seeds`, once per seed (or the `seeds` subset,
    so that seeds can run in parallel processes) into `out/seed-<n>/`, then `summarise_seeds`.
    With `mlflow`, tracked to `mlflow_tracking_uri` ("" = `mlflow.db` beside `out`; `ExperimentTracking`)."""
    check_seeds(config, seeds)
    tracking = ExperimentTracking.start(config, out, mlflow_tracking_uri) if mlflow else None
    with tracking or nullcontext():
        if config.seeds is None:
            results = _run_one_seed(config, out, tracking)
            summary = []
        else:
            results = []
            for seed in seeds or config.seeds:
                results += _run_one_seed(config.model_copy(update={"seed": seed, "seeds": None}), out / f"seed-{seed}",
                                         tracking)
            summary = summarise_seeds(config, out)
        atomic_write(out / "report.html", experiment_report_html(ExperimentFiles.read(out.resolve(), config.seeds, summary)))
    return results


def _run_one_seed(config: ExperimentConfig, out: Path, tracking: ExperimentTracking | None) -> list[ArmResult]:
    out = out.resolve()
    torch.set_num_threads(config.threads)
    sources = natural_sites(config, out / "data")
    results: list[ArmResult] = []
    if config.centralised is not None:
        for model_name in config.centralised.models:
            arm_dir = out / "centralised-cv" / model_name
            settings = {**_common_settings(config), "arm": "cv", "model": model_name, "sources": sources,
                        "centralised": config.centralised.model_dump(exclude={"models"})}
            results.append(_run_arm(arm_dir, settings, lambda m=model_name, d=arm_dir: centralised_cv_arm(config, sources, m, d),
                                    tracking))

    site_tables = {}
    for name, partition in config.partitions.items():
        site_paths = partition_stores(sources, partition, out / "data" / "partitions" / name)
        site_tables[name] = site_summary(site_paths)
        sites = [load_site(p, config.seed) for p in site_paths]
        class_names = list(sites[0].store.class_names)
        test_set = ConcatDataset([s.test for s in sites])
        base = {"partition": partition.model_dump(), "sources": sources, **_common_settings(config)}
        group = out / name
        if config.pooled:
            results.append(_run_arm(group / "pooled", {"arm": "pooled", **base},
                                    lambda ss=sites, t=test_set, c=class_names, d=group / "pooled": pooled_arm(
                                        config, ss, t, c, d), tracking))
        if config.federated is not None:
            for arm_name in config.federated.arms():
                arm_dir = group / f"federated-{arm_name}"
                # What this arm's run depends on, so that adding another strategy or variant reuses it.
                settings = {"arm": "federated", "strategy": arm_name, "engine": config.federated.engine,
                            "run-config": federated_run_config(config, arm_name, class_names), **base}
                results.append(_run_arm(arm_dir, settings, lambda s=arm_name, d=arm_dir, p=site_paths, ss=sites,
                                        c=class_names: federated_arm(config, s, p, ss, c, d), tracking))
        if config.local:
            for site, path in zip(sites, site_paths, strict=True):
                arm_dir = group / f"local-{path.name}"
                results.append(_run_arm(arm_dir, {"arm": "local", "site": path.name, **base},
                                        lambda s=site, d=arm_dir, t=test_set, c=class_names: local_arm(
                                            config, s, t, c, d), tracking))
        _plot_group(group / "curves.png", [r for r in results if r.group == name], name)
    write_tables(out, config, results, site_tables)
    return results


def _common_settings(config: ExperimentConfig) -> dict[str, Any]:
    return {"seed": config.seed, "bootstrap": config.bootstrap, "model": config.model, "width": config.model_width,
            "data": config.data.model_dump(), "training": config.training.model_dump()}


# ------------------------------------------------------------------------------ tables and curves


def _mean_sd_ci(values: list[float], bounds: tuple[float, float]) -> tuple[float, float | None, tuple[float, float] | None]:
    """Mean, sample sd and the t-based 95 % CI of the mean, clipped to `bounds` (the quantity's
    range); sd and CI are None with fewer than two values."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    sd = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / np.sqrt(len(values))
    return mean, sd, (max(bounds[0], mean - half), min(bounds[1], mean + half))


def summarise_seeds(config: ExperimentConfig, out: Path) -> list[dict[str, Any]]:
    """Across the seeds finished so far: per arm, macro AUC and macro recall as mean +- sd with the 95 %
    CI of the mean, and the arm's macro AUC minus the reference arm's (`reference`, pooled by default)
    of the same seed (paired: same data, same test ROIs) with its CI. Writes summary.md and summary.csv;
    returns the rows."""
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in config.seeds or []:
        path = out / f"seed-{seed}" / "results.json"
        if path.is_file():
            per_seed[seed] = json.loads(path.read_text())["arms"]
    arms: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for seed, results in per_seed.items():
        for arm in results:
            arms.setdefault((arm["group"], arm["kind"], arm["name"]), {})[seed] = arm["summary"]
    rows = []
    for (group, kind, name), by_seed in arms.items():
        reference = next((arm for (g, _, n), arm in arms.items() if g == group and n == config.reference), {})
        auc = _mean_sd_ci([s["macro_auc"] for s in by_seed.values()], (0.0, 1.0))
        recall = _mean_sd_ci([s["macro_recall"] for s in by_seed.values()], (0.0, 1.0))
        paired = [by_seed[seed]["macro_auc"] - reference[seed]["macro_auc"] for seed in by_seed if seed in reference]
        difference = _mean_sd_ci(paired, (-1.0, 1.0)) if paired and name != config.reference else None
        ratio = [by_seed[seed]["macro_auc"] / reference[seed]["macro_auc"] for seed in by_seed if seed in reference]
        rows.append({
            "group": group, "arm": kind, "name": name, "reference": config.reference, "seeds": len(by_seed),
            "test-rois": int(np.mean([s["num-examples"] for s in by_seed.values()])),
            "macro auc mean": auc[0], "macro auc sd": auc[1],
            "macro auc ci-low": None if auc[2] is None else auc[2][0],
            "macro auc ci-high": None if auc[2] is None else auc[2][1],
            "macro recall mean": recall[0], "macro recall sd": recall[1],
            # Each seed's own bootstrap CI over its test ROIs: the resolution of a single run.
            "per-seed bootstrap ci": "; ".join(
                f"{seed}: [{s['macro-auc-ci'][0]:.3f}, {s['macro-auc-ci'][1]:.3f}]"
                for seed, s in sorted(by_seed.items()) if s.get("macro-auc-ci")
            ),
            "auc / reference": float(np.mean(ratio)) if ratio else None,
            "auc - reference": None if difference is None else difference[0],
            "auc - reference ci-low": None if difference is None or difference[2] is None else difference[2][0],
            "auc - reference ci-high": None if difference is None or difference[2] is None else difference[2][1],
        })
    if not rows:
        return rows
    write_csv(out / "summary.csv", rows)

    def cell(mean: float | None, sd: float | None) -> str:
        return "–" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")

    def interval(low: float | None, high: float | None) -> str:
        return "–" if low is None else f"[{low:.3f}, {high:.3f}]"

    lines = [f"# Experiment `{config.name}`: {len(per_seed)} seed(s) ({', '.join(map(str, per_seed))})", "",
             ("Per arm over seeds: macro AUC mean ± sd and the t-based 95 % CI of the mean; each seed's own "
              f"bootstrap 95 % CI over its test ROIs beside it. 'AUC − {config.reference}' is paired by seed "
              "(the same data and test ROIs); a CI that contains 0 resolves no difference."), ""]
    for group in dict.fromkeys(row["group"] for row in rows):
        lines += [f"## `{group}`", "",
                  ("| arm | name | seeds | test ROIs | macro AUC | 95 % CI | per-seed bootstrap 95 % CI | "
                   f"macro recall | AUC / {config.reference} | AUC − {config.reference} [95 % CI] |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["group"] == group):
            ratio = "–" if row["auc / reference"] is None else f"{row['auc / reference']:.3f}"
            difference = "–" if row["auc - reference"] is None else (
                f"{row['auc - reference']:+.3f} {interval(row['auc - reference ci-low'], row['auc - reference ci-high'])}")
            lines.append(f"| {row['arm']} | {row['name']} | {row['seeds']} | {row['test-rois']} | "
                         f"{cell(row['macro auc mean'], row['macro auc sd'])} | "
                         f"{interval(row['macro auc ci-low'], row['macro auc ci-high'])} | {row['per-seed bootstrap ci']} | "
                         f"{cell(row['macro recall mean'], row['macro recall sd'])} | {ratio} | {difference} |")
        lines.append("")
    atomic_write(out / "summary.md", "\n".join(lines))
    return rows



def table_rows(results: list[ArmResult]) -> list[dict[str, Any]]:
    """One flat row per arm: the seed's Table 5 columns plus per-class AUC with 95 % CI and cost."""
    rows = []
    for r in results:
        s = r.summary
        row = {"group": r.group, "arm": r.kind, "name": r.name, "model": r.model, "test-rois": s["num-examples"],
               "accuracy": s["accuracy"], "precision": s["macro_precision"], "recall": s["macro_recall"],
               "f1": s["macro_f1"]}
        for c in s["per_class"]:
            ci = s["auc-ci"][c["name"]] or [None, None]
            row |= {f"auc {c['name']}": c["auc"], f"auc {c['name']} ci-low": ci[0], f"auc {c['name']} ci-high": ci[1]}
        macro_ci = s["macro-auc-ci"] or [None, None]
        row |= {"macro auc": s["macro_auc"], "macro auc ci-low": macro_ci[0], "macro auc ci-high": macro_ci[1],
                "wall s": round(r.wall_s, 1), "peak rss gib": round(r.peak_gib, 2)}
        rows.append(row)
    return rows


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _with_ci(row: dict[str, Any], key: str) -> str:
    low, high = row[f"{key} ci-low"], row[f"{key} ci-high"]
    ci = "" if low is None else f" [{low:.2f}, {high:.2f}]"
    return _number(row[key]) + ci


def markdown_table(rows: list[dict[str, Any]]) -> str:
    aucs = [k for k in rows[0] if k.startswith("auc ") and not k.endswith(("ci-low", "ci-high"))]
    header = ["arm", "name", "n", "accuracy", "precision", "recall", "F1", *[f"AUC {k[4:]} [95% CI]" for k in aucs],
              "macro AUC [95% CI]", "wall s", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["arm"], row["name"], str(row["test-rois"]), *(_number(row[k]) for k in ("accuracy", "precision", "recall", "f1")),
                 *(_with_ci(row, k) for k in aucs), _with_ci(row, "macro auc"), f"{row['wall s']:.0f}", f"{row['peak rss gib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(out: Path, config: ExperimentConfig, results: list[ArmResult], site_tables: dict[str, list]) -> None:
    rows = table_rows(results)
    if not rows:
        raise ValueError("the experiment has no arms: configure centralised, pooled, federated or local")
    write_csv(out / "results.csv", rows)
    parts = [f"# Experiment `{config.name}`", ""]
    cv = [r for r in results if r.group == "centralised-cv"]
    if cv:
        parts += [f"## Centralised, {config.centralised.folds}-fold patient-grouped CV (pooled out-of-fold scores)", "",
                  markdown_table(table_rows(cv)), "",
                  "Fold mean ± sd of macro AUC: " + ", ".join(
                      f"{r.name} {_number(r.extra['fold-macro-auc-mean'])} ± {_number(r.extra['fold-macro-auc-sd'])}" for r in cv),
                  ""]
    for name, table in site_tables.items():
        group = [r for r in results if r.group == name]
        sites = ", ".join(f"{t['site']} ({t['patients']} patients, " + "/".join(str(v) for k, v in t.items()
                          if k not in ("site", "patients", "rois")) + ")" for t in table)
        parts += [f"## Partition `{name}`: {config.partitions[name].scheme}", "", f"Sites (class counts): {sites}", "",
                  "Every row is scored on the union of the sites' test parts.", "", markdown_table(table_rows(group)), ""]
    atomic_write(out / "results.md", "\n".join(parts))
    write_json(out / "results.json", json.loads(json.dumps(
        {"config": config.model_dump(mode="json"), "sites": site_tables, "arms": [r.__dict__ for r in results]}, default=str)))


def _plot_group(path: Path, results: list[ArmResult], title: str) -> None:
    if not results:
        return
    epochs = sorted({e for r in results for e, _ in r.curve})
    series = {}
    for r in results:
        by_epoch = dict(r.curve)
        series[f"{r.kind} {r.name} auc"] = [by_epoch.get(e) for e in epochs]
    plot_curves(path, epochs, series, "epochs of local training", f"{title}: validation macro AUC")


# ------------------------------------------------------------------------------ CLI
