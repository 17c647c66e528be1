"""A federated run's directory: resolved config, metrics per round, models, plots, resume state.

Layout (all under the run directory):
  config.json               resolved run configuration
  metrics.json, metrics.csv one record per completed round (pooled and per-site evaluation)
  models/round-NNN.pt       the global model after every round (pneumofed model files)
  models/best.pt            the round with the best pooled macro AUC on the sites' validation parts
                            (lower validation loss breaks ties)
  final.json                the best model evaluated once on the sites' test parts
  cross_site.json           with cross-site-validation: every site's test macro AUC of the global model
                            and of each local-only model a site shares (server/cross_site.py)
  plots/*.png               loss/accuracy/AUC per round, pooled ROC per class, confusion matrix
                            (drawn when the rounds are done)
  report.html               all of the above on one self-contained page, with the privacy settings,
                            rejected replies and the command that runs the settings again
  state/checkpoint.pt       what `--resume` needs: last round, global arrays, optimiser state
  audit.jsonl               the run audit: starts, each round's participants and global model digest,
                            the end, then (cross-site validation) the digests of the models sent
  mlflow.json               with tracking on (run config `mlflow`): the MLflow store and run this run
                            logs to, so that a resumed run continues that run
"""

from __future__ import annotations

import io
import json
import math
import shlex
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import tomli_w
import torch
from flwr.app import ArrayRecord, Message

from pneumofed.common.federation.audit import PRIVACY_METRICS, append_run_audit
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.exchange import exchanged_state, load_exchanged_state
from pneumofed.common.federation.pooling import PooledEvaluation
from pneumofed.common.files import atomic_write, write_csv, write_json
from pneumofed.common.learning.modelfile import ModelCard, save_model_file
from pneumofed.common.learning.state import load_tensor_file
from pneumofed.common.metrics.html_report import RunFiles, run_report_html
from pneumofed.common.metrics.plots import plot_confusion, plot_curves, plot_roc
from pneumofed.common.metrics.report import ClassificationReport, selection_key
from pneumofed.common.metrics.tracking import MlflowTracker, flat_metrics, flat_params, local_tracking_uri, run_status

if TYPE_CHECKING:
    from pneumofed.server.rounds import RoundTiming, TrainRound

# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"num_server_rounds", "resume", "round_timeout", "run_dir", "mlflow", "mlflow_tracking_uri"}
# Run-config keys a command that runs the settings again passes otherwise (sites, run-dir; local-models:
# `simulate --cross-site` trains them anew) or not at all (resume: the settings are run afresh).
NOT_REPRODUCED = {"sites", "run-dir", "resume", "local-models"}
# The MLflow experiment of federated runs, and what each MLflow run stores of its run directory when it ends.
TRACKING_EXPERIMENT = "pneumofed"
TRACKED_FILES = ("config.json", "metrics.json", "metrics.csv", "final.json", "cross_site.json", "report.html", "plots")


