from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pneumofed.common.data.site import load_site
from pneumofed.common.data.store import RoiStore, pool_stores
from pneumofed.simulations.partition import (
    PartitionConfig,
    Scanner,
    apply_scanner,
    dirichlet_partition,
    iid_partition,
    partition_stores,
    prepare_natural_sites,
    quantity_partition,
    random_scanners,
    split_by_header,
    write_subset_store,
)


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each site's label distribution and the pooled one."""
    labels = np.asarray(labels)
    pooled = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - pooled).sum() for p in parts]
    return float(np.mean(distances))


def _population(n_patients: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 1-3 ROIs each and an unbalanced class mix, ROIs of a patient sharing a label."""
    rng = np.random.default_rng(seed)
    per_patient = rng.choice([1, 2, 3], size=n_patients, p=[0.7, 0.2, 0.1])
    patient_label = rng.choice(3, size=n_patients, p=[0.5, 0.3, 0.2])
    groups = np.repeat([f"p{i:04d}" for i in range(n_patients)], per_patient)
    labels = np.repeat(patient_label, per_patient)
    return labels, groups


PARTITIONERS = {
    "iid": lambda labels, groups, seed: iid_partition(groups, 5, seed),
    "dirichlet": lambda labels, groups, seed: dirichlet_partition(labels, groups, 5, 0.5, seed),
    "quantity": lambda labels, groups, seed: quantity_partition(groups, 5, 0.5, seed),
}


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_partition_covers_every_sample_once_and_keeps_patients_together(scheme: str) -> None:
    labels, groups = _population()
    parts = PARTITIONERS[scheme](labels, groups, 3)
    assert len(parts) == 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    site_sets = [set(groups[p]) for p in parts]
    for i, a in enumerate(site_sets):
        assert len(a) >= 10  # enough patients for load_site's 70/20/10 split
        for b in site_sets[i + 1 :]:
            assert not a & b


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_partition_is_a_function_of_the_seed(scheme: str) -> None:
    labels, groups = _population()
    first, again, other = (PARTITIONERS[scheme](labels, groups, s) for s in (1, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_label_skew_grows_as_alpha_falls() -> None:
    labels, groups = _population(600)
    skew = {
        alpha: np.mean([label_skew(labels, dirichlet_partition(labels, groups, 5, alpha, seed), 3) for seed in range(5)])
        for alpha in (100.0, 1.0, 0.1)
    }
    assert skew[100.0] < 0.06  # near-IID
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.3


def test_quantity_skew_varies_site_sizes_but_not_label_mix() -> None:
    _labels, groups = _population(600)
    parts = quantity_partition(groups, 5, alpha=0.3, seed=0)
    sizes = [len(set(groups[p])) for p in parts]
    assert max(sizes) > 3 * min(sizes)
    iid_sizes = [len(set(groups[p])) for p in iid_partition(groups, 5, seed=0)]
    assert max(iid_sizes) - min(iid_sizes) <= 1


def test_too_few_patients_is_a_clear_error() -> None:
    labels, groups = _population(40)
    with pytest.raises(ValueError, match="cannot give 5 sites 10 patients"):
        iid_partition(groups, 5)
    with pytest.raises(ValueError, match="alpha must be positive"):
        dirichlet_partition(labels, groups, 2, 0.0)


def test_apply_scanner_changes_statistics_as_configured_and_stays_uint8() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(40, 216, size=(16, 32, 32), dtype=np.uint8)
    assert np.array_equal(apply_scanner(images, Scanner()), images)

    darker = apply_scanner(images, Scanner(gamma=2.0))
    assert darker.mean() < images.mean() - 20
    flat = apply_scanner(images, Scanner(contrast=0.5))
    assert flat.std() < 0.6 * images.std()
    assert abs(flat.mean() - images.mean()) < 3
    brighter = apply_scanner(images, Scanner(brightness=0.2))
    assert brighter.mean() > images.mean() + 40
    blurred = apply_scanner(images, Scanner(resolution=0.25))
    assert np.abs(np.diff(blurred.astype(float), axis=-1)).mean() < 0.5 * np.abs(np.diff(images.astype(float), axis=-1)).mean()
    noisy = apply_scanner(images, Scanner(noise_std=0.1), seed=1)
    assert 20 < (noisy.astype(float) - images).std() < 30  # 0.1 * 255, slightly clipped

    extreme = apply_scanner(images, Scanner(contrast=5.0, brightness=0.5, noise_std=0.5))
    assert extreme.dtype == np.uint8 and extreme.shape == images.shape
    assert extreme.max() == 255  # clipped, not wrapped around


def test_random_scanners_are_seeded_and_scale_with_strength() -> None:
    assert random_scanners(4, 1.0, seed=3) == random_scanners(4, 1.0, seed=3)
    assert all(s == Scanner() for s in random_scanners(4, 0.0))
    strong = random_scanners(50, 1.0, seed=0)
    assert np.std([np.log(s.gamma) for s in strong]) > 0.1
    assert min(s.resolution for s in strong) < 0.8


def test_partition_stores_writes_valid_patient_grouped_site_stores(synthetic_sites: list[Path], tmp_path: Path) -> None:
    pooled = pool_stores(synthetic_sites)
    config = PartitionConfig(scheme="iid", sites=2, min_patients=5, acquisition_shift=1.0, seed=4)
    sites = partition_stores(synthetic_sites, config, tmp_path / "iid")
    assert [p.name for p in sites] == ["site-01", "site-02"]
    stores = [RoiStore.open(p) for p in sites]
    assert sum(len(s) for s in stores) == len(pooled.records)
    assert not set(stores[0].patient_keys) & set(stores[1].patient_keys)
    assert sorted(r.roi_id for s in stores for r in s.index.records) == sorted(r.roi_id for r in pooled.records)
    # The scanners changed the pixels, differently per site, and load_site can split each store.
    scanners = random_scanners(2, 1.0, seed=4)
    for store, scanner in zip(stores, scanners, strict=True):
        by_id = {r.roi_id: i for i, r in enumerate(pooled.records)}
        originals = pooled.images[[by_id[r.roi_id] for r in store.index.records], 0].numpy()
        assert np.array_equal(store.images[:, 0].numpy(), apply_scanner(originals, scanner, seed=4 + sites.index(store.path)))
        assert not np.array_equal(store.images[:, 0].numpy(), originals)
        assert len(load_site(store.path, seed=0).test) > 0

    again = partition_stores(synthetic_sites, config, tmp_path / "iid")  # replaces, never appends
    assert sum(len(RoiStore.open(p)) for p in again) == len(pooled.records)


def test_natural_partition_keeps_the_source_stores(synthetic_sites: list[Path], tmp_path: Path) -> None:
    sites = partition_stores(synthetic_sites, PartitionConfig(scheme="natural"), tmp_path / "natural")
    for source, site in zip(synthetic_sites, sites, strict=True):
        assert RoiStore.open(source).images.equal(RoiStore.open(site).images)


def test_write_subset_store_refuses_to_overwrite_other_folders(synthetic_sites: list[Path], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a ROI store"):
        write_subset_store(tmp_path, pool_stores(synthetic_sites[:1]), np.arange(3))


def test_partition_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="needs `sites`"):
        PartitionConfig(scheme="dirichlet")
    with pytest.raises(ValueError, match="do not set `sites`"):
        PartitionConfig(scheme="natural", sites=3)
    with pytest.raises(ValueError, match="2 scanners given for 3 sites"):
        PartitionConfig(scheme="iid", sites=3, scanners=[Scanner(), Scanner()])


def test_split_by_header_groups_files_by_institution(nih_dir: Path, tmp_path: Path) -> None:
    written = split_by_header(nih_dir / "dicom", nih_dir / "annotations.csv", tmp_path)
    assert sorted(written) == ["HOSPITAL A", "HOSPITAL B", "HOSPITAL C"]
    counts = {}
    for name, path in written.items():
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        assert all(Path(row["file"]).is_absolute() and Path(row["file"]).is_file() for row in rows)
        counts[name] = len(rows)
    assert counts == {"HOSPITAL A": 44, "HOSPITAL B": 58, "HOSPITAL C": 44}  # the data set's README


def test_prepare_natural_sites_builds_one_store_per_institution(nih_dir: Path, tmp_path: Path) -> None:
    stores = prepare_natural_sites(nih_dir / "dicom", nih_dir / "annotations.csv", tmp_path, roi_size=32)
    assert [s.name for s in stores] == ["hospital-a", "hospital-b", "hospital-c"]
    opened = [RoiStore.open(s) for s in stores]
    assert sum(len(s) for s in opened) == 146
    assert len({s.index.secret_check for s in opened}) == 1
