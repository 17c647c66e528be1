"""A federated run, round by round, readable in one place.

Each round: the strategy picks nodes and builds the train instructions, which carry the global
model encoded as `update-encoding` says (`encoding`) and ask the sites to score it on their
validation parts before they train from it (`carried_evaluation`: that model is the last round's
aggregate, so one message per site and round does both); every update is decoded to fp32 and
validated (`validation.update_problem`) and a bad one dropped with its reason; the strategy
aggregates the rest; the evaluations are pooled (`pooling.pool_evaluations`) and the run directory
records the round they score. The last round's model is scored by EVALUATE messages of its own
(every round's, under SecAgg+). Then the model with the best pooled validation score is evaluated
once on the sites' test parts (with `cross-site-validation`, beside the local-only models the sites
share: `cross_site`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from pneumofed.common.federation.carried_evaluation import EVALUATE_FIRST, EVALUATION, EVALUATION_REFUSED
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.encoding import decode_arrays, encode_arrays
from pneumofed.common.federation.exchange import exchanged_state
from pneumofed.common.federation.pooling import PooledEvaluation, pool_evaluations
from pneumofed.common.learning.modelfile import load_model_file, require_compatible
from pneumofed.server.cross_site import cross_site_validation
from pneumofed.server.outputs import RunDirectory, reported_privacy
from pneumofed.server.secure_aggregation import train_securely
from pneumofed.server.strategy import (
    SERVER_OPTIMISERS,
    UNIFORM_WEIGHT,
    build_strategy,
    optimiser_state,
    restore_optimiser_state,
    site_privacy_spent,
)
from pneumofed.server.validation import as_numpy, evaluation_problem, outlying_norms, update_norm, update_problem

log = logging.getLogger("pneumofed.server")


@dataclass
class TrainRound:
    """What one round of training produced: the new global arrays (None if no update was usable)."""

    arrays: ArrayRecord | None
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    # Each site's DP-SGD spend as its reply states it, by node id (`outputs.reported_privacy`).
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundTiming:
    """Where a round's wall time went. The round's exchange is its TRAIN messages, which also carry
    the evaluation of the round before's model; a round whose own model is scored by EVALUATE messages
    (the last, and every round under SecAgg+) adds that exchange. The sites' compute is what they report
    (train-seconds, eval-seconds); the framework's overhead is the rest of the round beyond the
    slowest site: messaging, (de)serialisation, process starts, aggregation and pooling."""

    round_seconds: float  # the exchange through aggregation, pooling and any EVALUATE exchange
    aggregate_seconds: float
    pool_seconds: float
    slowest_site_seconds: float  # of each exchange, summed over the round's exchanges
    sites_seconds: float  # summed over the sites: what sites sharing a CPU wait for
    # The exchanges' waits outside the sites' compute (`exchange_waits`; SecAgg+'s train: unmeasured).
    slowest_delivery_seconds: float
    collect_seconds: float
    evaluate_exchange_seconds: float = 0.0  # the EVALUATE messages' exchange, when the round had one

    def summary(self) -> dict[str, float]:
        overhead = self.round_seconds - self.slowest_site_seconds
        return {name.replace("_", "-"): value for name, value in vars(self).items()} | {"overhead-seconds": overhead}

    def with_evaluate_exchange(self, exchange: ExchangeTiming, pool_seconds: float) -> RoundTiming:
        """This timing with the round's EVALUATE exchange (and its pooling) added."""
        return RoundTiming(
            round_seconds=self.round_seconds + exchange.seconds + pool_seconds,
            aggregate_seconds=self.aggregate_seconds,
            pool_seconds=self.pool_seconds + pool_seconds,
            slowest_site_seconds=self.slowest_site_seconds + exchange.slowest_site_seconds,
            sites_seconds=self.sites_seconds + exchange.sites_seconds,
            slowest_delivery_seconds=self.slowest_delivery_seconds + exchange.slowest_delivery_seconds,
            collect_seconds=self.collect_seconds + exchange.collect_seconds,
            evaluate_exchange_seconds=exchange.seconds,
        )


