"""Server and client logic of the Flower apps, driven in-process (no Ray, no SuperLink)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from sklearn.metrics import roc_auc_score

from pneumofed.client.app import train_locally
from pneumofed.common.data.site import load_site
from pneumofed.common.federation.audit import array_digest, read_audit
from pneumofed.common.federation.carried_evaluation import EVALUATE_FIRST, EVALUATION, EVALUATION_REFUSED
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.exchange import exchanged_state
from pneumofed.common.federation.pooling import PooledEvaluation
from pneumofed.common.learning import training
from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.state import floating_state
from pneumofed.common.metrics.histogram import DEFAULT_MIN_COUNT, MAX_SCORE_BINS, ScoreSummary, report_from_summary
from pneumofed.common.metrics.report import confusion_counts
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.rounds import (
    aggregate_train_round,
    collect_declarations,
    encoded_instructions,
    exchange_waits,
    initial_arrays,
    pool_replies,
    run_federation,
)
from pneumofed.server.strategy import STRATEGIES, build_strategy
from pneumofed.simulations.inprocess import InProcessGrid

CLASSES = ["nodule", "interstitial", "emphysema"]
SMALL_RUN = {"model-width": 0.5, "roi-size": 32, "local-epochs": 1, "batch-size": 16, "learning-rate": 1e-3}


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every instruction and reply, optionally tampering with a node's
    training replies on their way to the server."""

    def __init__(self, sites: list[Path], run_config: dict, tamper: dict[int, Callable[[RecordDict], RecordDict]] | None = None,
                 tamper_evaluate: dict[int, Callable[[RecordDict], RecordDict]] | None = None):
        super().__init__(sites, run_config)
        self.tamper = tamper or {}
        self.tamper_evaluate = tamper_evaluate or {}
        self.instructions: list[Message] = []
        self.replies: list[Message] = []

    def handle(self, message: Message) -> RecordDict:
        content = super().handle(message)
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.TRAIN and node in self.tamper:
            content = self.tamper[node](content)
        if message.metadata.message_type == MessageType.EVALUATE and node in self.tamper_evaluate:
            content = self.tamper_evaluate[node](content)
        return content

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.instructions.extend(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies.extend(replies)
        return replies


def run_config(tmp_path: Path, **overrides) -> dict:
    return FederatedConfig.model_validate(SMALL_RUN | {"run-dir": str(tmp_path / "run")} | overrides).to_run_config()


def federate(sites, config_dict, tamper=None, tamper_evaluate=None, grid_class=None) -> tuple[RunDirectory, RecordingGrid]:
    config = FederatedConfig.from_run_config(config_dict)
    grid = (grid_class or RecordingGrid)(sites, config_dict, tamper, tamper_evaluate)
    run = RunDirectory.open(config, flower_run_id=1)
    run_federation(grid, config, run)
    return run, grid


def test_a_run_writes_metrics_models_best_model_final_test_and_plots(synthetic_sites, tmp_path, flower_identity):
    run, _ = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 2}))

    history = json.loads((run.path / "metrics.json").read_text())
    assert [record["round"] for record in history] == [1, 2]
    for record in history:
        assert set(record["site-auc"]) == {site.name for site in synthetic_sites}
        assert 0.0 <= record["accuracy"] <= 1.0 and record["train-loss"] > 0
    csv_header = (run.path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"round", "train-loss", "eval-loss", "macro_auc"} <= set(csv_header)
    for name in ("round-001.pt", "round-002.pt", "best.pt"):
        assert (run.path / "models" / name).is_file()
    final = json.loads((run.path / "final.json").read_text())
    assert final["split"] == "test" and final["best-round"] in (1, 2)
    for plot in ("curves.png", "roc.png", "confusion.png", "roc_test.png"):
        assert (run.path / "plots" / plot).stat().st_size > 1000
    assert json.loads((run.path / "config.json").read_text())["num-server-rounds"] == 2
    audit = read_audit(run.path / "audit.jsonl")
    assert [entry["event"] for entry in audit] == ["run-started", "round", "round", "run-finished"]
    last_global = torch.load(run.path / "models" / "round-002.pt", weights_only=True)["state"]
    assert audit[2]["global_model_sha256"] == array_digest({k: v.numpy() for k, v in last_global.items()})
    assert len(audit[1]["participants"]) == len(synthetic_sites)


