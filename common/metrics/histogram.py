"""Coarse, k-anonymous per-class score summaries: what sites send instead of scores.

A site bins each class's one-vs-rest scores on a coarse axis (at most `MAX_SCORE_BINS` bins) and
merges neighbouring bins until every reported interval holds at least `min_count` ROIs of its
kind (positives or negatives of the class), so no reported count singles out a ROI's score. The
site chooses both numbers (node config); sites with different choices still pool, because every
interval is a range of one shared, strictly increasing score axis `t(p)`.

The server concatenates the sites' intervals. Their counts give the pooled AUC only up to the
order of positive-negative pairs whose intervals overlap, so every pooled AUC comes with a bound:
`auc_bound(k)` is the largest distance between the estimate and any AUC the concatenated scores
could have, i.e. the AUC scikit-learn computes on them is within it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from pneumofed.common.metrics.report import (
    CLASS_NAMES_DEFAULT,
    ClassificationReport,
    check_class_names,
    report_from_confusion,
    validate_scores,
)

MAX_SCORE_BINS = 1000
DEFAULT_SCORE_BINS = 1000
DEFAULT_MIN_COUNT = 5
# The shared score axis, see `score_axis`. These constants give every bin its meaning: sites and
# server must agree on them, so changing one invalidates summaries made with the old values.
UNIFORM_SHARE = 0.4
LOGIT_LINEAR_LIMIT = 12.0
LOGIT_TAIL_SCALE = 1.5
_LOGIT_CLIP = 800.0  # beyond float64's logit range (+-745): only p == 0 or p == 1 reach it


def score_axis(scores: np.ndarray) -> np.ndarray:
    """The strictly increasing map of a score p in [0, 1] onto the shared axis t in [0, 1]:

        t(p) = s * p + (1 - s) * (u(logit p) + G) / (2 G),   s = UNIFORM_SHARE = 0.4,
        u(x) = x for |x| <= L = 12, sign(x) * (L + c * ln(|x| / L)) beyond (c = 1.5), G = u(800).

    Part of the axis is uniform in p (mid-range scores), part uniform in logit p (saturated softmax
    outputs such as 0.999..0.9999), so that equal-width bins of t resolve both.
    """
    p = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)
    magnitude = np.minimum(np.abs(logit), _LOGIT_CLIP)
    stretched = np.where(
        magnitude <= LOGIT_LINEAR_LIMIT,
        magnitude,
        LOGIT_LINEAR_LIMIT + LOGIT_TAIL_SCALE * np.log(np.maximum(magnitude, LOGIT_LINEAR_LIMIT) / LOGIT_LINEAR_LIMIT),
    )
    half_range = LOGIT_LINEAR_LIMIT + LOGIT_TAIL_SCALE * np.log(_LOGIT_CLIP / LOGIT_LINEAR_LIMIT)
    return UNIFORM_SHARE * p + (1 - UNIFORM_SHARE) * (np.sign(logit) * stretched + half_range) / (2 * half_range)


def score_bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin floor(bins * t(p)) of each score: equal scores share a bin, bins never reorder scores."""
    return np.minimum((score_axis(scores) * bins).astype(np.int64), bins - 1)


