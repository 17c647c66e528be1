"""Flower's strategies, wrapped with what every pneumofed round needs.

`build_strategy` takes Flower's own FedAvg, FedProx, FedAdam, FedAvgM, FedMedian,
FedTrimmedAvg or Krum and adds, by a mixin in front of it:
- validation of every client update before aggregation (a bad one is dropped with a logged
  reason and the round goes on with the rest),
- pooled federated evaluation from summed score histograms and confusion matrices, plus
  per-site AUC beside the pooled one,
- a round offset so a resumed run keeps its round numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum

from pneumofed.common.config import FederatedConfig
from pneumofed.common.metrics import ClassificationReport, ScoreHistogram, report_from_counts

log = logging.getLogger("pneumofed.server")

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

# Server-side optimiser state that must survive a resume (FedOpt moments, FedAvgM momentum).
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def update_problem(global_arrays: ArrayRecord, reply: RecordDict, max_update_ratio: float) -> str | None:
    """Why this training reply must not be aggregated, or None when it is sound.

    The norm bound is relative: ||client - global|| <= max_update_ratio * ||global||.
    """
    if len(reply.array_records) != 1 or len(reply.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(reply.metric_records.values()))
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"num-examples must be a positive integer, got {num_examples!r}"
    arrays = next(iter(reply.array_records.values()))
    if list(arrays.keys()) != list(global_arrays.keys()):
        return f"array keys differ from the global model ({len(arrays)} vs {len(global_arrays)} arrays)"
    delta_sq = reference_sq = 0.0
    for name, expected in global_arrays.items():
        received = arrays[name]
        if tuple(received.shape) != tuple(expected.shape):
            return f"{name}: shape {tuple(received.shape)} != {tuple(expected.shape)}"
        if received.dtype != expected.dtype:
            return f"{name}: dtype {received.dtype} != {expected.dtype}"
        values, reference = received.numpy(), expected.numpy()
        if not np.isfinite(values).all():
            return f"{name}: contains NaN or infinite values"
        delta_sq += float(np.sum((values.astype(np.float64) - reference) ** 2))
        reference_sq += float(np.sum(reference.astype(np.float64) ** 2))
    ratio = np.sqrt(delta_sq) / max(np.sqrt(reference_sq), 1e-12)
    if ratio > max_update_ratio:
        return f"update norm is {ratio:.3g}x the global model's (bound {max_update_ratio:g}x)"
    return None


@dataclass
class PooledEvaluation:
    """One round's federated evaluation: pooled over sites, and each site alone."""

    report: ClassificationReport
    loss: float
    num_examples: int
    site_auc: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "eval-loss": self.loss,
            "num-examples": self.num_examples,
            **self.report.model_dump(mode="json", exclude={"per_class": {"__all__": {"roc"}}}),
            "site-auc": self.site_auc,
        }

    def metric_record(self) -> MetricRecord:
        """The scalars Flower logs and keeps for the round."""
        record = {"num-examples": self.num_examples, "eval-loss": self.loss, "eval-accuracy": self.report.accuracy}
        if self.report.macro_auc is not None:
            record["macro-auc"] = self.report.macro_auc
        return MetricRecord(record)


def pool_evaluations(contents: list[RecordDict], site_names: list[str], class_names: list[str]) -> PooledEvaluation:
    """Exact pooling: histograms and confusion matrices are summed, never site AUCs averaged."""
    metrics = [next(iter(content.metric_records.values())) for content in contents]
    histograms = [ScoreHistogram.from_flat(m) for m in metrics]
    k = len(class_names)
    confusion = sum(np.asarray(m["confusion"], dtype=np.int64).reshape(k, k) for m in metrics)
    counts = np.array([int(m["num-examples"]) for m in metrics])
    losses = np.array([float(m["eval-loss"]) for m in metrics])
    site_auc = {
        name: {cls: hist.auc(i) for i, cls in enumerate(class_names)} | {"macro": hist.macro_auc()}
        for name, hist in zip(site_names, histograms, strict=True)
    }
    return PooledEvaluation(
        report=report_from_counts(ScoreHistogram.merge(histograms), confusion, class_names),
        loss=float(np.average(losses, weights=counts)) if counts.sum() else float("nan"),
        num_examples=int(counts.sum()),
        site_auc=site_auc,
    )


