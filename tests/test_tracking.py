"""Optional MLflow tracking of federated runs and experiments, read back from a local SQLite store."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from pneumofed.common.metrics.tracking import MlflowNotInstalled, MlflowTracker, local_tracking_uri
from pneumofed.simulations.cli.experiment import configure_parser, run
from pneumofed.simulations.experiment import load_config
from pneumofed.simulations.inprocess import run_in_process

SMALL_RUN = {"model-width": 0.5, "roi-size": 32, "local-epochs": 1, "batch-size": 16}


def _only_run(client: MlflowClient, experiment: str):
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return found


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id, folder)}


def test_a_tracked_run_logs_its_config_rounds_test_metrics_plots_and_best_model(synthetic_sites, tmp_path):
    run_dir = tmp_path / "runs" / "tracked"
    run, _ = run_in_process(synthetic_sites,
                            SMALL_RUN | {"num-server-rounds": 2, "run-dir": str(run_dir), "mlflow": True})

    # The default store: SQLite beside the run directory, artifacts beside it too (not in the working folder).
    client = MlflowClient(local_tracking_uri(tmp_path / "runs"))
    tracked = _only_run(client, "pneumofed")
    assert json.loads((run_dir / "mlflow.json").read_text())["run-id"] == tracked.info.run_id
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "tracked"
    assert tracked.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())

    config = json.loads((run_dir / "config.json").read_text())
    assert tracked.data.params == {key: value if isinstance(value, str) else json.dumps(value)
                                   for key, value in config.items()}
    assert tracked.data.params["mlflow"] == "true" and tracked.data.params["num-server-rounds"] == "2"

    history = json.loads((run_dir / "metrics.json").read_text())
    site = synthetic_sites[0].name
    expected = {
        "macro_auc": [(r["round"], r["macro_auc"]) for r in history],
        "eval-loss": [(r["round"], r["eval-loss"]) for r in history],
        "accuracy": [(r["round"], r["accuracy"]) for r in history],
        "train-loss": [(r["round"], r["train-loss"]) for r in history],
        "per_class.nodule.auc": [(r["round"], r["per_class"][0]["auc"]) for r in history],
        "per_class.emphysema.auc": [(r["round"], r["per_class"][2]["auc"]) for r in history],
        f"site-auc.{site}.macro": [(r["round"], r["site-auc"][site]["macro"]) for r in history],
        "timing.round-seconds": [(r["round"], r["timing"]["round-seconds"]) for r in history],
        "timing.overhead-seconds": [(r["round"], r["timing"]["overhead-seconds"]) for r in history],
        "rejected-updates": [(r["round"], len(r["rejected-updates"])) for r in history],
        "rejected-evaluations": [(r["round"], len(r["rejected-evaluations"])) for r in history],
    }
    for key, values in expected.items():
        assert _history(client, tracked.info.run_id, key) == values, key

    final = json.loads((run_dir / "final.json").read_text())
    assert _history(client, tracked.info.run_id, "test-macro_auc") == [(final["best-round"], final["macro_auc"])]
    assert tracked.data.metrics["test-per_class.nodule.auc"] == pytest.approx(final["per_class"][0]["auc"])
    assert "test-timing.round-seconds" not in tracked.data.metrics

    assert {"config.json", "metrics.json", "metrics.csv", "final.json", "report.html", "plots", "model"} <= _artifacts(
        client, tracked.info.run_id)
    assert {"plots/curves.png", "plots/roc_test.png", "plots/confusion_test.png"} <= _artifacts(
        client, tracked.info.run_id, "plots")
    best = client.download_artifacts(tracked.info.run_id, "model/best.pt", str(tmp_path / "downloaded"))
    assert Path(best).read_bytes() == (run.path / "models" / "best.pt").read_bytes()


def test_tracking_is_off_by_default_and_a_resumed_run_continues_its_mlflow_run(synthetic_sites, tmp_path):
    run_dir = tmp_path / "runs" / "resumed"
    config = SMALL_RUN | {"run-dir": str(run_dir)}
    run_in_process(synthetic_sites, config | {"num-server-rounds": 1})
    assert sorted(path.name for path in tmp_path.rglob("mlflow*")) == []

    # Tracking turned on when resuming: a new MLflow run that also gets the round recorded before.
    run_in_process(synthetic_sites, config | {"num-server-rounds": 2, "resume": True, "mlflow": True})
    client = MlflowClient(local_tracking_uri(tmp_path / "runs"))
    first = _only_run(client, "pneumofed")
    # Resumed again: the same MLflow run goes on, its parameters as first logged (MLflow never changes one).
    run_in_process(synthetic_sites, config | {"num-server-rounds": 3, "resume": True, "mlflow": True})
    tracked = _only_run(client, "pneumofed")
    assert tracked.info.run_id == first.info.run_id and tracked.info.status == "FINISHED"
    history = json.loads((run_dir / "metrics.json").read_text())
    assert _history(client, tracked.info.run_id, "macro_auc") == [(r["round"], r["macro_auc"]) for r in history]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert tracked.data.params["num-server-rounds"] == "2"


def test_without_mlflow_tracking_fails_before_any_round_and_names_the_install(synthetic_sites, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    run_dir = tmp_path / "run"
    with pytest.raises(MlflowNotInstalled, match=r"pip install 'pneumofed\[tracking\]'"):
        run_in_process(synthetic_sites, SMALL_RUN | {"run-dir": str(run_dir), "mlflow": True})
    assert not (run_dir / "metrics.json").exists()


def test_a_tracking_store_that_fails_mid_run_does_not_stop_the_run(synthetic_sites, tmp_path, monkeypatch, caplog):
    logged = MlflowClient.log_batch

    def unreachable_for_metrics(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics:
            raise ConnectionError("tracking server unreachable")
        return logged(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", unreachable_for_metrics)
    run_dir = tmp_path / "runs" / "run"
    with caplog.at_level(logging.WARNING, logger="pneumofed.tracking"):
        run_in_process(synthetic_sites[:2], SMALL_RUN | {"num-server-rounds": 2, "run-dir": str(run_dir), "mlflow": True})
    assert len(json.loads((run_dir / "metrics.json").read_text())) == 2 and (run_dir / "final.json").is_file()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "pneumofed.tracking"]
    assert "tracking server unreachable" in warning and "the run goes on" in warning
    monkeypatch.undo()
    assert _only_run(MlflowClient(local_tracking_uri(tmp_path / "runs")), "pneumofed").data.metrics == {}


def test_a_tracker_that_failed_logs_nothing_more(tmp_path, monkeypatch):
    tracker = MlflowTracker.start(local_tracking_uri(tmp_path), "e", "r", {})
    calls = []
    monkeypatch.setattr(tracker.client, "log_batch", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.log_metrics({"a": 2.0}, step=2)
    assert tracker.failed and len(calls) == 1


def test_an_experiment_is_one_parent_run_with_a_nested_run_per_arm(synthetic_sites, tmp_path):
    stores = ", ".join(f'"{s}"' for s in synthetic_sites[:2])
    config = tmp_path / "tracked.toml"
    config.write_text(f"""
