"""The model's arrays travel packed, one array per record, and packing changes nothing they carry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType, RecordDict
from test_federated import RecordingGrid, run_config

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.encoding import encode_arrays
from pneumofed.common.federation.packing import (
    PACKED_ARRAYS,
    PACKED_STYPE,
    PackedArraysGrid,
    pack_arrays,
    unpack_arrays,
)
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.rounds import initial_arrays, run_federation


def _default_model_arrays(encoding: str) -> ArrayRecord:
    config = FederatedConfig(**{"update-encoding": encoding})
    return encode_arrays(initial_arrays(config), encoding, statistics=config.batchnorm_statistics())


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_a_packed_record_is_one_uint8_array_that_unpacks_to_the_very_same_arrays(encoding):
    arrays = _default_model_arrays(encoding)
    packed = pack_arrays(arrays)

    assert list(packed.keys()) == [PACKED_ARRAYS] and packed[PACKED_ARRAYS].stype == PACKED_STYPE
    unpacked = unpack_arrays(packed)
    assert list(unpacked.keys()) == list(arrays.keys())
    for name, array in arrays.items():
        fields = (unpacked[name].dtype, unpacked[name].shape, unpacked[name].stype)
        assert fields == (array.dtype, array.shape, array.stype), name
        assert unpacked[name].data == array.data, name


def _blob(record: ArrayRecord) -> bytes:
    return record[PACKED_ARRAYS].data


def _record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED_ARRAYS: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


DEEP = b"[" * 100_000 + b"]" * 100_000  # nested deeper than the JSON parser goes


def _with_layout(layout: object, payload: bytes = b"") -> ArrayRecord:
    text = json.dumps(layout).encode()
    return _record(len(text).to_bytes(8, "little") + text + payload)


@pytest.mark.parametrize(("packed", "reason"), [
    (lambda good: _record(_blob(good)[:-1]), "not what its layout lists"),
    (lambda good: _record(_blob(good) + b"\0"), "not what its layout lists"),
    (lambda good: _with_layout("not a list"), "no readable layout"),
    (lambda good: _with_layout([["w", "float32", [2], "numpy.ndarray", -8]], b"\0" * 8), "no readable layout"),
    (lambda good: _with_layout([["w", "uint8", [1], "numpy.ndarray", 1]] * 2, b"\0\0"), "twice"),
    (lambda good: _record(b"\xff" * 8), "shorter than its layout says"),
    (lambda good: _record(b"\0" * 3), "shorter than its layout says"),
    (lambda good: _with_layout([["w", "uint8", "12", "numpy.ndarray", 1]], b"\0"), "no readable layout"),
    (lambda good: _with_layout([[None, "uint8", [1], "numpy.ndarray", 1]], b"\0"), "no readable layout"),
    (lambda good: _with_layout([["w", "uint8", [1], "numpy.ndarray", 1.5]], b"\0"), "no readable layout"),
    (lambda good: _record(len(DEEP).to_bytes(8, "little") + DEEP), "no readable layout"),
    (lambda good: ArrayRecord({PACKED_ARRAYS: Array(np.frombuffer(_blob(good), dtype=np.uint8))}), "serialisation"),
    (lambda good: ArrayRecord({PACKED_ARRAYS: good[PACKED_ARRAYS], "extra": Array(np.zeros(1))}), "exactly one array"),
])
def test_a_record_that_is_no_packing_is_refused_with_its_reason(packed, reason):
    good = pack_arrays(ArrayRecord({"a": Array(np.arange(3, dtype=np.float32)), "b": Array(np.ones((2, 2)))}))
    with pytest.raises(ValueError, match=reason):
        unpack_arrays(packed(good))


def _federate(sites, config_dict, packed: bool, tamper=None) -> tuple[RunDirectory, RecordingGrid]:
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(sites, config_dict, tamper)
    run = RunDirectory.open(config, flower_run_id=1)
    run_federation(PackedArraysGrid(grid) if packed else grid, config, run)
    return run, grid


def _without_timing(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "timing" and "seconds" not in key}
            for record in history]


def test_a_run_over_the_packed_grid_sends_and_receives_one_array_per_record_and_learns_exactly_the_same(
    synthetic_sites, tmp_path, flower_identity
):
    two_rounds = {"num-server-rounds": 2}
    plain_run, _ = _federate(synthetic_sites, run_config(tmp_path / "plain", **two_rounds), packed=False)
    packed_run, grid = _federate(synthetic_sites, run_config(tmp_path / "packed", **two_rounds), packed=True)

    for message in grid.instructions + grid.replies:
        if message.has_content():
            records = message.content.array_records.values()
            assert all(len(record) <= 1 for record in records), message.metadata.message_type
    train_replies = [reply for reply in grid.replies if reply.metadata.message_type == MessageType.TRAIN]
    assert train_replies and all(list(reply.content["arrays"].keys()) == [PACKED_ARRAYS] for reply in train_replies)
    history = json.loads((packed_run.path / "metrics.json").read_text())
    assert "macro_auc" in history[0]  # round 1 scored by the evaluation round 2's packed TRAIN messages carried
    plain, packed = (torch.load(run.path / "models" / "round-002.pt", weights_only=True)["state"]
                     for run in (plain_run, packed_run))
    assert plain.keys() == packed.keys() and all(torch.equal(plain[name], packed[name]) for name in plain)
    assert _without_timing(history) == _without_timing(json.loads((plain_run.path / "metrics.json").read_text()))


@pytest.mark.parametrize(("packed", "arrays", "reason"), [
    (True, _record(b"\xff" * 64), f"{PACKED_ARRAYS}: not a readable array"),  # does not unpack: passed on as it came
    (False, ArrayRecord({"w": Array(dtype="float32", shape=(0,), stype="numpy.ndarray", data=b"")}),
     "w: not a readable array"),
])
def test_a_training_reply_whose_arrays_do_not_read_is_dropped_and_the_run_goes_on(
    synthetic_sites, tmp_path, flower_identity, packed, arrays, reason
):
    def garbled(content: RecordDict) -> RecordDict:
        return RecordDict({**content, "arrays": arrays})

    config_dict = run_config(tmp_path, **{"num-server-rounds": 1})
    run, _ = _federate(synthetic_sites, config_dict, packed=packed, tamper={100: garbled})

    [record] = json.loads((run.path / "metrics.json").read_text())
    assert [rejection["node"] for rejection in record["rejected-updates"]] == [100]
    assert reason in record["rejected-updates"][0]["reason"]
