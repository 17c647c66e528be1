"""The site-local ROI store: a validated index plus uint8 pixel shards, loaded into memory once.

Layout of a store folder (written by ``pneumofed prepare``)::

    index.json               RoiIndex: settings, class names, one RoiRecord per ROI
    pixels/<sha256>.npy      uint8 (k, S, S): the k ROIs cut from the source file with that SHA-256
    .prepare.lock            only while a writer runs: its exclusive flock (see `store_write_lock`)

The store is pseudonymous: a record knows its source only by content hash and its patient only by
an HMAC of the PatientID under a secret that never leaves the site. It holds no names, dates,
accession numbers, institution names, UIDs or file names.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from pneumofed.common.files import atomic_write

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PIXELS_DIR = "pixels"
LOCK_FILE = ".prepare.lock"

_HEX64 = r"^[0-9a-f]{64}$"


class RoiRecord(BaseModel):
    """One region of interest. ``box`` is (x, y, width, height) in the source file's stored pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    roi_id: str
    source_sha256: str = Field(pattern=_HEX64)
    row: int = Field(ge=0)
    label: int = Field(ge=0)
    finding: str
    patient_key: str = Field(pattern=_HEX64)
    box: tuple[int, int, int, int]
    image_shape: tuple[int, int]  # (height, width) of the source image, so boxes can be re-checked


class RoiIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    roi_size: int = Field(ge=8)
    spacing_mm: float | None = Field(default=None, gt=0)
    class_names: tuple[str, ...] = Field(min_length=1)
    # HMAC of a fixed message under the site secret: tells a later run whether the secret changed
    # (then every patient key must be recomputed) without revealing anything about the secret.
    secret_check: str = Field(pattern=_HEX64)
    records: tuple[RoiRecord, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> RoiIndex:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"unsupported store format {self.format_version}; re-run `pneumofed prepare`")
        seen: set[tuple[str, int]] = set()
        for record in self.records:
            if record.label >= len(self.class_names) or self.class_names[record.label] != record.finding:
                raise ValueError(f"ROI {record.roi_id}: label {record.label} does not name {record.finding!r}")
            if (record.source_sha256, record.row) in seen:
                raise ValueError(f"ROI {record.roi_id}: shard row used twice")
            seen.add((record.source_sha256, record.row))
        return self


def shard_path(store_dir: Path, source_sha256: str) -> Path:
    return store_dir / PIXELS_DIR / f"{source_sha256}.npy"


def write_shard(store_dir: Path, source_sha256: str, rois: np.ndarray) -> None:
    if rois.dtype != np.uint8 or rois.ndim != 3:
        raise ValueError(f"a shard is uint8 (k, S, S), got {rois.dtype} {rois.shape}")
    buffer = io.BytesIO()
    np.save(buffer, rois, allow_pickle=False)
    atomic_write(shard_path(store_dir, source_sha256), buffer.getvalue())


def write_index(store_dir: Path, index: RoiIndex) -> None:
    atomic_write(store_dir / INDEX_FILE, index.model_dump_json(indent=1))


class StoreBusy(RuntimeError):
    """Another process holds the store's writer lock."""


