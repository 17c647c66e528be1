"""Hospital node: trains and evaluates the received global model on the site's own ROI store.

Replies carry only the model's floating-point arrays and aggregate metrics (counts, loss,
accuracy, confusion matrix, per-class score histograms): never pixels, patient keys, file
names or per-sample scores.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from pneumofed.common.data.site import SiteData, load_site
from pneumofed.common.data.store import StoreRequirements
from pneumofed.common.federation.audit import append_reply_audit
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.learning import training
from pneumofed.common.learning.augment import DEFAULT_AUGMENTATION, build_augmentation
from pneumofed.common.learning.state import floating_state, load_floating_state
from pneumofed.common.metrics.histogram import ScoreHistogram
from pneumofed.common.metrics.report import confusion_counts

app = ClientApp()


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


def _site_seed(run_seed: int, server_round: int, name: str) -> int:
    # Stable across processes (unlike hash()), so a resumed run retraces the same rounds.
    return (run_seed * 1_000_003 + server_round * 7_919 + zlib.crc32(name.encode())) % 2**31


def _global_model_at_site(
    arrays: ArrayRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> tuple[FederatedConfig, SiteData, nn.Module]:
    """The run's settings, this site's data, and the received global model ready to use."""
    config = FederatedConfig.from_run_config(run_config)
    required = StoreRequirements(roi_size=config.roi_size, class_names=tuple(config.classes), required_by="the run")
    site = load_site(_site_path(node_config, config), config.seed, required)
    model = config.build_model()
    load_floating_state(model, arrays.to_torch_state_dict())
    return config, site, model


def train_locally(
    arrays: ArrayRecord, instruction: ConfigRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> RecordDict:
    """One round of local training from the global `arrays`; returns the reply content."""
    config, site, model = _global_model_at_site(arrays, run_config, node_config)
    server_round = int(instruction["server-round"])
    train_config = training.TrainConfig(
        epochs=int(instruction.get("local-epochs", config.local_epochs)),
        learning_rate=float(instruction.get("learning-rate", config.learning_rate)),
        batch_size=config.batch_size,
        class_weighting=config.class_weighting,
        seed=_site_seed(config.seed, server_round, site_name(node_config, config)),
        progress=False,
    )
    augment = build_augmentation(DEFAULT_AUGMENTATION) if config.augment else None
    history = training.train(
        model,
        site.train,
        train_config,
        augment=augment,
        proximal_mu=float(instruction.get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {
            "num-examples": len(site.train),
            "train-loss": float(history.loss[-1]),
            "train-accuracy": float(history.accuracy[-1]),
        }
    )
    return RecordDict({"arrays": ArrayRecord(floating_state(model)), "metrics": metrics})


def evaluate_locally(
    arrays: ArrayRecord, instruction: ConfigRecord, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> RecordDict:
    """Evaluate the global `arrays` on this site's validation (or, when asked, test) part."""
    config, site, model = _global_model_at_site(arrays, run_config, node_config)
    data = site.part(str(instruction.get("split", "val")))
    result = training.evaluate(
        model, data, training.TrainConfig(batch_size=max(config.batch_size, 64), progress=False)
    )
    histogram = ScoreHistogram.from_scores(result.labels, result.probs)
    confusion = confusion_counts(result.labels, result.probs)
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "eval-loss": float(result.loss),
            "eval-accuracy": float(result.accuracy),
            "confusion": [int(count) for count in confusion.ravel()],
            **histogram.to_flat(),
        }
    )
    return RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site_name(node_config, config)})})


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = train_locally(msg.content["arrays"], msg.content["config"], context.run_config, context.node_config)
    _audit(context, msg, content)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    content = evaluate_locally(msg.content["arrays"], msg.content["config"], context.run_config, context.node_config)
    _audit(context, msg, content)
    return Message(content=content, reply_to=msg)


def _audit(context: Context, msg: Message, content: RecordDict) -> None:
    if "audit-log" not in context.node_config:
        return
    append_reply_audit(
        Path(str(context.node_config["audit-log"])),
        run_id=context.run_id,
        server_round=int(msg.content["config"]["server-round"]),
        kind=msg.metadata.message_type,
        content=content,
    )
