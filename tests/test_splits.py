from __future__ import annotations

import numpy as np
import pytest

from pneumofed.common.data.splits import patient_kfold, train_val_test_split


def nih_like(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """146 patients with the NIH class imbalance (91/28/27), some with 2-3 ROIs of one class."""
    rng = np.random.default_rng(seed)
    patient_labels = np.repeat([0, 1, 2], [91, 28, 27])
    rois_per_patient = rng.choice([1, 2, 3], size=len(patient_labels), p=[0.8, 0.1, 0.1])
    labels = np.repeat(patient_labels, rois_per_patient)
    groups = np.repeat([f"P{i:03d}" for i in range(len(patient_labels))], rois_per_patient)
    return labels, groups


def class_shares(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=3) / len(labels)


def test_kfold_tests_every_sample_once_and_keeps_patients_together():
    labels, groups = nih_like()
    folds = patient_kfold(labels, groups, k=10, seed=0)
    assert len(folds) == 10
    tested = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tested), np.arange(len(labels)))
    for train, test in folds:
        assert len(test) > 0
        assert np.array_equal(np.union1d(train, test), np.arange(len(labels)))
        assert not set(groups[train]) & set(groups[test])


def test_kfold_preserves_class_balance_in_each_fold():
    labels, groups = nih_like()
    overall = class_shares(labels)
    for _, test in patient_kfold(labels, groups, k=10, seed=0):
        assert np.abs(class_shares(labels[test]) - overall).max() < 0.15
        assert set(labels[test]) == {0, 1, 2}  # 27+ patients per class are enough for 10 folds


def test_kfold_is_deterministic_and_seed_dependent():
    labels, groups = nih_like()
    first = patient_kfold(labels, groups, k=5, seed=3)
    again = patient_kfold(labels, groups, k=5, seed=3)
    other = patient_kfold(labels, groups, k=5, seed=4)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))


def test_kfold_survives_a_class_with_fewer_patients_than_folds():
    labels = np.array([0] * 20 + [1] * 3)
    groups = np.arange(23)
    folds = patient_kfold(labels, groups, k=10, seed=0)
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(23))
    assert sum(1 in labels[test] for _, test in folds) == 3


def test_kfold_falls_back_when_every_class_is_smaller_than_k():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    folds = patient_kfold(labels, np.arange(9), k=8, seed=0)
    assert all(len(test) for _, test in folds)
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(9))


def test_kfold_never_leaves_a_fold_empty_with_very_unequal_patients():
    # StratifiedGroupKFold's greedy assignment leaves a fold empty for this case.
    sizes = [1, 3, 5, 7, 8, 4]
    groups = np.repeat(np.arange(6), sizes)
    labels = np.array([1] * 4 + [2] * 5 + [1] * 15 + [0] * 4)
    folds = patient_kfold(labels, groups, k=6, seed=4530)
    assert all(len(test) for _, test in folds)
    assert all(len(set(groups[test])) == 1 for _, test in folds)


def test_kfold_rejects_fewer_patients_than_folds():
    with pytest.raises(ValueError, match="patients"):
        patient_kfold([0, 1, 0, 1], ["a", "a", "b", "c"], k=4)


@pytest.mark.parametrize(
    ("labels", "groups", "k"),
    [([0, 1], [0], 2), ([], [], 2), ([[0, 1]], [[0, 1]], 2), ([0, 1, 0], [0, 1, 2], 1)],
)
def test_kfold_rejects_malformed_input(labels, groups, k):
    with pytest.raises(ValueError):
        patient_kfold(labels, groups, k=k)


def test_train_val_test_partitions_patients_with_requested_shares():
    labels, groups = nih_like()
    train, val, test = train_val_test_split(labels, groups, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(labels)))
    patient_sets = [set(groups[part]) for part in (train, val, test)]
    assert not (patient_sets[0] & patient_sets[1] or patient_sets[0] & patient_sets[2] or patient_sets[1] & patient_sets[2])
    n_patients = len(set(groups))
    for patients, share in zip(patient_sets, (0.7, 0.2, 0.1)):
        assert abs(len(patients) / n_patients - share) < 0.05
    overall = class_shares(labels)
    for part in (train, val, test):
        assert np.abs(class_shares(labels[part]) - overall).max() < 0.12


def test_train_val_test_honours_other_fractions_and_empty_parts():
    labels, groups = nih_like()
    n_patients = len(set(groups))
    train, val, test = train_val_test_split(labels, groups, fractions=(0.5, 0.0, 0.5), seed=1)
    assert len(val) == 0
    assert abs(len(set(groups[test])) / n_patients - 0.5) < 0.05
    assert len(train) + len(test) == len(labels)


def test_train_val_test_is_deterministic_and_seed_dependent():
    labels, groups = nih_like()
    first = train_val_test_split(labels, groups, seed=7)
    again = train_val_test_split(labels, groups, seed=7)
    other = train_val_test_split(labels, groups, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[2], other[2])


def test_train_val_test_works_at_the_minimum_patient_count():
    labels = np.array([0, 1] * 5)
    train, val, test = train_val_test_split(labels, np.arange(10), seed=0)
    assert (len(train), len(val), len(test)) == (7, 2, 1)


@pytest.mark.parametrize(
    "fractions", [(0.7, 0.2, 0.2), (0.5, 0.5), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)]
)
def test_train_val_test_rejects_bad_fractions(fractions):
    labels, groups = nih_like()
    with pytest.raises(ValueError, match="fractions"):
        train_val_test_split(labels, groups, fractions=fractions)


def test_train_val_test_rejects_too_few_patients():
    with pytest.raises(ValueError, match="too few"):
        train_val_test_split([0, 1] * 4, np.arange(8))