name = "tracked"
bootstrap = 20
model_width = 0.5
pooled = false
[data]
kind = "stores"
roi_size = 32
stores = [{stores}]
[training]
epochs = 1
augment = false
[federated]
rounds = 1
engine = "in-process"
[partitions.natural]
scheme = "natural"
""")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    out = tmp_path / "results" / "tracked"
    assert run(parser.parse_args([str(config), "--out", str(out), "--mlflow"])) == 0

    client = MlflowClient(local_tracking_uri(tmp_path / "results"))
    experiment = client.get_experiment_by_name("tracked").experiment_id
    runs = {found.info.run_name: found for found in client.search_runs([experiment])}
    assert set(runs) == {"tracked", "natural/federated-fedavg", "natural/local-site-01", "natural/local-site-02"}
    parent = runs.pop("tracked")
    assert parent.data.params["federated.rounds"] == "1" and parent.data.params["data.kind"] == "stores"
    assert {"report.html", "results.md", "results.csv"} <= _artifacts(client, parent.info.run_id)
    arms = {arm["name"]: arm for arm in json.loads((out / "results.json").read_text())["arms"]}
    for name, nested in runs.items():
        assert nested.data.tags["mlflow.parentRunId"] == parent.info.run_id and nested.info.status == "FINISHED"
        arm = arms[name.split("/")[1].removeprefix("federated-")]
        assert nested.data.params["arm"] == ("federated" if arm["kind"] == "federated" else "local")
        assert nested.data.metrics["test-macro_auc"] == pytest.approx(arm["summary"]["macro_auc"])
        assert nested.data.metrics["wall-seconds"] == pytest.approx(arm["wall_s"])
        assert _history(client, nested.info.run_id, "val-macro_auc") == [
            (int(epochs), auc) for epochs, auc in arm["curve"] if auc is not None]
        assert {"test_roc.png", "test_confusion.png", "test_metrics.json"} <= _artifacts(client, nested.info.run_id)
    assert "report.html" in _artifacts(client, runs["natural/federated-fedavg"].info.run_id)

    # Run again into the same folder: the arms are reused and already logged, so nothing is logged twice.
    assert run(parser.parse_args([str(config), "--out", str(out), "--mlflow"])) == 0
    assert len(client.search_runs([experiment])) == 4


def test_an_experiment_tracks_its_arms_itself_rather_than_through_their_run_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('name = "x"\n[data]\nkind = "synthetic"\n[partitions.a]\nscheme = "natural"\n'
                      '[federated]\nrun_config = { "mlflow" = true }\n')
    with pytest.raises(ValidationError, match=r"run_config may not set \['mlflow'\]"):
        load_config(config)
