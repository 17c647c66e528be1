from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from pneumofed.common.data.dicom import (
    REJECTION_REASONS,
    DicomRejected,
    Radiograph,
    load_radiograph,
)

# ---------------------------------------------------------------- helpers


def radiograph_dataset(
    stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **attributes
) -> Dataset:
    """A minimal DX 'For Presentation' dataset holding ``stored`` (2D, or 3D for several frames)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.PatientID = "P-0001"
    ds.InstitutionName = "TEST HOSPITAL"
    ds.set_pixel_data(stored, photometric, bits_stored or stored.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 48, cols: int = 64, high: int = 1000, dtype=np.uint16) -> np.ndarray:
    """Values rising left to right, 0..high, different in every column."""
    return np.tile(np.linspace(0, high, cols).round().astype(dtype), (rows, 1))


def relabelled_as_cr(name: str, tmp_path: Path) -> Path:
    """A pydicom test file with its pixel data and transfer syntax untouched, relabelled CR."""
    source = get_testdata_file(name)
    if source is None:
        pytest.skip(f"pydicom test file {name} not available")
    ds = pydicom.dcmread(source)
    ds.Modality = "CR"
    out = tmp_path / name
    ds.save_as(out)
    return out


def assert_display_image(radiograph: Radiograph, shape: tuple[int, int]) -> None:
    pixels = radiograph.pixels
    assert pixels.dtype == np.float32 and pixels.shape == shape
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert pixels.max() - pixels.min() > 0.5, "display range collapsed"


def assert_monotone_in(raw: np.ndarray, pixels: np.ndarray, *, increasing: bool = True) -> None:
    """Display values are a monotone function of the stored values (no scrambled pixels)."""
    order = np.argsort(raw.ravel(), kind="stable")
    steps = np.diff(pixels.ravel()[order].astype(np.float64))
    assert (steps >= -1e-6).all() if increasing else (steps <= 1e-6).all()


# ---------------------------------------------------------------- the shared NIH set

PROFILES = {  # InstitutionName -> (Modality, Photometric, BitsStored, transfer syntax)
    "HOSPITAL A": ("DX", "MONOCHROME2", 12, "1.2.840.10008.1.2.1"),
    "HOSPITAL B": ("DX", "MONOCHROME1", 12, "1.2.840.10008.1.2.4.90"),
    "HOSPITAL C": ("CR", "MONOCHROME2", 10, "1.2.840.10008.1.2.5"),
}


@pytest.fixture(scope="module")
def nih_files_by_profile(nih_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Three (path, annotated patient id) per hospital profile."""
    picked: dict[str, list[tuple[Path, str]]] = {name: [] for name in PROFILES}
    with open(nih_dir / "annotations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            path = nih_dir / row["file"]
            institution = pydicom.dcmread(path, stop_before_pixels=True).InstitutionName
            if len(picked[institution]) < 3:
                picked[institution].append((path, row["patient_id"]))
    return picked


@pytest.mark.parametrize("institution", sorted(PROFILES))
def test_every_nih_profile_decodes_to_display_values(nih_files_by_profile, institution):
    modality, photometric, bits, syntax = PROFILES[institution]
    mean_image = np.zeros((512, 512), np.float64)
    for path, patient_id in nih_files_by_profile[institution]:
        radiograph = load_radiograph(path)
        assert_display_image(radiograph, (512, 512))
        assert header(path) == (modality, photometric, syntax, institution)
        assert radiograph.patient_id == patient_id
        assert radiograph.pixel_spacing_mm == pytest.approx((0.286, 0.286)) and radiograph.scale == 1.0
        raw = pydicom.dcmread(path).pixel_array
        assert raw.max() < 2**bits
        correlation = np.corrcoef(raw.ravel().astype(np.float64), radiograph.pixels.ravel())[0, 1]
        # MONOCHROME1 stores dense tissue dark, so our MONOCHROME2 output runs against the raw values.
        assert correlation < -0.99 if photometric == "MONOCHROME1" else correlation > 0.99
        mean_image += radiograph.pixels
    # Anatomy, whatever the profile: the mediastinum/spine column is brighter than the lung fields.
    mediastinum = mean_image[150:400, 236:276].mean()
    lungs = np.concatenate([mean_image[150:350, 110:180].ravel(), mean_image[150:350, 332:402].ravel()]).mean()
    assert mediastinum > lungs


def test_nih_file_is_opened_read_only_and_left_unchanged(nih_files_by_profile):
    path, _ = nih_files_by_profile["HOSPITAL B"][0]
    before = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    load_radiograph(path, target_spacing_mm=0.5)
    assert (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) == before


def test_nih_resampling_to_a_coarser_grid(nih_files_by_profile):
    path, _ = nih_files_by_profile["HOSPITAL C"][0]
    radiograph = load_radiograph(path, target_spacing_mm=0.572)
    assert radiograph.scale == pytest.approx(0.5)
    assert radiograph.pixels.shape == (256, 256)
    assert radiograph.pixel_spacing_mm == (0.572, 0.572)
    full = load_radiograph(path).pixels
    assert np.abs(radiograph.pixels - full.reshape(256, 2, 256, 2).mean(axis=(1, 3))).mean() < 0.01


# ---------------------------------------------------------------- pydicom-data chest CR (RG1)


def header(path) -> tuple[str, str, str, str]:
    """(Modality, PhotometricInterpretation, transfer syntax, InstitutionName) as the file states them."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (str(ds.get("Modality", "") or ""), str(ds.PhotometricInterpretation), ds.file_meta.TransferSyntaxUID,
            str(ds.get("InstitutionName", "") or ""))


@pytest.fixture(scope="module")
def rg1() -> dict[str, tuple[Radiograph, np.ndarray]]:
    """RG1: a 1955x1841 15-bit MONOCHROME1 CR. UNCR/J2KR: original and its lossless JPEG 2000;
    J2KI: lossy JPEG 2000 of it; UNCI: J2KI decompressed by the data set's authors."""
    loaded = {}
    for variant in ("UNCR", "J2KR", "J2KI", "UNCI"):
        path = get_testdata_file(f"RG1_{variant}.dcm")
        if path is None:
            pytest.skip("pydicom-data (RG1_*.dcm chest CR files) is not installed")
        loaded[variant] = (load_radiograph(path), pydicom.dcmread(path).pixel_array)
    return loaded


def test_rg1_lossless_jpeg2000_equals_uncompressed(rg1):
    original, raw = rg1["UNCR"]
    assert_display_image(original, raw.shape)
    assert int(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True).BitsStored) == 15
    assert np.array_equal(rg1["J2KR"][0].pixels, original.pixels)


