"""Federated learning done right: BatchNorm modes, site-local optimiser state, one objective for all sites."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from test_federated import federate, run_config
from torch import nn

from pneumofed.client.app import (
    LOCAL_BATCHNORM,
    OPTIMIZER_MOMENTS,
    SITE_SPLIT,
    count_classes,
    evaluate_locally,
    train_locally,
)
from pneumofed.common.data import site as site_module
from pneumofed.common.data.site import load_site
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.learning import training
from pneumofed.common.learning.batchnorm import batchnorm_names, recalibrate_batchnorm
from pneumofed.server.rounds import collect_declarations, federation_class_weights, initial_arrays


def _fresh_process(state: RecordDict) -> RecordDict:
    """What a new ClientApp process receives: the context state as it crossed the process boundary."""
    return recorddict_from_proto(recorddict_to_proto(state))


def test_recalibration_sets_running_statistics_to_the_batch_statistics_of_the_training_rois(synthetic_sites):
    torch.manual_seed(0)
    model = FederatedConfig.model_validate({"model-width": 0.5, "roi-size": 32}).build_model()
    train = load_site(synthetic_sites[0], seed=0).train
    usable = len(train) - len(train) % 8  # whole batches: the cumulative average is then the exact mean
    subset = torch.utils.data.Subset(train, range(usable))
    recalibrate_batchnorm(model, subset, batch_size=8, device=torch.device("cpu"))

    images = torch.stack([subset[i][0] for i in range(usable)])
    first_conv, first_bn = model.conv1[0], model.conv1[1]
    assert isinstance(first_bn, nn.BatchNorm2d)
    with torch.no_grad():
        features = first_conv(images)
    torch.testing.assert_close(first_bn.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    batch_vars = torch.stack([features[i:i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, usable, 8)])
    torch.testing.assert_close(first_bn.running_var, batch_vars.mean(dim=0), rtol=1e-4, atol=1e-5)


def test_batchnorm_layers_are_found_by_type_in_shufflenet_whose_names_are_numbers():
    model = FederatedConfig().build_model()
    names = batchnorm_names(model)
    bn_modules = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(names.affine) == 2 * len(bn_modules) and len(names.variances) == len(bn_modules)
    assert any(name.startswith("stage2.0.branch2.") for name in names.statistics)


def test_under_fedbn_batchnorm_stays_at_the_site_and_the_site_evaluates_with_its_own(synthetic_sites, tmp_path):
    config_dict = run_config(tmp_path, **{"bn-mode": "fedbn"})
    config = FederatedConfig.from_run_config(config_dict)
    node = {"data-path": str(synthetic_sites[0]), "site-name": "a"}
    state = RecordDict()
    arrays = initial_arrays(config)
    bn = batchnorm_names(config.build_model())
    assert not (set(arrays.keys()) & (bn.affine | bn.statistics)), "the global model must carry no BatchNorm"

    reply = train_locally(arrays, ConfigRecord({"server-round": 1}), config_dict, node, state)

    assert not (set(reply["arrays"].keys()) & (bn.affine | bn.statistics)), "BatchNorm left the site"
    kept = state[LOCAL_BATCHNORM].to_torch_state_dict()
    assert set(kept) == {name for name in bn.affine | bn.statistics if not name.endswith("num_batches_tracked")}
    # The site evaluates the global model with the BatchNorm it trained, across a process boundary.
    restored = _fresh_process(state)
    evaluated = evaluate_locally(reply["arrays"], ConfigRecord({"split": "val"}), config_dict, node, restored)
    model = config.build_model()
    model.load_state_dict(reply["arrays"].to_torch_state_dict() | kept, strict=False)
    expected = training.evaluate(model, load_site(synthetic_sites[0], config.seed).val, training.TrainConfig(progress=False))
    assert evaluated["metrics"]["eval-loss"] == expected.loss


def test_silobn_shares_affine_parameters_and_keeps_statistics(synthetic_sites, tmp_path):
    config_dict = run_config(tmp_path, **{"bn-mode": "silobn"})
    config = FederatedConfig.from_run_config(config_dict)
    state = RecordDict()
    reply = train_locally(initial_arrays(config), ConfigRecord({"server-round": 1}), config_dict,
                          {"data-path": str(synthetic_sites[0])}, state)
    bn = batchnorm_names(config.build_model())
    sent = set(reply["arrays"].keys())
    assert bn.affine <= sent and not (sent & bn.statistics)
    assert set(state[LOCAL_BATCHNORM].keys()) == {n for n in bn.statistics if not n.endswith("num_batches_tracked")}


def test_local_optimiser_moments_survive_a_new_clientapp_process(synthetic_sites, tmp_path):
    config_dict = run_config(tmp_path, **{"keep-optimizer-state": True})
    config = FederatedConfig.from_run_config(config_dict)
    node = {"data-path": str(synthetic_sites[0])}
    state = RecordDict()
    first = train_locally(initial_arrays(config), ConfigRecord({"server-round": 1}), config_dict, node, state)
    moments = state[OPTIMIZER_MOMENTS].to_torch_state_dict()
    assert moments and all(torch.isfinite(t).all() for t in moments.values())

    continued = train_locally(first["arrays"], ConfigRecord({"server-round": 2}), config_dict, node, _fresh_process(state))
    restarted = train_locally(first["arrays"], ConfigRecord({"server-round": 2}), config_dict, node, RecordDict())
    fresh_again = train_locally(first["arrays"], ConfigRecord({"server-round": 2}), config_dict, node, RecordDict())
    different = any(
        not np.array_equal(continued["arrays"][k].numpy(), restarted["arrays"][k].numpy()) for k in continued["arrays"]
    )
    assert different, "the second round ignored the site's saved Adam moments"
    for key in restarted["arrays"]:  # and without them a round is reproducible
        np.testing.assert_array_equal(restarted["arrays"][key].numpy(), fresh_again["arrays"][key].numpy())


def test_every_site_is_sent_the_same_federation_wide_class_weights(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"num-server-rounds": 1})
    _, grid = federate(synthetic_sites, config_dict)
    counts = sum(np.asarray(count_classes(config_dict, grid.node_configs[node])["metrics"]["class-counts"])
                 for node in grid.get_node_ids())
    expected = counts.sum() / (len(counts) * counts)
    train_replies = [reply for reply in grid.replies if reply.metadata.message_type == MessageType.TRAIN]
    assert len(train_replies) == len(synthetic_sites)
    sent = [list(message.content["config"]["class-weights"]) for message in grid.instructions if message.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == len(synthetic_sites) and all(weights == sent[0] for weights in sent)
    np.testing.assert_allclose(sent[0], expected, rtol=1e-9)
    config = FederatedConfig.from_run_config(config_dict)
    declarations = collect_declarations(grid, grid.get_node_ids(), config)
    assert federation_class_weights(declarations, len(config.classes)) == sent[0]


def test_no_server_optimiser_drives_a_batchnorm_variance_negative(synthetic_sites, tmp_path, flower_identity):
    for strategy in ("fedadam", "fedavgm"):
        run, _ = federate(synthetic_sites[:2], run_config(tmp_path / strategy, strategy=strategy,
                                                          **{"num-server-rounds": 3, "server-learning-rate": 1.0}))
        history = json.loads((run.path / "metrics.json").read_text())
        assert all(record["rejected-updates"] == [] for record in history)
        for number in (1, 2, 3):
            state = torch.load(run.path / "models" / f"round-{number:03d}.pt", weights_only=True)["state"]
            variances = [t for name, t in state.items() if name.endswith("running_var")]
            assert variances and all((t > 0).all() for t in variances), f"{strategy} round {number}"


def test_an_update_with_a_negative_variance_is_rejected(synthetic_sites, tmp_path, flower_identity):
    def negative_variance(content: RecordDict) -> RecordDict:
        arrays = {name: torch.from_numpy(array.numpy().copy()) for name, array in content["arrays"].items()}
        name = next(n for n in arrays if n.endswith("running_var"))
        arrays[name].view(-1)[0] = -1e-3
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})

    run, _ = federate(synthetic_sites, run_config(tmp_path, **{"num-server-rounds": 1}), tamper={100: negative_variance})
    [record] = json.loads((run.path / "metrics.json").read_text())
    [rejection] = record["rejected-updates"]
    assert rejection["node"] == 100 and "variance is not positive" in rejection["reason"]


def _evaluate_in_a_new_process(state: RecordDict, arrays: ArrayRecord, config_dict: dict, node: dict, tmp_path) -> dict:
    """Run `evaluate_locally` in a fresh Python process with `state` as it crossed the process boundary;
    returns the reply's metrics and the heavy modules that process imported."""
    (tmp_path / "state.pb").write_bytes(recorddict_to_proto(RecordDict({"state": state.config_records[SITE_SPLIT],
                                                                       "arrays": arrays})).SerializeToString())
    script = f"""
import json, sys
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
from pneumofed.client.app import SITE_SPLIT, evaluate_locally
proto = RecordDictProto()
proto.ParseFromString(open({str(tmp_path / "state.pb")!r}, "rb").read())
kept = recorddict_from_proto(proto)
reply = evaluate_locally(kept["arrays"], ConfigRecord({{"split": "val"}}), {config_dict!r}, {node!r},
                         RecordDict({{SITE_SPLIT: kept["state"]}}))
print(json.dumps({{"num-examples": reply["metrics"]["num-examples"],
                  "imported": sorted({{m.split(".")[0] for m in sys.modules}} & {{"sklearn", "kornia", "scipy"}})}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_site_splits_its_store_once_and_a_new_clientapp_process_reuses_the_split(synthetic_sites, tmp_path, monkeypatch):
    config_dict = run_config(tmp_path)
    config = FederatedConfig.from_run_config(config_dict)
    node = {"data-path": str(synthetic_sites[0])}
    state = RecordDict()
    count_classes(config_dict, node, state)  # a run's first message
    split = load_site(synthetic_sites[0], config.seed)
    kept = state[SITE_SPLIT]
    for part in ("train", "val", "test"):
        assert list(kept[part]) == split.part(part).indices.tolist()

    # The kept split is used as it is: splitting again would fail here.
    def no_splitting(*args, **kwargs):
        raise AssertionError("the site split its store again")

    monkeypatch.setattr(site_module, "train_val_test_split", no_splitting)
    site_module._load_site_cached.cache_clear()
    trained = train_locally(initial_arrays(config), ConfigRecord({"server-round": 1}), config_dict, node, _fresh_process(state))
    assert trained["metrics"]["num-examples"] == len(split.train)
    reply = evaluate_locally(initial_arrays(config), ConfigRecord({"split": "val"}), config_dict, node, _fresh_process(state))
    assert reply["metrics"]["num-examples"] == len(split.val)

    # A new process that holds its split needs neither scikit-learn nor kornia (seconds of CPU each).
    evaluated = _evaluate_in_a_new_process(state, initial_arrays(config), config_dict, node, tmp_path)
    assert evaluated == {"num-examples": len(split.val), "imported": []}

    # A re-prepared store (a new index) is split anew.
    index = synthetic_sites[0] / "index.json"
    stat = index.stat()
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        with pytest.raises(AssertionError, match="split its store again"):
            evaluate_locally(initial_arrays(config), ConfigRecord({"split": "val"}), config_dict, node, state)
    finally:
        os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