@contextmanager
def store_write_lock(store_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive writer lock of the store in `store_dir` (created if missing) while the block runs.

    Non-blocking: raises `StoreBusy` at once when another writer holds it, so two `pneumofed prepare`
    runs can never interleave their shards and indexes (the later index would silently drop the
    earlier run's ROIs). The lock is an `flock` on `store_dir/.prepare.lock`, released by the kernel
    when its holder dies, so a crashed run never blocks the next one. The file is removed on release
    (while still locked), so a finished store holds only its index and shards; a run that opened
    the file just before it was removed notices it locked an unlinked file and starts over.
    """
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreBusy(
                    f"ROI store {store_dir} is being written by another `pneumofed prepare` (it holds {path}); "
                    "wait for that run to finish, then run again"
                ) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the current file
    try:
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def read_index(store_dir: Path) -> RoiIndex:
    path = Path(store_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no ROI store at {store_dir} (missing {INDEX_FILE}): run `pneumofed prepare`")
    return RoiIndex.model_validate_json(path.read_bytes())


class RoiStore:
    """All ROIs of one store in memory: ``images`` uint8 (N, 1, S, S), ``labels`` int64 (N,)."""

    def __init__(self, path: Path, index: RoiIndex, images: Tensor) -> None:
        self.path = path
        self.index = index
        self.images = images
        self.labels = torch.tensor([r.label for r in index.records], dtype=torch.int64)
        self.patient_keys = [r.patient_key for r in index.records]

    @classmethod
    def open(cls, path: str | Path) -> RoiStore:
        path = Path(path)
        index = read_index(path)
        size = index.roi_size
        images = torch.empty((len(index.records), 1, size, size), dtype=torch.uint8)
        shards: dict[str, np.ndarray] = {}
        for i, record in enumerate(index.records):
            shard = shards.get(record.source_sha256)
            if shard is None:
                shard = shards[record.source_sha256] = _load_shard(path, record.source_sha256, size)
            if record.row >= len(shard):
                raise ValueError(f"ROI {record.roi_id}: row {record.row} beyond its shard of {len(shard)}")
            images[i, 0] = torch.from_numpy(shard[record.row])
        return cls(path, index, images)

    def __len__(self) -> int:
        return len(self.index.records)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts, strict=True))


class StoreMismatch(ValueError):
    """ROIs were not prepared the way their user expects (ROI size, spacing or classes differ)."""


@dataclass(frozen=True)
class StoreRequirements:
    """What a caller needs of a store; a field left None is not checked."""

    roi_size: int | None = None
    class_names: tuple[str, ...] | None = None
    spacing_mm: float | None = None
    required_by: str = "the caller"  # named in the error: "the model", "the run", ...

    def problem(self, store: RoiStore) -> str | None:
        index = store.index
        if self.roi_size is not None and index.roi_size != self.roi_size:
            return (
                f"store {store.path} holds {index.roi_size}-px ROIs but {self.required_by} expects "
                f"{self.roi_size}-px ROIs; re-run `pneumofed prepare` with --roi-size {self.roi_size}"
            )
        if self.class_names is not None and tuple(index.class_names) != tuple(self.class_names):
            return (
                f"store {store.path} has classes {list(index.class_names)} but {self.required_by} uses "
                f"{list(self.class_names)} (same names in the same order are required); re-run `pneumofed prepare`"
            )
        if self.spacing_mm is not None and index.spacing_mm != self.spacing_mm:
            return (
                f"store {store.path} was prepared at spacing {index.spacing_mm} mm but {self.required_by} expects "
                f"{self.spacing_mm} mm; re-run `pneumofed prepare` with --spacing-mm {self.spacing_mm}"
            )
        return None


def open_stores(paths: Sequence[str | Path], required: StoreRequirements | None = None) -> list[RoiStore]:
    """The one way to open ROI stores: each is loaded and validated, all share ROI size, spacing and
    class names (so they can be pooled), and each meets `required` when given."""
    if not paths:
        raise ValueError("need at least one ROI store")
    stores = [RoiStore.open(path) for path in paths]
    first = stores[0].index
    for store in stores[1:]:
        index = store.index
        if (index.class_names, index.roi_size, index.spacing_mm) != (first.class_names, first.roi_size, first.spacing_mm):
            raise StoreMismatch(
                f"{store.path} ({index.roi_size} px, {index.spacing_mm} mm, {list(index.class_names)}) does not match "
                f"{stores[0].path} ({first.roi_size} px, {first.spacing_mm} mm, {list(first.class_names)}): "
                "prepare them with the same settings"
            )
    problem = None if required is None else required.problem(stores[0])
    if problem is not None:
        raise StoreMismatch(problem)
    return stores


@dataclass(frozen=True)
class PooledRois:
    """The ROIs of several matching stores side by side; `origin[i]` is the store ROI i came from."""

    class_names: tuple[str, ...]
    roi_size: int
    spacing_mm: float | None
    secret_check: str
    records: tuple[RoiRecord, ...]
    images: Tensor  # uint8 (N, 1, S, S)
    labels: Tensor  # int64 (N,)
    origin: np.ndarray  # int (N,)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def patient_keys(self) -> np.ndarray:
        """Each ROI's site pseudonym (stores keyed with one secret share a patient's key)."""
        return np.array([r.patient_key for r in self.records])

    @property
    def site_patient_keys(self) -> np.ndarray:
        """`<store position>:<pseudonym>`: patients of different stores are never merged."""
        return np.array([f"{origin}:{r.patient_key}" for origin, r in zip(self.origin, self.records, strict=True)])

    def subset(self, indices: Sequence[int] | np.ndarray | None = None) -> RoiDataset:
        return RoiDataset(self, indices)


def pool_stores(paths: Sequence[str | Path]) -> PooledRois:
    stores = open_stores(paths)
    first = stores[0].index
    checks = sorted({s.index.secret_check for s in stores})
    return PooledRois(
        class_names=first.class_names,
        roi_size=first.roi_size,
        spacing_mm=first.spacing_mm,
        # One store keeps its own check; a pool of several secrets matches none of them, so
        # `pneumofed prepare` pointed at a derived store rebuilds it rather than mixing keys.
        secret_check=checks[0] if len(checks) == 1 else hashlib.sha256("".join(checks).encode()).hexdigest(),
        records=tuple(r for s in stores for r in s.index.records),
        images=torch.cat([s.images for s in stores]),
        labels=torch.cat([s.labels for s in stores]),
        origin=np.concatenate([np.full(len(s), i) for i, s in enumerate(stores)]),
    )


def _load_shard(store_dir: Path, source_sha256: str, size: int) -> np.ndarray:
    path = shard_path(store_dir, source_sha256)
    if not path.is_file():
        raise FileNotFoundError(f"ROI store {store_dir} is incomplete: missing {path.name}; re-run `pneumofed prepare`")
    shard = np.load(path, allow_pickle=False)
    if shard.dtype != np.uint8 or shard.ndim != 3 or shard.shape[1:] != (size, size):
        raise ValueError(f"shard {path.name} is {shard.dtype} {shard.shape}, expected uint8 (k, {size}, {size})")
    return shard


@dataclass(frozen=True)
class RoiArrays:
    """ROIs in memory with no store behind them (e.g. a training part grown by offline augmentation)."""

    images: Tensor  # uint8 (N, 1, S, S)
    labels: Tensor  # int64 (N,)
    patient_keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)


class RoiDataset(Dataset):
    """Items ``(float32 (1, S, S) in [0, 1], int label)`` indexed straight out of preloaded ROIs.

    ``store`` is a `RoiStore`, `PooledRois` or `RoiArrays`: uint8 ``images`` (N, 1, S, S), int64
    ``labels`` and per-ROI ``patient_keys``.
    """

    def __init__(self, store: RoiStore | PooledRois | RoiArrays, indices: Sequence[int] | np.ndarray | Tensor | None = None) -> None:
        self.store = store
        selected = torch.arange(len(store)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        if selected.ndim != 1:
            raise ValueError("indices must be one-dimensional")
        if len(selected) and (int(selected.min()) < 0 or int(selected.max()) >= len(store)):
            raise IndexError(f"indices must lie in [0, {len(store)})")
        self.indices = selected

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> Tensor:
        return self.store.labels[self.indices]

    @property
    def patient_keys(self) -> list[str]:
        return [self.store.patient_keys[i] for i in self.indices.tolist()]

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        i = int(self.indices[item])
        return self.store.images[i].float().div_(255.0), int(self.store.labels[i])

    def __getitems__(self, items: Sequence[int]) -> list[tuple[Tensor, int]]:
        # DataLoader's batched fetch: one gather and one conversion per batch instead of per item.
        rows = self.indices[torch.as_tensor(items, dtype=torch.int64)]
        images = self.store.images[rows].float().div_(255.0)
        return list(zip(images, self.store.labels[rows].tolist(), strict=True))
