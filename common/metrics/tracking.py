"""Optional MLflow tracking: a run's parameters, metrics per step, result files and model file.

mlflow is imported only when a run starts, so nothing pays for the import (seconds) unless tracking
is on, and a missing mlflow is reported then, before any training, with the install command.
Tracking is a copy of what the run's own folder holds: once a run has started, a failing tracking
store (an unreachable server, a full disk) stops the tracking with one warning, never the run.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("pneumofed.tracking")

LOCAL_STORE = "mlflow.db"
# MLflow's own tag that makes a run a child of another in its UI.
PARENT_RUN_TAG = "mlflow.parentRunId"


class MlflowNotInstalled(ImportError):
    """Tracking was asked for where mlflow is not installed."""

    def __init__(self) -> None:
        super().__init__("MLflow tracking is on but mlflow is not installed: pip install 'pneumofed[tracking]'")


def local_tracking_uri(folder: Path) -> str:
    """The SQLite store `folder/mlflow.db`: MLflow 3 refuses a plain `file:` store unless
    MLFLOW_ALLOW_FILE_STORE is set, and SQLite needs no server."""
    return f"sqlite:///{(Path(folder) / LOCAL_STORE).resolve()}"


def flat_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in `values` under MLflow metric names: nested mappings joined with '.', a list of
    mappings that carry a "name" (per-class rows) keyed by that name; other lists, text and flags are
    left out. Characters MLflow refuses in a name become '_'."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = prefix + _metric_name(key)
        if isinstance(value, Mapping):
            flat |= flat_metrics(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(row, Mapping) and "name" in row for row in value):
            for row in value:
                fields = {k: v for k, v in row.items() if k != "name"}
                flat |= flat_metrics(fields, f"{name}.{_metric_name(row['name'])}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`values` as MLflow parameters: nested mappings joined with '.', text as it is, everything
    else as JSON (true, 0.001, [1, 2]), as config.json spells it."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = prefix + _metric_name(key)
        if isinstance(value, Mapping) and value:
            flat |= flat_params(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def run_status(ended_by: type[BaseException] | None) -> str:
    """The MLflow status of a run that ended normally (None), was interrupted or failed."""
    if ended_by is None:
        return "FINISHED"
    return "KILLED" if issubclass(ended_by, KeyboardInterrupt) else "FAILED"


def _metric_name(key: object) -> str:
    # MLflow allows letters, digits, '_', '-', '.', ' ' (and '/', which it may treat as a path).
    return re.sub(r"[^\w.\- ]", "_", str(key))


class MlflowTracker:
    """One MLflow run. Start it with `start` (which may raise: nothing has run yet); every later call
    logs a warning instead of raising, and after a failure the tracker logs nothing more."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, experiment_id: str, *,
                 continued: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.continued = continued  # an earlier run reopened, not a new one
        self.failed = False

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, str],
        *,
        continue_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> MlflowTracker:
        """A new run of `experiment` (created if missing) in the store at `tracking_uri`, or the run
        `continue_run_id` reopened (a resumed run): parameters it already has are kept, as MLflow
        never changes one (a run that is no longer there is started anew: see `continued`)."""
        try:
            from mlflow import MlflowClient
        except ImportError as error:
            raise MlflowNotInstalled from error
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri)
        if continue_run_id is not None:
            try:
                run = client.get_run(continue_run_id)
            except MlflowException as error:
                log.warning("MLflow run %s is not in %s (%s); starting a new one", continue_run_id, tracking_uri, error)
            else:
                client.update_run(continue_run_id, status="RUNNING")
                tracker = cls(client, continue_run_id, tracking_uri, run.info.experiment_id, continued=True)
                tracker._log_params({k: v for k, v in params.items() if k not in run.data.params})
                return tracker
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=_local_artifact_location(tracking_uri))
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        tracker = cls(client, run.info.run_id, tracking_uri, experiment_id)
        tracker._log_params(params)
        return tracker

    def start_nested(self, run_name: str, params: Mapping[str, str],
                     tags: Mapping[str, str] | None = None) -> MlflowTracker | None:
        """A run shown nested under this one (same store and experiment); None once tracking failed."""
        nested: list[MlflowTracker] = []

        def create() -> None:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags=dict(tags or {}) | {PARENT_RUN_TAG: self.run_id})
            nested.append(MlflowTracker(self.client, run.info.run_id, self.tracking_uri, self.experiment_id))
            nested[0]._log_params(params)

        self._safely(f"starting the nested run {run_name}", create)
        return nested[0] if nested and not self.failed else None

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self._safely("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Copy each existing file or folder in `paths` into the run's artifacts (a folder keeps its name)."""
        for path in map(Path, paths):
            if path.is_dir():
                folder = path.name if artifact_path is None else f"{artifact_path}/{path.name}"
                self._safely(f"storing {path}",
                             lambda p=path, f=folder: self.client.log_artifacts(self.run_id, str(p), f))
            elif path.is_file():
                self._safely(f"storing {path}",
                             lambda p=path: self.client.log_artifact(self.run_id, str(p), artifact_path))

    def log_model_file(self, path: Path) -> None:
        """A pneumofed model file, stored as it is under `model/` (a file that loads as tensors and
        plain data only, unlike a pickled mlflow.pytorch model)."""
        self.log_artifacts([path], "model")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        self._safely("ending the run", lambda: self.client.set_terminated(self.run_id, status))

    def _safely(self, what: str, action: Callable[[], object]) -> None:
        if self.failed:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001  (any failure of the store: HTTP, database, disk)
            self.failed = True
            log.warning("MLflow tracking stopped: %s in %s failed (%s); the run goes on, and its own files "
                        "hold every result", what, self.tracking_uri, error)


def _local_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts beside the database (`mlartifacts/`): MLflow's default is
    `./mlruns` in whatever folder the process happens to run in. Other stores choose their own."""
    database = tracking_uri.removeprefix("sqlite:///")
    if database == tracking_uri or not database:
        return None
    return (Path(database).resolve().parent / "mlartifacts").as_uri()