@dataclass(frozen=True)
class ExchangeTiming:
    """One send-and-receive of a round's messages, timed from the server and from the replies."""

    seconds: float
    slowest_site_seconds: float
    sites_seconds: float
    slowest_delivery_seconds: float
    collect_seconds: float

    @classmethod
    def of(cls, replies: list[Message], sent_at: float, received_at: float, *, waits_known: bool = True) -> ExchangeTiming:
        compute = [_site_compute(reply) for reply in replies if not reply.has_error()]
        delivery, collect = exchange_waits(replies, sent_at, received_at) if waits_known else (0.0, 0.0)
        return cls(received_at - sent_at, max(compute, default=0.0), sum(compute), delivery, collect)


COMPUTE_METRICS = ("train-seconds", "eval-seconds")  # what sites report of their own compute


def _site_compute(reply: Message) -> float:
    """The compute `reply` reports, training and evaluation together (unusable values left out)."""
    return sum(
        float(value) for metrics in reply.content.metric_records.values() for key in COMPUTE_METRICS
        if isinstance(value := metrics.get(key), (int, float)) and math.isfinite(value) and value >= 0
    )


def exchange_waits(replies: Iterable[Message], sent_at: float, received_at: float) -> tuple[float, float]:
    """An exchange's time outside the sites' compute, in seconds of `time.time()`: the longest wait
    over sites from the server sending to the site's handler starting (transport, polling, a new
    ClientApp process and its imports, and waiting for a worker that other sites occupy: the reply's
    creation time less the compute it reports), and the wait from the last reply's creation to the
    server holding every reply. Sites stamp their replies with their own clocks, so across machines
    this is as exact as their clock synchronisation."""
    timed = [(reply.metadata.created_at, _site_compute(reply)) for reply in replies if not reply.has_error()]
    if not timed:
        return 0.0, 0.0
    delivery = max(made - seconds - sent_at for made, seconds in timed)
    return delivery, received_at - max(made for made, _ in timed)


def initial_arrays(config: FederatedConfig) -> ArrayRecord:
    """The global model every site starts from (its exchanged part): the model file `init-model`
    when set, after checking that it was built as the run builds its model, else the seeded random
    initialisation. Only a fresh run asks for it: a resumed run continues from its checkpoint."""
    torch.manual_seed(config.seed)
    if not config.init_model:
        return ArrayRecord(exchanged_state(config.build_model(), config.bn_mode))
    model, card = load_model_file(config.init_model)
    require_compatible(
        card, f"init-model {config.init_model}",
        model=config.model, width=config.model_width, class_names=config.classes, roi_size=config.roi_size,
        norm_layer=config.norm_layer,
        fixes={"model": "set model={file}", "width": "set model-width={file}", "norm_layer": "set norm-layer={file}",
               "class_names": "set class-names={file} and prepare the sites with these classes",
               "roi_size": "set roi-size={file} and prepare the sites with --roi-size {file}"},
    )
    log.info("starting from the model file %s (%s)", config.init_model, card.provenance or "no provenance")
    return ArrayRecord(exchanged_state(model, config.bn_mode))


@dataclass(frozen=True)
class SiteDeclaration:
    """What a site says of its training part when it joins a run: its size and class counts."""

    num_examples: int
    class_counts: tuple[int, ...]


def collect_declarations(grid: Grid, nodes: Iterable[int], config: FederatedConfig) -> dict[int, SiteDeclaration]:
    """Ask `nodes` (a Flower QUERY) for their declarations; a node that answers unusably is left out
    (its training replies are then refused)."""
    query = RecordDict({"config": ConfigRecord({"query": "class-counts", "server-round": 0})})
    messages = [Message(query, node_id, MessageType.QUERY) for node_id in nodes]
    declarations = {}
    for reply in grid.send_and_receive(messages, timeout=config.round_timeout) if messages else []:
        node = reply.metadata.src_node_id
        metrics = None if reply.has_error() else next(iter(reply.content.metric_records.values()), None)
        counts = None if metrics is None else metrics.get("class-counts")
        size = None if metrics is None else metrics.get("num-examples")
        if (not isinstance(counts, list) or len(counts) != len(config.classes)
                or any(type(c) is not int or c < 0 for c in counts) or size != sum(counts) or size <= 0):
            log.warning("node %s sent no usable declaration of its data; its updates will be refused", node)
            continue
        declarations[node] = SiteDeclaration(size, tuple(counts))
    return declarations


