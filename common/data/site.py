"""One hospital's data as the federated apps see it: its ROI store split by patient."""

from __future__ import annotations

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
    if not path.is_absolute():
        raise ValueError(f"data-path must be absolute (each message may run in a new process), got {path}")
    index_file = path / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"no ROI store at {path}: run `pneumofed prepare` for this site first")
    return _load_site_cached(path, index_file.stat().st_mtime_ns, seed, required)


@lru_cache(maxsize=1024)  # a simulation worker serves many sites, each message anew
def _load_site_cached(path: Path, _index_mtime_ns: int, seed: int, required: StoreRequirements | None) -> SiteData:
    # Keyed on the index's mtime so a re-prepared store is picked up by long-lived workers.
    (store,) = open_stores([path], required)
    labels = np.asarray(store.labels)
    train, val, test = train_val_test_split(labels, np.asarray(store.patient_keys), seed=seed)
    return SiteData(
        store=store,
        train=RoiDataset(store, train),
        val=RoiDataset(store, val),
        test=RoiDataset(store, test),
    )
