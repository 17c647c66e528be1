"""Classification reports: accuracy, per-class precision/recall/F1 and one-vs-rest ROC/AUC.

Centralised evaluation has every score and uses scikit-learn directly (`classification_report`).
Federated evaluation never sees scores: sites send coarse, k-anonymous score summaries
(`histogram.ScoreSummary`) and a confusion matrix, and the server builds the same
`ClassificationReport` from them (`histogram.report_from_summary`), each AUC with its bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

CLASS_NAMES_DEFAULT = ("nodule", "interstitial", "emphysema")

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
    # Federated reports: the AUC of the concatenated scores lies within this of `auc` (None: exact).
    auc_bound: float | None = None


class ClassificationReport(BaseModel):
    num_samples: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    macro_auc: float | None
    macro_auc_bound: float | None = None
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.per_class]


def validate_scores(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def check_class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
    return list(class_names)


def confusion_counts(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = argmax prediction."""
    y, probs = validate_scores(y_true, probs)
    return _confusion(y, probs.argmax(axis=1), probs.shape[1])


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    # numpy rather than scikit-learn: a site's evaluation needs only this, and each of its messages
    # may run in a new process that would otherwise import scikit-learn (seconds of CPU) for it.
    return np.bincount(np.asarray(y_true, dtype=np.int64) * k + y_pred, minlength=k * k).reshape(k, k)


def report_from_confusion(
    names: list[str],
    confusion: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    weights: np.ndarray | None,
    rocs: list[tuple[np.ndarray, np.ndarray, float] | None],
) -> ClassificationReport:
    from sklearn.metrics import precision_recall_fscore_support  # see _confusion

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


def one_vs_rest_roc(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None):
    """(fpr, tpr, auc) or None when the class has no positives or no negatives."""
    from sklearn.metrics import auc as area_under_curve
    from sklearn.metrics import roc_curve

    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive, scores, sample_weight=weights)
    return fpr, tpr, area_under_curve(fpr, tpr)  # what roc_auc_score computes, without a second pass


def classification_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str] = CLASS_NAMES_DEFAULT
) -> ClassificationReport:
    """Report of argmax predictions and one-vs-rest ROC/AUC computed on the exact scores."""
    y, probs = validate_scores(y_true, probs)
    names = check_class_names(class_names, probs.shape[1])
    y_pred = probs.argmax(axis=1)
    confusion = _confusion(y, y_pred, len(names))
    rocs = [one_vs_rest_roc(y == k, probs[:, k]) for k in range(len(names))]
    return report_from_confusion(names, confusion, y, y_pred, None, rocs)



def selection_key(macro_auc: float | None, loss: float) -> tuple[float, float]:
    """How a best epoch (centralised) or best round (federated) is chosen: highest validation macro
    AUC, lower validation loss breaking ties (near-constant early scores all give 0.5) and deciding
    when no AUC is defined. Larger keys are better."""
    return (float("-inf") if macro_auc is None else macro_auc, -loss)