def test_rg1_lossy_jpeg2000_is_close_to_original(rg1):
    original, lossy = rg1["UNCR"][0].pixels, rg1["J2KI"][0].pixels
    assert np.array_equal(lossy, rg1["UNCI"][0].pixels)  # same decompression as the reference one
    assert np.abs(lossy - original).mean() < 0.01
    assert np.corrcoef(lossy.ravel(), original.ravel())[0, 1] > 0.99


def test_rg1_monochrome1_15bit_is_inverted_and_invalid_spacing_ignored(rg1):
    radiograph, raw = rg1["UNCR"]
    assert header(get_testdata_file("RG1_UNCR.dcm"))[1] == "MONOCHROME1"
    assert_monotone_in(raw, radiograph.pixels, increasing=False)
    assert radiograph.pixel_spacing_mm is None  # the file states PixelSpacing 0\0


# ---------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_lossless_transfer_syntaxes_match_explicit_little_endian(name, tmp_path):
    reference_path, decoded_path = relabelled_as_cr("MR_small.dcm", tmp_path), relabelled_as_cr(name, tmp_path)
    reference, decoded = load_radiograph(reference_path), load_radiograph(decoded_path)
    assert header(decoded_path)[2] != header(reference_path)[2]
    assert np.array_equal(decoded.pixels, reference.pixels)