def test_pooled_and_per_site_auc_equal_sklearn_on_the_sites_scores(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"batch-size": 4})
    config = FederatedConfig.from_run_config(config_dict)
    # Until BatchNorm's running statistics have moved off their initial values (tens of steps),
    # an eval-mode network scores every ROI alike to within 1e-6, which no fixed-bin summary
    # can order; so the model under test is first trained for ~70 steps.
    trained = train_locally(
        initial_arrays(config),
        ConfigRecord({"server-round": 1, "local-epochs": 10}),
        config_dict,
        {"data-path": str(synthetic_sites[0])},
        RecordDict(),
    )
    arrays = trained["arrays"]
    instruction = ConfigRecord({"server-round": 1, "split": "val"})

    def evaluated_with(policy: dict) -> tuple[PooledEvaluation, dict[str, ScoreSummary]]:
        grid = RecordingGrid(synthetic_sites, config_dict)
        for node_config in grid.node_configs.values():
            node_config.update(policy)
        replies = grid.send_and_receive([Message(RecordDict({"arrays": arrays, "config": instruction}), node,
                                                 MessageType.EVALUATE) for node in grid.get_node_ids()])
        summaries = {str(r.content["site"]["name"]): ScoreSummary.from_flat(r.content["metrics"]) for r in replies}
        return pool_replies(replies, CLASSES), summaries

    # One interval per occupied bin: the summary is then as fine as its 1,000 bins.
    (pooled, site_summaries), (coarse, _) = evaluated_with({"score-min-count": 1}), evaluated_with({})

    model = build_model(config.model, 3, width=config.model_width)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    labels, probs = [], []
    for site in synthetic_sites:
        result = training.evaluate(model, load_site(site, config.seed).val, training.TrainConfig(progress=False))
        labels.append(result.labels)
        probs.append(result.probs)
        for k, name in enumerate(CLASSES):
            positives = result.labels == k
            if 0 < positives.sum() < len(positives):
                site_auc = roc_auc_score(positives, result.probs[:, k])
                # A few dozen ROIs: one positive-negative pair in one bin moves the AUC by 0.02.
                assert abs(pooled.site_auc[site.name][name] - site_auc) <= site_summaries[site.name].auc_bound(k) + 1e-12
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    for k, name in enumerate(CLASSES):
        truth = roc_auc_score(labels == k, probs[:, k])
        for report in (pooled.report, coarse.report):  # as fine as the bins, and at the sites' defaults
            assert abs(report.per_class[k].auc - truth) <= report.per_class[k].auc_bound + 1e-12
    assert pooled.num_examples == coarse.num_examples == len(labels)


def _scaled(factor: float) -> Callable[[RecordDict], RecordDict]:
    def tamper(content: RecordDict) -> RecordDict:
        arrays = {name: torch.from_numpy(array.numpy() * factor) for name, array in content["arrays"].items()}
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})
    return tamper


def _poisoned(value: float) -> Callable[[RecordDict], RecordDict]:
    def tamper(content: RecordDict) -> RecordDict:
        arrays = {name: torch.from_numpy(array.numpy()) for name, array in content["arrays"].items()}
        first = next(iter(arrays))
        arrays[first].view(-1)[0] = value
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})
    return tamper


def _reshaped(content: RecordDict) -> RecordDict:
    arrays = {name: torch.from_numpy(array.numpy()) for name, array in content["arrays"].items()}
    first = next(iter(arrays))
    arrays[first] = arrays[first].reshape(-1)
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})


