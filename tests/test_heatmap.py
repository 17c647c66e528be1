from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate_predict import exit_code, hospital_of, make_model_file, source_file
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from pneumofed.common.cli import main
from pneumofed.common.data.site import load_site
from pneumofed.common.data.store import RoiStore
from pneumofed.common.learning.batchnorm import recalibrate_batchnorm
from pneumofed.common.learning.heatmap import (
    HeatmapPathError,
    check_png_path,
    class_activation_maps,
    write_overlay,
)
from pneumofed.common.learning.models import MODEL_NAMES, build_model, cam_target_layer
from pneumofed.common.learning.predict import predict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Every registry model's last feature block is 32 times coarser than its input: 64 px is the
# smallest ROI whose map has more than one cell (2x2).
ROI = 64


def registry_model(name: str, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, width=0.5 if name.startswith("shufflenet") else 1.0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_maps_are_finite_in_the_unit_range_with_the_rois_shape_and_leave_the_model_as_it_was(name):
    model = registry_model(name)
    model.train()  # mode a trainer may hand over; the maps must still be computed in eval mode
    held_gradient = torch.ones_like(next(model.parameters()))
    next(model.parameters()).grad = held_gradient
    before = {key: value.clone() for key, value in model.state_dict().items()}  # parameters and BN statistics
    images = torch.rand(2, 1, ROI, ROI, generator=torch.Generator().manual_seed(1))

    result = class_activation_maps(model, cam_target_layer(name, model), images)

    assert result.maps.shape == (2, ROI, ROI)
    assert np.isfinite(result.maps).all()
    assert result.maps.min() >= 0.0 and result.maps.max() <= 1.0
    assert result.maps.max() > 0.0
    model.eval()
    with torch.no_grad():
        expected = model(images).double().softmax(dim=1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert result.classes.tolist() == expected.argmax(axis=1).tolist()

    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # eval mode: BN statistics untouched
    first, *others = model.parameters()
    assert first.grad is held_gradient and all(p.grad is None for p in others)
    assert all(p.requires_grad for p in model.parameters())


def test_an_architecture_outside_the_registry_has_no_target_layer():
    with pytest.raises(ValueError, match="unknown model"):
        cam_target_layer("vgg16", nn.Linear(1, 1))


def test_a_given_class_is_explained_and_a_class_out_of_range_is_refused():
    model = registry_model("shufflenet_v2")
    images = torch.rand(2, 1, ROI, ROI, generator=torch.Generator().manual_seed(2))
    assert class_activation_maps(model, model.conv5, images, [2, 0]).classes.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\)"):
        class_activation_maps(model, model.conv5, images, [3, 0])
    with pytest.raises(ValueError, match="one class per image"):
        class_activation_maps(model, model.conv5, images, [0])


# ---------------------------------------------------------------- the map follows the lesion


BACKGROUND = 0.3
BLOB_SIGMA = 3.2  # px at 64 px: a nodule a few cells of the stem wide, well inside one quadrant


def blob_images(
    centres: Tensor, generator: torch.Generator, with_blob: Tensor | None = None, size: int = ROI
) -> Tensor:
    """Noisy ``size``-px ROIs with a bright Gaussian blob at each ``(row, column)`` centre (where ``with_blob``)."""
    n = len(centres)
    noise = BACKGROUND + 0.1 * torch.rand(n, 1, size, size, generator=generator)
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    squared = (rows - centres[:, 0, None, None]) ** 2 + (columns - centres[:, 1, None, None]) ** 2
    blob = 0.5 * torch.exp(-squared / (2 * BLOB_SIGMA**2))
    if with_blob is not None:
        blob = blob * with_blob[:, None, None]
    return (noise + blob[:, None]).clamp(0.0, 1.0)


def centre_of_mass(heatmap: np.ndarray) -> np.ndarray:
    rows, columns = np.indices(heatmap.shape)
    return np.array([(heatmap * rows).sum(), (heatmap * columns).sum()]) / heatmap.sum()


class CellBrightness(nn.Module):
    """A model whose response is known: class 0's logit is the mean over 4x4-px cells of how much a
    cell is brighter than 0.5 (the noisy background never is), class 1's its negative. Its Grad-CAM
    of class 0 is therefore that excess per cell, which peaks in the blob's cell."""

    def __init__(self) -> None:
        super().__init__()
        excess = nn.Conv2d(1, 1, 1)
        nn.init.ones_(excess.weight)
        nn.init.constant_(excess.bias, -0.5)
        self.cells = nn.Sequential(nn.AvgPool2d(4), excess, nn.ReLU())
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.cells(x).mean(dim=(2, 3)))