@pytest.mark.parametrize(
    "name",
    [
        "JPEG-LL.dcm",  # JPEG Lossless SV1, signed 16-bit
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG Lossless SV1, 8-bit
        "JPGExtended.dcm",  # JPEG Extended, 12-bit
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
        "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    ],
)
def test_other_transfer_syntaxes_decode_monotonically(name, tmp_path):
    path = relabelled_as_cr(name, tmp_path)
    raw = pydicom.dcmread(path).pixel_array
    radiograph = load_radiograph(path)
    assert_display_image(radiograph, raw.shape)
    assert_monotone_in(raw, radiograph.pixels)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressing_a_synthetic_radiograph_losslessly_changes_nothing(syntax, tmp_path):
    stored = (ramp(high=4000) + np.arange(48, dtype=np.uint16)[:, None] * 2).astype(np.uint16)
    plain = load_radiograph(write(radiograph_dataset(stored, bits_stored=12), tmp_path / "plain.dcm"))
    ds = radiograph_dataset(stored, bits_stored=12)
    ds.compress(syntax)
    compressed_path = write(ds, tmp_path / "compressed.dcm")
    compressed = load_radiograph(compressed_path)
    assert header(compressed_path)[2] == syntax
    assert np.array_equal(compressed.pixels, plain.pixels)


def test_jpeg_baseline_8bit(tmp_path):
    stored = ramp(high=255, dtype=np.uint8)
    ds = radiograph_dataset(stored)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    baseline_path = write(ds, tmp_path / "baseline.dcm")
    radiograph = load_radiograph(baseline_path)
    assert header(baseline_path)[2] == JPEGBaseline8Bit
    plain = load_radiograph(write(radiograph_dataset(stored), tmp_path / "plain.dcm"))
    assert np.abs(radiograph.pixels - plain.pixels).mean() < 0.01


# ---------------------------------------------------------------- grey-level pipeline


def test_rescale_slope_intercept_applied_before_window(tmp_path):
    # Modality values 2*s - 100; this exact window maps them back to s / 1000.
    stored = ramp(high=1000)
    ds = radiograph_dataset(
        stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=900, WindowWidth=2000, VOILUTFunction="LINEAR_EXACT"
    )
    pixels = load_radiograph(write(ds, tmp_path / "rescaled.dcm")).pixels
    np.testing.assert_allclose(pixels, stored / 1000.0, atol=1e-6)


def test_first_linear_window_is_applied_and_clips(tmp_path):
    stored = ramp(high=200)
    ds = radiograph_dataset(stored, WindowCenter=[100, 50], WindowWidth=[51, 10])
    pixels = load_radiograph(write(ds, tmp_path / "window.dcm")).pixels
    # PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped, for the first window.
    expected = np.clip((stored.astype(np.float64) - 99.5) / 50 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert pixels[:, 0].max() == 0.0 and pixels[:, -1].min() == 1.0


def test_sigmoid_window_is_half_at_center(tmp_path):
    stored = np.full((8, 8), 300, np.uint16)
    stored[0, 0] = 0
    ds = radiograph_dataset(stored, WindowCenter=300, WindowWidth=100, VOILUTFunction="SIGMOID")
    pixels = load_radiograph(write(ds, tmp_path / "sigmoid.dcm")).pixels
    assert pixels[4, 4] == pytest.approx(0.5) and pixels[0, 0] < 0.01


def test_voi_lut_sequence_takes_precedence_over_window(tmp_path):
    stored = ramp(high=255)
    ds = radiograph_dataset(stored, WindowCenter=128, WindowWidth=256)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 16])  # LUT Descriptor: 16 bits declared...
    item.add_new(0x00283006, "US", list(range(4095, -1, -16)))  # ...12 used, decreasing
    ds.VOILUTSequence = [item]
    pixels = load_radiograph(write(ds, tmp_path / "voilut.dcm")).pixels
    assert pixels[:, 0].min() == 1.0 and pixels[:, -1].max() == 0.0  # full range despite 12 of 16 bits
    assert_monotone_in(stored, pixels, increasing=False)


