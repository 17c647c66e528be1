from __future__ import annotations

import csv
import io
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from pneumofed.common.cli import main as cli_main
from pneumofed.common.data import synth

SEED = 3
N_HOSPITALS = len(synth.PROFILES)  # one of each fixed profile: every codec and bit depth
ROIS = 8


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory) -> list[Path]:
    return synth.write_hospitals(tmp_path_factory.mktemp("synth"), N_HOSPITALS, ROIS, seed=SEED)


def annotations(folder: Path) -> list[dict[str, str]]:
    with open(folder / "annotations.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def display_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values as MONOCHROME2 (bright = dense), scaled to [0, 1]."""
    values = ds.pixel_array.astype(np.float64) / (2**ds.BitsStored - 1)
    return 1 - values if ds.PhotometricInterpretation == "MONOCHROME1" else values


def test_each_hospital_is_a_folder_of_dicoms_with_an_annotation_table(hospitals):
    assert [f.name for f in hospitals] == [f"hospital-{i}" for i in range(1, N_HOSPITALS + 1)]
    for folder in hospitals:
        header = (folder / "annotations.csv").read_text().splitlines()[0]
        assert header == "file,patient_id,x,y,width,height,finding"
        rows = annotations(folder)
        assert len(rows) == ROIS
        assert {r["finding"] for r in rows} <= set(synth.FINDINGS)
        referenced = {r["file"] for r in rows}
        on_disk = {str(p.relative_to(folder)) for p in (folder / "dicom").glob("*.dcm")}
        assert referenced == on_disk


def test_files_are_part10_dicom_in_their_hospitals_profile(hospitals):
    for number, folder in enumerate(hospitals, start=1):
        profile = synth.hospital_profile(number, SEED)
        for path in sorted((folder / "dicom").glob("*.dcm")):
            assert path.read_bytes()[128:132] == b"DICM"
            ds = pydicom.dcmread(path)  # no force: needs a valid preamble and file meta
            assert ds.file_meta.TransferSyntaxUID == profile.transfer_syntax
            assert ds.PhotometricInterpretation == profile.photometric
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, profile.bits_stored, profile.bits_stored - 1)
            assert ds.Modality == profile.modality
            expected_class = DigitalXRayImageStorageForPresentation if profile.modality == "DX" else ComputedRadiographyImageStorage
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == expected_class
            spacing_tag = "ImagerPixelSpacing" if profile.modality == "DX" else "PixelSpacing"
            other_tag = "PixelSpacing" if profile.modality == "DX" else "ImagerPixelSpacing"
            assert [float(v) for v in ds[spacing_tag].value] == [profile.pixel_spacing_mm] * 2
            assert other_tag not in ds
            assert ("WindowCenter" in ds) == profile.window
            if profile.rescale is not None:
                assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == profile.rescale
            pixels = ds.pixel_array
            assert pixels.shape == (synth.IMAGE_SIZE, synth.IMAGE_SIZE)
            assert pixels.max() < 2**profile.bits_stored
            assert pixels.std() > 0.05 * 2**profile.bits_stored


def test_window_covers_the_stored_values(hospitals):
    for number, folder in enumerate(hospitals, start=1):
        profile = synth.hospital_profile(number, SEED)
        if not profile.window:
            continue
        ds = pydicom.dcmread(next((folder / "dicom").glob("*.dcm")))
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        values = ds.pixel_array * slope + intercept
        low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
        high = float(ds.WindowCenter) + float(ds.WindowWidth) / 2
        assert 0.9 < np.mean((values >= low) & (values <= high)) < 1.0


def test_images_look_like_chests_with_rois_in_dark_lung_fields(hospitals):
    for folder in hospitals:
        for row in annotations(folder):
            image = display_pixels(pydicom.dcmread(folder / row["file"]))
            x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
            mediastinum = image[200:300, 246:266].mean()
            assert image[:10, :10].mean() < image[y:y + h, x:x + w].mean() < mediastinum


def test_boxes_are_inside_the_image_and_at_least_30_pixels(hospitals):
    for folder in hospitals:
        for row in annotations(folder):
            x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
            assert w >= 30 and h >= 30
            assert x >= 0 and y >= 0 and x + w <= synth.IMAGE_SIZE and y + h <= synth.IMAGE_SIZE


def test_boxes_of_one_image_barely_overlap(hospitals):
    for folder in hospitals:
        by_file: dict[str, list[tuple[int, ...]]] = {}
        for row in annotations(folder):
            by_file.setdefault(row["file"], []).append(tuple(int(row[k]) for k in ("x", "y", "width", "height")))
        for boxes in by_file.values():
            for i, (x, y, w, h) in enumerate(boxes):
                for ox, oy, ow, oh in boxes[i + 1:]:
                    overlap = max(0, min(x + w, ox + ow) - max(x, ox)) * max(0, min(y + h, oy + oh) - max(y, oy))
                    assert overlap < 0.1 * w * h


