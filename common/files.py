"""Writing files so that a reader (or a crash) never sees half of one."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write `data` to a temporary file in the same folder, fsync, then `os.replace` it over `path`.

    Readers see the old file or the new one, never a mix. The new file gets `mode` from its
    creation on (a secret is never readable by others, not even for a moment).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """Atomic, indented JSON; NaN and infinity are refused (they are not JSON)."""
    return atomic_write(path, json.dumps(value, indent=1, allow_nan=False))


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Atomic CSV with a header; `columns` defaults to every key in order of first appearance."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())
