"""Flower's own aggregation strategies, configured from the run configuration.

pneumofed uses a strategy for what it is for: choosing which nodes take part in a round
(`configure_train`, `configure_evaluate`) and aggregating the accepted updates (`aggregate_train`).
Everything else a round needs (validating replies, pooling evaluation, recording the round) is
in `server.rounds`, around the strategy rather than inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)

from pneumofed.common.federation.config import FederatedConfig

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

# Strategies that take an optimiser step on the server (their BatchNorm statistics are averaged plainly).
SERVER_OPTIMISERS = frozenset({"fedadam", "fedavgm"})

# Server-side optimiser state that must survive a resume (FedOpt moments, FedAvgM momentum).
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def build_strategy(config: FederatedConfig) -> FedAvg:
    """Flower's implementation of `config.strategy`, with the run's sampling and hyper-parameters."""
    sampling: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_nodes,
        "min_evaluate_nodes": config.min_nodes,
        "min_available_nodes": config.min_nodes,
    }
    specific: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": config.proximal_mu},
        "fedadam": {"eta": config.server_learning_rate, "eta_l": config.learning_rate},
        "fedavgm": {"server_learning_rate": 1.0, "server_momentum": config.server_momentum},
        "fedtrimmedavg": {"beta": config.trim_beta},
        "krum": {"num_malicious_nodes": config.krum_malicious},
    }
    return STRATEGIES[config.strategy](**sampling, **specific.get(config.strategy, {}))


def optimiser_state(strategy: FedAvg) -> dict[str, Any]:
    """The strategy's optimiser state as tensors (a checkpoint holds tensors and plain data only)."""
    return {
        name: _map_arrays(getattr(strategy, name), torch.from_numpy)
        for name in STATEFUL_ATTRIBUTES
        if getattr(strategy, name, None) is not None
    }


def restore_optimiser_state(strategy: FedAvg, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, _map_arrays(value, lambda tensor: tensor.numpy()))


def _map_arrays(value: Any, convert: Callable[[Any], Any]) -> Any:
    # FedOpt keeps {name: array}, FedAvgM a list of arrays.
    if isinstance(value, dict):
        return {key: convert(array) for key, array in value.items()}
    return [convert(array) for array in value]