def _retyped(content: RecordDict) -> RecordDict:
    arrays = {name: torch.from_numpy(array.numpy()).double() for name, array in content["arrays"].items()}
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_poisoned(float("nan")), "NaN or infinite"),
        (_poisoned(float("inf")), "NaN or infinite"),
        (_reshaped, "shape"),
        (_retyped, "dtype"),
        (_scaled(1000.0), "update norm"),
    ],
    ids=["nan", "inf", "wrong-shape", "wrong-dtype", "norm-x1000"],
)
def test_a_bad_update_is_dropped_with_its_reason_and_the_round_aggregates_the_good_ones(
    synthetic_sites, tmp_path, flower_identity, tamper, reason
):
    config_dict = run_config(tmp_path)
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(synthetic_sites, config_dict, tamper={100: tamper})
    strategy = build_strategy(config, num_nodes=3)
    global_arrays = initial_arrays(config)
    replies = grid.send_and_receive(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))

    trained = aggregate_train_round(strategy, 1, global_arrays, replies, config,
                                    collect_declarations(grid, grid.get_node_ids(), config))
    aggregated = trained.arrays

    [rejection] = trained.rejected
    assert rejection["node"] == 100 and reason in rejection["reason"]
    good = [reply.content for reply in replies if reply.metadata.src_node_id != 100]
    weights = np.array([reply["metrics"]["num-examples"] for reply in good], dtype=float)
    for name, array in aggregated.items():
        expected = sum(w * reply["arrays"][name].numpy() for w, reply in zip(weights, good)) / weights.sum()
        np.testing.assert_allclose(array.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, strategy="fedadam")
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(synthetic_sites, config_dict)
    global_arrays = initial_arrays(config)
    replies = grid.send_and_receive(build_strategy(config, num_nodes=3).configure_train(1, global_arrays, ConfigRecord(), grid))

    aggregates = []
    for order in (replies, replies[::-1]):
        strategy = build_strategy(config, num_nodes=3)
        list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))
        declarations = collect_declarations(grid, grid.get_node_ids(), config)
        aggregates.append(aggregate_train_round(strategy, 1, global_arrays, order, config, declarations).arrays)

    for name, array in aggregates[0].items():
        np.testing.assert_array_equal(array.numpy(), aggregates[1][name].numpy())


METRIC_KEYS_TRAIN = {"num-examples", "train-loss", "train-accuracy", "train-seconds"}
METRIC_KEYS_EVALUATE_FIXED = {"num-examples", "eval-loss", "eval-accuracy", "confusion", "eval-seconds"}


def test_every_reply_a_client_sends_holds_only_model_arrays_and_whitelisted_metrics(synthetic_sites, tmp_path, flower_identity):
    _, grid = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 2}))
    model_state = floating_state(build_model("shufflenet_v2_eca", 3, width=0.5))

    kinds = [reply.metadata.message_type for reply in grid.replies]
    assert MessageType.TRAIN in kinds and MessageType.EVALUATE in kinds and MessageType.QUERY in kinds
    for reply in grid.replies:
        content = reply.content
        if reply.metadata.message_type == MessageType.TRAIN:
            [arrays] = content.array_records.values()
            assert {name: tuple(a.shape) for name, a in arrays.items()} == {
                name: tuple(t.shape) for name, t in model_state.items()
            }
            assert set(content["metrics"]) == METRIC_KEYS_TRAIN
            if EVALUATION in content:  # round 2 carries the score of round 1's model
                _assert_only_summarised_scores(content[EVALUATION], content)
            else:
                assert set(content) == {"arrays", "metrics"}
        elif reply.metadata.message_type == MessageType.QUERY:
            assert set(content) == {"metrics"} and set(content["metrics"]) == {"num-examples", "class-counts"}
        else:
            assert not content.array_records
            _assert_only_summarised_scores(content["metrics"], content)
        for metrics in content.metric_records.values():
            for value in metrics.values():
                assert isinstance(value, (int, float)) or all(isinstance(v, int) for v in value), "scores must be counted, not listed"


