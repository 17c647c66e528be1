"""Read a chest radiograph from a DICOM file into display-ready float32 pixels in [0, 1].

Pipeline (DICOM PS3.4 N.2 grayscale pipeline, in this order):

1. header checks, cheapest first: truncation, pixel data present, modality, single frame,
   grayscale, a size that fits in memory (also after resampling), a decoder for the transfer
   syntax is installed;
2. decode stored values (pydicom 3 + pylibjpeg plugins: uncompressed, deflate, RLE, JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K);
3. Modality LUT or Rescale Slope/Intercept;
4. VOI: the first VOI LUT, else the first Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID),
   else robust percentiles 0.5..99.5 (not min-max: burned-in markers, collimator edges and dead
   pixels would otherwise squeeze the lung field into a few grey levels);
   An image left without contrast by these LUTs (every pixel one display value) is rejected:
   stored as ROIs it would be blank squares with real labels;
5. MONOCHROME1 inverted to MONOCHROME2 in display space (bright = dense). In DX, Presentation
   LUT Shape INVERSE merely restates MONOCHROME1, so it is not applied a second time;
6. optional resampling to a common physical pixel size, so ROIs from different scanners share a
   scale.

Files are only ever opened for reading.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

logger = logging.getLogger(__name__)

REJECTION_REASONS = (
    "not-dicom",
    "corrupt",
    "no-pixel-data",
    "wrong-modality",
    "not-grayscale",
    "multi-frame",
    "undecodable",
    "no-spacing",
    "anisotropic-spacing",
    "blank-image",
    "too-large",
)
# CR and DX are the radiography modalities; RG (radiographic imaging, conventional film/screen)
# covers digitised films; "DR" is not a DICOM term but several vendors write it. A file without
# Modality makes no claim and is accepted; anything else (CT, MR, US, OT, SR, ...) is rejected.
RADIOGRAPHY_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
GRAYSCALE_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
PERCENTILE_RANGE = (0.5, 99.5)
# Relative difference between row and column spacing still treated as square pixels.
ISOTROPY_TOLERANCE = 1e-3
# Largest image decoded (stored, and again after resampling). Chest detectors stay below 6000 x
# 6000; 8192 x 8192 float pixels already take ~1.5 GB through the pipeline. Checked on the header,
# before decoding, so a small compressed file claiming a huge size cannot exhaust memory.
MAX_PIXELS = 8192 * 8192


class DicomRejected(Exception):
    """A file that cannot be used as a chest radiograph; ``reason`` is one of REJECTION_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected one of {REJECTION_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Radiograph:
    """Display-ready pixels plus the little metadata the pipeline needs.

    ``pixels``: float32 (H, W) in [0, 1], MONOCHROME2. ``pixel_spacing_mm``: (row, column) spacing
    of ``pixels`` (the target spacing after resampling), None when the file states none.
    ``scale``: factor applied by resampling (1.0 without); multiply boxes in stored-pixel
    coordinates by it.
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    scale: float
    patient_id: str


def load_radiograph(path: str | os.PathLike[str], *, target_spacing_mm: float | None = None) -> Radiograph:
    """Decode one single-frame grayscale radiograph; raises DicomRejected for unusable files.

    With ``target_spacing_mm`` the image is resampled (antialiased bilinear) to that many mm per
    pixel; a file without a usable spacing is then rejected ("no-spacing") rather than passed
    through at its own scale, because silently mixing scales is what resampling exists to prevent.
    A file that cannot be opened raises OSError: that is the caller's problem, not the file's.
    """
    if target_spacing_mm is not None and not target_spacing_mm > 0:
        raise ValueError(f"target_spacing_mm must be positive, got {target_spacing_mm}")
    ds = _read_dataset(Path(path))
    _check_header(ds)
    spacing = pixel_spacing_mm(ds)
    scale = 1.0 if target_spacing_mm is None else _resampling_scale(spacing, target_spacing_mm)
    if scale != 1.0:
        rows, columns = (int(ds.get(keyword, 0) or 0) for keyword in ("Rows", "Columns"))
        _check_size(math.floor(rows * scale), math.floor(columns * scale),
                    f" after resampling to {target_spacing_mm} mm (scale {scale:.3g})")

    stored = _decode(ds)
    values = apply_modality_lut(stored, ds)
    _check_contrast(values, lambda v: f"every pixel has the value {v:g} after the Modality LUT/rescale"
                    + (" (all stored values are equal)" if _is_flat(stored) else ""))
    display, voi = _apply_voi(values, ds)
    _check_contrast(display, lambda _: f"{voi()} maps every pixel to one display value")
    if ds.PhotometricInterpretation == "MONOCHROME1":
        display = 1.0 - display
    if target_spacing_mm is not None:
        display = resample(display, scale)
        spacing = (target_spacing_mm, target_spacing_mm)
    return Radiograph(
        pixels=np.ascontiguousarray(display, dtype=np.float32),
        pixel_spacing_mm=spacing,
        scale=scale,
        patient_id=str(ds.get("PatientID", "") or ""),
    )


def _resampling_scale(spacing: tuple[float, float] | None, target_spacing_mm: float) -> float:
    if spacing is None:
        raise DicomRejected(
            "no-spacing", f"no usable PixelSpacing/ImagerPixelSpacing to resample to {target_spacing_mm} mm"
        )
    if abs(spacing[0] - spacing[1]) > ISOTROPY_TOLERANCE * max(spacing):
        detail = f"pixel spacing {spacing} mm is not square; a single scale cannot map boxes"
        raise DicomRejected("anisotropic-spacing", detail)
    return spacing[1] / target_spacing_mm


def _read_dataset(path: Path) -> Dataset:
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        try:
            ds = pydicom.dcmread(fh, force=False)
        except InvalidDicomError as exc:
            raise DicomRejected("not-dicom", str(exc)) from exc
        except Exception as exc:  # pydicom surfaces a damaged byte stream as many error types
            raise DicomRejected("corrupt", f"{type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise DicomRejected("corrupt", "file meta information lacks TransferSyntaxUID")
    if ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:  # deflated offsets are not file offsets
        _check_complete(ds, file_size)
    return ds


def _check_complete(ds: Dataset, file_size: int) -> None:
    """Reject truncated files, which pydicom reads leniently.

    pydicom keeps a short final value and silently drops an unterminated encapsulated Pixel Data
    element, so the last element that was parsed must end exactly where the file ends.
    """
    if not ds.keys():
        raise DicomRejected("corrupt", "no data elements after the file meta information")
    last = ds.get_item(max(ds.keys()))
    value_tell = getattr(last, "value_tell", None)
    if value_tell is None or last.length == 0xFFFFFFFF:  # undefined length: parsed up to its delimiter
        return
    end = value_tell + last.length
    if end != file_size:
        detail = f"truncated or damaged: last element {last.tag} ends at byte {end} of {file_size}"
        raise DicomRejected("corrupt", detail)


def _check_header(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise DicomRejected("no-pixel-data", "no (7FE0,0010) Pixel Data element")
    modality = str(ds.get("Modality", "") or "")
    if modality and modality not in RADIOGRAPHY_MODALITIES:
        raise DicomRejected("wrong-modality", f"modality {modality!r} is not one of {sorted(RADIOGRAPHY_MODALITIES)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomRejected("multi-frame", f"{frames} frames; a radiograph has one")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in GRAYSCALE_PHOTOMETRICS:
        raise DicomRejected("not-grayscale", f"SamplesPerPixel={samples}, PhotometricInterpretation={photometric!r}")
    _check_size(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomRejected("undecodable", f"no decoder for transfer syntax {syntax.name} ({syntax})") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DicomRejected("undecodable", f"decoder for {syntax.name} needs: {missing}")


def _check_size(rows: int, columns: int, when: str = "") -> None:
    if rows * columns > MAX_PIXELS:
        raise DicomRejected(
            "too-large", f"{columns} x {rows} pixels{when} is more than the {MAX_PIXELS} pixels "
            f"({math.isqrt(MAX_PIXELS)} x {math.isqrt(MAX_PIXELS)}) a radiograph may have"
        )


def _is_flat(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.min(x) == np.max(x))


def _check_contrast(x: np.ndarray, detail: Callable[[float], str]) -> None:
    """Reject an image whose pixels all have one value: no LUT after this can bring contrast back."""
    if _is_flat(x):
        raise DicomRejected("blank-image", f"no contrast left: {detail(float(x.flat[0]) if x.size else 0.0)}")


def _decode(ds: Dataset) -> np.ndarray:
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        stored = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Rust codecs (pylibjpeg-rle) fail with pyo3's PanicException, a BaseException
        # Native pixel data only fails when it does not match its own header; a codec may also
        # refuse intact data in a variant it does not implement, so that is not called corrupt.
        reason = "undecodable" if syntax.is_compressed else "corrupt"
        raise DicomRejected(reason, f"{syntax.name} pixel data cannot be decoded: {exc}") from exc
    if stored.ndim != 2:
        raise DicomRejected("corrupt", f"decoded pixel array has shape {stored.shape}, expected (rows, columns)")
    return stored


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, Callable[[], str]]:
    """Map modality values to [0, 1] display values with the file's first VOI, else percentiles;
    also returns what names that VOI (for rejecting an image it leaves blank)."""
    if ds.get("VOILUTSequence"):
        return _apply_voi_lut(values, ds), lambda: "the first VOI LUT"
    center, width = _first_window(ds)
    if center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        windowed = window(values, center, width, function)
        if windowed is not None:
            return windowed, lambda: (f"the window (center {center:g}, width {width:g}, {function}) "
                                      f"on modality values {np.min(values):g}..{np.max(values):g}")
        logger.warning("ignoring invalid window (center=%s, width=%s, function=%s)", center, width, function)
    x = values.astype(np.float32, copy=False)
    low, high = (float(v) for v in np.percentile(x, PERCENTILE_RANGE))
    return _rescale(x, low, high), lambda: (
        f"the {PERCENTILE_RANGE[0]}..{PERCENTILE_RANGE[1]} percentile window (modality values {low:g}..{high:g})")


def _apply_voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first_mapped = int(descriptor[0]) or 2**16, int(descriptor[1])
    # Normalise by the values the LUT actually holds rather than its nominal bit depth: some
    # writers declare 16 bits per entry yet fill only 12, which would leave the image near black.
    lut = apply_voi(np.arange(first_mapped, first_mapped + entries), ds).astype(np.float32)
    low, high = float(lut.min()), float(lut.max())
    mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float32)
    return _rescale(mapped, low, high)


def _first_window(ds: Dataset) -> tuple[float | None, float | None]:
    def first(keyword: str) -> float | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return float(value[0] if isinstance(value, MultiValue) else value)

    return first("WindowCenter"), first("WindowWidth")


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 1]; None for an invalid window.

    pydicom's apply_windowing targets the stored-value range instead, which would have to be
    undone to reach [0, 1]; the three formulas are short enough to state here directly.
    """
    x = values.astype(np.float32, copy=False)
    if function == "SIGMOID":
        return None if width <= 0 else 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width, dtype=np.float32))
    if function == "LINEAR_EXACT":
        return None if width <= 0 else np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        logger.warning("unknown VOI LUT Function %r, using LINEAR", function)
    if width < 1:
        return None
    if width == 1:  # the formula's limit: a threshold
        return (x > center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def percentile_normalise(
    values: np.ndarray, percentiles: tuple[float, float] = PERCENTILE_RANGE
) -> np.ndarray:
    """Linearly map the given percentiles to 0 and 1, clipping outside; a flat image becomes 0."""
    x = values.astype(np.float32, copy=False)
    low, high = np.percentile(x, percentiles)
    return _rescale(x, float(low), float(high))


def _rescale(x: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(x.shape, np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm at the patient, or None when the file states no usable one.

    PixelSpacing comes first: by definition (PS3.3 10.7.1.3) it is already calibrated to the
    patient. ImagerPixelSpacing is measured at the detector, where the body appears magnified
    by the source-to-detector / source-to-patient ratio, so it is divided by
    EstimatedRadiographicMagnificationFactor when the file states one. Zero, negative or
    unparseable values (some writers put 0\\0) count as absent.
    """
    candidates = [("PixelSpacing", 1.0)]
    magnification = _positive_float(ds.get("EstimatedRadiographicMagnificationFactor")) or 1.0
    candidates.append(("ImagerPixelSpacing", magnification))
    for keyword, divisor in candidates:
        value = ds.get(keyword)
        if value is None or len(value) != 2:
            continue
        row, col = _positive_float(value[0]), _positive_float(value[1])
        if row is None or col is None:
            logger.warning("ignoring unusable %s %r", keyword, value)
            continue
        return (row / divisor, col / divisor)
    return None


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize a (H, W) float image by ``scale`` with antialiased bilinear interpolation.

    The output has floor(H * scale) x floor(W * scale) pixels and the sampling grid uses
    ``scale`` itself, so a stored-pixel coordinate maps exactly to coordinate * scale.
    """
    if scale == 1.0:
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(
        tensor, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False, recompute_scale_factor=False
    )
    return out[0, 0].clamp_(0.0, 1.0).numpy()
