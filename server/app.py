"""Coordinator: runs the configured Flower strategy, pools evaluation, writes the run directory."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from pneumofed.common.config import FederatedConfig
from pneumofed.common.models import build_model
from pneumofed.common.weights import exchanged_state
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.strategy import build_strategy

log = logging.getLogger("pneumofed.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederatedConfig.from_run_config(context.run_config)
    run = RunDirectory.open(config, flower_run_id=context.run_id)
    run_federation(grid, config, run)
    print(f"pneumofed run directory: {run.path}  (plots in {run.path / 'plots'})", flush=True)


def initial_arrays(config: FederatedConfig) -> ArrayRecord:
    """The seeded random initialisation every site starts from."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(config.classes), in_channels=1, width=config.model_width)
    return ArrayRecord(exchanged_state(model))


def run_federation(grid: Grid, config: FederatedConfig, run: RunDirectory) -> None:
    strategy = build_strategy(config, config.classes)
    strategy.round_offset = run.completed_rounds
    strategy.restore_optimiser_state(run.optimiser_state)

    def record_round(flower_round: int, arrays: ArrayRecord) -> None:
        if flower_round == 0:  # Flower's call before the first round: nothing trained yet
            return None
        server_round = flower_round + strategy.round_offset
        run.record_round(
            server_round,
            arrays,
            strategy.train_metrics.get(server_round),
            strategy.evaluations.get(server_round),
            strategy.rejected_updates.get(server_round, []),
            strategy.optimiser_state(),
            strategy.participants.get(server_round, []),
        )
        return None

    remaining = config.num_server_rounds - run.completed_rounds
    if remaining > 0:
        strategy.start(
            grid,
            run.global_arrays or initial_arrays(config),
            num_rounds=remaining,
            timeout=config.round_timeout,
            train_config=ConfigRecord({"local-epochs": config.local_epochs, "learning-rate": config.learning_rate}),
            evaluate_config=ConfigRecord({"split": "val"}),
            evaluate_fn=record_round,
        )
    run.write_plots(strategy.evaluations.get(run.completed_rounds))
    best = run.best_arrays()
    if best is None:
        log.warning("no round produced a pooled AUC; skipping the final test evaluation")
        return
    config_record = ConfigRecord({"split": "test", "server-round": config.num_server_rounds})
    messages = [
        Message(RecordDict({"arrays": best, "config": config_record}), node_id, MessageType.EVALUATE)
        for node_id in grid.get_node_ids()
    ]
    evaluation = strategy.pool(list(grid.send_and_receive(messages, timeout=config.round_timeout)))
    if evaluation is not None:
        run.write_final(evaluation)
