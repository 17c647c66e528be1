"""Compressed model exchange (`update-encoding`): round-trip bounds, bytes on the wire, fp32 aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from test_federated import RecordingGrid, federate, run_config

from pneumofed.client.app import train_locally
from pneumofed.common.federation.audit import array_bytes, reply_summary
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.encoding import INT8_SCALES, decode_arrays, encode_arrays
from pneumofed.common.federation.flower_app import flower_app_config
from pneumofed.common.learning.batchnorm import batchnorm_names
from pneumofed.server.rounds import (
    SiteDeclaration,
    aggregate_train_round,
    collect_declarations,
    encoded_instructions,
    initial_arrays,
)
from pneumofed.server.strategy import build_strategy

FP16_RELATIVE_STEP = 2.0**-11  # half the distance between neighbouring fp16 values, relative


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(0, 5.0, (3, 16)).astype(np.float32),
        "fc.bias": rng.uniform(-1e-3, 1e-3, 3).astype(np.float32),
    }


def _int8_scales(record: ArrayRecord) -> dict[str, float]:
    codes = [name for name in record if name != INT8_SCALES and record[name].numpy().dtype == np.int8]
    return dict(zip(codes, record[INT8_SCALES].numpy().tolist(), strict=True))


def test_fp16_round_trip_is_within_half_an_fp16_step_and_decodes_to_fp32():
    arrays = _tensors()
    encoded = encode_arrays(arrays, "fp16")
    decoded = decode_arrays(encoded, "fp16")
    assert all(encoded[name].numpy().dtype == np.float16 for name in arrays)
    for name, original in arrays.items():
        values = decoded[name].numpy()
        assert values.dtype == np.float32
        assert (np.abs(values - original) <= FP16_RELATIVE_STEP * np.abs(original)).all(), name


def test_fp16_keeps_variances_below_its_smallest_step_positive():
    variances = {"bn.running_var": np.array([1e-9, 2e-8, 1.0], dtype=np.float32)}
    decoded = decode_arrays(encode_arrays(variances, "fp16"), "fp16")["bn.running_var"].numpy()
    assert (decoded > 0).all() and decoded[2] == 1.0


def test_int8_round_trip_is_within_half_a_step_per_element():
    arrays = _tensors()
    encoded = encode_arrays(arrays, "int8")
    decoded = decode_arrays(encoded, "int8")
    scales = _int8_scales(encoded)
    for name, original in arrays.items():
        assert encoded[name].numpy().dtype == np.int8
        assert scales[name] == pytest.approx(np.abs(original).max() / 127, rel=1e-6)
        error = np.abs(decoded[name].numpy() - original)
        assert (error <= scales[name] / 2 * (1 + 1e-5)).all(), name
        assert decoded[name].numpy().dtype == np.float32


def test_an_int8_update_is_quantised_on_the_updates_scale_not_the_weights():
    reference = _tensors(seed=0)
    rng = np.random.default_rng(1)
    trained = {name: (array + rng.normal(0, 1e-3, array.shape)).astype(np.float32) for name, array in reference.items()}
    update = encode_arrays(trained, "int8", reference=reference)
    weights = encode_arrays(trained, "int8")
    decoded = decode_arrays(update, "int8", reference=reference)
    for name, original in trained.items():
        scale = _int8_scales(update)[name]
        assert scale == pytest.approx(np.abs(original - reference[name]).max() / 127, rel=1e-5)
        assert (np.abs(decoded[name].numpy() - original) <= scale / 2 * (1 + 1e-3)).all(), name
    assert _int8_scales(update)["fc.weight"] < _int8_scales(weights)["fc.weight"] / 100


def test_integer_tensors_travel_unchanged_and_int8_integers_are_refused_under_int8():
    counters = {"bn.num_batches_tracked": np.array(7, dtype=np.int64), "w": np.ones((2, 2), dtype=np.float32)}
    for encoding in ("fp16", "int8"):
        encoded = encode_arrays(counters, encoding)
        assert encoded["bn.num_batches_tracked"].numpy().dtype == np.int64
        decoded = decode_arrays(encoded, encoding)["bn.num_batches_tracked"].numpy()
        assert decoded.dtype == np.int64 and decoded == 7
    with pytest.raises(ValueError, match="int8 integer"):
        encode_arrays({"flags": np.zeros(3, dtype=np.int8)}, "int8")


def test_zero_tensors_encode_to_scale_zero_and_decode_to_exact_zeros():
    zeros = {"w": np.zeros((4, 4), dtype=np.float32)}
    with np.errstate(all="raise"):
        encoded = encode_arrays(zeros, "int8")
        decoded = decode_arrays(encoded, "int8")
        update = decode_arrays(encode_arrays(zeros, "int8", reference=zeros), "int8", reference=zeros)
    assert _int8_scales(encoded) == {"w": 0.0}
    assert np.array_equal(decoded["w"].numpy(), zeros["w"]) and np.array_equal(update["w"].numpy(), zeros["w"])
    assert np.array_equal(decode_arrays(encode_arrays(zeros, "fp16"), "fp16")["w"].numpy(), zeros["w"])


def test_batchnorm_statistics_travel_as_fp16_values_under_int8():
    arrays = {"bn.weight": np.ones(4, dtype=np.float32), "bn.running_var": np.array([1e-6, 1, 10, 100], dtype=np.float32)}
    encoded = encode_arrays(arrays, "int8", statistics={"bn.running_var"}, reference=arrays)
    assert encoded["bn.running_var"].numpy().dtype == np.float16 and encoded["bn.weight"].numpy().dtype == np.int8
    decoded = decode_arrays(encoded, "int8", statistics={"bn.running_var"}, reference=arrays)["bn.running_var"].numpy()
    assert (decoded > 0).all()
    # Below 6e-5 fp16 is subnormal: a fixed step of 2**-24.
    np.testing.assert_allclose(decoded, arrays["bn.running_var"], rtol=FP16_RELATIVE_STEP, atol=2.0**-25)


@pytest.mark.parametrize(
    ("encoding", "record", "reason"),
    [
        ("int8", lambda: ArrayRecord({"w": torch.ones(3)}), "scales"),
        ("int8", lambda: ArrayRecord({"w": torch.ones(3), INT8_SCALES: torch.ones(1)}), "not encoded as int8"),
        ("fp16", lambda: ArrayRecord({"w": torch.ones(3)}), "not encoded as fp16"),
    ],
    ids=["int8-without-scales", "int8-given-fp32", "fp16-given-fp32"],
)
def test_a_record_not_encoded_as_configured_is_refused(encoding, record, reason):
    with pytest.raises(ValueError, match=reason):
        decode_arrays(record(), encoding)


def test_an_int8_update_that_fits_no_array_of_the_model_is_refused():
    reference = {"w": np.ones((2, 3), dtype=np.float32)}
    update = encode_arrays({"w": np.ones(6, dtype=np.float32)}, "int8")
    with pytest.raises(ValueError, match="fits no array"):
        decode_arrays(update, "int8", reference=reference)


@pytest.mark.parametrize(("encoding", "fraction"), [("fp16", (0.5, 0.5)), ("int8", (0.25, 0.265))])
def test_bytes_per_message_measured_from_the_records_a_round_sends(encoding, fraction, synthetic_sites, tmp_path,
                                                                   flower_identity):
    config_dict = run_config(tmp_path, **{"update-encoding": encoding})
    config = FederatedConfig.from_run_config(config_dict)
    global_arrays = initial_arrays(config)
    fp32_bytes = array_bytes(global_arrays)
    grid = RecordingGrid(synthetic_sites[:1], config_dict)
    strategy = build_strategy(config, num_nodes=3)
    instructions = encoded_instructions(strategy.configure_train(1, global_arrays, ConfigRecord(), grid), global_arrays,
                                        config)
    [reply] = grid.send_and_receive(instructions)

    low, high = fraction
    for content in (instructions[0].content, reply.content):
        sent = array_bytes(content["arrays"])
        assert low * fp32_bytes <= sent <= high * fp32_bytes
        # The audit log's byte count is the elements' bytes, scales included.
        assert reply_summary(content)["arrays"]["arrays"]["bytes"] == sent
        assert sent == sum(array.numpy().nbytes for array in content["arrays"].values())


def _reply(instruction: Message, arrays: ArrayRecord, num_examples: int) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples})}),
                   reply_to=instruction)


@pytest.mark.parametrize("encoding", ["fp16", "int8"])
def test_the_server_aggregates_the_decoded_fp32_arrays(encoding, tmp_path, flower_identity):
    # Sites send 1000 or 1000.5 (exact in fp16, whose step there is 0.5), so their weighted mean
    # 1000 + 6/28 lies off fp16's grid: a mean accumulated in fp16, as Flower's would be for
    # fp16 arrays, is off by at least 0.2.
    config = FederatedConfig.from_run_config(run_config(tmp_path, **{"update-encoding": encoding}))
    global_arrays = ArrayRecord({"w": torch.full((64,), 1000.0)})
    sites = {100 + i: (1000.0 + 0.5 * (i % 2), 1 + i) for i in range(7)}
    replies, decoded = [], []
    for node, (value, num_examples) in sites.items():
        trained = {"w": np.full(64, value, dtype=np.float32)}
        encoded = encode_arrays(trained, encoding, reference=global_arrays if encoding == "int8" else None)
        decoded.append(decode_arrays(encoded, encoding, reference=global_arrays)["w"].numpy().astype(np.float64))
        replies.append(_reply(Message(RecordDict(), node, MessageType.TRAIN), encoded, num_examples))
    weights = np.array([num_examples for _, num_examples in sites.values()], dtype=np.float64)
    expected = sum(w * values for w, values in zip(weights, decoded)) / weights.sum()
    declarations = {node: SiteDeclaration(n, (n, 0, 0)) for node, (_, n) in sites.items()}

    trained = aggregate_train_round(build_strategy(config, num_nodes=3), 1, global_arrays, replies, config, declarations)

    assert trained.rejected == []
    np.testing.assert_allclose(trained.arrays["w"].numpy(), expected, rtol=0, atol=1e-4)
    if encoding == "fp16":  # what aggregating the records as they arrived gives
        in_fp16 = aggregate_arrayrecords([reply.content for reply in replies], "num-examples")["w"].numpy()
        assert np.abs(in_fp16.astype(np.float64) - expected).min() > 0.2


def test_a_reply_not_encoded_as_the_run_says_is_dropped_with_its_reason(synthetic_sites, tmp_path, flower_identity):
    config_dict = run_config(tmp_path, **{"update-encoding": "int8"})
    config = FederatedConfig.from_run_config(config_dict)

    def as_fp32(content: RecordDict) -> RecordDict:
        statistics = batchnorm_names(config.build_model()).statistics
        arrays = decode_arrays(content["arrays"], "int8", statistics=statistics, reference=global_arrays)
        return RecordDict({"arrays": arrays, "metrics": content["metrics"]})

    grid = RecordingGrid(synthetic_sites[:3], config_dict, tamper={100: as_fp32})
    strategy = build_strategy(config, num_nodes=3)
    global_arrays = initial_arrays(config)
    replies = grid.send_and_receive(
        encoded_instructions(strategy.configure_train(1, global_arrays, ConfigRecord(), grid), global_arrays, config)
    )
    trained = aggregate_train_round(strategy, 1, global_arrays, replies, config,
                                    collect_declarations(grid, grid.get_node_ids(), config))
    [rejection] = trained.rejected
    assert rejection["node"] == 100 and "update-encoding=int8" in rejection["reason"]
    assert sorted(trained.participants) == [101, 102]


def test_the_server_recovers_a_sites_int8_trained_model_to_half_a_step_of_its_update(synthetic_sites, tmp_path):
    site = {"data-path": str(synthetic_sites[0])}
    int8_run = run_config(tmp_path, **{"update-encoding": "int8"})
    config = FederatedConfig.from_run_config(int8_run)
    statistics = batchnorm_names(config.build_model()).statistics
    global_arrays = initial_arrays(config)
    instruction = encode_arrays(global_arrays, "int8", statistics=statistics)
    received = decode_arrays(instruction, "int8", statistics=statistics)
    # The site's own fp32 model: the same training (same seed) from the same decoded global model.
    trained = train_locally(received, ConfigRecord({"server-round": 1}), run_config(tmp_path), site, RecordDict())

    reply = train_locally(instruction, ConfigRecord({"server-round": 1}), int8_run, site, RecordDict())["arrays"]
    at_server = decode_arrays(reply, "int8", statistics=statistics, reference=received)

    scales = _int8_scales(reply)
    for name, array in trained["arrays"].items():
        error = np.abs(at_server[name].numpy() - array.numpy())
        if name in statistics:
            assert (error <= FP16_RELATIVE_STEP * np.abs(array.numpy()) + 2.0**-25).all(), name
        else:
            assert (error <= scales[name] / 2 * (1 + 1e-3) + 1e-7).all(), name


def test_an_int8_run_completes_and_learns_as_the_fp32_run_does(synthetic_sites, tmp_path, flower_identity):
    histories = {}
    for encoding in ("fp32", "int8"):
        overrides = {"update-encoding": encoding, "num-server-rounds": 2}
        run, _ = federate(synthetic_sites, run_config(tmp_path / encoding, **overrides))
        histories[encoding] = json.loads((run.path / "metrics.json").read_text())
        assert (run.path / "final.json").is_file()
    assert [record["rejected-updates"] for record in histories["int8"]] == [[], []]
    # This small synthetic federation's AUCs move by +-0.05 under any perturbation (fp16 too), so
    # the comparison is on the pooled validation loss; it moved by up to 0.053, depending on the
    # machine's CPU (an update decoded without its scales would send it far above 2).
    for fp32, int8 in zip(histories["fp32"], histories["int8"], strict=True):
        assert int8["eval-loss"] == pytest.approx(fp32["eval-loss"], abs=0.08)
        assert int8["train-loss"] == pytest.approx(fp32["train-loss"], abs=0.08)


def test_an_unknown_update_encoding_is_a_config_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"update-encoding[\s\S]*'fp32', 'fp16' or 'int8'"):
        FederatedConfig.from_run_config({"update-encoding": "int4"})
    assert FederatedConfig().update_encoding == "fp32"
    assert flower_app_config()["tool"]["flwr"]["app"]["config"]["update-encoding"] == "fp32"