def _assert_only_summarised_scores(metrics, content) -> None:
    summary_keys = set(metrics) - METRIC_KEYS_EVALUATE_FIXED
    assert summary_keys == {"scores-bins", "scores-min-count"} | {f"scores-{k}" for k in range(len(CLASSES))}
    assert set(content.config_records) == {"site"} and set(content["site"]) == {"name", "share-site-auc"}
    _assert_no_reported_score_singles_out_a_roi(metrics)


def test_each_round_records_where_its_time_went(synthetic_sites, tmp_path, flower_identity):
    run, grid = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 2}))
    history = json.loads((run.path / "metrics.json").read_text())
    # A site's compute in a message: its training and the evaluation the message carried, if any.
    compute = [sum(float(m[key]) for m in r.content.metric_records.values() for key in ("train-seconds", "eval-seconds")
                   if key in m) for r in grid.replies if r.metadata.message_type != MessageType.QUERY]
    # Per site: train, train + evaluate, evaluate (the last model), evaluate (the final test).
    assert len(compute) == 4 * len(synthetic_sites) and min(compute) > 0
    rounds = [record["timing"] for record in history]
    for timing in rounds:
        # In one process the sites run one after another: the round lasts at least their sum.
        assert timing["round-seconds"] >= timing["sites-seconds"] >= timing["slowest-site-seconds"] > 0
        assert timing["overhead-seconds"] == pytest.approx(timing["round-seconds"] - timing["slowest-site-seconds"])
        assert 0 < timing["aggregate-seconds"] < timing["round-seconds"] and timing["record-seconds"] > 0
        # One after another: a site's handler starts once the sites before it are done, so the last
        # site waited at least the others' compute (their loading and set-up come on top of it).
        others = timing["sites-seconds"] - timing["slowest-site-seconds"]
        assert others - 0.01 <= timing["slowest-delivery-seconds"] < timing["round-seconds"]
        assert 0 <= timing["collect-seconds"] < timing["round-seconds"]
    # Round 1's model is scored by round 2's TRAIN messages; only the last round has EVALUATE ones.
    assert rounds[0]["evaluate-exchange-seconds"] == 0
    assert 0 < rounds[1]["evaluate-exchange-seconds"] < rounds[1]["round-seconds"]
    # A site's compute in one message is its training and the evaluation the message carried.
    by_message = [compute[i:i + len(synthetic_sites)] for i in range(0, len(compute), len(synthetic_sites))]
    assert rounds[0]["slowest-site-seconds"] == pytest.approx(max(by_message[0]))
    assert rounds[1]["slowest-site-seconds"] == pytest.approx(max(by_message[1]) + max(by_message[2]))


def test_an_exchanges_waits_are_the_slowest_delivery_beyond_compute_and_the_collection_after_the_last_reply(
        flower_identity):
    instructions = [Message(RecordDict({"config": ConfigRecord({})}), node, MessageType.TRAIN) for node in (1, 2)]
    replies = []
    # Sent at t=100; site 1 computed 3 s and replied at 105 (2 s to reach it); site 2 computed 1 s and
    # replied at 107 (6 s to reach it, e.g. a new ClientApp process); the server had both at 108.
    for instruction, made, compute in zip(instructions, (105.0, 107.0), (3.0, 1.0), strict=True):
        reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "train-seconds": compute})}),
                        reply_to=instruction)
        reply.metadata.created_at = made
        replies.append(reply)
    replies.append(Message(Error(ErrorCode.UNKNOWN, "failed"), reply_to=instructions[0]))
    assert exchange_waits(replies, 100.0, 108.0) == pytest.approx((6.0, 1.0))
    assert exchange_waits(replies[-1:], 100.0, 108.0) == (0.0, 0.0)