class RunDirectory:
    def __init__(self, path: Path, config: FederatedConfig, flower_run_id: int) -> None:
        self.path = path
        self.config = config
        self.flower_run_id = flower_run_id
        self.history: list[dict[str, Any]] = []
        self.completed_rounds = 0
        self.global_arrays: ArrayRecord | None = None
        self.optimiser_state: dict[str, Any] = {}
        self.best_round: int | None = None
        self.best_key = (float("-inf"), float("-inf"))
        self.tracker: MlflowTracker | None = None

    @classmethod
    def open(cls, config: FederatedConfig, flower_run_id: int) -> RunDirectory:
        path = Path(config.run_dir) if config.run_dir else Path.home() / "pneumofed-runs" / f"run-{flower_run_id}"
        run = cls(path, config, flower_run_id)
        checkpoint = path / "state" / "checkpoint.pt"
        if config.resume:
            if not checkpoint.is_file():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {checkpoint}")
            run._restore(checkpoint)
        elif checkpoint.exists():
            raise FileExistsError(
                f"{path} already holds a run; resume it (resume=true) or choose another run-dir"
            )
        path.mkdir(parents=True, exist_ok=True)
        settings = config.to_run_config() | {"flower-run-id": flower_run_id}
        write_json(path / "config.json", settings)
        run.audit("run-resumed" if config.resume else "run-started", details={"completed-rounds": run.completed_rounds})
        if config.mlflow:
            run._start_tracking(settings)
        return run

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """End the MLflow run (with tracking on), storing the run's result files as they are now."""
        if self.tracker is None:
            return
        self.tracker.log_artifacts([self.path / name for name in TRACKED_FILES])
        self.tracker.log_model_file(self.path / "models" / "best.pt")
        self.tracker.finish(run_status(kind))

    def _start_tracking(self, settings: dict[str, Any]) -> None:
        """Start the MLflow run, or continue the one mlflow.json names when resuming into the same
        store; a new run of a resumed run gets the rounds recorded so far."""
        uri = self.config.mlflow_tracking_uri or local_tracking_uri(self.path.parent)
        record = self.path / "mlflow.json"
        earlier = json.loads(record.read_text()) if self.config.resume and record.is_file() else {}
        self.tracker = MlflowTracker.start(
            uri, TRACKING_EXPERIMENT, self.path.name, flat_params(settings),
            continue_run_id=earlier.get("run-id") if earlier.get("tracking-uri") == uri else None,
            tags={"pneumofed.run-dir": str(self.path)},
        )
        write_json(record, {"tracking-uri": uri, "run-id": self.tracker.run_id})
        if not self.tracker.continued:
            for recorded in self.history:
                self._track_round(recorded)

    def _track_round(self, record: dict[str, Any]) -> None:
        """A round's numbers as MLflow metrics at step = round (rejected replies as their count)."""
        if self.tracker is None:
            return
        rejected = {key: len(record[key]) for key in ("rejected-updates", "rejected-evaluations") if key in record}
        self.tracker.log_metrics(flat_metrics({k: v for k, v in record.items() if k != "round"}) | rejected,
                                 step=record["round"])

    def audit(self, event: str, **fields: Any) -> None:
        append_run_audit(self.path / "audit.jsonl", run_id=self.flower_run_id, event=event, **fields)

    def _restore(self, checkpoint: Path) -> None:
        state = load_tensor_file(checkpoint)
        saved = FederatedConfig.model_validate(state["config"])
        changed = {
            name
            for name in FederatedConfig.model_fields
            if getattr(saved, name) != getattr(self.config, name) and name not in RESUMABLE_CHANGES
        }
        if changed:
            raise ValueError(f"cannot resume with different settings: {', '.join(sorted(changed))}")
        self.completed_rounds = state["round"]
        self.global_arrays = ArrayRecord(state["arrays"])
        self.optimiser_state = state["optimiser_state"]
        self.best_round, self.best_key = state["best_round"], tuple(state["best_key"])
        self.history = json.loads((self.path / "metrics.json").read_text())[: self.completed_rounds]

    def record_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        trained: TrainRound | None,
        evaluation: PooledEvaluation | None,
        optimiser_state: dict[str, Any],
        timing: RoundTiming | None = None,
    ) -> None:
        recording = time.perf_counter()
        record: dict[str, Any] = {"round": server_round, **(trained.metrics if trained else {})}
        record.pop("num-examples", None)
        for key in PRIVACY_METRICS:  # an average of the sites' spends bounds no one's privacy
            record.pop(key, None)
        privacy = trained.privacy if trained else {}
        if privacy:
            record["dp-sgd"] = privacy
        if evaluation is not None:
            record.update(evaluation.summary())
        rejected = trained.rejected if trained else []
        record["rejected-updates"] = rejected
        self.history.append(record)

        model_path = self.save_model(self.path / "models" / f"round-{server_round:03d}.pt", arrays, server_round)
        if evaluation is not None:
            key = selection_key(evaluation.report.macro_auc, evaluation.loss)
            if key > self.best_key:
                self.best_round, self.best_key = server_round, key
                atomic_write(self.path / "models" / "best.pt", model_path.read_bytes())
        if timing is not None:  # the model files are the bulk of recording; metrics.json follows
            record["timing"] = timing.summary() | {"record-seconds": time.perf_counter() - recording}
        self._write_metrics()
        state = {
            "config": self.config.model_dump(),
            "round": server_round,
            "arrays": arrays.to_torch_state_dict(),
            "optimiser_state": optimiser_state,
            "best_round": self.best_round,
            "best_key": list(self.best_key),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.path / "state" / "checkpoint.pt", buffer.getvalue())
        self.completed_rounds = server_round
        details: dict[str, Any] = {"rejected-updates": len(rejected)}
        if privacy:
            details["dp-epsilon"] = {node: spend["dp-epsilon"] for node, spend in privacy.items()}
        self.audit("round", server_round=server_round, participants=trained.participants if trained else [],
                   arrays=arrays, details=details)
        self._track_round(record)

    def save_model(self, path: Path, arrays: ArrayRecord, server_round: int) -> Path:
        model = self.config.build_model()
        # Under fedbn/silobn the global model has no site's BatchNorm part: the file carries the
        # layers' initial values there (`pneumofed evaluate --calibrate-bn` fits statistics to a site).
        load_exchanged_state(model, arrays.to_torch_state_dict(), self.config.bn_mode)
        card = ModelCard(
            model=self.config.model,
            width=self.config.model_width,
            class_names=self.config.classes,
            roi_size=self.config.roi_size,
            norm_layer=self.config.norm_layer,
            provenance={"strategy": self.config.strategy, "round": server_round, "run_dir": str(self.path)},
        )
        return save_model_file(path, model, card)

    def best_arrays(self) -> ArrayRecord | None:
        if self.best_round is None:
            return None
        payload = load_tensor_file(self.path / "models" / "best.pt")
        # The model file is a whole model; what travels is its exchanged part (no site's BatchNorm
        # under fedbn/silobn).
        exchanged = exchanged_state(self.config.build_model(), self.config.bn_mode)
        return ArrayRecord({name: payload["state"][name] for name in exchanged})

    def write_final(self, evaluation: PooledEvaluation) -> None:
        summary = {"best-round": self.best_round, "split": "test", **evaluation.summary()}
        write_json(self.path / "final.json", summary)
        if self.tracker is not None:
            self.tracker.log_metrics(flat_metrics(summary, prefix="test-"), step=self.best_round)
        self.audit("run-finished", details={"best-round": self.best_round})
        report = evaluation.report
        _plot_report_roc(self.path / "plots" / "roc_test.png", report, f"Pooled ROC on the sites' test parts (round {self.best_round})")
        plot_confusion(self.path / "plots" / "confusion_test.png", report.confusion_matrix, report.class_names, "Test")
        self.write_report()

    def write_cross_site(self, matrix: dict[str, Any]) -> None:
        """cross_site.json (see server/cross_site.py), and the report with its table."""
        write_json(self.path / "cross_site.json", matrix)
        self.write_report()

    def _write_metrics(self) -> None:
        write_json(self.path / "metrics.json", self.history)
        write_csv(self.path / "metrics.csv", [_flatten(record) for record in self.history])

    def write_plots(self, last_evaluation: PooledEvaluation | None) -> None:
        """Curves over all recorded rounds, and the last round's pooled ROC and confusion matrix.

        Drawn once a run's rounds are done rather than every round: matplotlib costs about as much
        as a round of local training on small sites.
        """
        if not self.history:
            return
        rounds = [record["round"] for record in self.history]
        columns = {
            "train loss": "train-loss",
            "eval loss": "eval-loss",
            "train accuracy": "train-accuracy",
            "eval accuracy": "accuracy",
            "pooled macro auc": "macro_auc",
        }
        series = {label: [record.get(key) for record in self.history] for label, key in columns.items()}
        plot_curves(self.path / "plots" / "curves.png", rounds, series, "round", "Federated training")
        if last_evaluation is not None:
            report = last_evaluation.report
            _plot_report_roc(self.path / "plots" / "roc.png", report, f"Pooled ROC per class (round {rounds[-1]})")
            plot_confusion(self.path / "plots" / "confusion.png", report.confusion_matrix, report.class_names, f"Round {rounds[-1]}")
        self.write_report()

    def write_report(self) -> Path:
        """report.html from the files the run directory holds now. Written with the plots and again
        with the final test evaluation, so a run that ends without one still has its page."""
        page = run_report_html(RunFiles.read(self.path), reproduce_command(self.config, self.path))
        return atomic_write(self.path / "report.html", page)


