"""Site-level differential privacy (`site-dp`) with Flower's strategy wrappers and client mods."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from pydantic import ValidationError
from test_federated import RecordingGrid, federate, run_config

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.packing import PackedArraysGrid
from pneumofed.server.rounds import SiteDeclaration, aggregate_train_round, initial_arrays
from pneumofed.server.strategy import build_strategy
from pneumofed.server.validation import as_numpy

PRIVATE = {"site-dp": "server-fixed", "bn-mode": "fedbn", "site-dp-noise-multiplier": 1.0, "site-dp-clipping-norm": 0.5}


class NodeList:
    """As much of a Grid as a strategy needs to sample nodes."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _update_norm(before: ArrayRecord, after: dict[str, np.ndarray]) -> float:
    start = as_numpy(before)
    return float(np.sqrt(sum(np.sum((after[name].astype(np.float64) - start[name]) ** 2) for name in after)))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"strategy": "fedadam"}, "needs FedAvg's aggregation"),
    ({"strategy": "krum"}, "needs FedAvg's aggregation"),
    ({"bn-mode": "shared"}, "cannot send BatchNorm statistics"),
    ({"site-dp": "client-fixed", "update-encoding": "int8"}, "int8 reply"),
    ({"site-dp-noise-multiplier": 0.0}, "needs site-dp-noise-multiplier > 0"),
])
def test_settings_site_level_dp_cannot_honour_are_refused(overrides, message, tmp_path):
    with pytest.raises(ValidationError, match=message):
        FederatedConfig.model_validate(run_config(tmp_path, **(PRIVATE | overrides)))


def test_site_level_dp_without_batchnorm_statistics_in_flight_is_accepted(tmp_path):
    for allowed in ({"bn-mode": "silobn"}, {"site-dp": "server-adaptive", "site-dp-noise-multiplier": 0.0}):
        FederatedConfig.model_validate(run_config(tmp_path, **(PRIVATE | allowed)))


def test_every_update_counts_the_same_and_is_clipped_before_the_noise(tmp_path, flower_identity):
    # Seven sites of 1..7 ROIs move one weight by 10 * (node index): FedAvg would weight them by
    # size; under site-dp each update is clipped to the norm bound and they count equally.
    clip, noise = 0.5, 1e-6
    config = FederatedConfig.model_validate(run_config(tmp_path, **(PRIVATE | {
        "site-dp-noise-multiplier": noise, "site-dp-clipping-norm": clip})))
    nodes = list(range(100, 107))
    global_arrays = ArrayRecord({"w": torch.ones(4)})
    strategy = build_strategy(config, num_nodes=len(nodes))
    instructions = list(strategy.configure_train(1, global_arrays, ConfigRecord(), NodeList(nodes)))
    directions = {node: np.eye(4, dtype=np.float32)[index % 4] * 10 * (index + 1) for index, node in enumerate(nodes)}
    replies = [
        Message(RecordDict({"arrays": ArrayRecord({"w": torch.from_numpy(1 + directions[m.metadata.dst_node_id])}),
                            "metrics": MetricRecord({"num-examples": m.metadata.dst_node_id - 99})}), reply_to=m)
        for m in instructions
    ]
    declarations = {node: SiteDeclaration(node - 99, (node - 99, 0, 0)) for node in nodes}
    config = config.model_copy(update={"max_update_ratio": 1e9, "max_update_median_ratio": 1e9})

    trained = aggregate_train_round(strategy, 1, global_arrays, replies, config, declarations)

    clipped = [d / np.linalg.norm(d) * clip for d in directions.values()]
    np.testing.assert_allclose(trained.arrays["w"].numpy(), 1 + np.mean(clipped, axis=0), atol=1e-4)
    assert trained.metrics["site-dp-epsilon"] > 0 and trained.metrics["site-dp-releases"] == 1


def test_a_round_with_a_refused_update_is_not_aggregated(tmp_path, flower_identity):
    # The noise is calibrated to three clipped updates: two would be under-noised.
    config = FederatedConfig.model_validate(run_config(tmp_path, **PRIVATE))
    nodes = [100, 101, 102]
    global_arrays = ArrayRecord({"w": torch.ones(4)})
    strategy = build_strategy(config, num_nodes=len(nodes))
    instructions = list(strategy.configure_train(1, global_arrays, ConfigRecord(), NodeList(nodes)))
    values = {100: 1.1, 101: 0.9, 102: float("nan")}
    replies = [
        Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((4,), values[m.metadata.dst_node_id])}),
                            "metrics": MetricRecord({"num-examples": 5})}), reply_to=m)
        for m in instructions
    ]
    declarations = {node: SiteDeclaration(5, (5, 0, 0)) for node in nodes}

    trained = aggregate_train_round(strategy, 1, global_arrays, replies, config, declarations)

    assert trained.arrays is None and [entry["node"] for entry in trained.rejected] == [102]
    assert trained.metrics["site-dp-releases"] == 0 and trained.metrics["site-dp-epsilon"] == 0  # nothing released


