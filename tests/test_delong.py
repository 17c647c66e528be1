"""DeLong AUC variance, CI and paired test, against a published example and a brute-force reference."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from pneumofed.common.metrics.delong import delong_auc_ci, delong_covariance, delong_test
from pneumofed.common.metrics.intervals import hanley_mcneil_auc_ci

Z95 = 1.959963984540054


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def tied_scores(seed: int, n: int = 60, k: int = 3, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (n, k) probabilities rounded to one decimal, so that many scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    return y, np.round(_softmax(rng.normal(size=(n, k)) + signal * np.eye(k)[y]), 1)


def brute_force_delong(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """O(R^2 * m * n) structural components straight from DeLong et al. (1988), eqs. for V10, V01, S10, S01."""
    r, m, n = positives.shape[0], positives.shape[1], negatives.shape[1]
    v10 = np.zeros((r, m))
    v01 = np.zeros((r, n))
    for row in range(r):
        for i in range(m):
            for j in range(n):
                x, y = positives[row, i], negatives[row, j]
                psi = 1.0 if x > y else 0.5 if x == y else 0.0
                v10[row, i] += psi / n
                v01[row, j] += psi / m
    aucs = v10.mean(axis=1)
    s10 = np.zeros((r, r))
    s01 = np.zeros((r, r))
    for a in range(r):
        for b in range(r):
            s10[a, b] = sum((v10[a, i] - aucs[a]) * (v10[b, i] - aucs[b]) for i in range(m)) / (m - 1)
            s01[a, b] = sum((v01[a, j] - aucs[a]) * (v01[b, j] - aucs[b]) for j in range(n)) / (n - 1)
    return aucs, s10 / m + s01 / n


# ---------------------------------------------------- Hanley & McNeil (1982), Radiology 143:29, table 1

NORMAL_COUNTS = (33, 6, 6, 11, 2)  # 58 normal cases rated 1 (definitely normal) .. 5 (definitely abnormal)
ABNORMAL_COUNTS = (3, 2, 2, 11, 33)  # 51 abnormal cases


def hanley_mcneil_cases() -> tuple[np.ndarray, np.ndarray]:
    ratings = np.arange(1, 6)
    scores = np.concatenate([np.repeat(ratings, NORMAL_COUNTS), np.repeat(ratings, ABNORMAL_COUNTS)]) / 5
    y = np.array([0] * sum(NORMAL_COUNTS) + [1] * sum(ABNORMAL_COUNTS))
    return y, np.column_stack([1 - scores, scores])


def exact_delong_from_rating_table() -> tuple[Fraction, Fraction]:
    """AUC and DeLong variance of the rating table in exact rational arithmetic, one placement per rating."""
    m, n = sum(ABNORMAL_COUNTS), sum(NORMAL_COUNTS)
    # an abnormal case rated r outranks the normals rated below r and ties with those rated r
    v10 = [Fraction(2 * sum(NORMAL_COUNTS[:r]) + NORMAL_COUNTS[r], 2 * n) for r in range(5)]
    # a normal case rated r is outranked by the abnormals rated above r and ties with those rated r
    v01 = [Fraction(2 * sum(ABNORMAL_COUNTS[r + 1 :]) + ABNORMAL_COUNTS[r], 2 * m) for r in range(5)]
    auc = sum(c * v for c, v in zip(ABNORMAL_COUNTS, v10)) / m
    assert auc == sum(c * v for c, v in zip(NORMAL_COUNTS, v01)) / n
    s10 = sum(c * (v - auc) ** 2 for c, v in zip(ABNORMAL_COUNTS, v10)) / (m - 1)
    s01 = sum(c * (v - auc) ** 2 for c, v in zip(NORMAL_COUNTS, v01)) / (n - 1)
    return auc, s10 / m + s01 / n


def test_hanley_mcneil_rating_example_gives_the_published_auc_and_the_exact_delong_variance():
    y, probs = hanley_mcneil_cases()
    auc, variance = exact_delong_from_rating_table()
    assert (auc, variance) == (Fraction(1321, 1479), Fraction(17089, 18102960))
    result = delong_auc_ci(y, probs, 1)

    assert round(result.auc, 3) == 0.893  # as published
    assert result.auc == pytest.approx(float(auc), abs=1e-15)  # = 1321 / 1479
    assert result.variance == pytest.approx(float(variance), rel=1e-12)
    assert result.standard_error == pytest.approx(0.030724, abs=5e-7)
    assert result.ci == pytest.approx(
        (result.auc - Z95 * result.standard_error, result.auc + Z95 * result.standard_error)
    )
    assert result.ci == pytest.approx((0.83295, 0.95339), abs=5e-6)
    # The normal class's one-vs-rest AUC is the same curve seen from the other side.
    normal = delong_auc_ci(y, probs, 0)
    assert normal.auc == pytest.approx(result.auc) and normal.variance == pytest.approx(result.variance)


# ---------------------------------------------------------------- against brute force and sklearn


@pytest.mark.parametrize("seed", range(6))
def test_single_auc_and_variance_equal_brute_force_and_sklearn_on_tied_scores(seed):
    y, probs = tied_scores(seed)
    assert len(np.unique(probs)) < 12  # heavily tied
    for k in range(probs.shape[1]):
        positives, negatives = probs[y == k, k][None, :], probs[y != k, k][None, :]
        want_auc, want_cov = brute_force_delong(positives, negatives)
        result = delong_auc_ci(y, probs, k)
        assert result.auc == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)
        assert result.auc == pytest.approx(want_auc[0], abs=1e-12)
        assert result.variance == pytest.approx(want_cov[0, 0], rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_covariance_matrix_of_several_models_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    m, n = rng.integers(5, 30, size=2)
    truth = np.concatenate([np.ones(m), np.zeros(n)])
    # four correlated scores of the same cases, coarsely rounded so ties occur within and across groups
    shared = rng.normal(size=m + n)
    scores = np.round(np.stack([truth * s + shared + rng.normal(size=m + n) for s in (0.0, 0.5, 1.0, 2.0)]), 0)
    want_aucs, want_cov = brute_force_delong(scores[:, :m], scores[:, m:])
    aucs, covariance = delong_covariance(scores[:, :m], scores[:, m:])
    assert aucs == pytest.approx(want_aucs, abs=1e-12)
    np.testing.assert_allclose(covariance, want_cov, rtol=1e-10, atol=1e-15)
    assert np.abs(want_cov[np.triu_indices(4, 1)]).max() > 1e-4  # the off-diagonal terms are really exercised


@pytest.mark.parametrize("seed", range(4))
def test_paired_test_equals_brute_force_difference_variance_z_and_p(seed):
    y, probs_a = tied_scores(seed, n=80)
    _, noise = tied_scores(seed + 50, n=80, signal=0.0)
    probs_b = np.round(0.6 * probs_a + 0.4 * noise, 1)  # correlated with model a, weaker
    for k in range(3):
        positives = np.stack([probs_a[y == k, k], probs_b[y == k, k]])
        negatives = np.stack([probs_a[y != k, k], probs_b[y != k, k]])
        (auc_a, auc_b), cov = brute_force_delong(positives, negatives)
        variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        z = (auc_a - auc_b) / np.sqrt(variance)

        result = delong_test(y, probs_a, probs_b, k)
        assert (result.auc_a, result.auc_b) == pytest.approx(
            (roc_auc_score(y == k, probs_a[:, k]), roc_auc_score(y == k, probs_b[:, k])), abs=1e-12
        )
        assert result.difference == pytest.approx(auc_a - auc_b, abs=1e-12)
        assert result.variance == pytest.approx(variance, rel=1e-9)
        assert result.z == pytest.approx(z, rel=1e-9)
        assert result.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)
        half = Z95 * np.sqrt(variance)
        assert result.ci == pytest.approx((auc_a - auc_b - half, auc_a - auc_b + half), abs=1e-12)
        # the paired variance is smaller than that of independent samples for these correlated models
        assert result.variance < cov[0, 0] + cov[1, 1]


def test_paired_test_is_antisymmetric_in_the_two_models():
    y, probs_a = tied_scores(7, n=100)
    _, probs_b = tied_scores(8, n=100, signal=0.3)
    ab, ba = delong_test(y, probs_a, probs_b, 2), delong_test(y, probs_b, probs_a, 2)
    assert (ba.difference, ba.z) == pytest.approx((-ab.difference, -ab.z))
    assert ba.p_value == pytest.approx(ab.p_value) and ba.variance == pytest.approx(ab.variance)
    assert ba.ci == pytest.approx((-ab.ci[1], -ab.ci[0]))


# ---------------------------------------------------------------- behaviour


def test_results_depend_only_on_the_ranking_of_the_scores():
    y, probs = tied_scores(3)
    monotone = probs**3  # strictly increasing on [0, 1]: same ranks, same ties
    assert delong_auc_ci(y, monotone, 1) == delong_auc_ci(y, probs, 1)


def test_ci_is_clipped_to_the_unit_interval():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.4, 0.2, 0.1, 0.05])  # one negative outranks one positive: AUC 11/12
    result = delong_auc_ci(y, np.column_stack([1 - scores, scores]), 1)
    assert result.auc == pytest.approx(11 / 12)
    assert result.auc + Z95 * result.standard_error > 1  # the unclipped bound would leave [0, 1]
    assert result.ci[1] == 1.0 and result.ci[0] == pytest.approx(result.auc - Z95 * result.standard_error)

    separated = delong_auc_ci(y, np.column_stack([1 - y * 0.9, y * 0.9]), 1)  # perfect separation
    assert (separated.auc, separated.variance, separated.ci) == (1.0, 0.0, (1.0, 1.0))


def test_confidence_level_sets_the_normal_quantile():
    y, probs = tied_scores(4, n=200)
    at95, at90 = delong_auc_ci(y, probs, 0), delong_auc_ci(y, probs, 0, confidence=0.9)
    assert at90.variance == at95.variance
    assert at90.ci[1] - at90.ci[0] == pytest.approx(2 * norm.ppf(0.95) * at95.standard_error)
    assert at90.ci[1] - at90.ci[0] < at95.ci[1] - at95.ci[0]


def test_delong_variance_matches_the_sampling_variance_of_the_auc():
    """Across repeated binormal samples, the mean DeLong variance estimates the AUC's actual variance,
    and the 95 % CI covers the true AUC about 95 % of the time."""
    rng = np.random.default_rng(21)
    m, n, shift, repeats = 60, 90, 1.0, 400
    true_auc = norm.cdf(shift / np.sqrt(2))
    aucs, variances, covered = [], [], 0
    y = np.array([1] * m + [0] * n)
    for _ in range(repeats):
        scores = norm.cdf(np.concatenate([rng.normal(shift, 1, m), rng.normal(0, 1, n)]))
        result = delong_auc_ci(y, np.column_stack([1 - scores, scores]), 1)
        aucs.append(result.auc)
        variances.append(result.variance)
        covered += result.ci[0] <= true_auc <= result.ci[1]
    assert np.mean(variances) == pytest.approx(np.var(aucs, ddof=1), rel=0.2)
    assert 0.91 <= covered / repeats <= 0.98


def test_identical_models_do_not_differ():
    y, probs = tied_scores(5)
    result = delong_test(y, probs, probs.copy(), 0)
    assert (result.difference, result.variance, result.z, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert result.ci == (0.0, 0.0)


def test_a_clearly_better_model_is_significant_and_a_relabelled_copy_is_not():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, size=300)
    good = _softmax(rng.normal(size=(300, 2)) + 2.0 * np.eye(2)[y])
    poor = _softmax(rng.normal(size=(300, 2)) + 0.3 * np.eye(2)[y])
    better = delong_test(y, good, poor, 1)
    assert better.difference > 0 and better.z > 3 and better.p_value < 1e-3 and better.ci[0] > 0
    same_ranks = delong_test(y, good, good**2 / (good**2).sum(axis=1, keepdims=True), 1)  # monotone in p(1)
    assert same_ranks.difference == pytest.approx(0.0, abs=1e-12) and same_ranks.p_value == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: delong_auc_ci([0, 1, 1, 1], np.full((4, 2), 0.5), 1), "at least 2 positives and 2 negatives"),
        (lambda: delong_auc_ci([0, 0, 0, 0], np.full((4, 2), 0.5), 1), "at least 2 positives and 2 negatives"),
        (lambda: delong_auc_ci([0, 0, 1, 1], np.full((4, 2), 0.5), 2), "outside"),
        (lambda: delong_auc_ci([0, 0, 1, 1], np.full((4, 2), 0.5), 1, confidence=1.0), "confidence"),
        (lambda: delong_auc_ci([0, 0, 1, 1], np.full((4, 2), 1.5), 1), r"\[0, 1\]"),
        (lambda: delong_test([0, 0, 1, 1], np.full((4, 2), 0.5), np.full((4, 3), 0.2), 1), "shape"),
    ],
)
def test_bad_inputs_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_hanley_mcneil_standard_error_of_their_rating_example_is_the_published_0_032():
    auc = 1321 / 1479  # the rating table's AUC, 0.893 as published
    low, high = hanley_mcneil_auc_ci(auc, sum(ABNORMAL_COUNTS), sum(NORMAL_COUNTS))
    assert (low + high) / 2 == pytest.approx(auc)
    assert round((high - low) / 2 / Z95, 3) == 0.032


def test_hanley_mcneil_interval_is_widened_by_the_aucs_bound_and_stays_in_0_1():
    plain = hanley_mcneil_auc_ci(0.8, 30, 60)
    widened = hanley_mcneil_auc_ci(0.8, 30, 60, bound=0.05)
    assert widened == pytest.approx((plain[0] - 0.05, plain[1] + 0.05))
    assert hanley_mcneil_auc_ci(0.98, 10, 10, bound=0.1)[1] == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        hanley_mcneil_auc_ci(0.8, 0, 10)
