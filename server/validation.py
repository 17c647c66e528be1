"""What the server checks in every reply before it may touch the global model."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from flwr.app import ArrayRecord, RecordDict


def update_problem(
    global_arrays: ArrayRecord, reply: RecordDict, max_update_ratio: float, variances: Collection[str] = ()
) -> str | None:
    """Why this training reply must not be aggregated, or None when it is sound.

    The norm bound is relative: ||client - global|| <= max_update_ratio * ||global||. Arrays named
    in `variances` (BatchNorm running variances) must be positive everywhere.
    """
    if len(reply.array_records) != 1 or len(reply.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(reply.metric_records.values()))
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"num-examples must be a positive integer, got {num_examples!r}"
    arrays = next(iter(reply.array_records.values()))
    if list(arrays.keys()) != list(global_arrays.keys()):
        return f"array keys differ from the global model ({len(arrays)} vs {len(global_arrays)} arrays)"
    delta_sq = reference_sq = 0.0
    for name, expected in global_arrays.items():
        received = arrays[name]
        if tuple(received.shape) != tuple(expected.shape):
            return f"{name}: shape {tuple(received.shape)} != {tuple(expected.shape)}"
        if received.dtype != expected.dtype:
            return f"{name}: dtype {received.dtype} != {expected.dtype}"
        values, reference = received.numpy(), expected.numpy()
        if not np.isfinite(values).all():
            return f"{name}: contains NaN or infinite values"
        if name in variances and not (values > 0).all():
            return f"{name}: a BatchNorm variance is not positive"
        delta_sq += float(np.sum((values.astype(np.float64) - reference) ** 2))
        reference_sq += float(np.sum(reference.astype(np.float64) ** 2))
    ratio = np.sqrt(delta_sq) / max(np.sqrt(reference_sq), 1e-12)
    if ratio > max_update_ratio:
        return f"update norm is {ratio:.3g}x the global model's (bound {max_update_ratio:g}x)"
    return None