def test_without_window_percentiles_ignore_burned_in_markers(tmp_path):
    stored = ramp(high=1000)
    stored[:2, :2] = 4095  # a burned-in marker, 4 of 3072 pixels
    pixels = load_radiograph(write(radiograph_dataset(stored, bits_stored=12), tmp_path / "marker.dcm")).pixels
    assert pixels[:2, :2].min() == 1.0
    lung_ramp = pixels[2:, :]
    assert lung_ramp.max() - lung_ramp.min() > 0.95  # min-max would squeeze it into 0..0.25


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    stored = ramp(high=200)
    ds = radiograph_dataset(stored, photometric="MONOCHROME1", WindowCenter=50, WindowWidth=51)
    pixels = load_radiograph(write(ds, tmp_path / "mono1.dcm")).pixels
    # The window selects 25..75 on stored values; inversion happens on its output.
    expected = 1 - np.clip((stored.astype(np.float64) - 49.5) / 50 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "bits_stored", "high"),
    [(np.uint8, 8, 255), (np.uint16, 10, 1023), (np.uint16, 15, 32767), (np.uint16, 16, 65535)],
)
def test_unsigned_bit_depths(dtype, bits_stored, high, tmp_path):
    stored = ramp(high=high, dtype=dtype)
    radiograph = load_radiograph(write(radiograph_dataset(stored, bits_stored=bits_stored), tmp_path / "bits.dcm"))
    assert_display_image(radiograph, stored.shape)
    assert_monotone_in(stored, radiograph.pixels)


def test_signed_pixels_keep_their_sign(tmp_path):
    stored = (ramp(high=2000).astype(np.int32) - 1000).astype(np.int16)
    ds = radiograph_dataset(stored, bits_stored=16)
    assert ds.PixelRepresentation == 1
    pixels = load_radiograph(write(ds, tmp_path / "signed.dcm")).pixels
    assert_monotone_in(stored, pixels)  # read as unsigned, -1000 would be the brightest pixel
    assert pixels[:, 0].max() == 0.0 and pixels[:, -1].min() == 1.0


# ---------------------------------------------------------------- spacing and resampling


def test_pixel_spacing_preferred_over_imager_pixel_spacing(tmp_path):
    ds = radiograph_dataset(ramp(), PixelSpacing=[0.15, 0.15], ImagerPixelSpacing=[0.2, 0.2])
    assert load_radiograph(write(ds, tmp_path / "both.dcm")).pixel_spacing_mm == pytest.approx((0.15, 0.15))


def test_imager_pixel_spacing_corrected_for_magnification(tmp_path):
    ds = radiograph_dataset(ramp(), ImagerPixelSpacing=[0.22, 0.22], EstimatedRadiographicMagnificationFactor=1.1)
    assert load_radiograph(write(ds, tmp_path / "ermf.dcm")).pixel_spacing_mm == pytest.approx((0.2, 0.2))


@pytest.mark.parametrize(("target", "shape"), [(0.4, (24, 32)), (0.1, (96, 128)), (0.3, (32, 42))])
def test_resampling_to_target_spacing(target, shape, tmp_path):
    stored = np.zeros((48, 64), np.uint16)
    x, y, w, h = 20, 12, 16, 8
    stored[y : y + h, x : x + w] = 1000
    ds = radiograph_dataset(stored, PixelSpacing=[0.2, 0.2], WindowCenter=500, WindowWidth=1000)
    path = write(ds, tmp_path / "box.dcm")
    radiograph = load_radiograph(path, target_spacing_mm=target)
    assert radiograph.scale == pytest.approx(0.2 / target)
    assert radiograph.pixels.shape == shape
    assert radiograph.pixel_spacing_mm == (target, target)
    assert 0.0 <= radiograph.pixels.min() and radiograph.pixels.max() <= 1.0
    # A box given in stored pixels, multiplied by scale, lands on the same structure.
    rows, cols = np.nonzero(radiograph.pixels > 0.0)
    weights = radiograph.pixels[rows, cols]
    centre = np.average(cols, weights=weights) + 0.5, np.average(rows, weights=weights) + 0.5
    assert centre == pytest.approx(((x + w / 2) * radiograph.scale, (y + h / 2) * radiograph.scale), abs=0.15)


def test_downsampling_is_antialiased(tmp_path):
    stripes = np.tile((np.arange(60) % 2 * 1000).astype(np.uint16), (60, 1))  # finest possible detail
    ds = radiograph_dataset(stripes, PixelSpacing=[0.1, 0.1], WindowCenter=500, WindowWidth=1000)
    pixels = load_radiograph(write(ds, tmp_path / "stripes.dcm"), target_spacing_mm=0.3).pixels
    # Averaged out, not aliased into coarse stripes (plain bilinear at 1/3 picks whole columns).
    assert pixels.shape == (20, 20) and np.abs(pixels - 0.5).max() < 0.1