class PneumofedRounds:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    round_offset: int = 0
    max_update_ratio: float = 10.0
    class_names: list[str]

    def _init_rounds(self, max_update_ratio: float, class_names: list[str]) -> None:
        self.max_update_ratio = max_update_ratio
        self.class_names = class_names
        self.rejected_updates: dict[int, list[dict[str, Any]]] = {}
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.participants: dict[int, list[int]] = {}
        self.evaluations: dict[int, PooledEvaluation] = {}
        self._global_arrays: ArrayRecord | None = None
        self._pooled_now: PooledEvaluation | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global_arrays = arrays
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_number = server_round + self.round_offset
        accepted = []
        # Replies arrive in network order; summing them in node order makes the aggregate (and a
        # resumed run) reproducible to the last bit.
        for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id):
            problem = None if reply.has_error() else update_problem(self._global_arrays, reply.content, self.max_update_ratio)
            if problem is None:
                accepted.append(reply)
                continue
            node = reply.metadata.src_node_id
            log.warning("round %d: dropping update from node %s: %s", round_number, node, problem)
            self.rejected_updates.setdefault(round_number, []).append({"node": node, "reason": problem})
        self.participants[round_number] = [reply.metadata.src_node_id for reply in accepted if not reply.has_error()]
        arrays, metrics = super().aggregate_train(round_number, accepted)  # type: ignore[misc]
        if arrays is not None:
            arrays = self._in_global_dtypes(arrays)
        if metrics is not None:
            self.train_metrics[round_number] = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return arrays, metrics

    def _in_global_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        # Server optimisers (FedAdam's moments) compute in float64; sites train in float32 and
        # their next updates are checked against the global model's dtypes.
        return ArrayRecord(
            {
                name: torch.from_numpy(array.numpy().astype(self._global_arrays[name].numpy().dtype, copy=False))
                for name, array in arrays.items()
            }
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        round_number = server_round + self.round_offset
        replies = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        self.evaluations[round_number] = self.pool(replies)
        self._pooled_now = self.evaluations[round_number]
        return super().aggregate_evaluate(round_number, replies)  # type: ignore[misc]

    def _pooled_metric_record(self, _contents: list[RecordDict], _weighted_by_key: str) -> MetricRecord:
        # Flower's aggregation hook: hand it the pooling aggregate_evaluate has just done rather
        # than decode and sum the sites' histograms a second time.
        return self._pooled_now.metric_record()

    def pool(self, replies: list[Message]) -> PooledEvaluation | None:
        answered = [reply for reply in replies if not reply.has_error()]
        if not answered:
            return None
        names = [_site_label(reply) for reply in answered]
        return pool_evaluations([reply.content for reply in answered], names, self.class_names)

    def optimiser_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in STATEFUL_ATTRIBUTES if getattr(self, name, None) is not None}

    def restore_optimiser_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def _site_label(reply: Message) -> str:
    site = reply.content.config_records.get("site")
    return str(site["name"]) if site and "name" in site else f"node-{reply.metadata.src_node_id}"


def build_strategy(config: FederatedConfig, class_names: list[str]) -> FedAvg:
    """Flower's implementation of `config.strategy`, with pneumofed's round hooks in front."""
    base = STRATEGIES[config.strategy]
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_nodes,
        "min_evaluate_nodes": config.min_nodes,
        "min_available_nodes": config.min_nodes,
    }
    specific: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": config.proximal_mu},
        "fedadam": {"eta": config.server_learning_rate, "eta_l": config.learning_rate},
        "fedavgm": {"server_learning_rate": 1.0, "server_momentum": config.server_momentum},
        "fedtrimmedavg": {"beta": config.trim_beta},
        "krum": {"num_malicious_nodes": config.krum_malicious},
    }
    strategy_class = type(f"Pneumofed{base.__name__}", (PneumofedRounds, base), {})
    strategy = strategy_class(**common, **specific.get(config.strategy, {}))
    strategy._init_rounds(config.max_update_ratio, class_names)
    strategy.evaluate_metrics_aggr_fn = strategy._pooled_metric_record
    return strategy
