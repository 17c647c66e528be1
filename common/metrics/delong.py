"""DeLong confidence intervals of one-vs-rest AUCs and the paired DeLong test of two models' AUCs.

DeLong, DeLong & Clarke-Pearson (1988), *Comparing the areas under two or more correlated receiver
operating characteristic curves: a nonparametric approach*, Biometrics 44:837-845: the AUC is the
Mann-Whitney statistic, its variance comes from the structural components (placement values)

    V10_i = (1/n) sum_j psi(X_i, Y_j)    for each of the m positives X_i,
    V01_j = (1/m) sum_i psi(X_i, Y_j)    for each of the n negatives Y_j,

with psi = 1 when the positive scores higher, 1/2 on a tie, 0 otherwise, and

    Cov(AUC_r, AUC_s) = S10[r, s] / m + S01[r, s] / n

where S10 and S01 are the sample covariances (denominator m - 1, n - 1) of the placement values of
scores r and s on the same cases. The placement values are computed with the O(n log n) midrank
algorithm of Sun & Xu (2014), *Fast implementation of DeLong's algorithm for comparing the areas
under correlated receiver operating characteristic curves*, IEEE Signal Processing Letters 21:1389.

Intervals use the normal approximation (AUC +- z * SE), clipped to [0, 1] (to [-1, 1] for a
difference of AUCs); that is how pROC's ``ci.auc(method = "delong")`` and ``roc.test`` report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

from pneumofed.common.metrics.report import validate_scores


@dataclass(frozen=True)
class DelongAuc:
    """One-vs-rest AUC of one class with its DeLong variance and normal-approximation CI."""

    auc: float
    variance: float
    ci: tuple[float, float]
    confidence: float

    @property
    def standard_error(self) -> float:
        return float(np.sqrt(self.variance))


@dataclass(frozen=True)
class DelongComparison:
    """Paired DeLong test of AUC(a) - AUC(b) for two scores of the same cases (H0: equal AUCs)."""

    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    variance: float  # of the difference: Var(a) + Var(b) - 2 Cov(a, b)
    ci: tuple[float, float]  # of the difference
    z: float
    p_value: float  # two-sided
    confidence: float


def placement_values(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Structural components of each row of scores, by midranks (Sun & Xu 2014).

    ``positives`` is (R, m), ``negatives`` (R, n): R scores of the same m positive and n negative
    cases. Returns V10 (R, m), the fraction of negatives each positive outranks (ties count half),
    and V01 (R, n), the fraction of positives that outrank each negative.
    """
    positives = np.atleast_2d(np.asarray(positives, dtype=np.float64))
    negatives = np.atleast_2d(np.asarray(negatives, dtype=np.float64))
    m, n = positives.shape[1], negatives.shape[1]
    within_positives = rankdata(positives, axis=1)
    within_negatives = rankdata(negatives, axis=1)
    combined = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    # A positive's midrank among all cases less its midrank among the positives
    # = (#negatives below it) + (#negatives tied with it) / 2.
    v10 = (combined[:, :m] - within_positives) / n
    v01 = 1.0 - (combined[:, m:] - within_negatives) / m
    return v10, v01


def delong_covariance(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (R,) and their DeLong covariance matrix (R, R) for R scores of the same cases.

    Needs at least 2 positives and 2 negatives (the sample covariances divide by m - 1 and n - 1).
    """
    m, n = np.shape(np.atleast_2d(positives))[1], np.shape(np.atleast_2d(negatives))[1]
    if m < 2 or n < 2:
        raise ValueError(f"the DeLong variance needs at least 2 positives and 2 negatives, got {m} and {n}")
    v10, v01 = placement_values(positives, negatives)
    aucs = v10.mean(axis=1)
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def _split(y: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, m) scores of the cases of class k and (R, n) of the others, from R rows of scores."""
    is_positive = y == k
    return scores[:, is_positive], scores[:, ~is_positive]


def _class_index(k: int, num_classes: int) -> int:
    if not 0 <= k < num_classes:
        raise ValueError(f"class index {k} outside [0, {num_classes})")
    return int(k)


def delong_auc_ci(y_true: np.ndarray, probs: np.ndarray, k: int, confidence: float = 0.95) -> DelongAuc:
    """DeLong variance and normal-approximation CI (clipped to [0, 1]) of the one-vs-rest AUC of class k."""
    y, probs = validate_scores(y_true, probs)
    k = _class_index(k, probs.shape[1])
    z = _check_confidence(confidence)
    positives, negatives = _split(y, probs[:, k][None, :], k)
    aucs, covariance = delong_covariance(positives, negatives)
    auc, variance = float(aucs[0]), float(covariance[0, 0])
    half = z * float(np.sqrt(variance))
    return DelongAuc(auc, variance, (max(0.0, auc - half), min(1.0, auc + half)), confidence)


def delong_test(
    y_true: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, k: int, confidence: float = 0.95
) -> DelongComparison:
    """Paired DeLong test comparing two models' one-vs-rest AUCs of class k on the same cases.

    ``probs_a`` and ``probs_b`` are the (N, K) scores of the two models, row i on the same case.
    The difference's CI is clipped to [-1, 1]. When the difference has zero variance (e.g. the
    two models rank the cases alike), z is 0 and p is 1 for a zero difference, and z is +-inf and
    p is 0 otherwise.
    """
    y, probs_a = validate_scores(y_true, probs_a)
    _, probs_b = validate_scores(y_true, probs_b)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"the two models' scores differ in shape: {probs_a.shape} and {probs_b.shape}")
    k = _class_index(k, probs_a.shape[1])
    z_crit = _check_confidence(confidence)
    positives, negatives = _split(y, np.stack([probs_a[:, k], probs_b[:, k]]), k)
    aucs, covariance = delong_covariance(positives, negatives)
    difference = float(aucs[0] - aucs[1])
    variance = float(max(0.0, covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]))
    if variance > 0:
        z = difference / float(np.sqrt(variance))
        p_value = float(2 * norm.sf(abs(z)))
    elif difference == 0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = float(np.copysign(np.inf, difference)), 0.0
    half = z_crit * float(np.sqrt(variance))
    ci = (max(-1.0, difference - half), min(1.0, difference + half))
    return DelongComparison(float(aucs[0]), float(aucs[1]), difference, variance, ci, float(z), p_value, confidence)
