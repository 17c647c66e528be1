"""What a hospital lets the server learn from evaluating models on its data, and whether it shares a
local-only model for cross-site validation: the site decides.

Read from the node's own config (its SuperNode's `--node-config`), never from the run config, so
a coordinator cannot loosen it. The defaults are the safe ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from torch import nn

from pneumofed.common.learning.modelfile import ModelCard, load_model_file
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


class PrivacyBudget(BaseModel):
    """Node config key dp-epsilon-budget: the most epsilon (at the run's dp-delta) this hospital lets
    DP-SGD spend on its patients in a run; without it, the run's dp-target-epsilon."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    dp_epsilon_budget: float | None = Field(None, gt=0, alias="dp-epsilon-budget")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> PrivacyBudget:
        return cls.model_validate(dict(node_config))

    def check(self, epsilon_after: float, target_epsilon: float) -> None:
        """Raise PermissionError, with the reason the server will log, if a round that would take the
        site's epsilon to `epsilon_after` exceeds its budget."""
        budget = target_epsilon if self.dp_epsilon_budget is None else self.dp_epsilon_budget
        if epsilon_after > budget:
            raise PermissionError(f"privacy budget spent: epsilon {epsilon_after:.3f} of {budget:g} after this round "
                                  "(node config dp-epsilon-budget): this site trains no more in this run")


class LocalModelPolicy(BaseModel):
    """Node config key local-model: a pneumofed model file trained on this site's data alone, which
    the site shares for cross-site validation (the server and every other site then score it). No
    key, or an empty one, shares none."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    local_model: Path | None = Field(None, alias="local-model")
    _loaded: tuple[nn.Module, ModelCard] | None = PrivateAttr(None)

    @field_validator("local_model", mode="before")
    @classmethod
    def _empty_shares_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _readable_model_file(self) -> LocalModelPolicy:
        path = self.local_model
        if path is None:
            return self
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(path)!r}")
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        try:  # tensors and plain data only: a file that would run code when opened is refused
            self._loaded = load_model_file(path)
        except (ValueError, RuntimeError, OSError) as error:
            raise ValueError(f"{path} is not a readable pneumofed model file: {error}") from None
        return self

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> LocalModelPolicy:
        """The site's policy, or ValueError with a one-line reason (the server logs it)."""
        try:
            return cls.model_validate(dict(node_config))
        except ValidationError as error:
            reasons = "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in error.errors())
            raise ValueError(f"node config local-model: {reasons}") from None

    @property
    def shared_model(self) -> tuple[nn.Module, ModelCard] | None:
        """The shared model and its card, as loaded when the node config was validated."""
        return self._loaded