def reported_privacy(replies: Iterable[Message]) -> dict[str, dict[str, float]]:
    """Each site's DP-SGD spend as its TRAIN reply states it (`PRIVACY_METRICS`: epsilon after the
    round, the round's own epsilon, delta), by node id. A site spent it whether or not its update
    was accepted; a reply without all of them as finite non-negative numbers states none."""
    spends = {}
    for reply in replies:
        if reply.has_error():
            continue
        for metrics in reply.content.metric_records.values():
            values = [metrics.get(key) for key in PRIVACY_METRICS]
            if all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
                spends[str(reply.metadata.src_node_id)] = dict(zip(PRIVACY_METRICS, map(float, values), strict=True))
    return dict(sorted(spends.items()))


def reproduce_command(config: FederatedConfig, run_dir: Path) -> str:
    """The command line that runs `config` again: `pneumofed simulate` when it names the sites' stores
    (a simulation), else `flwr run` of the deployment's app. Only settings that differ from the
    defaults are spelt out."""
    defaults = FederatedConfig().to_run_config()
    changed = {key: value for key, value in config.to_run_config().items()
               if key not in NOT_REPRODUCED and value != defaults[key]}
    if config.site_paths:
        arguments = ["pneumofed", "simulate", "--sites", *map(str, config.site_paths), "--run-dir", str(run_dir)]
        if config.local_models:  # the local-only models `--cross-site` trained (and sets cross-site-validation)
            arguments.append("--cross-site")
            changed.pop("cross-site-validation", None)
        arguments += [part for key, value in changed.items() for part in ("--set", f"{key}={_toml_value(value)}")]
        return shlex.join(arguments)
    if config.run_dir:
        changed["run-dir"] = config.run_dir
    settings = " ".join(f"{key}={_toml_value(value)}" for key, value in changed.items())
    command = "flwr run FLOWER_APP FEDERATION" + (f" --run-config {shlex.quote(settings)}" if settings else "") + " --stream"
    # The ServerApp knows neither the app folder it was shipped from nor the federation's name.
    return f"# FLOWER_APP: the coordinator kit's flower-app folder; FEDERATION: its name (docs/deploy.md)\n{command}"


def _toml_value(value: object) -> str:
    """`value` as TOML, as `--set` and `flwr run --run-config` read it."""
    return tomli_w.dumps({"value": value}).partition("=")[2].strip()


def _plot_report_roc(path: Path, report: ClassificationReport, title: str) -> None:
    curves = {c.name: (c.roc.fpr, c.roc.tpr) for c in report.per_class if c.roc is not None}
    plot_roc(path, curves, {c.name: c.auc for c in report.per_class}, title)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat
