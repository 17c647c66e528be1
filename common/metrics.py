"""Classification metrics for centralised and federated evaluation.

Centralised evaluation has every score and uses scikit-learn directly (`classification_report`).
Federated evaluation never sees scores: each site sends a `ScoreHistogram` and a confusion matrix,
both plain integer counts that sum exactly across sites, and the server builds the same
`ClassificationReport` from the sums (`report_from_counts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel
from scipy.stats import rankdata
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_curve

CLASS_NAMES_DEFAULT = ("nodule", "interstitial", "emphysema")

DEFAULT_BINS = 1 << 16
# Bin layout, see `score_bin_index`. These constants define the meaning of every bin: sites and server
# must agree on them, so changing one invalidates histograms made with the old values.
UNIFORM_SHARE = 0.4
LOGIT_LINEAR_LIMIT = 12.0
LOGIT_TAIL_SCALE = 1.5
_LOGIT_CLIP = 800.0  # beyond float64's logit range (+-745): only p == 0 or p == 1 reach it

class RocCurve(BaseModel):
    fpr: list[float]
    tpr: list[float]


class ClassMetrics(BaseModel):
    name: str
    support: int
    precision: float
    recall: float
    f1: float
    auc: float | None
    roc: RocCurve | None


class ClassificationReport(BaseModel):
    num_samples: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    macro_auc: float | None
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.per_class]


def _validated(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {probs.shape}")
    if y.ndim != 1 or len(y) != len(probs) or len(y) == 0:
        raise ValueError(f"y_true must have shape ({len(probs)},) and be non-empty, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= probs.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {probs.shape[1]}), got [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError("probs must be finite scores in [0, 1]")
    return y.astype(np.int64), probs


def _check_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
    return list(class_names)


def confusion_counts(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = argmax prediction."""
    y, probs = _validated(y_true, probs)
    k = probs.shape[1]
    return confusion_matrix(y, probs.argmax(axis=1), labels=range(k)).astype(np.int64)


def _report(
    names: list[str],
    confusion: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    weights: np.ndarray | None,
    rocs: list[tuple[np.ndarray, np.ndarray, float] | None],
) -> ClassificationReport:
    labels = range(len(names))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, sample_weight=weights, zero_division=0
    )
    aucs = [None if roc is None else float(roc[2]) for roc in rocs]
    defined = [a for a in aucs if a is not None]
    per_class = [
        ClassMetrics(
            name=names[k],
            support=int(confusion[k].sum()),
            precision=float(precision[k]),
            recall=float(recall[k]),
            f1=float(f1[k]),
            auc=aucs[k],
            roc=None if rocs[k] is None else RocCurve(fpr=rocs[k][0].tolist(), tpr=rocs[k][1].tolist()),
        )
        for k in labels
    ]
    total = int(confusion.sum())
    return ClassificationReport(
        num_samples=total,
        accuracy=float(np.trace(confusion) / total),
        macro_precision=float(np.mean(precision)),
        macro_recall=float(np.mean(recall)),
        macro_f1=float(np.mean(f1)),
        macro_auc=float(np.mean(defined)) if defined else None,
        per_class=per_class,
        confusion_matrix=confusion.tolist(),
    )


def _one_vs_rest_roc(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None):
    """(fpr, tpr, auc) or None when the class has no positives or no negatives."""
    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive, scores, sample_weight=weights)
    return fpr, tpr, area_under_curve(fpr, tpr)  # what roc_auc_score computes, without a second pass


def classification_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str] = CLASS_NAMES_DEFAULT
) -> ClassificationReport:
    """Report of argmax predictions and one-vs-rest ROC/AUC computed on the exact scores."""
    y, probs = _validated(y_true, probs)
    names = _check_names(class_names, probs.shape[1])
    y_pred = probs.argmax(axis=1)
    confusion = confusion_matrix(y, y_pred, labels=range(len(names)))
    rocs = [_one_vs_rest_roc(y == k, probs[:, k]) for k in range(len(names))]
    return _report(names, confusion, y, y_pred, None, rocs)