def test_no_resampling_without_target(tmp_path):
    radiograph = load_radiograph(write(radiograph_dataset(ramp(), PixelSpacing=[0.2, 0.2]), tmp_path / "s.dcm"))
    assert radiograph.scale == 1.0 and radiograph.pixels.shape == (48, 64)


def test_invalid_target_spacing_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError, match="target_spacing_mm"):
        load_radiograph(write(radiograph_dataset(ramp()), tmp_path / "x.dcm"), target_spacing_mm=0)


# ---------------------------------------------------------------- rejections


def rejection(path: Path, **kwargs) -> str:
    with pytest.raises(DicomRejected) as caught:
        load_radiograph(path, **kwargs)
    assert caught.value.detail and str(caught.value).startswith(caught.value.reason)
    return caught.value.reason


def truncated_copy(path: Path, missing_bytes: int) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"truncated-{path.name}")
    out.write_bytes(data[:-missing_bytes])
    return out


def test_not_dicom(tmp_path):
    (tmp_path / "notes.dcm").write_text("this is a report, not an image\n" * 10)
    assert rejection(tmp_path / "notes.dcm") == "not-dicom"
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert rejection(tmp_path / "empty.dcm") == "not-dicom"


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_files_are_corrupt(tmp_path):
    plain = write(radiograph_dataset(ramp()), tmp_path / "plain.dcm")
    assert rejection(truncated_copy(plain, 100)) == "corrupt"
    ds = radiograph_dataset(ramp())
    ds.compress(RLELossless)
    rle = write(ds, tmp_path / "rle.dcm")
    assert rejection(truncated_copy(rle, 100)) == "corrupt"  # pydicom silently drops the unterminated pixel data
    (tmp_path / "header.dcm").write_bytes(plain.read_bytes()[:500])
    assert rejection(tmp_path / "header.dcm") == "corrupt"


def test_pixel_data_shorter_than_header_says_is_corrupt(tmp_path):
    ds = radiograph_dataset(ramp())
    ds.PixelData = ds.PixelData[:-64]
    assert rejection(write(ds, tmp_path / "short.dcm")) == "corrupt"


def test_no_pixel_data(tmp_path):
    ds = radiograph_dataset(ramp())
    del ds.PixelData
    assert rejection(write(ds, tmp_path / "header-only.dcm")) == "no-pixel-data"


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "OT"])
def test_wrong_modality(modality, tmp_path):
    assert rejection(write(radiograph_dataset(ramp(), Modality=modality), tmp_path / "m.dcm")) == "wrong-modality"


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG", None])
def test_radiography_modalities_and_absent_modality_accepted(modality, tmp_path):
    ds = radiograph_dataset(ramp())
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    path = write(ds, tmp_path / "m.dcm")
    assert load_radiograph(path).pixels.size and header(path)[0] == (modality or "")


def test_colour_images_are_not_grayscale(tmp_path):
    rgb = radiograph_dataset(np.zeros((8, 8, 3), np.uint8), photometric="RGB")
    assert rejection(write(rgb, tmp_path / "rgb.dcm")) == "not-grayscale"
    palette = radiograph_dataset(np.zeros((8, 8), np.uint8), PhotometricInterpretation="PALETTE COLOR")
    assert rejection(write(palette, tmp_path / "palette.dcm")) == "not-grayscale"


def test_multi_frame(tmp_path):
    ds = radiograph_dataset(np.stack([ramp(), ramp()]))
    assert ds.NumberOfFrames == 2
    assert rejection(write(ds, tmp_path / "frames.dcm")) == "multi-frame"


def test_transfer_syntax_without_decoder_is_undecodable(tmp_path):
    ds = radiograph_dataset(ramp())
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.92")  # JPEG 2000 Part 2 multi-component
    assert rejection(write(ds, tmp_path / "part2.dcm")) == "undecodable"


