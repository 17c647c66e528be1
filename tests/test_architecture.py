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
