"""A round's training through Flower's SecAgg+ (run config `secure-aggregation`): the server sees the sum.

`SecAggPlusWorkflow` runs the protocol's four stages over the grid (setup, key sharing, masked
vectors, unmasking; Bell et al. 2020). In Flower 1.42 it drives a legacy strategy in a
`LegacyContext`: `InstructionsStrategy` hands it the round's train instructions as FitIns and
keeps what it unmasks, the one weighted mean of the sites' updates (`common/federation/legacy_fit.py`).
Every site weights its update by num-examples / `max_weight` before masking it, so the unmasked
sum divided by the summed weights is FedAvg's weighted mean, up to SecAgg+'s quantisation.

`train_securely` returns what the round loop would have got from the grid, one reply per site
whose update is in the sum, but each holds the sum (as the model it gives) beside the site's
clear metrics, so `rounds.aggregate_train_round` validates, aggregates and records it unchanged:
its checks then apply to the sum, and the strategy's mean of identical arrays is the sum itself
(FedAvg, FedProx) or the start of its server step (FedAdam, FedAvgM). A site that dropped out
gets an error reply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.server import ClientManager, LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.legacy_fit import fit_instruction

log = logging.getLogger("pneumofed.server")

# Hospital federations are small: every site holds a share of every other site's secrets (SecAgg+
# on the complete graph), and two thirds of them must answer to unmask the sum (with three sites
# one may drop out).
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
# A weighted update element in [-8, 8] (Flower's default) quantised to 2**24 levels (about 1e-6
# apart; Flower's default is 2**22), masked modulo 2**32 (room for the sum of up to 256 sites).
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32


class SiteSize(Protocol):
    """What a site declared of its training part when it joined (`rounds.SiteDeclaration`)."""

    num_examples: int


class InstructionsStrategy(LegacyFedAvg):
    """The legacy strategy `SecAggPlusWorkflow` asks for the round's FitIns and hands the unmasked sum.

    Its `aggregate_fit` gets one FitRes per site whose masked vector is in the sum: each carries the
    site's clear num-examples and metrics and, as parameters, the one unmasked weighted mean update.
    """

    def __init__(self, instructions: Iterable[Message], grid: Grid) -> None:
        super().__init__()
        self.instructions = {message.metadata.dst_node_id: message for message in instructions}
        self.grid = grid
        self.results: list[tuple[int, FitRes]] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            # The workflow reads only the proxy's node id; it sends every message itself.
            (GridClientProxy(node, self.grid, run_id=message.metadata.run_id),
             fit_instruction(message.content["arrays"], message.content["config"]))
            for node, message in self.instructions.items()
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[BaseException]
    ) -> tuple[Parameters | None, dict[str, bool | bytes | float | int | str]]:
        self.results = [(proxy.node_id, fit_res) for proxy, fit_res in results]
        return None, {}


def train_securely(
    grid: Grid, instructions: Iterable[Message], config: FederatedConfig, declarations: Mapping[int, SiteSize]
) -> list[Message]:
    """Run the train `instructions` through SecAgg+; the replies the round may see (module docstring).

    Only nodes that declared their training data take part (a site's update cannot be taken out of
    the sum afterwards); `max_weight` is their declared total, so every honest weight is at most 1.
    """
    instructions = list(instructions)
    for message in instructions:
        if message.metadata.dst_node_id not in declarations:
            log.warning("node %s declared no training data: left out of the secure aggregation",
                        message.metadata.dst_node_id)
    taking_part = [message for message in instructions if message.metadata.dst_node_id in declarations]
    if not taking_part:
        return []
    server_round = int(taking_part[0].content["config"]["server-round"])
    global_arrays = taking_part[0].content["arrays"]
    strategy = InstructionsStrategy(taking_part, grid)
    state = RecordDict({MAIN_PARAMS_RECORD: global_arrays,
                        MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy)
    workflow = SecAggPlusWorkflow(
        NUM_SHARES, RECONSTRUCTION_THRESHOLD,
        max_weight=float(sum(declarations[message.metadata.dst_node_id].num_examples for message in taking_part)),
        clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
        timeout=config.round_timeout,
    )
    workflow(grid, context)
    mean_update = parameters_to_ndarrays(strategy.results[0][1].parameters) if strategy.results else None
    fits = mean_update is not None and [u.shape for u in mean_update] == [a.numpy().shape for a in global_arrays.values()]
    if mean_update is not None and not fits:
        log.warning("round %d: the unmasked sum does not fit the global model's arrays", server_round)
    summed = {node for node, _ in strategy.results} if fits else set()
    replies = [
        Message(Error(ErrorCode.UNKNOWN, "the site's update is not in a usable securely aggregated sum"),
                reply_to=message)
        for node, message in strategy.instructions.items() if node not in summed
    ]
    if fits:
        weight_share = sum(fit_res.num_examples for _, fit_res in strategy.results) / workflow.max_weight
        # (The weights are the sites' clear claims here; update_problem refuses a non-positive one.)
        error = quantisation_error(len(strategy.results), weight_share) if weight_share > 0 else 0.0
        model = summed_model(global_arrays, mean_update, config.batchnorm_statistics(), error)
        replies += [
            Message(RecordDict({"arrays": model, "metrics": _clear_metrics(fit_res)}), reply_to=strategy.instructions[node])
            for node, fit_res in strategy.results
        ]
    return replies


def quantisation_error(sites: int, weight_share: float) -> float:
    """The most an element of the unmasked mean update is off: each site's weighted element is
    rounded stochastically to a level of 2 c / Q, and the sum is divided by the summed weights
    (`weight_share` of `max_weight`)."""
    return sites * 2 * CLIPPING_RANGE / QUANTIZATION_RANGE / weight_share


def summed_model(
    global_arrays: ArrayRecord, mean_update: list[np.ndarray], statistics: frozenset[str], error: float
) -> ArrayRecord:
    """The global model moved by the unmasked weighted mean update (arrays of its shapes), in its dtypes.

    A BatchNorm variance whose mean is within the quantisation `error` of zero can come out at or
    below zero; it is set to the smallest positive value (BatchNorm adds eps = 1e-5 to it). A
    variance further below zero stays, and the round's validation refuses the sum.
    """
    model = {}
    for (name, array), update in zip(global_arrays.items(), mean_update, strict=True):
        values = (array.numpy() + update).astype(array.numpy().dtype, copy=False)
        if name in statistics and name.endswith("running_var"):
            values[(values <= 0) & (values > -error)] = np.finfo(values.dtype).tiny
        model[name] = Array(values)
    return ArrayRecord(model)


def _clear_metrics(fit_res: FitRes) -> MetricRecord:
    # A FitRes carries its metrics in a ConfigRecord: only numbers can be metrics (update_problem
    # then checks num-examples as it checks every reply's).
    numbers = {key: value for key, value in fit_res.metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return MetricRecord(numbers | {"num-examples": fit_res.num_examples})
