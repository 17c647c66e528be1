from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader

from pneumofed.common.data.store import (
    INDEX_FILE,
    RoiDataset,
    RoiIndex,
    RoiRecord,
    RoiStore,
    shard_path,
    write_index,
    write_shard,
)

SIZE = 8
CLASSES = ("nodule", "interstitial", "emphysema")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record(source: str, row: int, label: int, patient: str = "p") -> RoiRecord:
    return RoiRecord(
        roi_id=f"{source}-{row}",
        source_sha256=sha(source),
        row=row,
        label=label,
        finding=CLASSES[label],
        patient_key=sha(patient),
        box=(0, 0, 40, 40),
        image_shape=(64, 64),
    )


def make_index(records: list[RoiRecord]) -> RoiIndex:
    return RoiIndex(roi_size=SIZE, class_names=CLASSES, secret_check=sha("secret"), records=tuple(records))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """Two shards: file 'a' with ROIs of value 10 and 20, file 'b' with one ROI of value 255."""
    write_shard(tmp_path, sha("a"), np.stack([np.full((SIZE, SIZE), 10, np.uint8), np.full((SIZE, SIZE), 20, np.uint8)]))
    write_shard(tmp_path, sha("b"), np.full((1, SIZE, SIZE), 255, np.uint8))
    records = [record("b", 0, 0, "q"), record("a", 1, 1), record("a", 0, 0)]
    write_index(tmp_path, make_index(records))
    return tmp_path


def test_open_loads_every_roi_in_index_order(store_dir: Path) -> None:
    store = RoiStore.open(store_dir)
    assert len(store) == 3
    assert store.images.dtype == torch.uint8 and store.images.shape == (3, 1, SIZE, SIZE)
    assert store.images[:, 0, 0, 0].tolist() == [255, 20, 10]
    assert store.labels.tolist() == [0, 1, 0] and store.labels.dtype == torch.int64
    assert store.patient_keys == [sha("q"), sha("p"), sha("p")]
    assert store.class_counts() == {"nodule": 2, "interstitial": 1, "emphysema": 0}


def test_dataset_items_are_float_images_in_unit_range(store_dir: Path) -> None:
    dataset = RoiDataset(RoiStore.open(store_dir), indices=[2, 0])
    assert len(dataset) == 2
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (1, SIZE, SIZE)
    assert torch.allclose(image, torch.full_like(image, 10 / 255)) and label == 0
    assert dataset[1][0].max().item() == 1.0
    assert dataset.labels.tolist() == [0, 0]
    assert dataset.patient_keys == [sha("p"), sha("q")]


def test_batched_loading_matches_item_by_item(store_dir: Path) -> None:
    dataset = RoiDataset(RoiStore.open(store_dir))
    images, labels = next(iter(DataLoader(dataset, batch_size=3, shuffle=False)))
    expected = torch.stack([dataset[i][0] for i in range(3)])
    assert torch.equal(images, expected)
    assert labels.tolist() == [dataset[i][1] for i in range(3)]


def test_dataset_rejects_out_of_range_indices(store_dir: Path) -> None:
    with pytest.raises(IndexError):
        RoiDataset(RoiStore.open(store_dir), indices=[0, 3])


def test_index_rejects_label_that_does_not_name_the_finding() -> None:
    bad = record("a", 0, 0).model_copy(update={"finding": "emphysema"})
    with pytest.raises(ValidationError, match="does not name"):
        make_index([bad])


def test_index_rejects_shard_row_used_twice() -> None:
    with pytest.raises(ValidationError, match="used twice"):
        make_index([record("a", 0, 0), record("a", 0, 1)])


def test_index_rejects_unknown_fields_and_non_hash_keys(store_dir: Path) -> None:
    with pytest.raises(ValidationError):
        RoiRecord.model_validate({**record("a", 0, 0).model_dump(), "patient_name": "DOE^JANE"})
    with pytest.raises(ValidationError):
        RoiRecord.model_validate({**record("a", 0, 0).model_dump(), "patient_key": "JANE-DOE"})


def test_missing_index_says_how_to_create_the_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pneumofed prepare"):
        RoiStore.open(tmp_path)


def test_missing_shard_is_reported(store_dir: Path) -> None:
    shard_path(store_dir, sha("b")).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        RoiStore.open(store_dir)


def test_shard_of_wrong_size_is_reported(store_dir: Path) -> None:
    write_shard(store_dir, sha("b"), np.zeros((1, SIZE + 1, SIZE + 1), np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        RoiStore.open(store_dir)


def test_row_beyond_shard_is_reported(tmp_path: Path) -> None:
    write_shard(tmp_path, sha("a"), np.zeros((1, SIZE, SIZE), np.uint8))
    write_index(tmp_path, make_index([record("a", 1, 0)]))
    with pytest.raises(ValueError, match="beyond its shard"):
        RoiStore.open(tmp_path)


def test_writes_leave_no_temporary_files(store_dir: Path) -> None:
    names = sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*") if p.is_file())
    assert names == sorted([INDEX_FILE, f"pixels/{sha('a')}.npy", f"pixels/{sha('b')}.npy"])