def federation_class_weights(declarations: Mapping[int, SiteDeclaration], num_classes: int) -> list[float]:
    """Balanced weights n / (K * n_k) from the class counts of every site's training part, so that
    all sites minimise one and the same weighted loss (a class absent everywhere gets weight 0)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for declaration in declarations.values():
        counts += np.asarray(declaration.class_counts, dtype=np.int64)
    if counts.sum() == 0:
        raise RuntimeError("no site declared its class counts: cannot weight the classes (set class-weighting=false)")
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    log.info("federation-wide class counts %s -> class weights %s", counts.tolist(), np.round(weights, 4).tolist())
    return [float(w) for w in weights]


def aggregate_train_round(
    strategy: FedAvg,
    server_round: int,
    global_arrays: ArrayRecord,
    replies: Iterable[Message],
    config: FederatedConfig,
    declarations: Mapping[int, SiteDeclaration],
) -> TrainRound:
    """Decode every reply to fp32 and validate it, then let the strategy aggregate the accepted ones.

    Beyond `update_problem`, a reply from a node that declared no data is refused, and with three
    or more sound updates one more than `max-update-median-ratio` times the round's median update
    norm is refused (honest updates of one round are of one order of magnitude).

    A server optimiser (FedAdam, FedAvgM) steps only the trained parameters: BatchNorm running
    statistics are averaged plainly, as no optimiser step means anything for them (a momentum
    step can drive a variance negative).
    """
    statistics = config.batchnorm_statistics() & set(global_arrays.keys())
    variances = {name for name in statistics if name.endswith("running_var")}
    sound, problems = [], {}
    global_values = as_numpy(global_arrays)
    reply_values: dict[int, dict[str, np.ndarray]] = {}
    # Replies arrive in network order; aggregating them in node order makes the aggregate (and a
    # resumed run) reproducible to the last bit.
    for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            sound.append(reply)  # Flower's aggregate_train counts and logs failures itself
        elif node not in declarations:
            problems[node] = "the node declared no training data when it joined the run"
        else:
            try:
                decoded = _decoded(reply, global_arrays, config, statistics)
                records = list(decoded.content.array_records.values())
                values = as_numpy(records[0]) if len(records) == 1 else {}
            except ValueError as error:
                problems[node] = f"its arrays are not encoded as update-encoding={config.update_encoding} says: {error}"
                continue
            problem = update_problem(global_values, decoded.content, values, config.max_update_ratio, variances,
                                     declarations[node].num_examples)
            if problem is None:
                sound.append(decoded)
                reply_values[node] = values
            else:
                problems[node] = problem
    # Trained parameters only: BatchNorm statistics move by recalibration, not by optimiser steps,
    # and would dominate (and hide) the size of the step itself.
    norms = {node: update_norm(global_values, values, statistics) for node, values in reply_values.items()}
    problems |= outlying_norms(norms, config.max_update_median_ratio)
    accepted = [reply for reply in sound if reply.metadata.src_node_id not in problems]
    rejected = []
    for node, problem in sorted(problems.items()):
        log.warning("round %d: dropping update from node %s: %s", server_round, node, problem)
        rejected.append({"node": node, "reason": problem})
    if config.site_dp != "off" and rejected:
        # The noise is calibrated to every sampled site's clipped update: an aggregate of fewer would
        # be under-noised (Flower's wrappers skip a round with a failed site for the same reason).
        log.warning("round %d: not aggregated, as site-dp needs every sampled site's update", server_round)
        return TrainRound(arrays=None, metrics=site_privacy_spent(strategy), rejected=rejected)
    if config.site_dp != "off":
        accepted = [_weighing_one(reply) for reply in accepted]
    arrays, metrics = strategy.aggregate_train(server_round, accepted)
    metrics = {**(metrics or {}), **site_privacy_spent(strategy)}
    if arrays is not None and statistics and config.strategy in SERVER_OPTIMISERS:
        contents = [reply.content for reply in accepted if not reply.has_error()]
        averaged = aggregate_arrayrecords(contents, "num-examples")
        arrays = ArrayRecord({name: averaged[name] if name in statistics else array for name, array in arrays.items()})
    return TrainRound(
        arrays=None if arrays is None else _in_dtypes_of(global_values, arrays),
        metrics={k: float(v) for k, v in metrics.items() if not isinstance(v, list)},
        rejected=rejected,
        participants=[reply.metadata.src_node_id for reply in accepted if not reply.has_error()],
    )


def _weighing_one(reply: Message) -> Message:
    """`reply` with weight 1 in aggregation (site-level DP; errors stay as they are)."""
    if reply.has_error():
        return reply
    return _with_content(reply, RecordDict({
        key: MetricRecord({**record, UNIFORM_WEIGHT: 1}) if isinstance(record, MetricRecord) else record
        for key, record in reply.content.items()
    }))


def _with_content(reply: Message, content: RecordDict) -> Message:
    """A copy of `reply` (its metadata) with `content`: the grid's reply stays as it arrived (what the site sent)."""
    copied = copy.copy(reply)
    copied.content = content
    return copied


