"""Confidence intervals of per-class and macro AUC: percentile bootstrap from the scores, and
Hanley & McNeil's from an AUC and its class counts alone (what a federated evaluation has)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.stats import norm, rankdata

from pneumofed.common.metrics.report import validate_scores


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
    y, probs = validate_scores(y_true, probs)
    _check_bootstrap(y, [k], n_boot, confidence)
    return _percentile_ci(_bootstrap_aucs(y, probs, [k], n_boot, seed)[:, 0], confidence)


def bootstrap_macro_auc_ci(
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the macro AUC over the classes whose AUC is defined on the full data;
    resamples in which any of them lacks positives or negatives are skipped."""
    y, probs = validate_scores(y_true, probs)
    classes = [k for k in range(probs.shape[1]) if (y == k).any() and not (y == k).all()]
    _check_bootstrap(y, classes or [0], n_boot, confidence)
    return _percentile_ci(_bootstrap_aucs(y, probs, classes, n_boot, seed).mean(axis=1), confidence)


def hanley_mcneil_auc_ci(
    auc: float, positives: int, negatives: int, confidence: float = 0.95, bound: float = 0.0
) -> tuple[float, float]:
    """auc +- (bound + z * SE), clipped to [0, 1], with Hanley & McNeil's (1982) standard error

        SE^2 = (A (1 - A) + (P - 1)(Q1 - A^2) + (N - 1)(Q2 - A^2)) / (P N),  Q1 = A / (2 - A),  Q2 = 2 A^2 / (1 + A),

    which needs no scores. `bound` is how far `auc` itself may be from the AUC of the scores (a
    federated AUC from coarse summaries): the interval is widened by it.
    """
    if positives < 1 or negatives < 1:
        raise ValueError(f"an AUC needs positives and negatives, got {positives} and {negatives}")
    if not 0.0 <= auc <= 1.0 or bound < 0 or not 0 < confidence < 1:
        raise ValueError(f"need 0 <= auc <= 1, bound >= 0 and 0 < confidence < 1, got {auc}, {bound}, {confidence}")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (positives * negatives)
    half_width = bound + float(norm.ppf(0.5 + confidence / 2)) * float(np.sqrt(max(variance, 0.0)))
    return max(0.0, auc - half_width), min(1.0, auc + half_width)

