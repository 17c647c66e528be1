"""The built-in synthetic hospitals as ROI stores, written and prepared on first use."""

from __future__ import annotations

from pathlib import Path

from pneumofed.common.data.prepare import prepare_site
from pneumofed.common.data.synth import write_hospitals


def synthetic_sites(data_dir: Path, hospitals: int, rois: int, roi_size: int, seed: int) -> list[Path]:
    """ROI stores of the synthetic hospitals under `data_dir`, created when absent."""
    hospital_dirs = sorted(data_dir.glob("hospital-*"))
    if len(hospital_dirs) < hospitals or not all((h / "annotations.csv").is_file() for h in hospital_dirs):
        print(f"writing {hospitals} synthetic hospitals to {data_dir} ...", flush=True)
        hospital_dirs = write_hospitals(data_dir, n_hospitals=hospitals, rois_per_hospital=rois, seed=seed)
    stores = []
    for hospital in hospital_dirs[:hospitals]:
        store = data_dir / "stores" / hospital.name
        prepare_site(
            hospital / "dicom",
            hospital / "annotations.csv",
            store,
            roi_size=roi_size,
            secret_path=data_dir / "secrets" / f"{hospital.name}.key",
        )
        stores.append(store)
    return stores