def test_the_map_of_a_model_with_known_response_peaks_at_the_blob_wherever_it_is():
    centres = torch.tensor([[14.0, 14.0], [14.0, 50.0], [50.0, 14.0], [50.0, 50.0], [30.0, 38.0]])
    images = blob_images(centres, torch.Generator().manual_seed(3))
    model = CellBrightness()

    result = class_activation_maps(model, model.cells, images)

    assert result.classes.tolist() == [0] * len(centres)
    for heatmap, centre in zip(result.maps, centres.numpy(), strict=True):
        peak = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert np.abs(np.array(peak) - centre).max() <= 4  # within the blob's 4-px cell or its neighbour
        assert np.linalg.norm(centre_of_mass(heatmap) - centre) <= 4


@pytest.fixture(scope="module")
def blob_detector() -> nn.Module:
    """shufflenet_v2 (0.5) trained for 90 steps to tell ROIs with a blob (class 0) from ROIs without.

    Deterministic (fixed seeds, one thread) on one CPU, but not across CPUs: after 60 steps one
    machine's detector scored 0.94, another's above 0.95; after 90, 1.0. BatchNorm statistics are
    refitted exactly afterwards, so eval mode sees what training saw after so few steps.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model("shufflenet_v2", 2, width=0.5)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(size: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, 2, (size,), generator=generator)
        centres = ROI / 8 + ROI * 3 / 4 * torch.rand(size, 2, generator=generator)
        return blob_images(centres, generator, with_blob=(labels == 0).float()), labels

    model.train()
    for _ in range(90):
        images, labels = batch(16)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    recalibrate_batchnorm(model, TensorDataset(*batch(256)), 64, torch.device("cpu"))
    model.eval()
    images, labels = batch(256)
    with torch.no_grad():
        accuracy = float((model(images).argmax(dim=1) == labels).float().mean())
    assert accuracy > 0.95, f"the blob detector did not learn (accuracy {accuracy:.3f})"
    return model


def test_the_map_of_a_trained_registry_model_moves_with_the_blob(blob_detector):
    # The network is fully convolutional, so the detector trained on 64-px ROIs is explained on
    # 128-px ones, whose maps have 4x4 cells rather than 2x2. The blob visits the four quadrants;
    # at each place 8 ROIs with fresh background noise are explained, so no single noise pattern
    # decides. Over 10 training seeds the mean map's centre of mass lay 8-34 px from its own blob
    # and at least 52 px from every other place, and 319 of 320 single maps peaked in the blob's
    # quadrant (seed 0, used here: 12-23 px, at least 62 px, 32 of 32).
    size, half = 128, 64
    places = np.array([(24, 24), (24, 104), (104, 24), (104, 104)], dtype=np.float32)
    generator = torch.Generator().manual_seed(4)
    for k, place in enumerate(places):
        images = blob_images(torch.tensor(place).repeat(8, 1), generator, size=size)
        maps = class_activation_maps(blob_detector, blob_detector.conv5, images, [0] * 8).maps
        assert maps.shape == (8, size, size)
        distances = np.linalg.norm(places - centre_of_mass(maps.mean(axis=0)), axis=1)
        assert distances.argmin() == k, f"blob at {place}: centre of mass {distances.round(1)} px from the places"
        peaks = np.array([np.unravel_index(heatmap.argmax(), heatmap.shape) for heatmap in maps])
        in_quadrant = ((peaks >= half) == (place >= half)).all(axis=1).sum()
        assert in_quadrant >= 6, f"blob at {place}: only {in_quadrant} of 8 maps peak in its quadrant"


# ---------------------------------------------------------------- overlay and command line


def test_overlay_is_a_png(tmp_path):
    roi = np.linspace(0, 1, ROI * ROI, dtype=np.float32).reshape(ROI, ROI)
    path = write_overlay(tmp_path / "roi.png", roi, roi[::-1].copy(), "nodule", 0.87, detail="ROI abc-0")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("where", "message"),
    [("folder", "is a folder"), ("missing/heat.png", "does not exist"), ("heat.jpg", "must be a .png")],
)
def test_bad_png_paths_are_refused(tmp_path, where, message):
    (tmp_path / "folder").mkdir()
    with pytest.raises(HeatmapPathError, match=message):
        check_png_path(tmp_path / where)


@pytest.fixture(scope="module")
def store(synthetic_sites: list[Path]) -> Path:
    return synthetic_sites[0]


@pytest.fixture(scope="module")
def model_file(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = list(RoiStore.open(store).class_names)  # 32-px ROIs as the store's: 1x1 maps, enough for files
    return make_model_file(tmp_path_factory.mktemp("model") / "model.pt", names, roi_size=32)


def test_predict_writes_the_heatmap_of_the_predicted_class(store, model_file, tmp_path, capsys):
    path, box = source_file(store, 0)
    out = tmp_path / "heat.png"
    assert main(["predict", str(model_file), str(path), "--box", ",".join(map(str, box)),
                 "--device", "cpu", "--heatmap", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed.pop("heatmap") == str(out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert printed == predict(model_file, path, box, device="cpu")  # the heatmap changes nothing else


def test_predict_refuses_a_bad_heatmap_path_before_loading_anything(store, tmp_path, capsys):
    path, _ = source_file(store, 0)
    absent_model = tmp_path / "absent.pt"  # had the model been loaded first, the error would name it
    assert exit_code(["predict", str(absent_model), str(path), "--heatmap", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_evaluate_writes_one_heatmap_per_evaluated_roi_named_by_roi_id(store, model_file, tmp_path, capsys):
    heatmaps = tmp_path / "heatmaps"
    argv = ["evaluate", str(model_file), "--store", str(store), "--part", "test", "--split-seed", "3",
            "--device", "cpu", "--bootstrap", "20", "--out", str(tmp_path / "eval"), "--heatmaps", str(heatmaps)]
    assert main(argv) == 0
    test_part = load_site(store.resolve(), 3).test
    records = RoiStore.open(store).index.records
    expected = {f"{records[i].roi_id}.png" for i in test_part.indices.tolist()}
    assert {p.name for p in heatmaps.iterdir()} == expected
    assert f"{len(expected)} heatmaps written to {heatmaps}" in capsys.readouterr().out
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in heatmaps.iterdir())


@pytest.mark.parametrize(
    ("source", "message"),
    [("store", "exists and is not a folder"), ("dicom", "--heatmaps needs --store")],
)
def test_evaluate_refuses_bad_heatmaps_before_evaluating(store, model_file, tmp_path, capsys, source, message):
    occupied = tmp_path / "taken"
    occupied.write_text("a file where the heatmap folder should go")
    out = tmp_path / "eval"
    if source == "store":
        data = ["--store", str(store)]
    else:
        hospital = hospital_of(store)
        data = ["--dicom-dir", str(hospital / "dicom"), "--annotations", str(hospital / "annotations.csv")]
    argv = ["evaluate", str(model_file), *data, "--device", "cpu", "--out", str(out), "--heatmaps", str(occupied)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was evaluated