def _assert_no_reported_score_singles_out_a_roi(metrics) -> None:
    """Each reported score interval holds at least the sites' default minimum of ROIs; a site
    with fewer ROIs in all reports one interval over the whole axis, which says nothing of a score."""
    assert metrics["scores-min-count"] >= DEFAULT_MIN_COUNT and metrics["scores-bins"] <= MAX_SCORE_BINS
    for k in range(len(CLASSES)):
        triples = np.asarray(metrics[f"scores-{k}"]).reshape(-1, 3)
        assert triples[:, 1:].sum() == metrics["num-examples"]
        assert len(triples) == 1 or triples[:, 1:].sum(axis=1).min() >= metrics["scores-min-count"]


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(synthetic_sites, tmp_path, flower_identity):
    base = {"strategy": "fedadam", "num-server-rounds": 2}
    straight, _ = federate(synthetic_sites, run_config(tmp_path / "a", **base))

    interrupted = run_config(tmp_path / "b", **base | {"num-server-rounds": 1})
    federate(synthetic_sites, interrupted)
    resumed, _ = federate(synthetic_sites, interrupted | {"num-server-rounds": 2, "resume": True})

    a = json.loads((straight.path / "metrics.json").read_text())
    b = json.loads((resumed.path / "metrics.json").read_text())
    assert [r["round"] for r in b] == [1, 2]
    assert b[-1]["macro_auc"] == pytest.approx(a[-1]["macro_auc"], abs=1e-6)
    assert b[-1]["eval-loss"] == pytest.approx(a[-1]["eval-loss"], rel=1e-5)
    final_a = torch.load(straight.path / "models" / "round-002.pt", weights_only=True)["state"]
    final_b = torch.load(resumed.path / "models" / "round-002.pt", weights_only=True)["state"]
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6)


def test_each_site_gets_one_message_per_round_and_the_last_round_an_evaluation_of_its_own(synthetic_sites, tmp_path, flower_identity):
    rounds, sites = 3, len(synthetic_sites)
    run, grid = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": rounds}))

    trains = [m for m in grid.instructions if m.metadata.message_type == MessageType.TRAIN]
    evaluates = [m for m in grid.instructions if m.metadata.message_type == MessageType.EVALUATE]
    assert len(trains) == rounds * sites and all(m.content.array_records for m in trains)
    # Rounds 2 and 3 score the model they train from; the last model and the final test have their own.
    assert [m.content["config"].get(EVALUATE_FIRST) for m in trains] == [None] * sites + ["val"] * (rounds - 1) * sites
    assert [m.content["config"]["split"] for m in evaluates] == ["val"] * sites + ["test"] * sites
    history = json.loads((run.path / "metrics.json").read_text())
    assert [record["round"] for record in history] == [1, 2, 3]
    assert all(not record["rejected-updates"] and not record["rejected-evaluations"] for record in history)


def test_a_carried_evaluation_scores_the_model_as_an_evaluate_message_of_its_own_would(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"num-server-rounds": 2, "bn-mode": "fedbn"})
    run, _ = federate(synthetic_sites, config_dict)
    config = FederatedConfig.from_run_config(config_dict)

    # Round 1's model as it stood when round 2 began, with each site's BatchNorm of round 1 (fedbn).
    saved = torch.load(run.path / "models" / "round-001.pt", weights_only=True)["state"]
    round_1 = ArrayRecord({name: saved[name] for name in exchanged_state(config.build_model(), config.bn_mode)})
    # The sites' state after round 1: the same round again, in a run of one round.
    _, replay = federate(synthetic_sites, run_config(tmp_path / "replay", **{"num-server-rounds": 1, "bn-mode": "fedbn"}))
    messages = encoded_instructions(
        [Message(RecordDict({"arrays": round_1, "config": ConfigRecord({"split": "val", "server-round": 1})}), node,
                 MessageType.EVALUATE) for node in replay.get_node_ids()], round_1, config)
    separate = pool_replies(replay.send_and_receive(messages), CLASSES)
    carried = json.loads((run.path / "metrics.json").read_text())[0]
    assert carried["macro_auc"] == pytest.approx(separate.report.macro_auc, abs=1e-9)
    assert carried["eval-loss"] == pytest.approx(separate.loss, rel=1e-6)