def _decoded(reply: Message, global_arrays: ArrayRecord, config: FederatedConfig, statistics: frozenset[str]) -> Message:
    """A copy of `reply` whose arrays are decoded to fp32, so that validation and Flower's
    aggregation (which sums in each array's own dtype) see the site's model at full precision.

    An int8 update is added to the server's own fp32 global model rather than to the int8 copy
    the site trained from: the global model then keeps accumulating updates smaller than one
    int8 step, which re-quantising it every round would otherwise discard.
    """
    return _with_content(reply, RecordDict({
        key: decode_arrays(record, config.update_encoding, statistics=statistics, reference=global_arrays)
        if isinstance(record, ArrayRecord) else record
        for key, record in reply.content.items()
    }))


def encoded_instructions(messages: Iterable[Message], arrays: ArrayRecord, config: FederatedConfig) -> list[Message]:
    """`messages` built by the strategy from the fp32 global `arrays`, carrying them encoded as
    `update-encoding` says. Encoded here, after the strategy: FedOpt and FedAvgM keep the arrays
    they are configured with and take their next step from them."""
    statistics = config.batchnorm_statistics()
    encoded = encode_arrays(arrays, config.update_encoding, statistics=statistics)
    messages = list(messages)
    for message in messages:
        message.content["arrays"] = encoded
    return messages


