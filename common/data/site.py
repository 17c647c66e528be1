"""One hospital's data as the federated apps see it: its ROI store split by patient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pneumofed.common.data.splits import train_val_test_split
from pneumofed.common.data.store import (
    RoiDataset,
    RoiStore,
    StoreRequirements,
    open_stores,
)


@dataclass(frozen=True)
class SiteData:
    """Patient-grouped 70/20/10 parts of one site's ROI store (the seed's proportions).

    `val` drives federated evaluation and model selection every round; `test` is touched
    once, by the final evaluation of the selected model.
    """

    store: RoiStore
    train: RoiDataset
    val: RoiDataset
    test: RoiDataset

    def part(self, name: str) -> RoiDataset:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown data part {name!r}; expected train, val or test")
        return getattr(self, name)


def load_site(data_path: str | Path, seed: int, required: StoreRequirements | None = None) -> SiteData:
    path = Path(data_path)
    return _load_site_cached(path, _index_version(path), seed, required)


def split_key(data_path: str | Path, seed: int) -> str:
    """What a site's split depends on: the store (path and index version) and the seed."""
    path = Path(data_path)
    return f"{path}|{_index_version(path)}|{seed}"


def load_site_with_split(
    data_path: str | Path, parts: tuple[Sequence[int], Sequence[int], Sequence[int]], required: StoreRequirements | None = None
) -> SiteData:
    """The site as `load_site` split it before, from its (train, val, test) indices kept under the
    same `split_key` (a ClientApp keeps them in its context state: a new process then skips the
    splitter, seconds for a site of a thousand ROIs, and the import of scikit-learn)."""
    path = Path(data_path)
    return _load_split_site_cached(path, _index_version(path), tuple(tuple(part) for part in parts), required)


@lru_cache(maxsize=1024)
def _load_split_site_cached(
    path: Path, index_version: str, parts: tuple[tuple[int, ...], ...], required: StoreRequirements | None
) -> SiteData:
    store = _open_store_cached(path, index_version, required)
    train, val, test = (RoiDataset(store, indices) for indices in parts)
    return SiteData(store=store, train=train, val=val, test=test)


def _index_version(path: Path) -> str:
    """The index's modification time and size: a re-prepared store changes them (a copy that keeps
    the time, as `cp -p` does, still changes the size unless the index is byte for byte the same)."""
    if not path.is_absolute():
        raise ValueError(f"data-path must be absolute (each message may run in a new process), got {path}")
    index_file = path / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"no ROI store at {path}: run `pneumofed prepare` for this site first")
    stat = index_file.stat()
    return f"{stat.st_mtime_ns}-{stat.st_size}"


@lru_cache(maxsize=1024)  # a simulation worker serves many sites, each message anew
def _open_store_cached(path: Path, index_version: str, required: StoreRequirements | None) -> RoiStore:
    # Keyed on the index's version so a re-prepared store is picked up by long-lived workers; one
    # store per site and process, however its split was obtained.
    (store,) = open_stores([path], required)
    return store


@lru_cache(maxsize=1024)
def _load_site_cached(path: Path, index_version: str, seed: int, required: StoreRequirements | None) -> SiteData:
    store = _open_store_cached(path, index_version, required)
    labels = np.asarray(store.labels)
    train, val, test = train_val_test_split(labels, np.asarray(store.patient_keys), seed=seed)
    return SiteData(
        store=store,
        train=RoiDataset(store, train),
        val=RoiDataset(store, val),
        test=RoiDataset(store, test),
    )