def test_a_site_that_refuses_the_carried_evaluation_still_trains_and_is_listed_as_not_scoring(synthetic_sites, tmp_path, flower_identity):
    class TestOnlyGrid(RecordingGrid):  # node 101 lets the server score only its test part
        def __init__(self, *args):
            super().__init__(*args)
            self.node_configs[101] = self.node_configs[101] | {"evaluate-splits": "test"}

    run, grid = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 2}), grid_class=TestOnlyGrid)

    history = json.loads((run.path / "metrics.json").read_text())
    for record in history:
        [refused] = record["rejected-evaluations"]
        assert refused["node"] == 101 and "evaluate-splits" in refused["reason"]
        assert record["macro_auc"] is not None  # pooled over the other sites
    assert [record["rejected-updates"] for record in history] == [[], []]  # its training was used
    round_2 = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN][len(synthetic_sites):]
    assert {r.metadata.src_node_id for r in round_2 if EVALUATION_REFUSED in r.content} == {101}


def test_a_site_whose_training_fails_is_scored_by_an_evaluate_message_of_its_own(synthetic_sites, tmp_path, flower_identity):
    class FailingGrid(RecordingGrid):  # node 101's training fails in round 2, before its evaluation is sent
        def handle(self, message):
            config = message.content["config"]
            if message.metadata.message_type == MessageType.TRAIN and message.metadata.dst_node_id == 101 \
                    and config["server-round"] == 2:
                raise RuntimeError("out of memory")
            return super().handle(message)

    run, grid = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 2}), grid_class=FailingGrid)

    round_1 = json.loads((run.path / "metrics.json").read_text())[0]
    assert round_1["rejected-evaluations"] == [] and round_1["macro_auc"] is not None
    resent = [m for m in grid.instructions if m.metadata.message_type == MessageType.EVALUATE
              and m.metadata.dst_node_id == 101 and m.content["config"]["server-round"] == 1]
    assert len(resent) == 1


def test_under_fedbn_a_site_without_batchnorm_of_its_own_does_not_score_the_model_with_initial_statistics(
        synthetic_sites, tmp_path, flower_identity):
    class RestartingGrid(RecordingGrid):  # node 100's SuperNode restarts after round 1: its state is gone
        def handle(self, message):
            if message.metadata.message_type == MessageType.TRAIN and message.content["config"]["server-round"] == 2:
                self.states[100] = RecordDict()
            return super().handle(message)

    run, _ = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 2, "bn-mode": "fedbn"}),
                      grid_class=RestartingGrid)

    history = json.loads((run.path / "metrics.json").read_text())
    [refused] = history[0]["rejected-evaluations"]
    assert refused["node"] == 100 and "no BatchNorm of its own" in refused["reason"]
    assert history[1]["rejected-updates"] == [] and history[1]["rejected-evaluations"] == []  # it trained, then scored


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_keeps_the_global_model_in_the_sites_dtypes_so_later_rounds_are_accepted(name, synthetic_sites, tmp_path, flower_identity):
    run, _ = federate(synthetic_sites[:2], run_config(tmp_path, strategy=name, **{"num-server-rounds": 2}))
    history = json.loads((run.path / "metrics.json").read_text())
    assert [record["rejected-updates"] for record in history] == [[], []]
    round_1 = torch.load(run.path / "models" / "round-001.pt", weights_only=True)["state"]
    round_2 = torch.load(run.path / "models" / "round-002.pt", weights_only=True)["state"]
    assert all(tensor.dtype == torch.float32 for tensor in round_2.values())
    assert any(not torch.equal(round_1[key], round_2[key]) for key in round_1), "round 2 changed nothing"


