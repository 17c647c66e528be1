"""Coordinator: the Flower ServerApp, a thin shell over `server.rounds`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.packing import PackedArraysGrid
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.polling import PromptlyPolledGrid
from pneumofed.server.rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederatedConfig.from_run_config(context.run_config)
    with RunDirectory.open(config, flower_run_id=context.run_id) as run:
        run_federation(PackedArraysGrid(PromptlyPolledGrid(grid)), config, run)
    print(f"pneumofed run directory: {run.path}  (plots in {run.path / 'plots'})", flush=True)
