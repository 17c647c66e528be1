"""The Flower app that `flwr run` ships: written on demand from the installed package.

`flwr run` takes a folder with a `pyproject.toml` that names the ServerApp and ClientApp and the
run configuration's defaults. That folder is generated here rather than being this repository:
a plain `pip install pneumofed` can then simulate or coordinate, the defaults come from the one
typed `FederatedConfig`, and the FAB carries no code (every node runs its installed, reviewed
pneumofed; the apps are referenced by import path).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomli_w

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.files import atomic_write

FLOWER_VERSION = "1.42.0"
SERVER_APP = "pneumofed.server.app:app"
CLIENT_APP = "pneumofed.client.app:app"
# Flower's FAB format 1 requires `[project].license = { file = "LICENSE" }` and that file in the FAB.
LICENSE_FILE = "LICENSE"


def _license_text() -> str:
    try:
        dist = distribution("pneumofed")
    except PackageNotFoundError as error:
        raise RuntimeError("pneumofed is not installed: `pip install .` first") from error
    for file in dist.files or []:
        if file.name == LICENSE_FILE:
            return file.read_text()
    raise RuntimeError(f"the installed pneumofed {dist.version} carries no {LICENSE_FILE} file")


def flower_app_config(defaults: FederatedConfig | None = None) -> dict:
    """The app's pyproject.toml as a mapping; run-config defaults are `FederatedConfig`'s own."""
    return {
        "project": {
            "name": "pneumofed-app",
            "version": distribution("pneumofed").version,
            "description": "pneumofed's Flower ServerApp and ClientApp (from the installed package)",
            "license": {"file": LICENSE_FILE},
            # FAB format 1 derives the supported Flower range from an inclusive lower bound.
            "dependencies": [f"flwr>={FLOWER_VERSION},<={FLOWER_VERSION}", "pneumofed"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "pneumofed",
                    "fab-format-version": 1,
                    "flwr-version-target": FLOWER_VERSION,
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": (defaults or FederatedConfig()).to_run_config(),
                }
            }
        },
    }


def write_flower_app(directory: str | Path) -> Path:
    """Write (or refresh) the app folder: `pyproject.toml` and `LICENSE`; returns the folder."""
    directory = Path(directory)
    atomic_write(directory / "pyproject.toml", tomli_w.dumps(flower_app_config()))
    atomic_write(directory / LICENSE_FILE, _license_text())
    return directory
