"""Secure aggregation (`secure-aggregation`): Flower's SecAgg+ shows the server the sites' sum, never one update."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from pydantic import ValidationError
from test_federated import RecordingGrid, run_config

import pneumofed.client.app as client_app
from pneumofed.client.app import count_classes
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.legacy_fit import fit_instruction, fit_reply, train_instruction
from pneumofed.common.federation.packing import PackedArraysGrid
from pneumofed.server import rounds, secure_aggregation
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.validation import as_numpy

SECURE = {"secure-aggregation": True, "min-nodes": 3, "augment": False}


class Recorder:
    """What each site's training produced (in clear, at the site), what the legacy strategy of the
    SecAgg+ workflow was handed, and what the round's strategy aggregated."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failing_site: str | None = None,
                 examples_used: dict[str, int] | None = None) -> None:
        self.trained: dict[str, dict[str, np.ndarray]] = {}
        self.weights: dict[str, int] = {}
        self.fit_results: list[list] = []
        self.strategy_replies: list[list] = []
        self.strategy_outputs: list[ArrayRecord] = []
        train_locally = client_app.train_locally

        def recording_train(arrays, instruction, run_config, node_config, state):
            name = node_config["site-name"]
            if name == failing_site:
                raise RuntimeError(f"{name} fails while training")
            content = train_locally(arrays, instruction, run_config, node_config, state)
            if name in (examples_used or {}):  # weighs less, as a site that trains on part of its data
                content["metrics"]["num-examples"] = examples_used[name]
            self.trained[name] = {k: v.copy() for k, v in as_numpy(content["arrays"]).items()}
            self.weights[name] = int(content["metrics"]["num-examples"])
            return content

        aggregate_fit = secure_aggregation.InstructionsStrategy.aggregate_fit

        def recording_aggregate_fit(strategy, server_round, results, failures):
            self.fit_results.append(list(results))
            return aggregate_fit(strategy, server_round, results, failures)

        build_strategy = rounds.build_strategy

        def recording_build_strategy(*args, **kwargs):
            strategy = build_strategy(*args, **kwargs)
            aggregate_train = strategy.aggregate_train

            def recording_aggregate_train(server_round, replies):
                replies = list(replies)
                self.strategy_replies.append(replies)
                arrays, metrics = aggregate_train(server_round, replies)
                self.strategy_outputs.append(arrays)
                return arrays, metrics

            strategy.aggregate_train = recording_aggregate_train
            return strategy

        monkeypatch.setattr(client_app, "train_locally", recording_train)
        monkeypatch.setattr(secure_aggregation.InstructionsStrategy, "aggregate_fit", recording_aggregate_fit)
        monkeypatch.setattr(rounds, "build_strategy", recording_build_strategy)

    def fedavg_of(self, names: list[str]) -> dict[str, np.ndarray]:
        """Plain FedAvg (Flower's, weighted by num-examples) of what these sites trained."""
        contents = [RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in self.trained[name].items()}),
                                "metrics": MetricRecord({"num-examples": self.weights[name]})}) for name in names]
        return as_numpy(aggregate_arrayrecords(contents, "num-examples"))


def federate(sites, config_dict) -> tuple[RunDirectory, RecordingGrid]:
    """A run over the grid as a deployed ServerApp sees it (arrays packed in transport)."""
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(sites, config_dict)
    with RunDirectory.open(config, flower_run_id=1) as run:
        rounds.run_federation(PackedArraysGrid(grid), config, run)
    return run, grid


def declared_examples(sites, config_dict) -> int:
    """The training ROIs the sites declare when they join (SecAgg+'s max-weight)."""
    return sum(count_classes(config_dict, {"data-path": str(site)})["metrics"]["num-examples"] for site in sites)


def quantisation_tolerance(weights: list[int], declared: int) -> float:
    # SecAgg+'s rounding of the sites' weighted elements, plus fp32 rounding of the model's weights.
    return secure_aggregation.quantisation_error(len(weights), sum(weights) / declared) + 1e-6


