"""One real `flwr run` simulation (Ray backend, local SuperLink) through `pneumofed simulate`."""

from __future__ import annotations

import json

import psutil
import pytest

from pneumofed.common.cli import main


def _superlinks_started_by_pneumofed() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flower-superlink" in cmdline and "pneumofed-flwr-" in cmdline:
            found.append(process)
    return found


@pytest.mark.slow
def test_simulate_runs_the_real_apps_on_flower_and_stops_its_superlink(synthetic_sites, tmp_path, capsys):
    run_dir = tmp_path / "run"
    exit_code = main(
        [
            "simulate", "--sites", *map(str, synthetic_sites[:2]),
            "--rounds", "2", "--local-epochs", "1", "--roi-size", "32",
            "--set", "model-width=0.5", "--run-dir", str(run_dir),
        ]
    )

    assert exit_code == 0
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [record["round"] for record in history] == [1, 2]
    # Round 1's model was scored by round 2's TRAIN messages; only the last round had EVALUATE ones.
    assert [record["timing"]["evaluate-exchange-seconds"] > 0 for record in history] == [False, True]
    assert all(record["macro_auc"] is not None for record in history)
    assert set(history[-1]["site-auc"]) == {site.name for site in synthetic_sites[:2]}
    assert json.loads((run_dir / "final.json").read_text())["split"] == "test"
    assert (run_dir / "plots" / "roc.png").is_file()
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "pooled validation macro AUC by round: " in out
    assert not _superlinks_started_by_pneumofed(), "the local SuperLink outlived the simulation"
