"""What a hospital lets the server learn from evaluating models on its data: the site decides.

Read from the node's own config (its SuperNode's `--node-config`), never from the run config, so
a coordinator cannot loosen it. The defaults are the safe ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pneumofed.common.metrics.histogram import DEFAULT_MIN_COUNT, DEFAULT_SCORE_BINS, MAX_SCORE_BINS

EVALUATION_PARTS = ("val", "test")


class EvaluationPolicy(BaseModel):
    """Node config keys (hyphenated): evaluate-splits, score-bins, score-min-count,
    min-evaluation-rois, share-site-auc."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    # Never the training part, which would let a coordinator probe what a model memorised of it.
    evaluate_splits: frozenset[str] = Field(frozenset(EVALUATION_PARTS), alias="evaluate-splits")
    score_bins: int = Field(DEFAULT_SCORE_BINS, ge=2, le=MAX_SCORE_BINS, alias="score-bins")
    # Every reported score interval holds at least this many ROIs.
    score_min_count: int = Field(DEFAULT_MIN_COUNT, ge=1, alias="score-min-count")
    # A part with fewer ROIs is not evaluated at all: its confusion matrix would all but list them.
    min_evaluation_rois: int = Field(DEFAULT_MIN_COUNT, ge=1, alias="min-evaluation-rois")
    # Whether the run's reports may show this site's own AUC (the pooled one is always shown).
    share_site_auc: bool = Field(True, alias="share-site-auc")

    @field_validator("evaluate_splits", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> frozenset[str]:
        parts = {part.strip() for part in str(value).split(",")} if isinstance(value, str) else set(value)
        if not parts or not parts <= set(EVALUATION_PARTS):
            raise ValueError(f"evaluate-splits may name {' and '.join(EVALUATION_PARTS)} only, got {sorted(parts)}")
        return frozenset(parts)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> EvaluationPolicy:
        return cls.model_validate(dict(node_config))

    def check(self, split: str, rois: int | None) -> None:
        """Raise PermissionError, with the reason the server will log, unless `split` (of `rois` ROIs,
        when known) may be evaluated."""
        if split not in self.evaluate_splits:
            raise PermissionError(f"this site evaluates only its {', '.join(sorted(self.evaluate_splits))} part(s), "
                                  f"not {split!r} (node config evaluate-splits)")
        if rois is not None and rois < self.min_evaluation_rois:
            raise PermissionError(f"this site's {split} part has {rois} ROIs, fewer than its min-evaluation-rois "
                                  f"({self.min_evaluation_rois}): it sends no evaluation of it")
