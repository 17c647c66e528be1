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
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
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
# The site-level DP accountant's record of releases, kept with the optimiser state for a resume.
ACCOUNTANT_STATE = "site-dp-accountant"

# Flower's wrappers for site-level differential privacy (`site-dp`), by where updates are clipped.
SITE_DP_WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
# Under site-level DP every accepted update weighs the same: the noise is calibrated to one site's
# clipped update over the number sampled, and Flower's accountant requires equal weights. The server
# sets this metric on the replies it has accepted (a site cannot choose its weight).
UNIFORM_WEIGHT = "site-weight"


def build_strategy(config: FederatedConfig, num_nodes: int) -> Strategy:
    """Flower's implementation of `config.strategy`, with the run's sampling and hyper-parameters,
    wrapped in Flower's differential-privacy wrapper when `site-dp` asks for one. `num_nodes` is
    the number of nodes connected at the start, from which site-level DP fixes the sample size."""
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
    if config.site_dp != "off":
        sampling["weighted_by_key"] = UNIFORM_WEIGHT
    strategy = STRATEGIES[config.strategy](**sampling, **specific.get(config.strategy, {}))
    if config.site_dp == "off":
        return strategy
    # As FedAvg samples: this many nodes every round (fewer replies and the round is not aggregated).
    sampled = max(int(num_nodes * config.fraction_train), config.min_nodes)
    wrapper = SITE_DP_WRAPPERS[config.site_dp]
    if config.site_dp.endswith("fixed"):
        return wrapper(strategy, config.site_dp_noise_multiplier, config.site_dp_clipping_norm, sampled,
                       accountant=_site_accountant(config, max(num_nodes, sampled)))
    return wrapper(strategy, config.site_dp_noise_multiplier, sampled,
                   initial_clipping_norm=config.site_dp_clipping_norm)


def _site_accountant(config: FederatedConfig, population: int) -> Any:
    """Flower's RDP accountant of site-level releases (one per aggregated round), with no credit for
    sampling (the condition under which Flower accounts fixed clipping)."""
    from flwr.serverapp import RdpAccountant  # needs dp-accounting (flwr's `dp` extra): only under site-dp

    limit = config.site_dp_max_epsilon or None
    return RdpAccountant(PrivacyConfig(
        target_delta=config.site_dp_delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=limit,
    ))


def site_privacy_spent(strategy: Strategy) -> dict[str, float]:
    """The site-level (epsilon, delta) spent so far, when the strategy accounts for it."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return {}
    return {"site-dp-epsilon": float(spent.epsilon), "site-dp-delta": float(spent.delta),
            "site-dp-releases": spent.num_releases}


def _inner(strategy: Strategy) -> Strategy:
    # A DP wrapper keeps the strategy it wraps as `.strategy`.
    return getattr(strategy, "strategy", strategy)


def optimiser_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's optimiser state as tensors, and its privacy accountant's releases as plain
    data (a checkpoint holds tensors and plain data only)."""
    inner = _inner(strategy)
    state = {
        name: _map_arrays(getattr(inner, name), torch.from_numpy)
        for name in STATEFUL_ATTRIBUTES
        if getattr(inner, name, None) is not None
    }
    if getattr(strategy, "accountant", None) is not None:
        state[ACCOUNTANT_STATE] = strategy.accountant.state_dict()
    return state


def restore_optimiser_state(strategy: Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if name == ACCOUNTANT_STATE:
            strategy.accountant.load_state_dict(value)
        else:
            setattr(_inner(strategy), name, _map_arrays(value, lambda tensor: tensor.numpy()))


def _map_arrays(value: Any, convert: Callable[[Any], Any]) -> Any:
    # FedOpt keeps {name: array}, FedAvgM a list of arrays.
    if isinstance(value, dict):
        return {key: convert(array) for key, array in value.items()}
    return [convert(array) for array in value]
