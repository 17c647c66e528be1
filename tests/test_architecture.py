"""The import direction stated in README holds (contracts in pyproject.toml, checked by import-linter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_subcommand_is_registered_by_the_package_that_implements_it():
    from pneumofed.common.cli import subcommands

    commands = subcommands()
    assert list(commands) == ["synth", "prepare", "train", "simulate", "experiment", "evaluate", "predict", "provision"]
    for name, (module, _) in commands.items():
        package = module.split(".")[1]
        assert module == f"pneumofed.{package}.cli.{name}"
    assert {module.split(".")[1] for module, _ in commands.values()} == {"common", "simulations", "deploy"}


def _top_level_modules_loaded_by(module: str) -> set[str]:
    probe = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_the_clientapp_does_not_import_what_only_optional_features_need():
    # In a deployment every message starts a new ClientApp process, which pays every import again:
    # Opacus (DP-SGD), MLflow (tracking), matplotlib and Grad-CAM (reports, heatmaps) cost seconds.
    loaded = _top_level_modules_loaded_by("pneumofed.client.app")
    assert loaded & {"opacus", "mlflow", "matplotlib", "pytorch_grad_cam"} == set()
    assert {"torch", "flwr"} <= loaded  # the probe itself works


def test_the_serverapp_loads_opacus_and_mlflow_only_when_a_run_asks_for_them():
    assert _top_level_modules_loaded_by("pneumofed.server.app") & {"opacus", "mlflow"} == set()
