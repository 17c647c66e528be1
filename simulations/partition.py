"""Simulated hospitals cut from pooled ROI data, written as ordinary per-site ROI stores.

Schemes (every one patient-grouped: all ROIs of a patient go to one site):
  natural     one site per source store; `split_by_header` + `prepare_natural_sites` build those
              stores from a DICOM folder by a header such as InstitutionName (the ROI store itself
              deliberately holds no institution names)
  iid         patients shuffled and dealt into equal shares
  dirichlet   label skew: for every class, its patients are shared out by proportions ~ Dir(alpha)
              (Hsu et al. 2019); small alpha gives sites dominated by few classes
  quantity    size skew: site shares of the patients ~ Dir(alpha), labels stay mixed
Any scheme can add acquisition shift: each site gets its own `Scanner` (resolution, gamma,
contrast, brightness, noise) applied to its ROI pixels, imitating different detectors.

Why not Flower Datasets: its partitioners (DirichletPartitioner & co.) split rows of a Hugging Face
`datasets.Dataset`, so patients would first have to be collapsed to one row each and expanded back,
and the package pulls `datasets`, pyarrow, pandas and seaborn (~150 MB) into an image pipeline that
uses none of them. The patient-level numpy versions below are a few lines each and seeded.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pneumofed.common.data.prepare import prepare_site
from pneumofed.common.data.store import (
    INDEX_FILE,
    PooledRois,
    RoiIndex,
    open_stores,
    pool_stores,
    write_index,
    write_shard,
)

# load_site splits every site 70/20/10 by patient, so a site needs at least 10 patients.
MIN_SITE_PATIENTS = 10
MAX_DRAWS = 1000


# ------------------------------------------------------------------------------ partitioners
# Each returns one sorted index array per site; together they cover every sample exactly once.


def patient_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patients, the most common label of each patient, patient number of every sample)."""
    patients, inverse = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(patients), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (inverse, labels), 1)
    return patients, counts.argmax(axis=1), inverse


def _samples_of(site_of_patient: np.ndarray, inverse: np.ndarray, n_sites: int) -> list[np.ndarray]:
    site_of_sample = site_of_patient[inverse]
    return [np.flatnonzero(site_of_sample == s) for s in range(n_sites)]


def _check_sites(n_patients: int, n_sites: int, min_patients: int) -> None:
    if n_sites < 1:
        raise ValueError(f"need at least one site, got {n_sites}")
    if n_patients < n_sites * min_patients:
        raise ValueError(
            f"{n_patients} patients cannot give {n_sites} sites {min_patients} patients each "
            f"(a site needs {MIN_SITE_PATIENTS} for its train/val/test split)"
        )


def natural_partition(origin: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(origin == site) for site in np.unique(origin)]


def iid_partition(groups: np.ndarray, n_sites: int, seed: int = 0, min_patients: int = MIN_SITE_PATIENTS) -> list[np.ndarray]:
    patients, inverse = np.unique(groups, return_inverse=True)
    _check_sites(len(patients), n_sites, min_patients)
    order = np.random.default_rng(seed).permutation(len(patients))
    site_of_patient = np.empty(len(patients), dtype=np.int64)
    for site, members in enumerate(np.array_split(order, n_sites)):
        site_of_patient[members] = site
    return _samples_of(site_of_patient, inverse, n_sites)


def dirichlet_partition(
    labels: np.ndarray, groups: np.ndarray, n_sites: int, alpha: float, seed: int = 0,
    min_patients: int = MIN_SITE_PATIENTS,
) -> list[np.ndarray]:
    """Label skew: the patients of each class are shared out by proportions ~ Dir(alpha, ..., alpha).

    Draws that leave a site with fewer than `min_patients` patients are redrawn (as Flower
    Datasets' DirichletPartitioner does), so the result is a deterministic function of `seed`.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    patients, patient_label, inverse = patient_labels(np.asarray(labels), np.asarray(groups))
    _check_sites(len(patients), n_sites, min_patients)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        site_of_patient = np.empty(len(patients), dtype=np.int64)
        for label in np.unique(patient_label):
            members = rng.permutation(np.flatnonzero(patient_label == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_sites, alpha)))[:-1] * len(members)).round().astype(int)
            for site, share in enumerate(np.split(members, cuts)):
                site_of_patient[share] = site
        if np.bincount(site_of_patient, minlength=n_sites).min() >= min_patients:
            return _samples_of(site_of_patient, inverse, n_sites)
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} gave every site {min_patients} patients; "
                     "raise alpha or lower the number of sites")


def quantity_partition(
    groups: np.ndarray, n_sites: int, alpha: float, seed: int = 0, min_patients: int = MIN_SITE_PATIENTS
) -> list[np.ndarray]:
    """Quantity skew: site sizes ~ Dir(alpha) on top of `min_patients` each; labels stay mixed."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    patients, inverse = np.unique(groups, return_inverse=True)
    _check_sites(len(patients), n_sites, min_patients)
    rng = np.random.default_rng(seed)
    spare = len(patients) - n_sites * min_patients
    sizes = min_patients + np.floor(rng.dirichlet(np.full(n_sites, alpha)) * spare).astype(int)
    sizes[rng.choice(n_sites, len(patients) - sizes.sum(), replace=False)] += 1  # the floor's remainder
    site_of_patient = rng.permutation(np.repeat(np.arange(n_sites), sizes))
    return _samples_of(site_of_patient, inverse, n_sites)