def anonymous_groups(counts: np.ndarray, min_count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tile the bins 0..len(counts) into intervals of at least `min_count` samples each.

    Occupied bins are grouped left to right until a group reaches `min_count` (a short remainder
    joins the last group); each boundary lies halfway across the gap between two groups, so it
    does not mark any sample's bin. Returns the upper edges and each interval's bins; fewer than
    `min_count` samples in all give one interval over the whole axis.
    """
    bins, occupied = len(counts), np.flatnonzero(counts)
    if counts.sum() < min_count:
        return np.array([bins]), [occupied]
    groups: list[list[int]] = [[]]
    filled = 0
    for b in occupied:
        groups[-1].append(int(b))
        filled += int(counts[b])
        if filled >= min_count:
            groups.append([])
            filled = 0
    remainder = groups.pop()
    groups[-1] += remainder  # short of min_count (or empty): it joins the group before it
    edges = [(previous[-1] + 1 + following[0]) // 2 for previous, following in pairwise(groups)] + [bins]
    return np.array(edges, np.int64), [np.array(g, np.int64) for g in groups]


_FLAT_KEY = re.compile(r"scores-(\d+)")


@dataclass(frozen=True, eq=False)
class ScoreSummary:
    """Per-class one-vs-rest score intervals with counts, from one site or pooled over several.

    `intervals[k]` is an (n, 4) float array of rows (t_low, t_high, positives, negatives) on the
    shared axis (`score_axis`): how many ROIs of class k, and of the other classes, score in
    [t_low, t_high) for class k. A site's summary tiles [0, 1) for each class with `bins` bins
    merged until each interval holds `min_count` ROIs; a pooled one is the concatenation of its
    sites' (and has neither).
    """

    intervals: tuple[np.ndarray, ...]
    bins: int | None = None
    min_count: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.intervals)

    @classmethod
    def from_scores(
        cls, y_true: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_SCORE_BINS, min_count: int = DEFAULT_MIN_COUNT
    ) -> ScoreSummary:
        y, probs = validate_scores(y_true, probs)
        _check_policy(bins, min_count)
        intervals = []
        for k in range(probs.shape[1]):
            index = score_bin_index(probs[:, k], bins)
            positives, negatives = (np.bincount(index[members], minlength=bins) for members in (y == k, y != k))
            edges, groups = anonymous_groups(positives + negatives, min_count)
            counts = np.array([[positives[g].sum(), negatives[g].sum()] for g in groups], np.int64)
            intervals.append(_rows(edges, counts, bins))
        return cls(tuple(intervals), bins, min_count)

    @classmethod
    def merge(cls, summaries: Iterable[ScoreSummary]) -> ScoreSummary:
        summaries = list(summaries)
        if not summaries:
            raise ValueError("no score summaries to merge")
        if len({s.num_classes for s in summaries}) != 1:
            raise ValueError(f"cannot merge summaries of {sorted({s.num_classes for s in summaries})} classes")
        return cls(tuple(np.concatenate([s.intervals[k] for s in summaries]) for k in range(summaries[0].num_classes)))

    def counts(self, k: int) -> tuple[int, int]:
        """(positives, negatives) of class k."""
        totals = self.intervals[k][:, 2:].sum(axis=0)
        return int(totals[0]), int(totals[1])

    def _kinds(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (t_low, t_high, count) of class k's positives and of its negatives, empty ones dropped."""
        if not 0 <= k < self.num_classes:
            raise ValueError(f"class index {k} outside [0, {self.num_classes})")
        rows = self.intervals[k]
        positive, negative = rows[:, [0, 1, 2]], rows[:, [0, 1, 3]]
        return positive[positive[:, 2] > 0], negative[negative[:, 2] > 0]

    def roc(self, k: int) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(fpr, tpr, auc) with the ROIs spread evenly over their intervals; None when class k has
        no positive or no negative.

        Between consecutive interval edges both rates then change linearly, so the curve through
        the edges is exact for that spread and its trapezoid area is the AUC: the chance that a
        positive outscores a negative, with a positive and a negative of one site's interval
        counting half, as tied scores do.
        """
        positive, negative = self._kinds(k)
        if not len(positive) or not len(negative):
            return None
        thresholds = np.unique(np.r_[positive[:, :2].ravel(), negative[:, :2].ravel(), 0.0, 1.0])[::-1]
        tpr, fpr = _share_above(positive, thresholds), _share_above(negative, thresholds)
        return fpr, tpr, float(np.trapezoid(tpr, fpr))

    def auc(self, k: int) -> float | None:
        roc = self.roc(k)
        return None if roc is None else roc[2]

    def macro_auc(self) -> float | None:
        """Mean AUC over the classes whose AUC is defined (None if none is)."""
        aucs = [a for a in (self.auc(k) for k in range(self.num_classes)) if a is not None]
        return float(np.mean(aucs)) if aucs else None

    def auc_range(self, k: int) -> tuple[float, float] | None:
        """The lowest and highest AUC of any scores these intervals could hold: positive-negative
        pairs in overlapping intervals count as lost for the one, as won for the other."""
        positive, negative = self._kinds(k)
        if not len(positive) or not len(negative):
            return None
        weight = np.outer(positive[:, 2], negative[:, 2])
        surely_won = positive[:, None, 0] >= negative[None, :, 1]
        surely_lost = positive[:, None, 1] <= negative[None, :, 0]
        pairs, won, undecided = weight.sum(), weight[surely_won].sum(), weight[~surely_won & ~surely_lost].sum()
        return float(won / pairs), float((won + undecided) / pairs)

    def auc_bound(self, k: int) -> float | None:
        """How far `auc(k)` can be from the AUC of the scores the intervals summarise (for which
        scikit-learn's roc_auc_score would be computed): the estimate lies in `auc_range`, so does
        the truth."""
        estimate, extremes = self.auc(k), self.auc_range(k)
        if estimate is None or extremes is None:
            return None
        return max(estimate - extremes[0], extremes[1] - estimate, 0.0)

    def to_flat(self) -> dict[str, int | list[int]]:
        """A site's summary for a Flower MetricRecord: `scores-bins`, `scores-min-count` and, per class,
        the intervals as a flat list [upper edge, positives, negatives, ...] tiling bins 0..scores-bins."""
        bins, min_count = self.bins, self.min_count
        if bins is None or min_count is None:
            raise ValueError("a pooled summary has no wire form: only a site's own summary travels")
        flat: dict[str, int | list[int]] = {"scores-bins": bins, "scores-min-count": min_count}
        for k, rows in enumerate(self.intervals):
            edges = np.rint(rows[:, 1] * bins).astype(np.int64)
            flat[f"scores-{k}"] = np.column_stack([edges, rows[:, 2:].astype(np.int64)]).ravel().tolist()
        return flat

    @classmethod
    def from_flat(cls, mapping: Mapping[str, object]) -> ScoreSummary:
        """Inverse of `to_flat`, checking that the intervals tile the axis and hold the site's own
        minimum count each; keys other than scores-* are ignored."""
        bins, min_count = mapping.get("scores-bins"), mapping.get("scores-min-count")
        if type(bins) is not int or type(min_count) is not int:
            raise ValueError(f"scores-bins and scores-min-count must be integers, got {bins!r} and {min_count!r}")
        _check_policy(bins, min_count)
        found = {int(match[1]): (key, value) for key, value in mapping.items() if (match := _FLAT_KEY.fullmatch(key))}
        if len(found) < 2 or set(found) != set(range(len(found))):
            raise ValueError(f"summary keys must be scores-<k> for k = 0..K-1, K >= 2, got {sorted(found)}")
        intervals = tuple(_parse_intervals(*found[k], bins, min_count) for k in range(len(found)))
        return cls(intervals, bins, min_count)


def _share_above(rows: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of the count above each threshold, each interval's count spread evenly over it."""
    low, high, count = rows[:, 0], rows[:, 1], rows[:, 2]
    above = np.clip((high[None, :] - thresholds[:, None]) / (high - low)[None, :], 0.0, 1.0)
    return above @ count / count.sum()


def _check_policy(bins: int, min_count: int) -> None:
    if not 2 <= bins <= MAX_SCORE_BINS:
        raise ValueError(f"score bins must lie in [2, {MAX_SCORE_BINS}], got {bins}")
    if min_count < 1:
        raise ValueError(f"the minimum count per reported interval must be >= 1, got {min_count}")


def _rows(edges: np.ndarray, counts: np.ndarray, bins: int) -> np.ndarray:
    lows = np.r_[0, edges[:-1]]
    return np.column_stack([lows / bins, edges / bins, counts]).astype(np.float64)


def _parse_intervals(key: str, value: object, bins: int, min_count: int) -> np.ndarray:
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is None or any(type(v) is not int for v in values):
        raise ValueError(f"{key} must be a list of integers")
    if not values or len(values) % 3:
        raise ValueError(f"{key} must hold (upper edge, positives, negatives) triples: length {len(values)}")
    triples = np.asarray(values, dtype=np.int64).reshape(-1, 3)
    edges, counts = triples[:, 0], triples[:, 1:]
    if edges[-1] != bins or np.any(np.diff(np.r_[0, edges]) <= 0):
        raise ValueError(f"{key}: the upper edges must rise strictly and end at scores-bins ({bins})")
    if np.any(counts < 0):
        raise ValueError(f"{key}: counts must be non-negative")
    if len(triples) > 1 and counts.sum(axis=1).min() < min_count:
        raise ValueError(f"{key}: an interval counts {counts.sum(axis=1).min()} ROIs, fewer than the site's minimum {min_count}")
    return _rows(edges, counts, bins)


def report_from_summary(
    summary: ScoreSummary, confusion: np.ndarray, class_names: Sequence[str] = CLASS_NAMES_DEFAULT
) -> ClassificationReport:
    """The `classification_report` of pooled data from summed site counts: precision/recall/F1/accuracy
    exactly from the (K, K) confusion matrix, ROC/AUC (with its bound) from the score summary."""
    confusion = np.asarray(confusion)
    names = check_class_names(class_names, summary.num_classes)
    if confusion.shape != (summary.num_classes, summary.num_classes):
        raise ValueError(f"confusion must have shape ({summary.num_classes}, {summary.num_classes}), got {confusion.shape}")
    if not np.issubdtype(confusion.dtype, np.integer) or confusion.min() < 0 or confusion.sum() == 0:
        raise ValueError("confusion must hold non-negative integer counts with at least one sample")
    if [summary.counts(k)[0] for k in range(len(names))] != confusion.sum(axis=1).tolist():
        raise ValueError("confusion row sums and score-summary positives disagree: they come from different data")
    # One weighted (true, predicted) sample per cell lets scikit-learn compute the scores exactly as
    # `classification_report` does from the individual samples.
    y_true, y_pred = np.nonzero(confusion)
    rocs = [summary.roc(k) for k in range(len(names))]
    report = report_from_confusion(names, confusion.astype(np.int64), y_true, y_pred, confusion[y_true, y_pred], rocs)
    bounds = [summary.auc_bound(k) for k in range(len(names))]
    per_class = [c.model_copy(update={"auc_bound": b}) for c, b in zip(report.per_class, bounds, strict=True)]
    defined = [b for b in bounds if b is not None]
    return report.model_copy(update={"per_class": per_class, "macro_auc_bound": float(np.mean(defined)) if defined else None})