def test_files_carry_identifying_data_for_deidentification_to_strip(hospitals):
    uids = []
    for number, folder in enumerate(hospitals, start=1):
        rows = {r["file"]: r["patient_id"] for r in annotations(folder)}
        for file, patient_id in rows.items():
            ds = pydicom.dcmread(folder / file)
            assert ds.PatientID == patient_id
            for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "StudyDate", "ReferringPhysicianName"):
                assert str(ds.data_element(keyword).value).strip(), keyword
            assert ds.InstitutionName == synth.hospital_profile(number, SEED).institution
            uids += [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID]
    assert len(set(uids)) == len(uids)
    assert all(uid.is_valid for uid in uids)


def test_patients_are_distinct_within_a_hospital(hospitals):
    for folder in hospitals:
        files_per_patient = Counter()
        for file, patient_id in {(r["file"], r["patient_id"]) for r in annotations(folder)}:
            files_per_patient[patient_id] += 1
        assert set(files_per_patient.values()) == {1}


def test_round_trip_through_the_dicom_loader(hospitals):
    dicom = pytest.importorskip("pneumofed.common.data.dicom")
    for number, folder in enumerate(hospitals, start=1):
        profile = synth.hospital_profile(number, SEED)
        row = annotations(folder)[0]
        radiograph = dicom.load_radiograph(folder / row["file"])
        assert radiograph.pixels.shape == (synth.IMAGE_SIZE, synth.IMAGE_SIZE)
        assert radiograph.patient_id == row["patient_id"]
        assert radiograph.pixel_spacing_mm == (profile.pixel_spacing_mm,) * 2
        # Display values agree with the simple MONOCHROME2 reading of the stored values.
        reference = display_pixels(pydicom.dcmread(folder / row["file"]))
        assert np.corrcoef(reference.ravel(), radiograph.pixels.ravel())[0, 1] > 0.95


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    first = synth.write_hospitals(tmp_path / "a", 3, 2, seed=11)
    again = synth.write_hospitals(tmp_path / "b", 3, 2, seed=11)
    other = synth.write_hospitals(tmp_path / "c", 3, 2, seed=12)
    for a, b, c in zip(first, again, other):
        files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
        for name in files:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        pixels_a = pydicom.dcmread(a / "dicom/IMG00001.dcm").pixel_array
        pixels_c = pydicom.dcmread(c / "dicom/IMG00001.dcm").pixel_array
        assert not np.array_equal(pixels_a, pixels_c)


def test_class_mix_follows_each_hospitals_profile():
    shares = {}
    for number in (1, 2, 3):
        patients = synth.plan_hospital(number, 3000, seed=0)
        counts = Counter(f for p in patients for f in p.findings)
        assert sum(counts.values()) == 3000
        shares[number] = np.array([counts[f] for f in synth.FINDINGS]) / 3000
        assert np.abs(shares[number] - synth.hospital_profile(number).class_mix).max() < 0.05
    nodule, emphysema = synth.FINDINGS.index("nodule"), synth.FINDINGS.index("emphysema")
    assert shares[1][nodule] > shares[2][nodule] > shares[3][nodule]
    assert shares[3][emphysema] > shares[2][emphysema] > shares[1][emphysema]


def test_most_patients_have_one_roi_and_none_more_than_three():
    patients = synth.plan_hospital(1, 1000, seed=0)
    per_patient = Counter(len(p.findings) for p in patients)
    assert set(per_patient) <= {1, 2, 3}
    assert per_patient[1] > 0.7 * len(patients)
    assert len({p.patient_id for p in patients}) == len(patients)


def test_annotations_follow_the_plan(hospitals):
    for number, folder in enumerate(hospitals, start=1):
        planned = [(p.patient_id, f) for p in synth.plan_hospital(number, ROIS, SEED) for f in p.findings]
        assert [(r["patient_id"], r["finding"]) for r in annotations(folder)] == planned


def test_hospitals_beyond_the_fixed_profiles_get_seeded_valid_profiles():
    profile = synth.hospital_profile(7, seed=5)
    assert profile == synth.hospital_profile(7, seed=5)
    assert profile.bits_stored in (10, 12, 14, 16)
    assert profile.photometric in ("MONOCHROME1", "MONOCHROME2")
    assert profile.modality in ("DX", "CR")
    assert profile.rescale is None or profile.modality == "CR"
    assert sum(profile.class_mix) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="start at 1"):
        synth.hospital_profile(0)


def test_refuses_to_write_over_existing_hospitals(hospitals):
    with pytest.raises(FileExistsError, match="hospital-1"):
        synth.write_hospitals(hospitals[0].parent, 1, 1)


def test_rejects_empty_requests(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        synth.write_hospitals(tmp_path, n_hospitals=0)
    with pytest.raises(ValueError, match="at least one"):
        synth.write_hospitals(tmp_path, rois_per_hospital=0)


def test_cli_writes_the_folders_and_says_where(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(["synth", "--out", str(tmp_path), "--hospitals", "2", "--rois", "2", "--seed", "1"])
    assert code == 0
    for number in (1, 2):
        folder = tmp_path / f"hospital-{number}"
        assert len(annotations(folder)) == 2
        assert str(folder) in out.getvalue()
    with redirect_stdout(io.StringIO()):
        assert cli_main(["synth", "--out", str(tmp_path), "--hospitals", "1", "--rois", "2"]) == 1


def test_cli_rejects_non_positive_counts(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["synth", "--out", str(tmp_path), "--rois", "0"])