def test_codestream_the_codec_refuses_is_undecodable(tmp_path):
    ds = radiograph_dataset(ramp())
    ds.PixelData = encapsulate([bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    assert rejection(write(ds, tmp_path / "garbage-j2k.dcm")) == "undecodable"


def test_rle_segments_overrunning_the_frame_are_undecodable(tmp_path):
    # The Rust RLE decoder panics on this (a BaseException, not an Exception); it must still be a rejection.
    segment = b"\x81\x00" * 100  # 100 runs of 128 zero bytes for a 3072-byte segment
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *[0] * 13)
    ds = radiograph_dataset(ramp())
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    assert rejection(write(ds, tmp_path / "overrun-rle.dcm")) == "undecodable"


def test_spacing_required_only_when_resampling(tmp_path):
    path = write(radiograph_dataset(ramp()), tmp_path / "nospacing.dcm")
    assert load_radiograph(path).pixel_spacing_mm is None
    assert rejection(path, target_spacing_mm=0.2) == "no-spacing"
    zero = write(radiograph_dataset(ramp(), PixelSpacing=[0, 0]), tmp_path / "zero.dcm")
    assert rejection(zero, target_spacing_mm=0.2) == "no-spacing"


def test_anisotropic_spacing_cannot_be_resampled_to_one_scale(tmp_path):
    path = write(radiograph_dataset(ramp(), PixelSpacing=[0.1, 0.2]), tmp_path / "aniso.dcm")
    assert load_radiograph(path).pixel_spacing_mm == pytest.approx((0.1, 0.2))
    assert rejection(path, target_spacing_mm=0.2) == "anisotropic-spacing"


def test_rejection_reasons_are_a_closed_set():
    contract = {"not-dicom", "corrupt", "no-pixel-data", "wrong-modality", "not-grayscale", "multi-frame", "undecodable"}
    assert contract <= set(REJECTION_REASONS)
    with pytest.raises(ValueError, match="unknown rejection reason"):
        DicomRejected("bad-vibes", "not a code")


def test_read_only_file_loads_and_stays_unchanged(tmp_path):
    path = write(radiograph_dataset(ramp(), PixelSpacing=[0.2, 0.2]), tmp_path / "ro.dcm")
    os.chmod(path, 0o444)
    before = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    load_radiograph(path, target_spacing_mm=0.4)
    assert (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) == before


# ---------------------------------------------------------------- no contrast, too large


def constant_modality_lut(stored: np.ndarray) -> Dataset:
    ds = radiograph_dataset(stored, bits_stored=12)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: every stored value 0..4095...
    item.add_new(0x00283006, "US", [1234] * 4096)  # ...maps to 1234
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    return ds


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (constant_modality_lut, "value 1234 after the Modality LUT"),
        (lambda s: radiograph_dataset(s, RescaleSlope=0, RescaleIntercept=-7), "value -7 after the Modality LUT"),
        (lambda s: radiograph_dataset(np.full_like(s, 900)), "(all stored values are equal)"),
        (lambda s: radiograph_dataset(s, WindowCenter=30000, WindowWidth=100), "the window (center 30000, width 100"),
    ],
    ids=["modality-lut", "rescale-slope-0", "flat-stored", "window-outside-values"],
)
def test_an_image_left_without_contrast_by_its_luts_is_blank(make, says, tmp_path):
    path = write(make(ramp(high=1000)), tmp_path / "blank.dcm")
    with pytest.raises(DicomRejected) as caught:
        load_radiograph(path)
    assert caught.value.reason == "blank-image" and says in caught.value.detail


def test_a_contrasted_modality_lut_is_not_blank(tmp_path):
    ds = constant_modality_lut(ramp(high=1000))
    ds.ModalityLUTSequence[0].add_new(0x00283006, "US", list(range(4096)))
    assert_display_image(load_radiograph(write(ds, tmp_path / "lut.dcm")), (48, 64))


def test_header_size_beyond_the_limit_is_too_large_before_decoding(tmp_path):
    ds = radiograph_dataset(ramp())
    ds.Rows = ds.Columns = 9000  # the pixel data is tiny: decoding would call it corrupt
    assert rejection(write(ds, tmp_path / "huge.dcm")) == "too-large"


def test_resampling_beyond_the_size_limit_is_too_large(tmp_path):
    path = write(radiograph_dataset(ramp(41, 41), PixelSpacing=[0.2, 0.2]), tmp_path / "small.dcm")
    with pytest.raises(DicomRejected) as caught:
        load_radiograph(path, target_spacing_mm=0.001)  # x200: 8200 x 8200 pixels
    assert caught.value.reason == "too-large" and "after resampling to 0.001 mm" in caught.value.detail
    assert load_radiograph(path, target_spacing_mm=0.01).pixels.shape == (820, 820)