def score_bin_index(scores: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin of each score p in [0, 1]: floor(bins * t(p)) with the strictly increasing map

        t(p) = s * p + (1 - s) * (u(logit p) + G) / (2 G),   s = UNIFORM_SHARE = 0.4,
        u(x) = x for |x| <= L = 12, sign(x) * (L + c * ln(|x| / L)) beyond (c = 1.5), G = u(800).

    Part of the axis is uniform in p (narrow mid-range score distributions), part uniform in logit p
    (saturated softmax outputs such as 0.999..0.9999 or 1e-4..1e-3) and logarithmic in the logit beyond
    |logit| = 12, so that float32 softmax outputs down to 1e-45 (and 1 - 6e-8) still get their own bins
    rather than piling up with exact 0 and 1. Resolution at the default 65,536 bins: about 3.3e-5 in
    p around p = 0.5 and never coarser than 1 / (s * bins) = 3.8e-5; 0.00094 in logit p for
    |logit| <= 12; well under 0.1 % of the logit itself beyond. Equal scores always share a bin and different bins never reorder scores.
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
    t = UNIFORM_SHARE * p + (1 - UNIFORM_SHARE) * (np.sign(logit) * stretched + half_range) / (2 * half_range)
    return np.minimum((t * bins).astype(np.int64), bins - 1)


_FLAT_KEY = re.compile(r"hist-(pos|neg)-(\d+)")


@dataclass(frozen=True, eq=False)
class ScoreHistogram:
    """Per-class one-vs-rest score counts in fixed bins shared by all sites (layout: `score_bin_index`).

    `counts[0, k, b]` counts samples with y == k whose score probs[:, k] falls in bin b, `counts[1, k, b]`
    those with y != k. Histograms add exactly, so the sum of the sites' histograms is the histogram of
    the pooled data. AUC from counts treats a positive and a negative in the same bin as a half-win,
    which is exact for tied scores; two distinct scores sharing a bin (closer than the bin width) are the
    only source of error, at most 0.5 * (share of positive-negative pairs sharing a bin). Against
    roc_auc_score on pooled sets of 300-1200 samples the default layout stays within 1e-3 for generic,
    narrow ([0.30, 0.36]), saturated (0.999..0.9999, 1e-4..1e-3), float32-confident and rounded (exact)
    scores. The weak spot is a large mass of identical mid-range scores with a different score closer
    than a bin width (~3.3e-5): each such score shifts the AUC by up to 0.5 * tied share / min(P, N).

    The bins are fine because site evaluation sets are small: there one positive-negative pair sharing
    a bin already moves the AUC by 0.5 / (P * N), more than 0.002 for a few dozen ROIs. On the wire
    (`to_flat`) only occupied bins travel, as (bin, count) pairs, so the payload is at most
    2 * classes ints per evaluated ROI whatever the bin count. What it reveals is each class's
    multiset of scores, unlinked to any ROI or patient: the information a per-class ROC curve shows.
    """

    counts: np.ndarray

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if counts.ndim != 3 or counts.shape[0] != 2 or counts.shape[1] < 2 or counts.shape[2] < 2:
            raise ValueError(f"counts must have shape (2, classes >= 2, bins >= 2), got {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0:
            raise ValueError("counts must be non-negative integers")
        counts = counts.astype(np.int64)  # copy: the histogram owns its counts
        counts.flags.writeable = False
        object.__setattr__(self, "counts", counts)

    @classmethod
    def from_scores(cls, y_true: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_BINS) -> ScoreHistogram:
        y, probs = _validated(y_true, probs)
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        num_classes = probs.shape[1]
        counts = np.zeros((2, num_classes, bins), dtype=np.int64)
        for k in range(num_classes):
            index = score_bin_index(probs[:, k], bins)
            counts[0, k] = np.bincount(index[y == k], minlength=bins)
            counts[1, k] = np.bincount(index[y != k], minlength=bins)
        return cls(counts)

    @property
    def num_classes(self) -> int:
        return self.counts.shape[1]

    @property
    def bins(self) -> int:
        return self.counts.shape[2]

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        if not isinstance(other, ScoreHistogram):
            return NotImplemented
        if other.counts.shape != self.counts.shape:
            raise ValueError(
                f"cannot merge histograms with (classes, bins) {self.counts.shape[1:]} and {other.counts.shape[1:]}"
            )
        return ScoreHistogram(self.counts + other.counts)

    @classmethod
    def merge(cls, histograms: Iterable[ScoreHistogram]) -> ScoreHistogram:
        histograms = list(histograms)
        if not histograms:
            raise ValueError("no histograms to merge")
        merged = histograms[0]
        for histogram in histograms[1:]:
            merged = merged + histogram
        return merged

    def _weighted_bins(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each occupied (class, bin) as one weighted sample, so scikit-learn computes ROC and AUC."""
        if not 0 <= k < self.num_classes:
            raise ValueError(f"class index {k} outside [0, {self.num_classes})")
        positive, negative = self.counts[0, k], self.counts[1, k]
        pos_bins, neg_bins = np.flatnonzero(positive), np.flatnonzero(negative)
        is_positive = np.r_[np.ones(len(pos_bins), bool), np.zeros(len(neg_bins), bool)]
        return is_positive, np.r_[pos_bins, neg_bins], np.r_[positive[pos_bins], negative[neg_bins]]

    def roc_curve(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Pooled one-vs-rest ROC of class k at bin thresholds; raises ValueError if it is undefined."""
        roc = _one_vs_rest_roc(*self._weighted_bins(k))
        if roc is None:
            raise ValueError(f"class {k} has no positive or no negative samples: its ROC curve is undefined")
        return roc[0], roc[1]

    def auc(self, k: int) -> float | None:
        """Pooled one-vs-rest AUC of class k; None when it has no positive or no negative samples."""
        roc = _one_vs_rest_roc(*self._weighted_bins(k))
        return None if roc is None else float(roc[2])

    def macro_auc(self) -> float | None:
        """Mean AUC over the classes whose AUC is defined (None if none is)."""
        aucs = [a for a in (self.auc(k) for k in range(self.num_classes)) if a is not None]
        return float(np.mean(aucs)) if aucs else None

    def to_flat(self) -> dict[str, int | list[int]]:
        """Sparse form for a Flower MetricRecord: `hist-bins` plus, per class and kind, the occupied
        bins as a flat list [bin, count, bin, count, ...] (same keys at every site)."""
        flat: dict[str, int | list[int]] = {"hist-bins": self.bins}
        for k in range(self.num_classes):
            for kind, row in (("pos", self.counts[0, k]), ("neg", self.counts[1, k])):
                occupied = np.flatnonzero(row)
                flat[f"hist-{kind}-{k}"] = np.column_stack([occupied, row[occupied]]).ravel().tolist()
        return flat

    @classmethod
    def from_flat(cls, mapping: Mapping[str, object]) -> ScoreHistogram:
        """Inverse of `to_flat`; keys other than hist-bins / hist-pos-<k> / hist-neg-<k> are ignored."""
        bins = mapping.get("hist-bins")
        if type(bins) is not int or bins < 1:
            raise ValueError(f"hist-bins must be a positive integer, got {bins!r}")
        found: dict[tuple[str, int], np.ndarray] = {}
        for key, value in mapping.items():
            match = _FLAT_KEY.fullmatch(key)
            if match:
                found[(match[1], int(match[2]))] = _occupied_pairs(key, value, bins)
        num_classes = len(found) // 2
        expected = {(kind, k) for kind in ("pos", "neg") for k in range(num_classes)}
        if not found or set(found) != expected:
            raise ValueError(f"histogram keys must be hist-pos-<k> and hist-neg-<k> for k = 0..K-1, got {sorted(found)}")
        counts = np.zeros((2, num_classes, bins), dtype=np.int64)
        for (kind, k), pairs in found.items():
            counts[0 if kind == "pos" else 1, k, pairs[:, 0]] = pairs[:, 1]
        return cls(counts)


def _occupied_pairs(key: str, value: object, bins: int) -> np.ndarray:
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is None or any(type(v) is not int for v in values):
        raise ValueError(f"{key} must be a list of integers")
    if len(values) % 2:
        raise ValueError(f"{key} must hold (bin, count) pairs: odd length {len(values)}")
    pairs = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    if pairs.size and (pairs[:, 0].min() < 0 or pairs[:, 0].max() >= bins or pairs[:, 1].min() <= 0):
        raise ValueError(f"{key}: bins must lie in [0, {bins}) and counts be positive")
    if len(np.unique(pairs[:, 0])) != len(pairs):
        raise ValueError(f"{key}: a bin appears twice")
    return pairs


def report_from_counts(
    hist: ScoreHistogram, confusion: np.ndarray, class_names: Sequence[str] = CLASS_NAMES_DEFAULT
) -> ClassificationReport:
    """The `classification_report` of pooled data from summed site counts: precision/recall/F1/accuracy
    exactly from the (K, K) confusion matrix, ROC/AUC from the score histogram."""
    confusion = np.asarray(confusion)
    names = _check_names(class_names, hist.num_classes)
    if confusion.shape != (hist.num_classes, hist.num_classes):
        raise ValueError(f"confusion must have shape ({hist.num_classes}, {hist.num_classes}), got {confusion.shape}")
    if not np.issubdtype(confusion.dtype, np.integer) or confusion.min() < 0 or confusion.sum() == 0:
        raise ValueError("confusion must hold non-negative integer counts with at least one sample")
    if not np.array_equal(confusion.sum(axis=1), hist.counts[0].sum(axis=1)):
        raise ValueError("confusion row sums and histogram positives disagree: they come from different data")
    # One weighted (true, predicted) sample per cell lets scikit-learn compute the scores exactly as
    # `classification_report` does from the individual samples.
    y_true, y_pred = np.nonzero(confusion)
    rocs = [_one_vs_rest_roc(*hist._weighted_bins(k)) for k in range(len(names))]
    return _report(names, confusion.astype(np.int64), y_true, y_pred, confusion[y_true, y_pred], rocs)


def _bootstrap_aucs(y: np.ndarray, probs: np.ndarray, classes: list[int], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, len(classes)) AUCs on resamples with replacement; NaN where a resample lacks a class.

    AUC is the Mann-Whitney statistic from average ranks (equal to roc_auc_score), vectorised per chunk.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    chunk = max(1, 2_000_000 // n)  # bounds memory to a few (chunk, n) float arrays
    aucs = np.empty((n_boot, len(classes)))
    for start in range(0, n_boot, chunk):
        rows = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        for column, k in enumerate(classes):
            is_positive = y[rows] == k
            positives = is_positive.sum(axis=1)
            negatives = n - positives
            ranks = rankdata(probs[rows, k], axis=1)
            rank_sum = np.where(is_positive, ranks, 0.0).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
            aucs[start : start + len(rows), column] = np.where((positives > 0) & (negatives > 0), auc, np.nan)
    return aucs


def _percentile_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        raise ValueError("every bootstrap resample lacked positives or negatives")
    tail = 50 * (1 - confidence)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _check_bootstrap(y: np.ndarray, classes: Iterable[int], n_boot: int, confidence: float) -> None:
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    for k in classes:
        if (y == k).all() or not (y == k).any():
            raise ValueError(f"AUC of class {k} is undefined: it has no positive or no negative samples")


def bootstrap_auc_ci(
    y_true: np.ndarray, probs: np.ndarray, k: int, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the one-vs-rest AUC of class k (resamples without both groups skipped)."""
    y, probs = _validated(y_true, probs)
    _check_bootstrap(y, [k], n_boot, confidence)
    return _percentile_ci(_bootstrap_aucs(y, probs, [k], n_boot, seed)[:, 0], confidence)


def bootstrap_macro_auc_ci(
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the macro AUC over the classes whose AUC is defined on the full data;
    resamples in which any of them lacks positives or negatives are skipped."""
    y, probs = _validated(y_true, probs)
    classes = [k for k in range(probs.shape[1]) if (y == k).any() and not (y == k).all()]
    _check_bootstrap(y, classes or [0], n_boot, confidence)
    return _percentile_ci(_bootstrap_aucs(y, probs, classes, n_boot, seed).mean(axis=1), confidence)