def largest_difference(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(arrays[k].astype(np.float64) - reference[k]))) for k in reference)


def test_the_secure_aggregate_equals_plain_fedavg_of_the_sites_models_within_quantisation_error(
    synthetic_sites, tmp_path, flower_identity, monkeypatch
):
    names = [site.name for site in synthetic_sites]
    recorder = Recorder(monkeypatch, examples_used={names[1]: 25, names[2]: 10})
    config_dict = run_config(tmp_path, **SECURE, **{"num-server-rounds": 1})
    run, _ = federate(synthetic_sites, config_dict)

    assert sorted(recorder.trained) == sorted(names)
    expected = recorder.fedavg_of(names)
    (aggregate,) = recorder.strategy_outputs
    received = as_numpy(aggregate)
    assert list(received) == list(expected)
    tolerance = quantisation_tolerance(list(recorder.weights.values()), declared_examples(synthetic_sites, config_dict))
    assert largest_difference(received, expected) <= tolerance
    # Weighted by num-examples, not a plain mean of the three models.
    unweighted = {k: np.mean([recorder.trained[n][k] for n in names], axis=0) for k in expected}
    assert largest_difference(received, unweighted) > 10 * tolerance
    history = json.loads((run.path / "metrics.json").read_text())
    assert history[0]["rejected-updates"] == []


def test_the_server_never_holds_a_site_update_in_clear(synthetic_sites, tmp_path, flower_identity, monkeypatch):
    recorder = Recorder(monkeypatch)
    _, grid = federate(synthetic_sites, run_config(tmp_path, **SECURE, **{"num-server-rounds": 2}))

    # Every training reply that reached the server carries no arrays: the site's model left it only
    # as SecAgg+'s masked integer vector.
    train_replies = [reply for reply in grid.replies if reply.metadata.message_type == MessageType.TRAIN]
    assert len(train_replies) == 2 * 4 * 3  # two rounds of SecAgg+'s four stages, three sites
    for reply in train_replies:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    protocol = [reply.content.config_records[RECORD_KEY_CONFIGS] for reply in train_replies]
    masked = [record[Key.MASKED_PARAMETERS] for record in protocol if Key.MASKED_PARAMETERS in record]
    assert len(masked) == 2 * 3
    for vector in masked:  # integers uniform modulo 2**32, whatever the model
        values = np.concatenate([bytes_to_ndarray(array).ravel() for array in vector])
        assert np.issubdtype(values.dtype, np.integer) and abs(values.mean() / 2**32 - 0.5) < 0.01
    # The legacy strategy of the workflow was handed one aggregate per round, shared by every result.
    assert len(recorder.fit_results) == 2
    for results in recorder.fit_results:
        assert len(results) == 3 and len({id(fit_res.parameters) for _, fit_res in results}) == 1
    # The round's strategy received, per site, that one aggregate: never a site's own model.
    for replies in recorder.strategy_replies:
        arrays = [as_numpy(reply.content["arrays"]) for reply in replies]
        assert all(all(np.array_equal(a[k], arrays[0][k]) for k in a) for a in arrays)
    last_round = as_numpy(recorder.strategy_replies[-1][0].content["arrays"])
    for site_model in recorder.trained.values():
        assert largest_difference(last_round, site_model) > 1e-3


