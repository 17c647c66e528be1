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
    DEFAULT_MIN_COUNT,
    MAX_SCORE_BINS,
    ScoreSummary,
    anonymous_groups,
    report_from_summary,
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

    summary = ScoreSummary.from_scores(y, probs, min_count=1)
    assert summary.auc(2) is None and summary.roc(2) is None and summary.auc_bound(2) is None
    assert summary.macro_auc() == pytest.approx(report.macro_auc, abs=summary.auc_bound(0) + summary.auc_bound(1))


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
    for build in (classification_report, ScoreSummary.from_scores):
        with pytest.raises(ValueError, match=match):
            build(np.array(y), np.array(probs))


def test_class_names_must_match_class_count():
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        classification_report(np.array([0, 1, 2]), np.eye(3), ["a", "b"])
    assert len(CLASS_NAMES_DEFAULT) == 3


# ---------------------------------------------------------------- score axis


def test_bins_keep_order_and_separate_extreme_float32_scores_at_the_finest_layout():
    rng = np.random.default_rng(4)
    scores = np.sort(np.r_[rng.random(20_000), rng.random(1000) ** 30, 1 - rng.random(1000) ** 30, 0.0, 1.0])
    bins = score_bin_index(scores, MAX_SCORE_BINS)
    assert np.all(np.diff(bins) >= 0) and bins[0] == 0 and bins[-1] == MAX_SCORE_BINS - 1
    extremes = np.array([0.0, np.float32(1e-30), 0.3, 0.31, 0.9990, np.float32(1 - 6e-8), 1.0])
    assert len(np.unique(score_bin_index(extremes, MAX_SCORE_BINS))) == len(extremes)


# ---------------------------------------------------------------- k-anonymous intervals


@pytest.mark.parametrize("min_count", [1, 3, 5, 10])
def test_every_reported_interval_holds_at_least_min_count_rois(min_count):
    for seed in range(10):
        for y, probs in _pooled_sites(seed, "generic"):
            y, probs = y[: 20 + 7 * seed], probs[: 20 + 7 * seed]  # site-sized: a few dozen ROIs
            flat = ScoreSummary.from_scores(y, probs, min_count=min_count).to_flat()
            for k in range(3):
                triples = np.asarray(flat[f"scores-{k}"]).reshape(-1, 3)
                assert triples[:, 1:].sum() == len(y)  # every ROI once per class
                assert triples[:, 1:].sum(axis=1).min() >= min_count
                assert triples[-1, 0] == flat["scores-bins"] and np.all(np.diff(triples[:, 0]) > 0)


def test_interval_edges_lie_in_gaps_not_on_a_rois_bin():
    counts = np.zeros(100, np.int64)
    counts[[10, 11, 40, 41, 42, 90]] = [2, 1, 1, 1, 1, 3]
    edges, groups = anonymous_groups(counts, 3)
    assert edges.tolist() == [26, 66, 100] and [g.tolist() for g in groups] == [[10, 11], [40, 41, 42], [90]]
    edges, groups = anonymous_groups(counts, 4)  # 1 + 1 + 1 + 3 left after the first four: joins them
    assert edges.tolist() == [41, 100] and [g.tolist() for g in groups] == [[10, 11, 40], [41, 42, 90]]


def test_a_site_with_fewer_rois_than_the_minimum_reports_one_interval_over_the_whole_axis():
    y, probs = np.array([0, 1, 2]), np.eye(3) * 0.8 + 0.1 / 3
    flat = ScoreSummary.from_scores(y, probs, min_count=DEFAULT_MIN_COUNT).to_flat()
    assert all(flat[f"scores-{k}"] == [flat["scores-bins"], 1, 2] for k in range(3))


# ---------------------------------------------------------------- federated pooling


@pytest.mark.parametrize(
    "kind", ["generic", "narrow", "saturated-high", "saturated-low", "confident", "one-hot", "identical", "rounded"]
)
@pytest.mark.parametrize("min_count", [1, 5])
def test_pooled_auc_lies_within_its_reported_bound_of_sklearn(kind, min_count):
    for seed in range(10):
        sites = _pooled_sites(seed, kind)
        pooled = ScoreSummary.merge(ScoreSummary.from_flat(ScoreSummary.from_scores(y, p, min_count=min_count).to_flat())
                                    for y, p in sites)
        y, probs = _concat(sites)
        for k in range(3):
            low, high = pooled.auc_range(k)
            truth = roc_auc_score(y == k, probs[:, k])
            assert low - 1e-12 <= truth <= high + 1e-12
            assert abs(pooled.auc(k) - truth) <= pooled.auc_bound(k) + 1e-12


def test_pooled_auc_is_close_to_sklearn_on_site_sized_generic_data():
    """The bound is a worst case; the estimate itself is much closer (measured: within 0.01 at the default)."""
    errors = {1: [], DEFAULT_MIN_COUNT: []}
    for seed in range(15):
        sites = _pooled_sites(seed, "generic")
        y, probs = _concat(sites)
        for min_count, found in errors.items():
            pooled = ScoreSummary.merge(ScoreSummary.from_scores(y, p, min_count=min_count) for y, p in sites)
            found += [abs(pooled.auc(k) - roc_auc_score(y == k, probs[:, k])) for k in range(3)]
    assert np.mean(errors[1]) < 0.002 and np.mean(errors[DEFAULT_MIN_COUNT]) < 0.01


