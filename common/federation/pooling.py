"""Federated evaluation pooled from the sites' counts: confusion matrices summed, score summaries
concatenated (each pooled AUC with its bound), site AUCs never averaged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from pneumofed.common.metrics.histogram import ScoreSummary, report_from_summary
from pneumofed.common.metrics.intervals import hanley_mcneil_auc_ci
from pneumofed.common.metrics.report import ClassificationReport


@dataclass
class PooledEvaluation:
    """One round's federated evaluation: pooled over sites, and each site alone."""

    report: ClassificationReport
    loss: float
    num_examples: int
    site_auc: dict[str, dict[str, float | None]] = field(default_factory=dict)  # sites that share theirs
    rejected: list[dict[str, Any]] = field(default_factory=list)  # replies dropped, with the reason

    def auc_ci(self) -> dict[str, list[float]]:
        """Per class, Hanley & McNeil's 95 % CI widened by the AUC's bound (no scores are pooled)."""
        intervals = {}
        for metrics in self.report.per_class:
            positives = metrics.support
            if metrics.auc is not None:
                low, high = hanley_mcneil_auc_ci(metrics.auc, positives, self.num_examples - positives,
                                                 bound=metrics.auc_bound or 0.0)
                intervals[metrics.name] = [low, high]
        return intervals

    def summary(self) -> dict[str, Any]:
        return {
            "eval-loss": self.loss,
            "num-examples": self.num_examples,
            **self.report.model_dump(mode="json", exclude={"per_class": {"__all__": {"roc"}}}),
            "auc-ci-hanley-mcneil": self.auc_ci(),
            "site-auc": self.site_auc,
            "rejected-evaluations": self.rejected,
        }


def pool_evaluations(
    contents: list[RecordDict], site_names: list[str], class_names: list[str], shares_site_auc: list[bool]
) -> PooledEvaluation:
    """Pool the sites' evaluation replies; a site's own AUC is kept only where the site shares it."""
    metrics = [next(iter(content.metric_records.values())) for content in contents]
    summaries = [ScoreSummary.from_flat(m) for m in metrics]
    k = len(class_names)
    confusion = sum(np.asarray(m["confusion"], dtype=np.int64).reshape(k, k) for m in metrics)
    counts = np.array([int(m["num-examples"]) for m in metrics])
    losses = np.array([float(m["eval-loss"]) for m in metrics])
    site_auc = {
        name: {cls: summary.auc(i) for i, cls in enumerate(class_names)} | {"macro": summary.macro_auc()}
        for name, summary, shared in zip(site_names, summaries, shares_site_auc, strict=True)
        if shared
    }
    return PooledEvaluation(
        report=report_from_summary(ScoreSummary.merge(summaries), confusion, class_names),
        loss=float(np.average(losses, weights=counts)) if counts.sum() else float("nan"),
        num_examples=int(counts.sum()),
        site_auc=site_auc,
    )
