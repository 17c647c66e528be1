"""Hospital node: trains and evaluates the received global model on the site's own ROI store.

Replies carry only the model's floating-point arrays (encoded as run config `update-encoding`
says) and aggregate metrics (counts, loss, accuracy, confusion matrix, coarse k-anonymous per-class score
summaries, as the site's node config allows): never pixels, patient keys, file names or per-ROI scores.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from torch import nn

from pneumofed.common.data.site import SiteData, load_site, load_site_with_split, split_key
from pneumofed.common.data.store import StoreRequirements
from pneumofed.common.federation.audit import append_reply_audit
from pneumofed.common.federation.carried_evaluation import EVALUATE_FIRST, EVALUATION, EVALUATION_REFUSED
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.encoding import decode_arrays, encode_arrays
from pneumofed.common.federation.exchange import exchanged_state, load_exchanged_state, local_state
from pneumofed.common.federation.legacy_fit import fit_reply, train_instruction
from pneumofed.common.federation.packing import asks_for_packed_reply, pack_content, unpack_content
from pneumofed.common.federation.site_policy import EvaluationPolicy, LocalModelPolicy, PrivacyBudget
from pneumofed.common.learning import training
from pneumofed.common.learning.augment import DEFAULT_AUGMENTATION, build_augmentation
from pneumofed.common.learning.batchnorm import recalibrate_batchnorm
from pneumofed.common.learning.state import floating_state, load_floating_state
from pneumofed.common.metrics.histogram import ScoreSummary
from pneumofed.common.metrics.report import confusion_counts

if TYPE_CHECKING:  # Opacus costs seconds to import: only DP-SGD rounds load privacy.py
    from pneumofed.common.learning.privacy import DPSGD



def packed_arrays_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpacks the arrays of an instruction that asks for a packed reply, and packs the reply's
    (`common/federation/packing.py`): the outermost mod, so every other mod and handler reads plain
    records."""
    if not asks_for_packed_reply(msg):
        return call_next(msg, context)
    unpacked = copy.copy(msg)
    unpacked.content = unpack_content(msg.content)
    reply = call_next(unpacked, context)
    return reply if reply.has_error() else Message(pack_content(reply.content), reply_to=msg)