def test_a_site_that_drops_out_while_training_leaves_the_others_sum(synthetic_sites, tmp_path, flower_identity,
                                                                     monkeypatch):
    failing = synthetic_sites[1].name
    recorder = Recorder(monkeypatch, failing_site=failing)
    config_dict = run_config(tmp_path, **SECURE, **{"num-server-rounds": 1})
    run, _ = federate(synthetic_sites, config_dict)

    others = [site.name for site in synthetic_sites if site.name != failing]
    expected = recorder.fedavg_of(others)
    received = as_numpy(recorder.strategy_outputs[0])
    declared = declared_examples(synthetic_sites, config_dict)
    assert largest_difference(received, expected) <= quantisation_tolerance([recorder.weights[n] for n in others], declared)
    (results,) = recorder.fit_results
    assert len(results) == 2
    audit = [json.loads(line) for line in (run.path / "audit.jsonl").read_text().splitlines()]
    assert len(next(event for event in audit if event["event"] == "round")["participants"]) == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"strategy": "krum"}, "needs every site's update"),
    ({"strategy": "fedmedian"}, "needs every site's update"),
    ({"strategy": "fedtrimmedavg"}, "needs every site's update"),
    ({"update-encoding": "int8"}, "set update-encoding fp32"),
    ({"update-encoding": "fp16"}, "set update-encoding fp32"),
    ({"min-nodes": 2}, "needs min-nodes of at least 3"),
    ({"sites": "/a,/b,/c", "min-nodes": 4}, "needs as many sites, the run lists 3"),
])
def test_secure_aggregation_refuses_what_sec_agg_plus_cannot_serve(overrides, message):
    with pytest.raises(ValidationError, match=message):
        FederatedConfig.from_run_config(SECURE | overrides)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedavgm"])
def test_secure_aggregation_serves_the_strategies_that_work_on_the_sum(strategy):
    assert FederatedConfig.from_run_config(SECURE | {"strategy": strategy}).secure_aggregation


def test_the_bridge_carries_the_instruction_by_name_and_replies_the_update():
    global_arrays = ArrayRecord({"conv.weight": Array(np.full((2, 3), 0.5, dtype=np.float32)),
                                 "bn.running_var": Array(np.ones(3, dtype=np.float32))})
    config = ConfigRecord({"server-round": 2, "class-weights": [0.5, 1.0, 2.0], "learning-rate": 1e-3})
    fitins = fit_instruction(global_arrays, config)
    received = train_instruction(fitins_to_recorddict(fitins, keep_input=True))
    assert list(received["arrays"].keys()) == ["conv.weight", "bn.running_var"]
    assert all(np.array_equal(received["arrays"][k].numpy(), global_arrays[k].numpy()) for k in global_arrays)
    assert dict(received["config"]) == dict(config)

    trained = {"conv.weight": np.full((2, 3), 0.75, dtype=np.float32), "bn.running_var": np.full(3, 2.0, np.float32)}
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
                        "metrics": MetricRecord({"num-examples": 40, "train-loss": 0.3})})
    fitres = recorddict_to_fitres(fit_reply(reply, received["arrays"], clipping_range=8.0, max_weight=100.0), True)
    update = parameters_to_ndarrays(fitres.parameters)
    assert np.allclose(update[0], 0.25) and np.allclose(update[1], 1.0)
    assert fitres.num_examples == 40 and fitres.metrics["train-loss"] == 0.3


def test_a_site_refuses_to_send_an_update_that_sec_agg_plus_would_clip():
    received = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    reply = RecordDict({"arrays": ArrayRecord({"w": Array(np.array([0, 0, 0, 30], dtype=np.float32))}),
                        "metrics": MetricRecord({"num-examples": 50})})
    # Weighted by 50 / 100, the element 30 becomes 15, beyond +-8.
    with pytest.raises(ValueError, match="beyond SecAgg"):
        fit_reply(reply, received, clipping_range=8.0, max_weight=100.0)
    fit_reply(reply, received, clipping_range=8.0, max_weight=200.0)  # 7.5: sent as it is


def test_a_server_optimiser_steps_from_the_secure_mean(synthetic_sites, tmp_path, flower_identity, monkeypatch):
    recorder = Recorder(monkeypatch)
    run, _ = federate(synthetic_sites, run_config(tmp_path, **SECURE, **{"num-server-rounds": 1, "strategy": "fedadam",
                                                                         "server-learning-rate": 1e-2}))

    mean = as_numpy(recorder.strategy_replies[0][0].content["arrays"])
    stepped = as_numpy(recorder.strategy_outputs[0])
    assert largest_difference(stepped, mean) > 1e-3  # FedAdam's step from the mean, not the mean itself
    assert json.loads((run.path / "metrics.json").read_text())[0]["rejected-updates"] == []