def exchange(
    grid: Grid, training: list[Message], evaluating: list[Message], config: FederatedConfig
) -> tuple[list[Message], list[Message], ExchangeTiming]:
    """Send a round's TRAIN instructions `training` and the EVALUATE instructions `evaluating` of the
    same model (the last round's aggregate), one message per site: a site in both gets the TRAIN
    asking it to evaluate first (`carried_evaluation`). Returns the train replies, the evaluation
    replies (split out of the TRAIN replies that carry them) and the exchange's timing."""
    scoring = {message.metadata.dst_node_id: message for message in evaluating}
    trainees = {message.metadata.dst_node_id for message in training}
    sent = [_evaluating_first(message, scoring[message.metadata.dst_node_id]) if message.metadata.dst_node_id in scoring
            else message for message in training]
    sent += [message for node, message in scoring.items() if node not in trainees]
    sent_at = time.time()
    replies = list(grid.send_and_receive(sent, timeout=config.round_timeout)) if sent else []
    timing = ExchangeTiming.of(replies, sent_at, time.time())
    train_replies, evaluation_replies, evaluate_apart = [], [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.metadata.message_type == MessageType.EVALUATE:
            evaluation_replies.append(reply)
        elif node not in scoring:
            train_replies.append(reply)
        elif reply.has_error():  # its training failed, and with it the evaluation the reply would carry
            train_replies.append(reply)
            evaluate_apart.append(scoring[node])
        else:
            carried = {key: record for key, record in reply.content.items() if key in CARRIED_RECORDS}
            train_replies.append(_with_content(reply, RecordDict({
                key: record for key, record in reply.content.items() if key not in carried})))
            # Shaped as an EVALUATE reply: `pool_replies` reads both.
            evaluation_replies.append(_with_content(reply, RecordDict({CARRIED_RECORDS[key]: record
                                                                       for key, record in carried.items()})))
    if evaluate_apart:
        evaluation_replies += grid.send_and_receive(evaluate_apart, timeout=config.round_timeout)
    return train_replies, evaluation_replies, timing


# The records a TRAIN reply carries its evaluation in, by the names an EVALUATE reply gives them.
CARRIED_RECORDS = {EVALUATION: "metrics", "site": "site", EVALUATION_REFUSED: EVALUATION_REFUSED}


def _evaluating_first(training: Message, evaluating: Message) -> Message:
    config = ConfigRecord({**training.content["config"], EVALUATE_FIRST: evaluating.content["config"]["split"]})
    return Message(RecordDict({**training.content, "config": config}), training.metadata.dst_node_id, MessageType.TRAIN)


def _in_dtypes_of(reference: Mapping[str, np.ndarray], arrays: ArrayRecord) -> ArrayRecord:
    # Server optimisers (FedAdam's moments) compute in float64; sites train in float32 and
    # their next updates are checked against the global model's dtypes.
    return ArrayRecord(
        {
            name: torch.from_numpy(array.numpy().astype(reference[name].dtype, copy=False))
            for name, array in arrays.items()
        }
    )


def pool_replies(replies: Iterable[Message], class_names: list[str]) -> PooledEvaluation | None:
    """Pooled evaluation of the sound replies (`evaluation_problem`), in node order; None if none is.
    A dropped reply is logged and listed in the evaluation's `rejected`."""
    answered, rejected = [], []
    for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problem = f"the node replied with an error: {reply.error.reason}"
        elif EVALUATION_REFUSED in reply.content:
            problem = f"the node sent no evaluation: {reply.content[EVALUATION_REFUSED].get('reason', '')}"
        else:
            problem = evaluation_problem(reply.content, len(class_names))
        if problem is None:
            answered.append(reply)
        else:
            log.warning("dropping evaluation from node %s: %s", node, problem)
            rejected.append({"node": node, "reason": problem})
    if not answered:
        return None
    names = [_site_label(reply) for reply in answered]
    shared = [_shares_site_auc(reply) for reply in answered]
    pooled = pool_evaluations([reply.content for reply in answered], names, class_names, shared)
    pooled.rejected = rejected
    return pooled


def _shares_site_auc(reply: Message) -> bool:
    site = reply.content.config_records.get("site")
    return bool(site.get("share-site-auc", False)) if site else False


def _site_label(reply: Message) -> str:
    site = reply.content.config_records.get("site")
    return str(site["name"]) if site and "name" in site else f"node-{reply.metadata.src_node_id}"


def evaluate_instructions(
    strategy: FedAvg, server_round: int, arrays: ArrayRecord, grid: Grid, config: FederatedConfig
) -> list[Message]:
    """The strategy's EVALUATE instructions for round `server_round`'s model `arrays`, on the validation parts."""
    configured = strategy.configure_evaluate(server_round, arrays, ConfigRecord({"split": "val"}), grid)
    return encoded_instructions(configured, arrays, config)


@dataclass
class ScoredLater:
    """A trained round whose model the sites score later, with what the run directory records of it."""

    server_round: int
    arrays: ArrayRecord
    trained: TrainRound
    optimiser_state: dict[str, Any]  # the server optimiser's state after this round's step
    timing: RoundTiming

    def record(self, run: RunDirectory, evaluation: PooledEvaluation | None) -> None:
        run.record_round(self.server_round, self.arrays, self.trained, evaluation, self.optimiser_state, self.timing)

    def score(self, grid: Grid, strategy: FedAvg, config: FederatedConfig, run: RunDirectory) -> PooledEvaluation | None:
        """Score the model by EVALUATE messages of its own, record the round, and return its evaluation."""
        scoring = evaluate_instructions(strategy, self.server_round, self.arrays, grid, config)
        _, replies, exchanged = exchange(grid, [], scoring, config)
        pooling = time.perf_counter()
        evaluation = pool_replies(replies, config.classes)
        self.timing = self.timing.with_evaluate_exchange(exchanged, time.perf_counter() - pooling)
        self.record(run, evaluation)
        return evaluation


def run_federation(grid: Grid, config: FederatedConfig, run: RunDirectory) -> None:
    """The remaining rounds of `run`, then the final test evaluation of its best model."""
    # Nodes are expected to be connected when a run starts (they are asked for their declarations now).
    strategy = build_strategy(config, max(len(list(grid.get_node_ids())), config.min_nodes))
    restore_optimiser_state(strategy, run.optimiser_state)
    arrays = run.global_arrays or initial_arrays(config)
    train_config = ConfigRecord({"local-epochs": config.local_epochs, "learning-rate": config.learning_rate})
    declarations = collect_declarations(grid, grid.get_node_ids(), config)
    if config.class_weighting:
        train_config["class-weights"] = federation_class_weights(declarations, len(config.classes))
    evaluation: PooledEvaluation | None = None
    # The round trained last, its model not yet scored: the next round's TRAIN messages carry that.
    unscored: ScoredLater | None = None
    for server_round in range(run.completed_rounds + 1, config.num_server_rounds + 1):
        log.info("round %d of %d", server_round, config.num_server_rounds)
        started = time.perf_counter()
        try:
            configured = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        except PrivacyBudgetExhausted as exhausted:
            log.warning("round %d not started: %s (site-dp-max-epsilon)", server_round, exhausted)
            run.audit("site-dp-budget-spent", server_round=server_round, details={"reason": str(exhausted)})
            break
        instructions = encoded_instructions(configured, arrays, config)
        newcomers = {message.metadata.dst_node_id for message in instructions} - set(declarations)
        declarations |= collect_declarations(grid, sorted(newcomers), config)  # nodes that joined since
        if config.secure_aggregation:  # the replies hold only the sites' sum (server/secure_aggregation.py)
            sent = time.time()
            train_replies = train_securely(grid, instructions, config, declarations)
            exchanged = ExchangeTiming.of(train_replies, sent, time.time(), waits_known=False)
        else:
            scoring = [] if unscored is None else evaluate_instructions(strategy, unscored.server_round, unscored.arrays,
                                                                         grid, config)
            train_replies, evaluation_replies, exchanged = exchange(grid, instructions, scoring, config)
        pooling = time.perf_counter()
        if unscored is not None:
            evaluation = pool_replies(evaluation_replies, config.classes)
        pool_seconds = time.perf_counter() - pooling
        aggregating = time.perf_counter()
        trained = aggregate_train_round(strategy, server_round, arrays, train_replies, config, declarations)
        aggregated = time.perf_counter()
        trained.privacy = reported_privacy(train_replies)
        if trained.arrays is not None:
            arrays = trained.arrays
        timing = RoundTiming(
            round_seconds=time.perf_counter() - started,
            aggregate_seconds=aggregated - aggregating,
            pool_seconds=pool_seconds,
            slowest_site_seconds=exchanged.slowest_site_seconds,
            sites_seconds=exchanged.sites_seconds,
            slowest_delivery_seconds=exchanged.slowest_delivery_seconds,
            collect_seconds=exchanged.collect_seconds,
        )
        if unscored is not None:  # after this round's timing, as the last round's recording is after its own
            unscored.record(run, evaluation)
        # A copy: the optimiser takes the next round's step before this round is recorded.
        unscored = ScoredLater(server_round, arrays, trained, copy.deepcopy(optimiser_state(strategy)), timing)
        if config.secure_aggregation or server_round == config.num_server_rounds:
            evaluation = unscored.score(grid, strategy, config, run)
            unscored = None
    if unscored is not None:  # training stopped early (the privacy budget): score what it reached
        evaluation = unscored.score(grid, strategy, config, run)
    run.write_plots(evaluation)
    best = run.best_arrays()
    if best is None:
        log.warning("no round produced a pooled AUC; skipping the final test evaluation")
        return
    instruction = ConfigRecord({"split": "test", "server-round": config.num_server_rounds})
    messages = encoded_instructions(
        [Message(RecordDict({"arrays": best, "config": instruction}), node_id, MessageType.EVALUATE)
         for node_id in grid.get_node_ids()],
        best, config,
    )
    final = pool_replies(grid.send_and_receive(messages, timeout=config.round_timeout), config.classes)
    if final is not None:
        run.write_final(final)
    if config.cross_site_validation:
        cross_site_validation(grid, config, run, best)
