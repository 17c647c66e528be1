"""A server that bad replies cannot stop, sites that decide what they are scored on, files that cannot run code."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from test_federated import federate, run_config

from pneumofed.client.app import evaluate_locally
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.learning.modelfile import load_model_file
from pneumofed.common.learning.state import UnsafeFile
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.rounds import initial_arrays


def _metrics_changed(change: Callable[[dict], None]) -> Callable[[RecordDict], RecordDict]:
    def tamper(content: RecordDict) -> RecordDict:
        metrics = dict(content["metrics"])
        change(metrics)
        return RecordDict({"metrics": MetricRecord(metrics), "site": content["site"]})
    return tamper


def _set(key, value):
    return lambda metrics: metrics.__setitem__(key, value)


def _drop(key):
    return lambda metrics: metrics.pop(key)


def _wrong_bin_count(metrics):
    metrics["scores-bins"] = metrics["scores-bins"] // 2


def _interval_below_the_minimum(metrics):
    """Split the first interval of class 0 so that one part holds a single ROI."""
    edge, positives, negatives, *rest = metrics["scores-0"]
    first = [edge // 2, 1, 0] if positives else [edge // 2, 0, 1]
    metrics["scores-0"] = first + [edge, positives - first[1], negatives - first[2], *rest]


def _counts_one_more(metrics):
    metrics["num-examples"] = metrics["num-examples"] + 1


def _negative_confusion(metrics):
    metrics["confusion"] = [-1] + list(metrics["confusion"])[1:]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_drop("confusion"), "missing metrics"),
        (_drop("scores-0"), "score summary"),
        (_negative_confusion, "non-negative integers"),
        (_wrong_bin_count, "score summary"),
        (_interval_below_the_minimum, "fewer than the site's minimum"),
        (_set("eval-loss", float("nan")), "eval-loss"),
        (_counts_one_more, "num-examples says"),
        (_set("num-examples", -3), "positive integer"),
    ],
    ids=["missing-key", "missing-summary-class", "negative-count", "wrong-bin-count", "interval-below-minimum", "nan-loss",
         "counts-disagree-with-num-examples", "negative-num-examples"],
)
def test_a_malformed_evaluation_reply_is_dropped_and_the_round_completes(synthetic_sites, tmp_path, flower_identity,
                                                                          change, reason):
    run, _ = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 1}),
                      tamper_evaluate={100: _metrics_changed(change)})
    [record] = json.loads((run.path / "metrics.json").read_text())
    [rejection] = record["rejected-evaluations"]
    assert rejection["node"] == 100 and reason in rejection["reason"]
    assert set(record["site-auc"]) == {site.name for site in synthetic_sites[1:]}
    assert (run.path / "final.json").is_file()


def test_an_inflated_num_examples_cannot_buy_a_site_weight(synthetic_sites, tmp_path, flower_identity):
    def inflated(content: RecordDict) -> RecordDict:
        return RecordDict({"arrays": content["arrays"], "metrics": MetricRecord(dict(content["metrics"]) | {"num-examples": 10**9})})

    run, grid = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 1}), tamper={100: inflated})
    [record] = json.loads((run.path / "metrics.json").read_text())
    [rejection] = record["rejected-updates"]
    assert rejection["node"] == 100 and "exceeds" in rejection["reason"]
    # The aggregate is the average of the two honest sites alone.
    honest = [r.content for r in grid.replies if r.metadata.message_type.endswith("train") and r.metadata.src_node_id != 100]
    weights = np.array([c["metrics"]["num-examples"] for c in honest], dtype=float)
    state = torch.load(run.path / "models" / "round-001.pt", weights_only=True)["state"]
    name = next(n for n in honest[0]["arrays"] if n.endswith("weight"))
    expected = sum(w * c["arrays"][name].numpy() for w, c in zip(weights, honest)) / weights.sum()
    np.testing.assert_allclose(state[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_an_update_far_above_the_rounds_median_norm_is_refused(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"num-server-rounds": 1})
    start = initial_arrays(FederatedConfig.from_run_config(config_dict))

    def amplified(content: RecordDict) -> RecordDict:
        # 50x the honest step on the trained parameters (BatchNorm statistics are left as sent).
        arrays = {name: torch.from_numpy(a.numpy() if "running_" in name else
                                         start[name].numpy() + 50 * (a.numpy() - start[name].numpy()))
                  for name, a in content["arrays"].items()}
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})

    run, _ = federate(synthetic_sites, config_dict, tamper={100: amplified})
    [record] = json.loads((run.path / "metrics.json").read_text())
    [rejection] = record["rejected-updates"]
    assert rejection["node"] == 100 and "median" in rejection["reason"]


def test_a_site_refuses_to_be_scored_on_its_training_part(synthetic_sites, tmp_path):
    config_dict = run_config(tmp_path)
    arrays = initial_arrays(FederatedConfig.from_run_config(config_dict))
    node = {"data-path": str(synthetic_sites[0])}
    with pytest.raises(PermissionError, match="not 'train'"):
        evaluate_locally(arrays, ConfigRecord({"split": "train"}), config_dict, node, RecordDict())
    with pytest.raises(PermissionError, match="not 'test'"):
        evaluate_locally(arrays, ConfigRecord({"split": "test"}), config_dict, node | {"evaluate-splits": "val"}, RecordDict())
    with pytest.raises(ValueError, match="val and test only"):
        evaluate_locally(arrays, ConfigRecord({"split": "val"}), config_dict, node | {"evaluate-splits": "val,train"}, RecordDict())
    assert evaluate_locally(arrays, ConfigRecord({"split": "val"}), config_dict, node, RecordDict())["metrics"]["num-examples"] > 0


class _RunsCode:
    """A pickled object whose unpickling would run code (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_model_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    torch.save({"card": {"model": "shufflenet_v2_eca"}, "state": _RunsCode(str(marker))}, path)
    with pytest.raises(UnsafeFile, match="could run code") as refused:
        load_model_file(path)
    assert "weights_only" not in str(refused.value)
    assert not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"num-server-rounds": 1})
    run, _ = federate(synthetic_sites[:1], config_dict)
    marker = tmp_path / "code-ran"
    torch.save({"config": {}, "payload": _RunsCode(str(marker))}, run.path / "state" / "checkpoint.pt")
    with pytest.raises(UnsafeFile, match="could run code"):
        RunDirectory.open(FederatedConfig.from_run_config(config_dict | {"resume": True}), flower_run_id=2)
    assert not marker.exists()


def test_honest_sites_are_never_refused(synthetic_sites, tmp_path, flower_identity):
    run, _ = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 3}))
    history = json.loads((run.path / "metrics.json").read_text())
    assert all(r["rejected-updates"] == [] and r["rejected-evaluations"] == [] for r in history)
