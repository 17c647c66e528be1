from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

# The models here are small: one intra-op thread is faster than two fighting over two cores,
# and it keeps CPU results bitwise reproducible across machines with different core counts.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
NIH_DIR = REPO.parent / "shared" / "data" / "nih-cxr-abc"


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    """The shared NIH chest X-ray set (146 DICOM files, three hospital profiles)."""
    if not (NIH_DIR / "annotations.csv").is_file():
        pytest.skip(f"shared NIH data set not found at {NIH_DIR}; place nih-cxr-abc beside the repository")
    return NIH_DIR


@pytest.fixture(scope="session")
def synthetic_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small synthetic hospitals, prepared into 32-px ROI stores (absolute paths); each site's
    test part has more ROIs than the sites' default min-evaluation-rois."""
    from pneumofed.common.data.prepare import prepare_site
    from pneumofed.common.data.synth import write_hospitals

    root = tmp_path_factory.mktemp("synthetic")
    (root / "secrets").mkdir()
    stores = []
    for hospital in write_hospitals(root / "dicom", n_hospitals=3, rois_per_hospital=60, seed=7):
        store = root / "stores" / hospital.name
        # A fixed site secret: pseudonyms decide the patient-grouped splits, so a random secret
        # would give every test session different training and evaluation data.
        secret = root / "secrets" / f"{hospital.name}.key"
        secret.write_bytes(hashlib.sha256(hospital.name.encode()).digest())
        prepare_site(hospital / "dicom", hospital / "annotations.csv", store, roi_size=32, secret_path=secret)
        stores.append(store)
    return stores


@pytest.fixture
def flower_identity():
    """Lets tests build Flower Messages outside a running SuperLink, as Flower's own tests do."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
