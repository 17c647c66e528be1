from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from pneumofed.common.metrics.histogram import (
    DEFAULT_BINS,
    ScoreHistogram,
    report_from_counts,
    score_bin_index,
)
from pneumofed.common.metrics.intervals import bootstrap_auc_ci, bootstrap_macro_auc_ci
from pneumofed.common.metrics.report import (
    CLASS_NAMES_DEFAULT,
    classification_report,
    confusion_counts,
)

AUC_TOLERANCE = 0.002


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _site(rng: np.random.Generator, kind: str, n: int, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (N, K) scores of one site; `kind` shapes the score distribution."""
    k = len(prior)
    y = rng.choice(k, size=n, p=prior)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += rng.uniform(0.3, 2.0)
    probs = _softmax(z)
    if kind == "rounded":  # heavy ties: 11 distinct values
        probs = np.round(probs, 1)
    elif kind == "narrow":  # all scores within [0.30, 0.36]
        probs = 0.30 + 0.06 * probs
    elif kind == "saturated-high":  # 0.9990..0.9999
        probs = 0.9990 + 0.0009 * probs
    elif kind == "saturated-low":  # 1e-4..1e-3
        probs = 1e-4 + 9e-4 * probs
    elif kind == "confident":  # float32 softmax of large logits: values down to ~1e-20
        probs = _softmax(8 * z).astype(np.float32).astype(np.float64)
    elif kind == "one-hot":  # most scores exactly 0.0 or 1.0 in float32, a few in between
        probs = _softmax(30 * z).astype(np.float32).astype(np.float64)
    elif kind == "identical":  # 40 % of rows share one constant score vector
        probs[rng.random(n) < 0.4] = 1.0 / k
    return y, probs


def _pooled_sites(seed: int, kind: str, num_classes: int = 3):
    """Three sites of 100-400 samples with imbalanced classes (each class >= 10 / num_classes % share)."""
    rng = np.random.default_rng(seed)
    prior = 0.9 * rng.dirichlet(np.full(num_classes, 2.0)) + 0.1 / num_classes
    return [_site(rng, kind, int(rng.integers(100, 400)), prior) for _ in range(3)]


def _concat(sites):
    return np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites])


def _shared_bin_bound(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """0.5 * share of positive-negative pairs with distinct scores in one bin: the worst possible error."""
    def pairs_per_group(groups: np.ndarray) -> int:
        _, group = np.unique(groups, return_inverse=True)
        return int(np.dot(np.bincount(group[is_positive], minlength=group.max() + 1),
                          np.bincount(group[~is_positive], minlength=group.max() + 1)))

    distinct_in_one_bin = pairs_per_group(score_bin_index(scores)) - pairs_per_group(scores)
    return 0.5 * distinct_in_one_bin / (is_positive.sum() * (~is_positive).sum())


# ---------------------------------------------------------------- centralised report


@pytest.mark.parametrize("num_classes,seed", [(3, 0), (4, 1), (5, 2)])
def test_classification_report_matches_sklearn(num_classes, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=300)
    probs = _softmax(rng.normal(size=(300, num_classes)) + np.eye(num_classes)[y])
    names = [f"class-{k}" for k in range(num_classes)]
    report = classification_report(y, probs, names)

    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, labels=range(num_classes), zero_division=0)
    assert report.accuracy == accuracy_score(y, y_pred)
    assert report.num_samples == 300
    assert report.confusion_matrix == confusion_matrix(y, y_pred).tolist()
    assert report.class_names == names
    for k, metrics in enumerate(report.per_class):
        assert (metrics.precision, metrics.recall, metrics.f1, metrics.support) == (
            precision[k], recall[k], f1[k], support[k]
        )
        assert metrics.auc == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        np.testing.assert_array_equal(metrics.roc.fpr, fpr)
        np.testing.assert_array_equal(metrics.roc.tpr, tpr)
    assert report.macro_precision == pytest.approx(np.mean(precision))
    assert report.macro_f1 == pytest.approx(np.mean(f1))
    assert report.macro_auc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert json.loads(json.dumps(report.model_dump(mode="json")))["accuracy"] == report.accuracy


def test_class_absent_from_labels_has_no_auc_anywhere():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=100)  # class 2 never occurs
    probs = _softmax(rng.normal(size=(100, 3)))
    report = classification_report(y, probs)
    assert report.per_class[2].auc is None and report.per_class[2].roc is None
    assert report.per_class[2].recall == 0.0
    assert report.macro_auc == pytest.approx(np.mean([roc_auc_score(y == k, probs[:, k]) for k in (0, 1)]))
    json.dumps(report.model_dump(mode="json"))

    hist = ScoreHistogram.from_scores(y, probs)
    assert hist.auc(2) is None
    assert hist.macro_auc() == pytest.approx(report.macro_auc, abs=AUC_TOLERANCE)
    with pytest.raises(ValueError, match="undefined"):
        hist.roc_curve(2)


@pytest.mark.parametrize(
    "y,probs,match",
    [
        ([0, 1], [0.2, 0.8], "shape"),
        ([0, 3], [[0.5, 0.5], [0.5, 0.5]], r"\[0, 2\)"),
        ([0], [[0.5, 0.5], [0.5, 0.5]], "y_true"),
        ([0, 1], [[0.5, 0.5], [np.nan, 0.5]], "finite"),
        ([0, 1], [[1.5, -0.5], [0.5, 0.5]], r"\[0, 1\]"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], "integer"),
    ],
)
def test_bad_inputs_are_rejected(y, probs, match):
    for build in (classification_report, ScoreHistogram.from_scores):
        with pytest.raises(ValueError, match=match):
            build(np.array(y), np.array(probs))


def test_class_names_must_match_class_count():
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        classification_report(np.array([0, 1, 2]), np.eye(3), ["a", "b"])
    assert len(CLASS_NAMES_DEFAULT) == 3


# ---------------------------------------------------------------- histogram layout


def test_bins_keep_order_and_separate_extreme_float32_scores():
    rng = np.random.default_rng(4)
    scores = np.sort(np.r_[rng.random(20_000), rng.random(1000) ** 30, 1 - rng.random(1000) ** 30, 0.0, 1.0])
    bins = score_bin_index(scores)
    assert np.all(np.diff(bins) >= 0) and bins[0] == 0 and bins[-1] == DEFAULT_BINS - 1
    extremes = np.array([0.0, np.float32(1e-45), np.float32(1e-30), np.float32(1e-7), 0.3, 0.3006,
                         0.9990, 0.99903, np.float32(1 - 6e-8), 1.0])
    assert len(np.unique(score_bin_index(extremes))) == len(extremes)


# ---------------------------------------------------------------- federated pooling


def test_sum_of_site_histograms_equals_histogram_of_pooled_data():
    sites = _pooled_sites(5, "generic")
    pooled = ScoreHistogram.merge(ScoreHistogram.from_scores(y, p) for y, p in sites)
    np.testing.assert_array_equal(pooled.counts, ScoreHistogram.from_scores(*_concat(sites)).counts)
    first, second, third = (ScoreHistogram.from_scores(y, p) for y, p in sites)
    np.testing.assert_array_equal((first + second + third).counts, pooled.counts)
    assert pooled.num_classes == 3 and pooled.bins == DEFAULT_BINS
    assert pooled.counts[:, 0].sum() == sum(len(y) for y, _ in sites)


@pytest.mark.parametrize(
    "kind", ["generic", "narrow", "saturated-high", "saturated-low", "confident", "one-hot", "identical"]
)
def test_pooled_auc_from_histograms_matches_sklearn(kind):
    worst = 0.0
    for seed in range(15):
        sites = _pooled_sites(seed, kind)
        pooled = ScoreHistogram.merge(ScoreHistogram.from_scores(y, p) for y, p in sites)
        y, probs = _concat(sites)
        for k in range(3):
            error = abs(pooled.auc(k) - roc_auc_score(y == k, probs[:, k]))
            assert error <= _shared_bin_bound(y == k, probs[:, k]) + 1e-12
            worst = max(worst, error)
    assert worst < AUC_TOLERANCE


def test_tied_scores_in_distinct_bins_give_the_exact_auc():
    for seed in range(10):
        sites = _pooled_sites(seed, "rounded")
        pooled = ScoreHistogram.merge(ScoreHistogram.from_scores(y, p) for y, p in sites)
        y, probs = _concat(sites)
        for k in range(3):
            assert pooled.auc(k) == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)


def test_pooled_roc_curve_runs_from_origin_to_one_monotonically():
    sites = _pooled_sites(6, "confident")
    pooled = ScoreHistogram.merge(ScoreHistogram.from_scores(y, p) for y, p in sites)
    for k in range(3):
        fpr, tpr = pooled.roc_curve(k)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert np.trapezoid(tpr, fpr) == pytest.approx(pooled.auc(k), abs=1e-12)


def test_flat_form_roundtrips_and_ignores_other_metrics():
    y, probs = _concat(_pooled_sites(7, "generic", num_classes=4))
    hist = ScoreHistogram.from_scores(y, probs, bins=256)
    flat = hist.to_flat()
    assert sorted(flat) == sorted(["hist-bins"] + [f"hist-{kind}-{k}" for kind in ("pos", "neg") for k in range(4)])
    assert flat["hist-bins"] == 256
    assert all(type(v) is int for key, values in flat.items() if key != "hist-bins" for v in values)
    restored = ScoreHistogram.from_flat({**flat, "loss": 0.3, "confusion": [1, 2]})
    np.testing.assert_array_equal(restored.counts, hist.counts)


def test_flat_form_carries_only_occupied_bins_so_its_size_follows_the_samples_not_the_bins():
    y, probs = np.array([0, 1, 2, 0]), np.eye(3)[[0, 1, 2, 0]] * 0.7 + 0.1
    flat = ScoreHistogram.from_scores(y, probs).to_flat()
    values = sum(len(v) for key, v in flat.items() if key != "hist-bins")
    assert values <= 2 * 3 * len(y)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda f: f.pop("hist-neg-1"), "keys"),
        (lambda f: f.pop("hist-bins"), "hist-bins"),
        (lambda f: f.__setitem__("hist-pos-0", f["hist-pos-0"][:-1]), "pairs"),
        (lambda f: f.__setitem__("hist-pos-0", [3, -1]), "positive"),
        (lambda f: f.__setitem__("hist-pos-0", [16, 1]), r"\[0, 16\)"),
        (lambda f: f.__setitem__("hist-pos-0", [2, 1, 2, 1]), "twice"),
        (lambda f: f.__setitem__("hist-pos-0", [0.5, 1]), "integers"),
    ],
)
def test_malformed_flat_form_is_rejected(edit, match):
    flat = ScoreHistogram.from_scores(np.array([0, 1]), np.eye(2), bins=16).to_flat()
    edit(flat)
    with pytest.raises(ValueError, match=match):
        ScoreHistogram.from_flat(flat)


def test_merging_incompatible_histograms_is_rejected():
    y = np.array([0, 1, 2])
    base = ScoreHistogram.from_scores(y, np.eye(3), bins=64)
    with pytest.raises(ValueError, match="cannot merge"):
        base + ScoreHistogram.from_scores(y, np.eye(3), bins=128)
    with pytest.raises(ValueError, match="cannot merge"):
        ScoreHistogram.merge([base, ScoreHistogram.from_scores(np.array([0, 1]), np.eye(2), bins=64)])
    with pytest.raises(ValueError, match="no histograms"):
        ScoreHistogram.merge([])


@pytest.mark.parametrize("kind,seed", [("generic", 8), ("saturated-high", 9), ("one-hot", 10)])
def test_report_from_site_counts_equals_centralised_report(kind, seed):
    sites = _pooled_sites(seed, kind)
    pooled = ScoreHistogram.merge(ScoreHistogram.from_scores(y, p) for y, p in sites)
    confusion = sum(confusion_counts(y, p) for y, p in sites)
    federated = report_from_counts(pooled, confusion, CLASS_NAMES_DEFAULT)
    central = classification_report(*_concat(sites), CLASS_NAMES_DEFAULT)

    exact = central.model_dump(exclude={"macro_auc", "per_class"})
    assert federated.model_dump(exclude={"macro_auc", "per_class"}) == exact
    for fed, cen in zip(federated.per_class, central.per_class, strict=True):
        assert fed.model_dump(include={"name", "support", "precision", "recall", "f1"}) == cen.model_dump(
            include={"name", "support", "precision", "recall", "f1"}
        )
        assert fed.auc == pytest.approx(cen.auc, abs=AUC_TOLERANCE)
    assert federated.macro_auc == pytest.approx(central.macro_auc, abs=AUC_TOLERANCE)


def test_report_from_counts_rejects_counts_of_different_data():
    y, probs = _concat(_pooled_sites(11, "generic"))
    hist = ScoreHistogram.from_scores(y, probs)
    confusion = confusion_counts(y, probs)
    with pytest.raises(ValueError, match="disagree"):
        report_from_counts(hist, confusion + np.eye(3, dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        report_from_counts(hist, confusion[:2, :2])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_equals_percentiles_of_sklearn_auc_on_the_same_resamples():
    rng = np.random.default_rng(12)
    y = rng.integers(0, 3, size=40)
    probs = np.round(_softmax(rng.normal(size=(40, 3)) + np.eye(3)[y]), 1)  # ties exercise average ranks
    rows = np.random.default_rng(0).integers(0, 40, size=(100, 40))
    expected = [roc_auc_score(y[r] == 1, probs[r, 1]) for r in rows if 0 < (y[r] == 1).sum() < 40]
    low, high = bootstrap_auc_ci(y, probs, 1, n_boot=100, seed=0)
    assert (low, high) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    widths = []
    for n in (200, 2000):
        rng = np.random.default_rng(13)
        y = rng.integers(0, 3, size=n)
        probs = _softmax(rng.normal(size=(n, 3)) + np.eye(3)[y])
        point = roc_auc_score(y == 0, probs[:, 0])
        low, high = bootstrap_auc_ci(y, probs, 0, n_boot=300)
        assert low < point < high
        macro_low, macro_high = bootstrap_macro_auc_ci(y, probs, n_boot=300)
        assert macro_low < classification_report(y, probs).macro_auc < macro_high
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]  # ~ 1 / sqrt(10) expected


def test_bootstrap_skips_resamples_without_positives_and_rejects_undefined_classes():
    y = np.array([1] + [0] * 19)
    probs = np.column_stack([np.linspace(0.1, 0.9, 20), np.linspace(0.9, 0.1, 20)])
    # ~36 % of resamples lack the one positive; every other resample ranks it first (AUC 1).
    assert bootstrap_auc_ci(y, probs, 1, n_boot=200) == (1.0, 1.0)
    with pytest.raises(ValueError, match="undefined"):
        bootstrap_auc_ci(np.zeros(5, dtype=int), np.full((5, 2), 0.5), 0)
