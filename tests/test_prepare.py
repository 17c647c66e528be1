from __future__ import annotations

import csv
import hashlib
import json
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumofed.common.cli import main as cli_main
from pneumofed.common.data import prepare
from pneumofed.common.data.prepare import (
    PrepareInputError,
    load_site_secret,
    parse_label_map,
    patient_key,
    prepare_site,
    resize_roi,
    square_crop,
)
from pneumofed.common.data.store import INDEX_FILE, RoiStore

COLUMNS = ["file", "patient_id", "x", "y", "width", "height", "finding"]
SIDE = 96


# ---------------------------------------------------------------------------------------------
# crafted inputs


def write_dicom(
    path: Path,
    *,
    patient_id: str | None = "PID-1",
    modality: str = "DX",
    pixels: np.ndarray | None = None,
    rgb: bool = False,
    frames: int = 1,
    with_pixels: bool = True,
    spacing_mm: float | None = None,
) -> Path:
    """A small uncompressed radiograph carrying identifying attributes that must not reach the store."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientBirthDate, ds.StudyDate = f"DOE^{path.stem.upper()}", "19610704", "20230105"
    ds.AccessionNumber, ds.InstitutionName = f"ACC{abs(hash(path.stem)) % 10**8:08d}", "SAINT EXAMPLE HOSPITAL"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Modality = modality
    if spacing_mm is not None:
        ds.PixelSpacing = [spacing_mm, spacing_mm]
    if with_pixels:
        if pixels is None:
            pixels = np.random.default_rng(0).integers(0, 4096, (SIDE, SIDE)).astype(np.uint16)
        if rgb:
            pixels = np.repeat((pixels >> 4).astype(np.uint8)[..., None], 3, axis=-1)
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
        else:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        if frames > 1:
            pixels = np.stack([pixels] * frames)
            ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = pixels.shape[-2 if not rgb else -3], pixels.shape[-1 if not rgb else -2]
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, rows: list[list[object]], columns: list[str] = COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def good_row(name: str, finding: str = "nodule", box: tuple[int, int, int, int] = (10, 10, 40, 40)) -> list[object]:
    return [f"dicom/{name}", "CSV-1", *box, finding]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """One usable file, good.dcm, annotated on CSV line 2; tests add their bad inputs to it."""
    write_dicom(tmp_path / "dicom" / "good.dcm")
    return tmp_path


def run_site(site: Path, rows: list[list[object]], **kwargs: object) -> prepare.PrepareReport:
    write_csv(site / "annotations.csv", [good_row("good.dcm"), *rows])
    return prepare_site(site / "dicom", site / "annotations.csv", site / "store",
                        secret_path=site / "secret" / "key", workers=1, **kwargs)


def rejected(report: prepare.PrepareReport) -> list[tuple[str, str | None, int | None]]:
    return [(r.reason, r.file, r.row) for r in report.rejects]


def file_states(*paths: Path) -> dict[str, tuple[str, int]]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {f.as_posix(): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files}


# ---------------------------------------------------------------------------------------------
# ROI geometry


def test_square_crop_pads_the_short_side_around_the_box_centre() -> None:
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    crop = square_crop(image, (40, 30, 20, 10))  # 20 wide, 10 high -> 20x20 centred on row 35
    assert np.array_equal(crop, image[25:45, 40:60])


def test_square_crop_shifts_inside_the_image_at_its_border() -> None:
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    assert np.array_equal(square_crop(image, (0, 0, 40, 10)), image[0:40, 0:40])
    assert np.array_equal(square_crop(image, (70, 95, 30, 5)), image[70:100, 70:100])


def test_square_crop_zero_pads_only_when_the_square_exceeds_the_image() -> None:
    image = np.ones((40, 100), np.float32)
    crop = square_crop(image, (0, 0, 100, 40))
    assert crop.shape == (100, 100)
    assert crop[30:70].min() == 1 and crop[:30].max() == 0 and crop[70:].max() == 0


def test_resized_roi_keeps_the_aspect_of_what_is_inside_the_box() -> None:
    image = np.zeros((200, 200), np.float32)
    image[80:120, 60:140] = 1.0  # an 80x40 bright box
    roi = resize_roi(square_crop(image, (60, 80, 80, 40)), 64)
    assert roi.dtype == np.uint8 and roi.shape == (64, 64)
    bright = roi > 127
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    assert len(cols) == 64 and 31 <= len(rows) <= 33  # 2:1, not stretched to fill the square
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1


# ---------------------------------------------------------------------------------------------
# label map, secret, patient keys


def test_label_map_inline_json_file_and_errors(tmp_path: Path) -> None:
    assert parse_label_map("nodule=0, interstitial=1, emphysema=2") == prepare.DEFAULT_LABEL_MAP
    assert parse_label_map("A=1,D=0") == {"nodule": 1, "pleural_plaque": 0}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"emphysema": 0, "mediastinal_mass": 1}))
    assert parse_label_map(str(path)) == {"emphysema": 0, "mediastinal_mass": 1}
    for bad in ("nodule=0,emphysema=2", "nodule", "nodule=x", '{"nodule": "0"}', "nodule=0,emphysema=0"):
        with pytest.raises(PrepareInputError):
            parse_label_map(bad)


def test_secret_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "config" / "pneumofed" / "site-secret"
    secret = load_site_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_site_secret(path) == secret


def test_patient_key_depends_on_id_and_secret() -> None:
    one, other = b"1" * 32, b"2" * 32
    assert patient_key("PID-1", one) == patient_key("PID-1 ", one)  # DICOM pads strings with a space
    assert patient_key("PID-1", one) != patient_key("PID-1", other)
    assert patient_key("PID-1", one) != patient_key("PID-2", one)
    assert len(patient_key("PID-1", one)) == 64


def test_patient_key_uses_dicom_patient_id_else_the_csv(site: Path) -> None:
    write_dicom(site / "dicom" / "anonymous.dcm", patient_id=None)
    report = run_site(site, [["dicom/anonymous.dcm", "CSV-7", 10, 10, 40, 40, "emphysema"]])
    secret = (site / "secret" / "key").read_bytes()
    keys = {r.finding: r.patient_key for r in RoiStore.open(site / "store").index.records}
    assert report.rois == 2
    assert keys == {"nodule": patient_key("PID-1", secret), "emphysema": patient_key("CSV-7", secret)}


# ---------------------------------------------------------------------------------------------
# bad input: skipped with a reason, never a crash


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def claiming_size(path: Path, side: int) -> None:
    ds = pydicom.dcmread(write_dicom(path))
    ds.Rows = ds.Columns = side
    ds.save_as(path)


BAD_FILES = {
    "blank-image": lambda p: write_dicom(p, pixels=np.full((SIDE, SIDE), 700, np.uint16)),
    "too-large": lambda p: claiming_size(p, 20000),
    "wrong-modality": lambda p: write_dicom(p, modality="CT"),
    "not-grayscale": lambda p: write_dicom(p, rgb=True),
    "multi-frame": lambda p: write_dicom(p, frames=3),
    "no-pixel-data": lambda p: write_dicom(p, with_pixels=False),
    "corrupt": lambda p: cut_in_half(write_dicom(p)),
    "not-dicom": lambda p: p.write_text("radiology report: no acute findings\n" * 20),
}


@pytest.mark.parametrize("reason", list(BAD_FILES))
def test_bad_file_is_rejected_and_the_rest_is_kept(site: Path, reason: str) -> None:
    BAD_FILES[reason](site / "dicom" / "bad.dcm")
    report = run_site(site, [good_row("bad.dcm")])
    assert rejected(report) == [(reason, "bad.dcm", 3)]
    assert report.rois == 1 and report.class_counts["nodule"] == 1


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (good_row("good.dcm", "silicosis", (0, 0, 60, 60)), "unknown-finding"),
        (good_row("good.dcm"), "duplicate-row"),
        (good_row("elsewhere.dcm"), "missing-file"),
        (good_row("good.dcm", box=(70, 10, 40, 40)), "roi-outside"),
        (good_row("good.dcm", box=(-5, 10, 40, 40)), "roi-outside"),
        (good_row("good.dcm", box=(10, 10, 20, 20)), "roi-too-small"),
        (good_row("good.dcm", box=(10, 10, 60, 29)), "roi-too-small"),
        (["dicom/good.dcm", "CSV-1", "1.5", 10, 40, 40, "nodule"], "bad-row"),
        (["dicom/good.dcm", "CSV-1", "ten", 10, 40, 40, "nodule"], "bad-row"),
        (["dicom/good.dcm", "CSV-1", 10, 10, 40], "bad-row"),
        (["", "CSV-1", 10, 10, 40, 40, "nodule"], "bad-row"),
    ],
)
def test_bad_annotation_row_is_rejected_with_its_line(site: Path, row: list[object], reason: str) -> None:
    report = run_site(site, [row])
    assert [(r.reason, r.row) for r in report.rejects] == [(reason, 3)]
    assert report.rois == 1


def test_rejects_report_is_machine_readable(site: Path) -> None:
    (site / "dicom" / "notes.dcm").write_text("not an image")
    report = run_site(site, [good_row("notes.dcm"), good_row("good.dcm", "tb", (0, 0, 50, 50))])
    saved = json.loads((site / "store" / "rejects.json").read_text())
    assert {(r["reason"], r["file"], r["row"]) for r in saved["rejects"]} == {
        ("not-dicom", "notes.dcm", 3), ("unknown-finding", "good.dcm", 4)}
    assert all(r["detail"] for r in saved["rejects"])
    assert report.reject_counts() == {"not-dicom": 1, "unknown-finding": 1}


def test_unannotated_files_are_listed_not_rejected(site: Path) -> None:
    write_dicom(site / "dicom" / "deep" / "er" / "IM0001")  # any name, any depth
    (site / "dicom" / "README").write_text("export notes")
    report = run_site(site, [])
    assert report.rejects == [] and report.files == 3
    assert report.unannotated_files == ["README", "deep/er/IM0001"]


def test_files_without_extension_at_any_depth_are_used(site: Path) -> None:
    write_dicom(site / "dicom" / "2023" / "series1" / "IM0001", patient_id="PID-9")
    report = run_site(site, [good_row("2023/series1/IM0001", "interstitial")])
    assert report.rois == 2 and report.class_counts["interstitial"] == 1


def test_csv_paths_may_be_relative_to_the_dicom_folder(site: Path) -> None:
    report = run_site(site, [["good.dcm", "CSV-1", 50, 50, 40, 40, "emphysema"]])
    assert report.rejects == [] and report.rois == 2


def test_a_store_inside_the_dicom_folder_is_not_scanned(site: Path) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm")])
    for _ in range(2):
        report = prepare_site(site, site / "annotations.csv", site, secret_path=site / "key", workers=1)
    assert (report.files, report.reused, report.rois) == (2, 1, 1)  # good.dcm and the CSV; no store files
    assert report.unannotated_files == ["annotations.csv"]


def test_inputs_are_never_modified(site: Path) -> None:
    for reason, make in BAD_FILES.items():
        make(site / "dicom" / f"{reason}.dcm")
    rows = [good_row(f"{reason}.dcm") for reason in BAD_FILES]
    write_csv(site / "annotations.csv", [good_row("good.dcm"), *rows])
    before = file_states(site / "dicom", site / "annotations.csv")
    prepare_site(site / "dicom", site / "annotations.csv", site / "store", secret_path=site / "key", workers=1)
    assert file_states(site / "dicom", site / "annotations.csv") == before
    assert len(before) == len(BAD_FILES) + 2


# ---------------------------------------------------------------------------------------------
# CLI: summary line and exit codes


def cli(site: Path, *extra: str) -> int:
    return cli_main(["prepare", "--dicom-dir", str(site / "dicom"), "--annotations", str(site / "annotations.csv"),
                     "--out", str(site / "store"), "--secret-file", str(site / "key"), "--workers", "1", *extra])


def test_cli_prints_one_line_summary_and_succeeds_with_rejects(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dicom(site / "dicom" / "ct.dcm", modality="CT")
    write_csv(site / "annotations.csv", [good_row("good.dcm"), good_row("ct.dcm"), good_row("good.dcm")])
    assert cli(site) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.startswith("prepared 1 ROIs from 2 files")
    assert "rejected 2: " in summary and "1 wrong-modality" in summary and "1 duplicate-row" in summary


def test_cli_fails_only_when_nothing_usable_remains(site: Path) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm", box=(0, 0, 10, 10)), good_row("missing.dcm")])
    assert cli(site) == 1
    assert json.loads((site / "store" / "rejects.json").read_text())["rois"] == 0


def test_missing_required_column_exits_2_and_writes_nothing(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_csv(site / "annotations.csv", [["dicom/good.dcm", 10, 10, 40, 40, "nodule"]], columns=COLUMNS[:1] + COLUMNS[2:])
    assert cli(site) == 2
    assert "patient_id" in capsys.readouterr().err
    assert not (site / "store").exists() and not (site / "key").exists()


def test_bad_label_map_exits_2(site: Path) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm")])
    assert cli(site, "--label-map", "nodule=1") == 2
    assert not (site / "store").exists()


def test_label_map_selects_and_numbers_the_classes(site: Path) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm"), good_row("good.dcm", "D", (40, 40, 50, 50))])
    assert cli(site, "--label-map", "pleural_plaque=0,nodule=1") == 0
    store = RoiStore.open(site / "store")
    assert store.index.class_names == ("pleural_plaque", "nodule")
    assert store.class_counts() == {"pleural_plaque": 1, "nodule": 1}


# ---------------------------------------------------------------------------------------------
# resampling to a common pixel spacing


def test_spacing_resamples_and_boxes_follow(site: Path) -> None:
    pixels = np.zeros((SIDE, SIDE), np.uint16)
    pixels[20:60, 30:70] = 4000  # the annotated 40x40 box is the only bright area
    write_dicom(site / "dicom" / "fine.dcm", pixels=pixels, spacing_mm=0.2)
    report = run_site(site, [good_row("fine.dcm", box=(30, 20, 40, 40)), good_row("fine.dcm", box=(60, 60, 40, 40))],
                      spacing_mm=0.4, roi_size=16)
    assert rejected(report) == [("no-spacing", "good.dcm", 2), ("roi-outside", "fine.dcm", 4)]
    store = RoiStore.open(site / "store")
    assert store.index.spacing_mm == 0.4 and store.index.records[0].image_shape == (SIDE, SIDE)
    assert store.images.float().mean() > 200  # the ROI sits on the bright box after halving the image


# ---------------------------------------------------------------------------------------------
# incremental re-runs


@pytest.fixture
def three_files(site: Path) -> Path:
    for name in ("b.dcm", "c.dcm"):  # distinct content with contrast (a flat image is rejected as blank)
        pixels = np.random.default_rng(ord(name[0])).integers(0, 4096, (SIDE, SIDE)).astype(np.uint16)
        write_dicom(site / "dicom" / name, patient_id=f"PID-{name}", pixels=pixels)
    write_csv(site / "annotations.csv", [good_row("good.dcm"), good_row("b.dcm", "interstitial"), good_row("c.dcm", "emphysema")])
    return site


def rerun(site: Path, **kwargs: object) -> prepare.PrepareReport:
    return prepare_site(site / "dicom", site / "annotations.csv", site / "store", secret_path=site / "key", workers=1, **kwargs)


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    calls: Counter[str] = Counter()
    original = prepare.load_radiograph

    def counting(path, **kwargs):
        calls[Path(path).name] += 1
        return original(path, **kwargs)

    monkeypatch.setattr(prepare, "load_radiograph", counting)
    return calls


def test_rerun_reuses_unchanged_files(three_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = rerun(three_files)
    images = RoiStore.open(three_files / "store").images.clone()
    calls = count_decodes(monkeypatch)
    second = rerun(three_files)
    assert (first.decoded, first.reused, second.decoded, second.reused) == (3, 0, 0, 3)
    assert sum(calls.values()) == 0
    assert second.rois == 3 and (RoiStore.open(three_files / "store").images == images).all()


def test_rerun_decodes_only_changed_or_new_sources(three_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rerun(three_files)
    write_dicom(three_files / "dicom" / "b.dcm", patient_id="PID-b.dcm")  # new content, same name
    rows = [good_row("good.dcm", "emphysema"), good_row("b.dcm", "interstitial"),
            good_row("c.dcm", "emphysema"), good_row("c.dcm", "nodule", (50, 50, 40, 40))]
    write_csv(three_files / "annotations.csv", rows)
    calls = count_decodes(monkeypatch)
    report = rerun(three_files)
    assert dict(calls) == {"b.dcm": 1, "c.dcm": 1}  # good.dcm only changed its label
    assert (report.decoded, report.reused, report.rois) == (2, 1, 4)
    assert RoiStore.open(three_files / "store").class_counts() == {"nodule": 1, "interstitial": 1, "emphysema": 2}


def test_changed_settings_rebuild_everything(three_files: Path) -> None:
    rerun(three_files)
    report = rerun(three_files, roi_size=32)
    assert (report.decoded, report.reused) == (3, 0)
    assert RoiStore.open(three_files / "store").images.shape == (3, 1, 32, 32)
    assert rerun(three_files, roi_size=32, spacing_mm=None).reused == 3


def test_deleted_files_and_rows_drop_out(three_files: Path) -> None:
    rerun(three_files)
    (three_files / "dicom" / "b.dcm").unlink()
    write_csv(three_files / "annotations.csv", [good_row("good.dcm"), good_row("b.dcm", "interstitial")])
    report = rerun(three_files)
    assert rejected(report) == [("missing-file", "dicom/b.dcm", 3)]
    assert report.unannotated_files == ["c.dcm"]
    store = RoiStore.open(three_files / "store")
    assert len(store) == 1
    assert len(list((three_files / "store" / "pixels").iterdir())) == 1  # stale shards removed


def test_interrupted_rebuild_never_leaves_a_mismatched_store(three_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rerun(three_files)
    written = []

    def fail_after_one(out_dir, sha, rois):
        if written:
            raise KeyboardInterrupt
        written.append(sha)
        original(out_dir, sha, rois)

    original = prepare.write_shard
    monkeypatch.setattr(prepare, "write_shard", fail_after_one)
    with pytest.raises(KeyboardInterrupt):
        rerun(three_files, roi_size=32)
    with pytest.raises(FileNotFoundError, match="pneumofed prepare"):
        RoiStore.open(three_files / "store")
    monkeypatch.setattr(prepare, "write_shard", original)
    assert rerun(three_files, roi_size=32).rois == 3
    assert RoiStore.open(three_files / "store").images.shape == (3, 1, 32, 32)


def test_new_secret_recomputes_patient_keys(three_files: Path) -> None:
    rerun(three_files)
    keys = RoiStore.open(three_files / "store").patient_keys
    (three_files / "key").write_bytes(b"k" * 32)
    report = rerun(three_files)
    assert report.decoded == 3
    new_keys = RoiStore.open(three_files / "store").patient_keys
    assert set(new_keys).isdisjoint(keys) and new_keys[0] in {patient_key(p, b"k" * 32) for p in ("PID-1", "PID-b.dcm", "PID-c.dcm")}


# ---------------------------------------------------------------------------------------------
# the shared NIH set


@pytest.fixture(scope="module")
def nih_store(nih_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, prepare.PrepareReport]:
    out = tmp_path_factory.mktemp("nih")
    report = prepare_site(nih_dir / "dicom", nih_dir / "annotations.csv", out / "store", secret_path=out / "key")
    return out / "store", report


def test_nih_set_gives_one_roi_per_file_from_every_profile(nih_dir: Path, nih_store: tuple[Path, prepare.PrepareReport]) -> None:
    path, report = nih_store
    with (nih_dir / "annotations.csv").open() as handle:
        expected = Counter(row["finding"] for row in csv.DictReader(handle))
    assert (report.files, report.rois, report.rejects, report.unannotated_files) == (146, 146, [], [])
    store = RoiStore.open(path)
    assert store.images.shape == (146, 1, 64, 64)
    assert store.class_counts() == dict(expected)
    assert all(r.box == (0, 0, 512, 512) and r.image_shape == (512, 512) for r in store.index.records)
    profiles: dict[str, set[str]] = {}
    for dcm in (nih_dir / "dicom").iterdir():
        header = pydicom.dcmread(dcm, stop_before_pixels=True)
        sha = hashlib.sha256(dcm.read_bytes()).hexdigest()
        profiles.setdefault(str(header.file_meta.TransferSyntaxUID.name), set()).add(sha)
    stored = {r.source_sha256 for r in store.index.records}
    assert len(profiles) == 3 and all(shas <= stored for shas in profiles.values())
    # MONOCHROME1 files were inverted: every profile's ROIs have similar mean brightness
    means = [store.images[[r.source_sha256 in shas for r in store.index.records]].float().mean().item()
             for shas in profiles.values()]
    assert max(means) - min(means) < 40


def test_nih_store_holds_no_identifying_values(nih_dir: Path, nih_store: tuple[Path, prepare.PrepareReport]) -> None:
    path, _ = nih_store
    keywords = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate", "InstitutionName",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    identifying: set[str] = set()
    for dcm in (nih_dir / "dicom").iterdir():
        header = pydicom.dcmread(dcm, stop_before_pixels=True)
        identifying |= {str(header.get(k, "")) for k in keywords} | {dcm.name, dcm.stem}
    with (nih_dir / "annotations.csv").open() as handle:
        identifying |= {row["patient_id"] for row in csv.DictReader(handle)}
    identifying.discard("")
    assert len(identifying) > 146 * 5
    store_files = [p for p in path.rglob("*") if p.is_file() and p.name != prepare.REJECTS_FILE]
    assert {p.name for p in store_files} >= {INDEX_FILE} and len(store_files) == 147
    for file in store_files:
        text = file.read_bytes().decode("latin-1")
        leaked = [value for value in identifying if value in text]
        assert leaked == [], f"{file.name} contains {leaked[:5]}"


def test_nih_rerun_decodes_nothing(nih_dir: Path, nih_store: tuple[Path, prepare.PrepareReport]) -> None:
    path, _ = nih_store
    report = prepare_site(nih_dir / "dicom", nih_dir / "annotations.csv", path, secret_path=path.parent / "key")
    assert (report.decoded, report.reused, report.rois) == (0, 146, 146)