def test_a_finished_run_directory_is_never_overwritten_without_resume(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"num-server-rounds": 1})
    federate(synthetic_sites[:1], config_dict)
    with pytest.raises(FileExistsError, match="resume"):
        RunDirectory.open(FederatedConfig.from_run_config(config_dict), flower_run_id=2)


def test_resuming_with_a_different_model_is_refused(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"num-server-rounds": 1})
    federate(synthetic_sites[:1], config_dict)
    changed = FederatedConfig.from_run_config(config_dict | {"resume": True, "model-width": 1.0})
    with pytest.raises(ValueError, match="model_width"):
        RunDirectory.open(changed, flower_run_id=2)


def test_a_single_site_run_completes_with_default_minimum_nodes(synthetic_sites, tmp_path, flower_identity):
    run, _ = federate(synthetic_sites[:1], run_config(tmp_path, **{"num-server-rounds": 1}))
    assert (run.path / "models" / "round-001.pt").is_file()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_flowers_own_and_aggregates_a_round(name, synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, strategy=name)
    config = FederatedConfig.from_run_config(config_dict)
    strategy = build_strategy(config, num_nodes=3)
    assert isinstance(strategy, STRATEGIES[name])
    grid = RecordingGrid(synthetic_sites, config_dict)
    global_arrays = initial_arrays(config)
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord({"local-epochs": 1}), grid))
    if name == "fedprox":
        assert all(message.content["config"]["proximal-mu"] == config.proximal_mu for message in messages)

    aggregated, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))

    assert list(aggregated.keys()) == list(global_arrays.keys())
    assert all(np.isfinite(a.numpy()).all() for a in aggregated.values())
    assert metrics["train-loss"] > 0


def test_a_site_whose_store_does_not_match_the_run_is_told_how_to_fix_it(synthetic_sites, tmp_path):
    config_dict = run_config(tmp_path, **{"roi-size": 64})
    arrays = initial_arrays(FederatedConfig.from_run_config(config_dict))
    with pytest.raises(ValueError, match="pneumofed prepare"):
        train_locally(arrays, ConfigRecord({"server-round": 1}), config_dict, {"data-path": str(synthetic_sites[0])},
                      RecordDict())


def test_run_config_rejects_unknown_keys_and_relative_paths():
    with pytest.raises(ValueError, match="extra"):
        FederatedConfig.from_run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="absolute"):
        FederatedConfig.from_run_config({"sites": "relative/store"})
    with pytest.raises(ValueError, match="unknown model"):
        FederatedConfig.from_run_config({"model": "vgg16"})


def test_the_generated_flower_app_passes_flowers_own_validation_with_the_typed_defaults(tmp_path):
    from flwr.common.config import validate_config
    from flwr.supercore.fab_format_version import normalize_and_validate_fab_format

    from pneumofed.common.federation.flower_app import write_flower_app

    app = write_flower_app(tmp_path / "app")
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(pyproject, check_module=True, project_dir=app)
    assert valid, errors
    normalize_and_validate_fab_format(pyproject)
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert FederatedConfig.from_run_config(defaults) == FederatedConfig()
    assert (app / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_the_best_round_is_the_best_pooled_auc_and_lower_validation_loss_breaks_ties(tmp_path):
    config = FederatedConfig.from_run_config(run_config(tmp_path))
    run = RunDirectory.open(config, flower_run_id=1)
    labels = np.array([0, 1, 2, 0, 1, 2])
    constant = np.full((6, 3), 1 / 3)  # every class AUC 0.5, as an untrained network gives
    report = report_from_summary(
        ScoreSummary.from_scores(labels, constant), confusion_counts(labels, constant), CLASSES
    )
    arrays = initial_arrays(config)
    for server_round, loss in ((1, 1.10), (2, 1.05), (3, 1.08)):
        run.record_round(server_round, arrays, None, PooledEvaluation(report, loss, 6), {})
    assert run.best_round == 2
