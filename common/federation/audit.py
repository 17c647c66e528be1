"""Append-only JSONL audit logs: what a hospital's node sent, and what the coordinator's runs did.

A hospital's log (node config `audit-log`) gets a `run-joined` record the first time a run
reaches the node and one `reply` record per reply: run id, round, message kind, size in bytes
and SHA-256 of the arrays as sent (encoded as `update-encoding` says, int8 scales included),
and the metric keys (never metric values or data, except a DP-SGD site's privacy spend: the
epsilon after the round, the round's own and delta, its own record of what it gave). The server's run
log gets one record per event (start, each round with its participants and the global model's
digest, end). Each record is one line written with a single `write` under an exclusive lock, so
concurrent ClientApp processes never interleave lines.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

Arrays = Mapping[str, np.ndarray] | ArrayRecord
# The metrics a site's TRAIN reply carries under DP-SGD (docs/privacy.md).
PRIVACY_METRICS = ("dp-epsilon", "dp-round-epsilon", "dp-delta")


def array_digest(arrays: Arrays) -> str:
    """SHA-256 over the arrays in name order, covering each name, dtype, shape and raw bytes.

    Equal for the same arrays given as numpy or as a Flower ArrayRecord, so a hospital's log and
    the coordinator's log can be matched entry by entry.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays.keys()):
        array = np.ascontiguousarray(_as_numpy(arrays[name]))
        header = json.dumps([name, array.dtype.str, list(array.shape)])
        digest.update(len(header).to_bytes(8, "big") + header.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def array_bytes(arrays: Arrays) -> int:
    return int(sum(_as_numpy(arrays[name]).nbytes for name in arrays))


def _as_numpy(value: Any) -> np.ndarray:
    # A Flower `Array` converts itself; anything else is taken as array-like.
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def reply_summary(content: RecordDict) -> dict[str, Any]:
    """What a reply carries, per record: arrays as digest + byte count, metrics as key names only
    (and the values of a DP-SGD privacy spend, under `privacy`)."""
    arrays = {name: {"sha256": array_digest(record), "bytes": array_bytes(record), "count": len(record)}
              for name, record in content.array_records.items()}
    metric_keys = {name: sorted(record.keys()) for name, record in content.metric_records.items()}
    config_keys = {name: sorted(record.keys()) for name, record in content.config_records.items()}
    summary = {"arrays": arrays, "metric_keys": metric_keys, "config_keys": config_keys}
    privacy = {key: record[key] for record in content.metric_records.values() for key in PRIVACY_METRICS if key in record}
    return summary | ({"privacy": privacy} if privacy else {})


def append_reply_audit(
    path: str | Path, *, run_id: int, server_round: int, kind: str, content: RecordDict, node_id: int | None = None
) -> dict[str, Any]:
    """Record one reply this node is about to send (and, first time for `run_id`, that it joined)."""
    record = {"event": "reply", "run_id": run_id, "node_id": node_id, "round": server_round, "kind": kind,
              **reply_summary(content)}
    joined = {"event": "run-joined", "run_id": run_id, "node_id": node_id}

    def records(existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
        known = any(e.get("event") == "run-joined" and e.get("run_id") == run_id for e in existing)
        return [record] if known else [joined, record]

    _append(Path(path), records)
    return record


def append_run_audit(
    path: str | Path,
    *,
    run_id: int,
    event: str,
    server_round: int | None = None,
    participants: Iterable[int | str] = (),
    arrays: Arrays | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a coordinator-side event, e.g. `run-started`, `round` (participants, global model), `run-finished`."""
    record: dict[str, Any] = {"event": event, "run_id": run_id}
    if server_round is not None:
        record["round"] = server_round
    if participants:
        record["participants"] = sorted(str(p) for p in participants)
    if arrays is not None:
        record["global_model_sha256"] = array_digest(arrays)
    if details:
        record["details"] = dict(details)
    _append(Path(path), lambda _existing: [record])
    return record


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append(path: Path, records: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Append `records(existing entries)`, deciding and writing under one exclusive lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        time = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        lines = [json.dumps({"time": time, **entry}, allow_nan=False) + "\n" for entry in records(read_audit(path))]
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)