def _expected_epsilon(noise: float, sites: int, releases: int, delta: float) -> float:
    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=sites,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sites, population_size=sites),
                       count=releases)
    return accountant.get_epsilon(delta)


def test_a_private_run_records_the_epsilon_spent_after_every_round(synthetic_sites, tmp_path, flower_identity):
    run, _ = federate(synthetic_sites, run_config(tmp_path, **(PRIVATE | {"num-server-rounds": 2})))

    history = json.loads((run.path / "metrics.json").read_text())
    spent = [record["site-dp-epsilon"] for record in history]
    assert spent == pytest.approx([_expected_epsilon(1.0, len(synthetic_sites), r, 1e-5) for r in (1, 2)])
    assert spent[0] < spent[1] and all(record["site-dp-delta"] == 1e-5 for record in history)
    assert (run.path / "final.json").is_file()


def test_the_run_stops_training_before_a_round_would_exceed_the_epsilon_limit(synthetic_sites, tmp_path, flower_identity):
    limit = (_expected_epsilon(1.0, 3, 1, 1e-5) + _expected_epsilon(1.0, 3, 2, 1e-5)) / 2
    run, _ = federate(synthetic_sites, run_config(tmp_path, **(PRIVATE | {
        "num-server-rounds": 3, "site-dp-max-epsilon": limit})))

    history = json.loads((run.path / "metrics.json").read_text())
    assert [record["round"] for record in history] == [1]
    assert history[0]["site-dp-epsilon"] <= limit
    events = [json.loads(line)["event"] for line in (run.path / "audit.jsonl").read_text().splitlines()]
    assert "site-dp-budget-spent" in events
    assert json.loads((run.path / "final.json").read_text())["best-round"] == 1


def test_a_resumed_run_continues_the_accounting(synthetic_sites, tmp_path, flower_identity):
    settings = PRIVATE | {"num-server-rounds": 1}
    federate(synthetic_sites, run_config(tmp_path, **settings))
    run, _ = federate(synthetic_sites, run_config(tmp_path, **(settings | {"num-server-rounds": 2, "resume": True})))

    history = json.loads((run.path / "metrics.json").read_text())
    assert history[1]["site-dp-releases"] == 2
    assert history[1]["site-dp-epsilon"] == pytest.approx(_expected_epsilon(1.0, 3, 2, 1e-5))


def test_with_client_side_clipping_the_update_is_bounded_before_it_leaves_the_site(synthetic_sites, tmp_path, flower_identity):
    clip = 0.05
    config_dict = run_config(tmp_path, **(PRIVATE | {"site-dp": "client-fixed", "site-dp-clipping-norm": clip}))
    config = FederatedConfig.from_run_config(config_dict)
    grid = PackedArraysGrid(RecordingGrid(synthetic_sites, config_dict))  # as deployed: Flower's mod sees plain records
    global_arrays = initial_arrays(config)
    strategy = build_strategy(config, num_nodes=len(synthetic_sites))

    replies = grid.send_and_receive(strategy.configure_train(1, global_arrays, ConfigRecord(
        {"local-epochs": 1, "learning-rate": 1e-2}), grid))

    assert len(replies) == len(synthetic_sites) and not any(reply.has_error() for reply in replies)
    for reply in replies:
        assert _update_norm(global_arrays, as_numpy(reply.content["arrays"])) <= clip * (1 + 1e-4)


def test_messages_of_runs_without_client_side_clipping_pass_the_mod_untouched(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **(PRIVATE | {"site-dp": "server-fixed", "site-dp-clipping-norm": 1e-3}))
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(synthetic_sites[:1], config_dict)
    global_arrays = initial_arrays(config)
    instruction = Message(RecordDict({"arrays": global_arrays, "config": ConfigRecord(
        {"server-round": 1, "local-epochs": 1, "learning-rate": 1e-2})}), 100, MessageType.TRAIN)

    reply = grid.send_and_receive([instruction])[0]

    assert _update_norm(global_arrays, as_numpy(reply.content["arrays"])) > 1e-3  # clipped only at the server


def test_a_clipping_site_refuses_an_instruction_without_a_clipping_norm_and_says_why(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **(PRIVATE | {"site-dp": "client-fixed"}))
    grid = RecordingGrid(synthetic_sites[:1], config_dict)
    instruction = Message(RecordDict({"arrays": initial_arrays(FederatedConfig.from_run_config(config_dict)),
                                      "config": ConfigRecord({"server-round": 1})}), 100, MessageType.TRAIN)

    reply = grid.send_and_receive([instruction])[0]

    assert reply.has_error() and "clipping_norm" in reply.error.reason
