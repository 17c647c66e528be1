"""Patient-grouped, class-stratified data splits.

Every ROI of one patient lands in the same part, so a model is never tested on a patient it saw in
training (the seed paper split ROIs, which lets one patient's ROIs leak across folds).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

# train_val_test_split cuts the patients into this many folds (fewer for small sets), so fractions
# that are multiples of 1/20 are honoured exactly in fold counts.
FOLD_RESOLUTION = 20


def _validated(labels: Sequence | np.ndarray, groups: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.ndim != 1 or groups.ndim != 1:
        raise ValueError(f"labels and groups must be 1-D, got shapes {labels.shape} and {groups.shape}")
    if len(labels) != len(groups):
        raise ValueError(f"labels ({len(labels)}) and groups ({len(groups)}) differ in length")
    if len(labels) == 0:
        raise ValueError("cannot split an empty data set")
    return labels, groups


def _test_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Test indices of k patient-disjoint folds, class-stratified when the data allow it."""
    # Imported here: every new ClientApp process imports this module, and most never split.
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_patients = len(np.unique(groups))
    if n_patients < k:
        raise ValueError(f"{n_patients} patients cannot fill {k} folds; need at least {k} patients")
    placeholder = np.zeros(len(labels))
    _, class_counts = np.unique(labels, return_counts=True)
    if class_counts.max() >= k:
        with warnings.catch_warnings():
            # A class with fewer members than folds simply misses some folds; that is expected here.
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            folds = [test for _, test in splitter.split(placeholder, labels, groups)]
        if all(len(test) for test in folds):
            return folds
    # Stratification is impossible (every class smaller than k) or its greedy assignment left a
    # fold empty (a few very large patients): plain patient-grouped folds always fill every fold.
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(placeholder, labels, groups)]


def patient_kfold(
    labels: Sequence | np.ndarray, groups: Sequence | np.ndarray, k: int = 10, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) index pairs; each sample is tested exactly once, patients never straddle."""
    labels, groups = _validated(labels, groups)
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    everything = np.arange(len(labels))
    return [
        (np.setdiff1d(everything, test), np.sort(test)) for test in _test_folds(labels, groups, k, seed)
    ]


def _apportion(fractions: np.ndarray, k: int) -> np.ndarray:
    """Whole fold counts per part summing to k (largest remainder), at least one per non-zero part."""
    exact = fractions * k
    counts = np.floor(exact + 1e-9).astype(int)
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[: k - counts.sum()]] += 1
    for part in np.flatnonzero((fractions > 0) & (counts == 0)):
        counts[np.argmax(counts)] -= 1
        counts[part] = 1
    return counts


def train_val_test_split(
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, val, test) index arrays with about `fractions` of the patients each."""
    labels, groups = _validated(labels, groups)
    shares = np.asarray(fractions, dtype=float)
    if shares.shape != (3,) or np.any(shares < 0) or shares[0] == 0:
        raise ValueError(f"fractions must be three non-negative numbers with train > 0, got {fractions}")
    if not math.isclose(shares.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {shares.sum():.6g})")
    shares = shares / shares.sum()
    n_patients = len(np.unique(groups))
    needed = math.ceil(1 / shares[shares > 0].min() - 1e-9)
    if n_patients < needed:
        raise ValueError(f"{n_patients} patients are too few for fractions {fractions}; need {needed}")
    k = min(n_patients, FOLD_RESOLUTION)
    folds = _test_folds(labels, groups, k, seed)
    order = np.random.default_rng(seed).permutation(k)
    bounds = np.cumsum(_apportion(shares, k))[:-1]
    parts = np.split(order, bounds)
    return tuple(
        np.sort(np.concatenate([folds[i] for i in part])).astype(np.int64)
        if len(part)
        else np.empty(0, dtype=np.int64)
        for part in parts
    )