def site_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping of the site's update, for site-level DP with clipping at the
    sites (`site-dp = client-fixed | client-adaptive`): the update is bounded before it leaves the
    hospital. Other messages and runs pass through (Flower's mods would refuse them)."""
    mode = FederatedConfig.from_run_config(context.run_config).site_dp
    if msg.metadata.message_type != MessageType.TRAIN or not mode.startswith("client"):
        return call_next(msg, context)
    clipping = fixedclipping_mod if mode == "client-fixed" else adaptiveclipping_mod
    return clipping(msg, context, call_next)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for the messages of the SecAgg+ protocol (run config
    `secure-aggregation`), which only masks legacy FitRes content: the site's training sees the plain
    TRAIN instruction, and its update leaves the hospital masked (`common/federation/legacy_fit.py`).
    Every other message passes through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_as_fit(legacy: Message, ctxt: Context) -> Message:
        instruction = copy.copy(legacy)
        instruction.content = train_instruction(legacy.content)
        reply = call_next(instruction, ctxt)
        protocol = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
        content = fit_reply(reply.content, instruction.content["arrays"], protocol.clipping_range, protocol.max_weight)
        return Message(content, reply_to=legacy)

    return secaggplus_mod(msg, context, train_as_fit)


def evaluation_before_training_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Scores the received model before training from it when the TRAIN instruction asks
    (`evaluate-first`), and adds the evaluation to the reply (`common/federation/carried_evaluation.py`):
    the last round's score rides on this round's message. Outside the clipping mod, whose Flower
    checks allow only the update's own records in the reply."""
    config = msg.content.config_records.get("config", ConfigRecord())
    if msg.metadata.message_type != MessageType.TRAIN or EVALUATE_FIRST not in config:
        return call_next(msg, context)
    evaluated_round = int(config["server-round"]) - 1
    instruction = ConfigRecord({"split": config[EVALUATE_FIRST], "server-round": evaluated_round})
    try:
        if FederatedConfig.from_run_config(context.run_config).bn_mode != "shared" and LOCAL_BATCHNORM not in context.state:
            raise PermissionError("this site has no BatchNorm of its own yet (it joined or restarted since the model "
                                  "was trained): it scores the models it has trained with")
        evaluation = evaluate_locally(msg.content["arrays"], instruction, context.run_config, context.node_config,
                                      context.state)
        carried = RecordDict({EVALUATION: evaluation["metrics"], "site": evaluation["site"]})
    except Exception as failure:  # noqa: BLE001 - a failed evaluation must not cost the site its update
        reason = str(failure) if isinstance(failure, PermissionError) else f"{type(failure).__name__}: {failure}"
        evaluation = carried = RecordDict({EVALUATION_REFUSED: ConfigRecord({"reason": reason})})
    reply = call_next(msg, context)
    if reply.has_error():  # the server scores this site by an EVALUATE message of its own
        return reply
    _audit_reply(context, evaluated_round, MessageType.EVALUATE, evaluation)
    return Message(RecordDict({**reply.content, **carried}), reply_to=msg)


# Outermost first: packed_arrays_mod hands on plain records; secure_aggregation_mod turns SecAgg+'s
# legacy messages into the plain TRAIN messages that the mods after it and the handlers read; the
# clipping mod sees only the update's own records (evaluation_before_training_mod adds the rest).
MODS = [packed_arrays_mod, secure_aggregation_mod, evaluation_before_training_mod, site_dp_clipping_mod]
app = ClientApp(mods=MODS)

# Keys of the site's own state in its Flower `context.state` (kept by the SuperNode between messages).
LOCAL_BATCHNORM = "local-batchnorm"
OPTIMIZER_MOMENTS = "optimizer-moments"
PRIVACY_ACCOUNTANT = "privacy-accountant"
SITE_SPLIT = "site-split"  # the site's patient split: a new ClientApp process need not split again


def site_name(node_config: Mapping[str, Any], config: FederatedConfig) -> str:
    if "site-name" in node_config:
        return str(node_config["site-name"])
    return _site_path(node_config, config).name


def _site_path(node_config: Mapping[str, Any], config: FederatedConfig) -> Path:
    if "data-path" in node_config:
        return Path(str(node_config["data-path"]))
    if "partition-id" in node_config and config.site_paths:
        partition = int(node_config["partition-id"])
        if partition >= len(config.site_paths):
            raise ValueError(f"simulated node {partition} has no site: run config lists {len(config.site_paths)}")
        return config.site_paths[partition]
    raise ValueError("this node has no data: set node config `data-path` to its ROI store (absolute path)")


def _site_data(node_config: Mapping[str, Any], config: FederatedConfig, state: RecordDict | None = None) -> SiteData:
    """This node's ROI store, split by patient, checked against the run's ROI size and classes. With
    the node's `state`, the split is kept there and reused while the store and seed are unchanged."""
    required = StoreRequirements(roi_size=config.roi_size, class_names=tuple(config.classes), required_by="the run")
    path = _site_path(node_config, config)
    if state is None:
        return load_site(path, config.seed, required)
    key = split_key(path, config.seed)
    kept = state.config_records.get(SITE_SPLIT)
    if kept is not None and kept["key"] == key:
        return load_site_with_split(path, (kept["train"], kept["val"], kept["test"]), required)
    site = load_site(path, config.seed, required)
    state[SITE_SPLIT] = ConfigRecord({"key": key} | {part: site.part(part).indices.tolist() for part in ("train", "val", "test")})
    return site


def _site_seed(run_seed: int, server_round: int, name: str) -> int:
    # Stable across processes (unlike hash()), so a resumed run retraces the same rounds.
    return (run_seed * 1_000_003 + server_round * 7_919 + zlib.crc32(name.encode())) % 2**31


def _global_model_at_site(
    arrays: ArrayRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: RecordDict
) -> tuple[FederatedConfig, SiteData, nn.Module, ArrayRecord]:
    """The run's settings, this site's data, the received global model with the site's own
    BatchNorm part (kept from its last round, under `fedbn` and `silobn`) ready to use, and the
    received global arrays decoded to fp32 (what an int8 reply's update is taken from)."""
    config, site, model, received = _received_at_site(arrays, run_config, node_config, state)
    local = state.array_records.get(LOCAL_BATCHNORM)
    load_exchanged_state(model, received.to_torch_state_dict(), config.bn_mode, local and local.to_torch_state_dict())
    return config, site, model, received


def _whole_model_at_site(
    arrays: ArrayRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: RecordDict
) -> tuple[FederatedConfig, SiteData, nn.Module]:
    """The run's settings, this site's data and the received whole model, BatchNorm included, as it
    is: a local-only model is scored as its site trained it, never with this site's BatchNorm."""
    config, site, model, received = _received_at_site(arrays, run_config, node_config, state)
    load_floating_state(model, received.to_torch_state_dict())
    return config, site, model


def _received_at_site(
    arrays: ArrayRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: RecordDict
) -> tuple[FederatedConfig, SiteData, nn.Module, ArrayRecord]:
    """The run's settings, this site's data, a fresh model of the run and the received arrays in fp32."""
    config = FederatedConfig.from_run_config(run_config)
    site = _site_data(node_config, config, state)
    received = decode_arrays(arrays, config.update_encoding, statistics=config.batchnorm_statistics())
    return config, site, config.build_model(), received


def count_classes(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: RecordDict | None = None
) -> RecordDict:
    """This site's class counts in its training part, for federation-wide class weights; the split
    is kept in the node's `state` (the run's first message: its first TRAIN need not split again)."""
    config = FederatedConfig.from_run_config(run_config)
    site = _site_data(node_config, config, state)
    counts = torch.bincount(site.train.labels, minlength=len(config.classes)).tolist()
    return RecordDict({"metrics": MetricRecord({"num-examples": len(site.train), "class-counts": counts})})


def share_local_model(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: RecordDict | None = None
) -> RecordDict:
    """This site's local-only model for cross-site validation, when its node config shares one
    (`local-model`): the model's whole floating-point state and the card fields the server checks
    it against the run's model by. A site that shares none says so. (It reads no site data, so
    keeps nothing in `state`.)"""
    config = FederatedConfig.from_run_config(run_config)
    name = site_name(node_config, config)
    shared = LocalModelPolicy.from_node_config(_with_simulated_local_model(node_config, config)).shared_model
    site = ConfigRecord({"name": name, "shares-local-model": shared is not None})
    if shared is None:
        return RecordDict({"site": site})
    model, card = shared
    card_fields = ConfigRecord({"model": card.model, "width": card.width, "in-channels": card.in_channels,
                                "class-names": card.class_names, "roi-size": card.roi_size, "norm-layer": card.norm_layer})
    return RecordDict({"arrays": ArrayRecord(floating_state(model)), "card": card_fields, "site": site})


def _with_simulated_local_model(node_config: Mapping[str, Any], config: FederatedConfig) -> Mapping[str, Any]:
    # A simulated node's node config is only its partition id: run config local-models stands in.
    if "local-model" in node_config or "partition-id" not in node_config or not config.local_model_paths:
        return node_config
    return {**node_config, "local-model": config.local_model_paths[int(node_config["partition-id"])]}


# What a QUERY message may ask for (its config record's `query`).
QUERIES = {"class-counts": count_classes, "local-model": share_local_model}


def answer_query(instruction: ConfigRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                 state: RecordDict | None = None) -> RecordDict:
    query_name = str(instruction.get("query", ""))
    if query_name not in QUERIES:
        raise ValueError(f"unknown query {query_name!r}; this site answers {', '.join(QUERIES)}")
    return QUERIES[query_name](run_config, node_config, state)


def train_locally(
    arrays: ArrayRecord,
    instruction: ConfigRecord,
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    state: RecordDict,
) -> RecordDict:
    """One round of local training from the global `arrays`; returns the reply content and keeps
    what must stay at the site (its BatchNorm part, its optimiser moments, its privacy accountant)
    in `state`."""
    started = time.perf_counter()
    config, site, model, received = _global_model_at_site(arrays, run_config, node_config, state)
    server_round = int(instruction["server-round"])
    train_config = training.TrainConfig(
        epochs=int(instruction.get("local-epochs", config.local_epochs)),
        learning_rate=float(instruction.get("learning-rate", config.learning_rate)),
        batch_size=config.batch_size,
        seed=_site_seed(config.seed, server_round, site_name(node_config, config)),
        progress=False,
    )
    dp = _private_training(config, site, train_config.epochs, node_config, state)
    augment = build_augmentation(DEFAULT_AUGMENTATION) if config.augment else None
    moments = state.array_records.get(OPTIMIZER_MOMENTS) if config.keep_optimizer_state else None
    history = training.train(
        model,
        site.train,
        train_config,
        augment=augment,
        proximal_mu=float(instruction.get("proximal-mu", 0.0)),
        class_weights=instruction.get("class-weights"),
        optimizer_moments=moments and moments.to_torch_state_dict(),
        dp=dp,
    )
    # The statistics that travel (or stay) must describe the weights just trained.
    recalibrate_batchnorm(model, site.train, max(config.batch_size, 64), training.select_device("auto"))
    if config.bn_mode != "shared":
        state[LOCAL_BATCHNORM] = ArrayRecord(local_state(model, config.bn_mode))
    if config.keep_optimizer_state:
        state[OPTIMIZER_MOMENTS] = ArrayRecord(history.optimizer_moments)
    metrics = MetricRecord({"num-examples": len(site.train)})
    if dp is None:  # under DP-SGD they would be noiseless statistics of the patients' ROIs
        metrics["train-loss"] = float(history.loss[-1])
        metrics["train-accuracy"] = float(history.accuracy[-1])
    else:
        state[PRIVACY_ACCOUNTANT] = ConfigRecord(dp.account.to_record())
        metrics["dp-epsilon"] = dp.account.epsilon(config.dp_delta)
        metrics["dp-round-epsilon"] = dp.round_epsilon(train_config.epochs)
        metrics["dp-delta"] = config.dp_delta
    trained = encode_arrays(exchanged_state(model, config.bn_mode), config.update_encoding,
                            statistics=config.batchnorm_statistics(), reference=received)
    metrics["train-seconds"] = time.perf_counter() - started  # the site's compute, as the server cannot see it
    return RecordDict({"arrays": trained, "metrics": metrics})


def _private_training(
    config: FederatedConfig, site: SiteData, epochs: int, node_config: Mapping[str, Any], state: RecordDict
) -> DPSGD | None:
    """This round's DP-SGD at the site (None when the run has no DP): its noise planned for the whole
    run, its accountant continued from `state`. PermissionError when the round would overspend the
    site's budget."""
    if config.dp_target_epsilon == 0:
        return None
    from pneumofed.common.learning.privacy import DPSGD, PrivacyAccount, PrivacyPlan  # Opacus: seconds to import
    patient_keys = site.train.patient_keys
    plan = PrivacyPlan.for_site(target_epsilon=config.dp_target_epsilon, delta=config.dp_delta,
                                max_grad_norm=config.dp_max_grad_norm, batch_size=config.batch_size,
                                patients=len(set(patient_keys)), epochs=config.num_server_rounds * config.local_epochs)
    account = PrivacyAccount.from_record(state.config_records.get(PRIVACY_ACCOUNTANT))
    PrivacyBudget.from_node_config(node_config).check(account.epsilon_after(plan, epochs * plan.steps_per_epoch),
                                                      config.dp_target_epsilon)
    return DPSGD(plan, patient_keys, account)


def evaluate_locally(
    arrays: ArrayRecord,
    instruction: ConfigRecord,
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    state: RecordDict,
) -> RecordDict:
    """Evaluate the global `arrays` (with the site's own BatchNorm part) on this site's validation
    (or, when asked, test) part; with `whole-model` in the instruction, the arrays are a whole model
    (another site's local-only one, in cross-site validation) and are used as they are."""
    started = time.perf_counter()
    split = str(instruction.get("split", "val"))
    policy = EvaluationPolicy.from_node_config(node_config)
    policy.check(split, rois=None)
    if instruction.get("whole-model", False):
        config, site, model = _whole_model_at_site(arrays, run_config, node_config, state)
    else:
        config, site, model, _ = _global_model_at_site(arrays, run_config, node_config, state)
    data = site.part(split)
    policy.check(split, rois=len(data))
    result = training.evaluate(
        model, data, training.TrainConfig(batch_size=max(config.batch_size, 64), progress=False)
    )
    summary = ScoreSummary.from_scores(result.labels, result.probs, policy.score_bins, policy.score_min_count)
    confusion = confusion_counts(result.labels, result.probs)
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "eval-loss": float(result.loss),
            "eval-accuracy": float(result.accuracy),
            "confusion": [int(count) for count in confusion.ravel()],
            **summary.to_flat(),
            "eval-seconds": time.perf_counter() - started,
        }
    )
    site_record = ConfigRecord({"name": site_name(node_config, config), "share-site-auc": policy.share_site_auc})
    return RecordDict({"metrics": metrics, "site": site_record})


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = train_locally(
        msg.content["arrays"], msg.content["config"], context.run_config, context.node_config, context.state
    )
    _audit(context, msg, content)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    content = evaluate_locally(
        msg.content["arrays"], msg.content["config"], context.run_config, context.node_config, context.state
    )
    _audit(context, msg, content)
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    content = answer_query(msg.content["config"], context.run_config, context.node_config, context.state)
    _audit(context, msg, content)
    return Message(content=content, reply_to=msg)


def _audit(context: Context, msg: Message, content: RecordDict) -> None:
    _audit_reply(context, int(msg.content["config"]["server-round"]), msg.metadata.message_type, content)


def _audit_reply(context: Context, server_round: int, kind: str, content: RecordDict) -> None:
    if "audit-log" not in context.node_config:
        return
    append_reply_audit(
        Path(str(context.node_config["audit-log"])), run_id=context.run_id, server_round=server_round, kind=kind,
        content=content,
    )
