"""What the server checks in every reply before it may touch the global model or the pooled metrics.

A reply that fails a check is dropped with its reason (logged and recorded in the run's metrics)
and the round goes on with the others: no single site, faulty or hostile, can stop a run.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from pneumofed.common.federation.encoding import read_array
from pneumofed.common.metrics.histogram import ScoreSummary


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array deserialised once (Flower's `Array.numpy()` parses the bytes anew on each call);
    ValueError when one does not deserialise."""
    return {name: read_array(array, name) for name, array in arrays.items()}


def update_problem(
    global_values: Mapping[str, np.ndarray],
    reply: RecordDict,
    values: Mapping[str, np.ndarray],
    max_update_ratio: float,
    variances: Collection[str] = (),
    declared_examples: int | None = None,
) -> str | None:
    """Why this training reply must not be aggregated, or None when it is sound; `values` are its
    arrays (`as_numpy`), `global_values` the global model's.

    The norm bound is relative: ||client - global|| <= max_update_ratio * ||global||. Arrays named
    in `variances` (BatchNorm running variances) must be positive everywhere. `num-examples` may
    not exceed what the site declared when it joined the run (`declared_examples`), so no site can
    buy itself more weight in the average than its data give it.
    """
    if len(reply.array_records) != 1 or len(reply.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(reply.metric_records.values()))
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"num-examples must be a positive integer, got {num_examples!r}"
    if declared_examples is not None and num_examples > declared_examples:
        return f"num-examples {num_examples} exceeds the {declared_examples} training ROIs the site declared"
    if list(values.keys()) != list(global_values.keys()):
        return f"array keys differ from the global model ({len(values)} vs {len(global_values)} arrays)"
    if (problem := arrays_problem(global_values, values, variances)) is not None:
        return problem
    ratio = update_norm(global_values, values) / max(_norm(global_values), 1e-12)
    if ratio > max_update_ratio:
        return f"update norm is {ratio:.3g}x the global model's (bound {max_update_ratio:g}x)"
    return None


def arrays_problem(
    expected: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray], variances: Collection[str] = ()
) -> str | None:
    """Why `values` (holding every name of `expected`) are not arrays of `expected`'s shapes and
    dtypes, finite, with the arrays named in `variances` positive everywhere; None when they are."""
    for name, reference in expected.items():
        received = values[name]
        if received.shape != reference.shape:
            return f"{name}: shape {received.shape} != {reference.shape}"
        if received.dtype != reference.dtype:
            return f"{name}: dtype {received.dtype} != {reference.dtype}"
        if not np.isfinite(received).all():
            return f"{name}: contains NaN or infinite values"
        if name in variances and not (received > 0).all():
            return f"{name}: a BatchNorm variance is not positive"
    return None


def update_norm(
    global_values: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray], excluded: Collection[str] = ()
) -> float:
    """||values - global_values|| over the arrays not named in `excluded` (float64)."""
    return math.sqrt(sum(
        float(np.sum((values[name].astype(np.float64) - reference) ** 2))
        for name, reference in global_values.items()
        if name not in excluded
    ))


def _norm(values: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(array.astype(np.float64) ** 2)) for array in values.values()))


def outlying_norms(norms: dict[int, float], max_median_ratio: float) -> dict[int, str]:
    """Nodes whose update is more than `max_median_ratio` times the round's median update norm,
    with the reason. Needs three updates: with fewer the median is one of two candidates."""
    if len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    return {
        node: f"update norm {norm:.3g} is {norm / median:.3g}x the round's median {median:.3g} (bound {max_median_ratio:g}x)"
        for node, norm in norms.items()
        if median > 0 and norm > max_median_ratio * median
    }


def evaluation_problem(reply: RecordDict, num_classes: int) -> str | None:
    """Why this evaluation reply must not be pooled, or None when its counts are consistent.

    Every count must be a non-negative integer, the loss finite, the confusion matrix K x K and sum
    to `num-examples`; the score summary must tile the score axis in intervals of at least its
    site's minimum count and hold, per class, exactly the confusion matrix's positives and every
    evaluated ROI once.
    """
    if len(reply.metric_records) != 1 or reply.array_records:
        return "expected exactly one MetricRecord and no arrays"
    metrics = next(iter(reply.metric_records.values()))
    missing = sorted({"num-examples", "eval-loss", "eval-accuracy", "confusion"} - set(metrics))
    if missing:
        return f"missing metrics {missing}"
    num_examples = metrics["num-examples"]
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"num-examples must be a positive integer, got {num_examples!r}"
    loss, accuracy = metrics["eval-loss"], metrics["eval-accuracy"]
    if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        return f"eval-loss must be a finite non-negative number, got {loss!r}"
    if not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        return f"eval-accuracy must lie in [0, 1], got {accuracy!r}"
    confusion = metrics["confusion"]
    if not isinstance(confusion, list) or len(confusion) != num_classes**2:
        return f"confusion must list {num_classes}x{num_classes} counts"
    if any(type(count) is not int or count < 0 for count in confusion):
        return "confusion counts must be non-negative integers"
    matrix = np.asarray(confusion, dtype=np.int64).reshape(num_classes, num_classes)
    if int(matrix.sum()) != num_examples:
        return f"confusion counts {int(matrix.sum())} ROIs but num-examples says {num_examples}"
    try:
        summary = ScoreSummary.from_flat(metrics)
    except ValueError as error:
        return f"score summary: {error}"
    if summary.num_classes != num_classes:
        return f"score summary has {summary.num_classes} classes, the run {num_classes}"
    counts = [summary.counts(k) for k in range(num_classes)]
    if [positives for positives, _ in counts] != matrix.sum(axis=1).tolist():
        return "score summary positives disagree with the confusion matrix"
    if any(positives + negatives != num_examples for positives, negatives in counts):
        return "score summary does not count every evaluated ROI once per class"
    return None