def test_sites_with_different_bins_and_minimums_pool_on_the_shared_axis():
    sites = _pooled_sites(5, "generic")
    summaries = [ScoreSummary.from_scores(y, p, bins=b, min_count=m) for (y, p), b, m in zip(sites, (1000, 200, 50), (1, 5, 10))]
    pooled = ScoreSummary.merge(summaries)
    y, probs = _concat(sites)
    assert [pooled.counts(k) for k in range(3)] == [(int((y == k).sum()), int((y != k).sum())) for k in range(3)]
    for k in range(3):
        assert abs(pooled.auc(k) - roc_auc_score(y == k, probs[:, k])) <= pooled.auc_bound(k) + 1e-12


def test_pooled_roc_curve_runs_from_origin_to_one_monotonically_and_its_area_is_the_auc():
    sites = _pooled_sites(6, "confident")
    pooled = ScoreSummary.merge(ScoreSummary.from_scores(y, p) for y, p in sites)
    for k in range(3):
        fpr, tpr, auc = pooled.roc(k)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert np.trapezoid(tpr, fpr) == pytest.approx(auc, abs=1e-12) == pooled.auc(k)


def test_one_bin_per_score_and_no_merging_gives_sklearns_auc_with_ties():
    y, probs = _concat(_pooled_sites(3, "rounded"))  # 11 distinct values: ties across classes
    summary = ScoreSummary.from_scores(y, probs, bins=MAX_SCORE_BINS, min_count=1)
    for k in range(3):
        assert summary.auc(k) == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)


def test_flat_form_roundtrips_and_ignores_other_metrics():
    y, probs = _concat(_pooled_sites(7, "generic", num_classes=4))
    summary = ScoreSummary.from_scores(y, probs, bins=256, min_count=3)
    flat = summary.to_flat()
    assert sorted(flat) == sorted(["scores-bins", "scores-min-count"] + [f"scores-{k}" for k in range(4)])
    assert (flat["scores-bins"], flat["scores-min-count"]) == (256, 3)
    restored = ScoreSummary.from_flat({**flat, "loss": 0.3, "confusion": [1, 2]})
    for k in range(4):
        np.testing.assert_array_equal(restored.intervals[k], summary.intervals[k])
    with pytest.raises(ValueError, match="pooled"):
        ScoreSummary.merge([summary, restored]).to_flat()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda f: f.pop("scores-1"), "keys"),
        (lambda f: f.pop("scores-bins"), "integers"),
        (lambda f: f.__setitem__("scores-bins", 65536), "score bins"),
        (lambda f: f.__setitem__("scores-min-count", 0), "minimum count"),
        (lambda f: f.__setitem__("scores-0", f["scores-0"][:-1]), "triples"),
        (lambda f: f.__setitem__("scores-0", []), "triples"),
        (lambda f: f.__setitem__("scores-0", [8, 3, 0, 16, 3, -1]), "non-negative"),
        (lambda f: f.__setitem__("scores-0", [8, 3, 0, 12, 3, 0]), "end at scores-bins"),
        (lambda f: f.__setitem__("scores-0", [8, 3, 0, 8, 3, 0, 16, 0, 3]), "rise strictly"),
        (lambda f: f.__setitem__("scores-0", [8, 1, 0, 16, 3, 2]), "fewer than the site's minimum"),
        (lambda f: f.__setitem__("scores-0", [16, 0.5, 1]), "integers"),
    ],
)
def test_malformed_flat_form_is_rejected(edit, match):
    flat = ScoreSummary.from_scores(np.array([0, 1, 0, 1, 1, 0]), np.eye(2)[[0, 1, 0, 1, 1, 0]], bins=16, min_count=3).to_flat()
    edit(flat)
    with pytest.raises(ValueError, match=match):
        ScoreSummary.from_flat(flat)


def test_merging_summaries_of_different_class_counts_is_rejected():
    three = ScoreSummary.from_scores(np.array([0, 1, 2]), np.eye(3))
    with pytest.raises(ValueError, match="cannot merge"):
        ScoreSummary.merge([three, ScoreSummary.from_scores(np.array([0, 1]), np.eye(2))])
    with pytest.raises(ValueError, match="no score summaries"):
        ScoreSummary.merge([])


@pytest.mark.parametrize("kind,seed", [("generic", 8), ("saturated-high", 9), ("one-hot", 10)])
def test_report_from_site_counts_equals_centralised_report_and_bounds_every_auc(kind, seed):
    sites = _pooled_sites(seed, kind)
    pooled = ScoreSummary.merge(ScoreSummary.from_scores(y, p) for y, p in sites)
    confusion = sum(confusion_counts(y, p) for y, p in sites)
    federated = report_from_summary(pooled, confusion, CLASS_NAMES_DEFAULT)
    central = classification_report(*_concat(sites), CLASS_NAMES_DEFAULT)

    exact = central.model_dump(exclude={"macro_auc", "macro_auc_bound", "per_class"})
    assert federated.model_dump(exclude={"macro_auc", "macro_auc_bound", "per_class"}) == exact
    for fed, cen in zip(federated.per_class, central.per_class, strict=True):
        assert fed.model_dump(include={"name", "support", "precision", "recall", "f1"}) == cen.model_dump(
            include={"name", "support", "precision", "recall", "f1"}
        )
        assert abs(fed.auc - cen.auc) <= fed.auc_bound + 1e-12 and cen.auc_bound is None
    assert abs(federated.macro_auc - central.macro_auc) <= federated.macro_auc_bound + 1e-12


def test_report_from_summary_rejects_counts_of_different_data():
    y, probs = _concat(_pooled_sites(11, "generic"))
    summary = ScoreSummary.from_scores(y, probs)
    confusion = confusion_counts(y, probs)
    with pytest.raises(ValueError, match="disagree"):
        report_from_summary(summary, confusion + np.eye(3, dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        report_from_summary(summary, confusion[:2, :2])


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