# ------------------------------------------------------------------------------ acquisition shift


class Scanner(BaseModel):
    """A site's acquisition chain, applied to ROI pixels in [0, 1] in this order: resolution
    (down- then up-sampling by `resolution`), gamma, contrast about mid-grey, brightness, noise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: float = Field(1.0, gt=0.1, le=1.0)
    gamma: float = Field(1.0, gt=0)
    contrast: float = Field(1.0, gt=0)
    brightness: float = Field(0.0, ge=-1, le=1)
    noise_std: float = Field(0.0, ge=0, le=0.5)


def random_scanners(n_sites: int, strength: float, seed: int = 0) -> list[Scanner]:
    """Per-site scanners drawn around the identity; `strength` 1 is a clearly visible difference."""
    if strength < 0:
        raise ValueError(f"acquisition-shift strength must be >= 0, got {strength}")
    rng = np.random.default_rng([seed, 0x5CA])
    u = rng.uniform(-1, 1, size=(n_sites, 4))
    return [
        Scanner(
            resolution=float(np.clip(1 - 0.5 * strength * abs(row[0]), 0.25, 1.0)),
            gamma=float(np.exp(0.4 * strength * row[1])),
            contrast=float(np.exp(0.3 * strength * row[2])),
            brightness=float(0.1 * strength * row[3]),
            noise_std=float(rng.uniform(0, 0.03 * strength)),
        )
        for row in u
    ]


def apply_scanner(images: np.ndarray, scanner: Scanner, seed: int = 0) -> np.ndarray:
    """uint8 (N, S, S) -> uint8 (N, S, S) as `scanner` would have recorded them."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 (N, S, S) ROIs, got {images.dtype} {images.shape}")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    size = images.shape[-1]
    low = max(2, round(size * scanner.resolution))
    if low < size:
        x = torch.nn.functional.interpolate(x, size=(low, low), mode="area")
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).pow(scanner.gamma)
    x = (x - 0.5) * scanner.contrast + 0.5 + scanner.brightness
    if scanner.noise_std:
        x = x + scanner.noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)[:, 0].numpy()


# ------------------------------------------------------------------------------ writing sites


def write_subset_store(out_dir: Path, pooled: PooledRois, indices: np.ndarray, images: np.ndarray | None = None) -> Path:
    """A valid ROI store of the ROIs `indices` of `pooled` (with `images` replacing their pixels).

    Shards stay keyed by source SHA-256 with rows renumbered; an existing store at `out_dir` is replaced.
    """
    out_dir = Path(out_dir)
    pixels = pooled.images[indices, 0].numpy() if images is None else images
    if len(pixels) != len(indices):
        raise ValueError(f"{len(indices)} ROIs selected but {len(pixels)} images given")
    if out_dir.exists():
        if not (out_dir / INDEX_FILE).is_file() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not a ROI store; refusing to overwrite it")
        shutil.rmtree(out_dir)
    rows_of: dict[str, list[int]] = {}
    records = []
    for position, i in enumerate(indices):
        record = pooled.records[i]
        rows = rows_of.setdefault(record.source_sha256, [])
        records.append(record.model_copy(update={"row": len(rows)}))
        rows.append(position)
    for sha, rows in rows_of.items():
        write_shard(out_dir, sha, np.ascontiguousarray(pixels[rows]))
    index = RoiIndex(
        roi_size=pooled.roi_size,
        spacing_mm=pooled.spacing_mm,
        class_names=pooled.class_names,
        secret_check=pooled.secret_check,
        records=tuple(records),
    )
    write_index(out_dir, index)
    return out_dir


# ------------------------------------------------------------------------------ configuration


class PartitionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["natural", "iid", "dirichlet", "quantity"]
    sites: int | None = Field(None, ge=1, description="number of sites (not for natural)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, quantity)")
    min_patients: int = Field(MIN_SITE_PATIENTS, ge=1)
    acquisition_shift: float = Field(0.0, ge=0, description="strength of random per-site scanners (0: none)")
    scanners: list[Scanner] | None = Field(None, description="explicit per-site scanners (overrides the strength)")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> PartitionConfig:
        if self.scheme == "natural" and self.sites is not None:
            raise ValueError("a natural partition has one site per source; do not set `sites`")
        if self.scheme != "natural" and self.sites is None:
            raise ValueError(f"scheme {self.scheme!r} needs `sites`")
        if self.scanners is not None and self.sites is not None and len(self.scanners) != self.sites:
            raise ValueError(f"{len(self.scanners)} scanners given for {self.sites} sites")
        return self


def partition_indices(pooled: PooledRois, config: PartitionConfig) -> list[np.ndarray]:
    labels, groups = pooled.labels.numpy(), pooled.patient_keys
    if config.scheme == "natural":
        return natural_partition(pooled.origin)
    if config.scheme == "iid":
        return iid_partition(groups, config.sites, config.seed, config.min_patients)
    if config.scheme == "dirichlet":
        return dirichlet_partition(labels, groups, config.sites, config.alpha, config.seed, config.min_patients)
    return quantity_partition(groups, config.sites, config.alpha, config.seed, config.min_patients)


def partition_stores(stores: Sequence[Path], config: PartitionConfig, out_dir: Path) -> list[Path]:
    """Pool `stores`, cut them into sites per `config`, write `out_dir/site-NN` stores; returns their paths."""
    pooled = pool_stores(stores)
    parts = partition_indices(pooled, config)
    if config.scanners is not None and len(config.scanners) != len(parts):
        raise ValueError(f"{len(config.scanners)} scanners given for {len(parts)} sites")
    scanners = config.scanners or (random_scanners(len(parts), config.acquisition_shift, config.seed)
                                   if config.acquisition_shift > 0 else None)
    paths = []
    for site, indices in enumerate(parts):
        images = None if scanners is None else apply_scanner(pooled.images[indices, 0].numpy(), scanners[site], seed=config.seed + site)
        paths.append(write_subset_store(Path(out_dir) / f"site-{site + 1:02d}", pooled, indices, images).resolve())
    return paths


# ------------------------------------------------------------------------------ natural sites from DICOM


def _folder_name(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-") or "unnamed"


def split_by_header(dicom_dir: Path, annotations_csv: Path, out_dir: Path, tag: str = "InstitutionName") -> dict[str, Path]:
    """Per-site annotation CSVs `out_dir/<tag value>/annotations.csv`, one per value of the DICOM
    header `tag` of the annotated files; `file` is rewritten as an absolute path."""
    dicom_dir, annotations_csv = Path(dicom_dir).resolve(), Path(annotations_csv).resolve()
    with annotations_csv.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames or [], list(reader)
    if "file" not in columns:
        raise ValueError(f"{annotations_csv} has no `file` column")
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        candidates = (annotations_csv.parent / row["file"], dicom_dir / row["file"])
        path = next((p.resolve() for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"annotated file {row['file']!r} not found beside {annotations_csv} or in {dicom_dir}")
        value = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[tag]).get(tag)
        if not value:
            raise ValueError(f"{path} has no {tag}; cannot assign it to a site")
        groups.setdefault(str(value), []).append(row | {"file": str(path)})
    if len({_folder_name(v) for v in groups}) != len(groups):
        raise ValueError(f"{tag} values {sorted(groups)} collide as folder names")
    written = {}
    for value, site_rows in sorted(groups.items()):
        target = Path(out_dir) / _folder_name(value) / "annotations.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(site_rows)
        written[value] = target
    return written


def prepare_natural_sites(
    dicom_dir: Path, annotations_csv: Path, out_dir: Path, *, roi_size: int = 64, tag: str = "InstitutionName"
) -> list[Path]:
    """ROI stores `out_dir/stores/<site>`, one per value of `tag`, all keyed with one secret so a
    patient seen at two sites keeps one key when the sites are pooled again."""
    out_dir = Path(out_dir).resolve()
    stores = []
    for csv_path in split_by_header(dicom_dir, annotations_csv, out_dir / "annotations", tag).values():
        store = out_dir / "stores" / csv_path.parent.name
        report = prepare_site(dicom_dir, csv_path, store, roi_size=roi_size, secret_path=out_dir / "secret.key")
        if report.rois == 0:
            raise ValueError(f"site {csv_path.parent.name} yielded no ROIs: {report.summary()}")
        stores.append(store)
    return stores


def site_summary(paths: Sequence[Path]) -> list[dict[str, object]]:
    """Patients, ROIs and class counts per site store (for reports)."""
    rows = []
    for path, store in zip(paths, open_stores(paths), strict=True):
        rows.append({"site": Path(path).name, "patients": len(set(store.patient_keys)), "rois": len(store),
                     **store.class_counts()})
    return rows

