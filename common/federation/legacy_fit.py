"""How a round's train instruction and reply ride Flower's SecAgg+ protocol (run config `secure-aggregation`).

Flower 1.42's `SecAggPlusWorkflow` and `secaggplus_mod` speak the legacy FitIns/FitRes content
(Flower's `recorddict_compat`), whose arrays are an unnamed list. The server puts the global
model's names into the FitIns config under `ARRAY_NAMES`; the site turns the FitIns back into the
instruction its train handler reads, and its reply into a FitRes whose parameters are its update
(trained model minus the global model it received), in the same order. SecAgg+ clips every
weighted element to its clipping range before quantising it, and an update is orders of magnitude
smaller than the weights; the server adds the unmasked weighted mean update to its global model.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

ARRAY_NAMES = "array-names"


def fit_instruction(arrays: ArrayRecord, config: ConfigRecord) -> FitIns:
    """The train instruction of the global `arrays` and `config` as the FitIns SecAgg+ carries."""
    return FitIns(arrayrecord_to_parameters(arrays, keep_input=True), {**config, ARRAY_NAMES: list(arrays.keys())})


def train_instruction(fitins_content: RecordDict) -> RecordDict:
    """The content of the train instruction (`arrays`, `config`) that the FitIns content carries."""
    config = ConfigRecord(dict(fitins_content.config_records["fitins.config"]))
    names = config.pop(ARRAY_NAMES)
    parameters = arrayrecord_to_parameters(fitins_content.array_records["fitins.parameters"], keep_input=True)
    values = parameters_to_ndarrays(parameters)
    if len(names) != len(values):
        raise ValueError(f"the instruction names {len(names)} arrays but carries {len(values)}")
    return RecordDict({"arrays": ArrayRecord({name: Array(v) for name, v in zip(names, values)}), "config": config})


def fit_reply(reply: RecordDict, received: ArrayRecord, clipping_range: float, max_weight: float) -> RecordDict:
    """The FitRes content of a train `reply`: the update from the `received` global arrays, its
    num-examples and metrics. ValueError when SecAgg+ would clip it: an element of the update,
    weighted by num-examples / `max_weight` as SecAgg+ weights it, beyond +-`clipping_range`."""
    trained, metrics = reply["arrays"], reply["metrics"]
    if list(trained.keys()) != list(received.keys()):
        raise ValueError("the trained arrays are not the ones the instruction carried")
    update = [trained[name].numpy() - received[name].numpy() for name in received]
    num_examples = int(metrics["num-examples"])
    largest = max((float(np.max(np.abs(u), initial=0.0)) for u in update), default=0.0) * num_examples / max_weight
    if not largest <= clipping_range:
        raise ValueError(f"the weighted update reaches {largest:.3g}, beyond SecAgg+'s clipping range "
                         f"+-{clipping_range:g}: sending it would clip it")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples, dict(metrics))
    return fitres_to_recorddict(fitres, keep_input=True)
