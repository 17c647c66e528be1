"""Synthetic hospitals: chest-radiograph-like DICOM files with annotated ROIs of three findings.

Each hospital has its own acquisition profile (modality, photometric interpretation, bit depth,
transfer syntax, pixel spacing, exposure response, noise, Modality/VOI LUT tags) and its own class
mix, so a federated run meets the between-site heterogeneity of real multicentre data. Lesions are
deliberately subtle and share the clutter of the anatomy (vessels, rib crossings, noise), so the
classes overlap. Everything is a deterministic function of the seed: same seed, identical bytes.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

FINDINGS = ("nodule", "interstitial", "emphysema")
IMAGE_SIZE = 512
BOX_SIZE_RANGE = (40, 96)
# Seed paper: 171, 22 and 24 of 217 patients had 1, 2 and 3 ROIs.
ROIS_PER_PATIENT_P = (0.79, 0.10, 0.11)
# Upper / middle / lower lung zone, after the seed paper's Table 3 (interstitial changes sit low).
ZONE_P = {"nodule": (0.5, 0.36, 0.14), "interstitial": (0.03, 0.47, 0.5), "emphysema": (0.45, 0.3, 0.25)}
ANNOTATION_COLUMNS = ("file", "patient_id", "x", "y", "width", "height", "finding")


@dataclass(frozen=True)
class HospitalProfile:
    institution: str
    manufacturer: str
    modality: str  # "DX" writes ImagerPixelSpacing, "CR" PixelSpacing
    photometric: str  # MONOCHROME1 stores dense tissue dark
    bits_stored: int
    transfer_syntax: UID
    pixel_spacing_mm: float
    gamma: float  # detector/processing response applied to the density image
    noise: float  # quantum-noise standard deviation at full signal
    rescale: tuple[float, float] | None  # (slope, intercept); DX always writes the identity
    window: bool  # whether a VOI window centre/width is written
    class_mix: tuple[float, float, float]  # probabilities of FINDINGS


PROFILES = (
    HospitalProfile("NORTH VALLEY GENERAL HOSPITAL", "Acme Imaging", "DX", "MONOCHROME2", 12,
                    ExplicitVRLittleEndian, 0.75, 1.0, 0.012, None, True, (0.6, 0.25, 0.15)),
    HospitalProfile("EASTSIDE MINERS HOSPITAL", "Borealis Medical", "CR", "MONOCHROME1", 10,
                    RLELossless, 0.80, 0.8, 0.02, (1.0, -512.0), False, (0.34, 0.33, 0.33)),
    HospitalProfile("SOUTH RIDGE CLINIC", "Cobalt Systems", "DX", "MONOCHROME2", 14,
                    JPEG2000Lossless, 0.70, 1.25, 0.008, None, True, (0.2, 0.3, 0.5)),
    HospitalProfile("WEST HILLS REGIONAL HOSPITAL", "Acme Imaging", "CR", "MONOCHROME2", 16,
                    ExplicitVRLittleEndian, 0.85, 1.1, 0.015, (0.5, -1000.0), True, (0.45, 0.4, 0.15)),
)

_SURNAMES = ("SMITH", "JONES", "BROWN", "WANG", "LI", "ZHANG", "MUELLER", "NOWAK", "GARCIA", "EVANS")
_GIVEN = ("JOHN", "MARY", "WEI", "PETER", "ANNA", "JAMES", "LING", "TOMASZ", "CARLOS", "DAVID")


def hospital_profile(number: int, seed: int = 0) -> HospitalProfile:
    """Profile of hospital `number` (1-based): fixed for the first four, drawn from the seed after."""
    if number < 1:
        raise ValueError(f"hospital numbers start at 1, got {number}")
    if number <= len(PROFILES):
        return PROFILES[number - 1]
    rng = np.random.default_rng([seed, number, 1])
    modality = str(rng.choice(["DX", "CR"]))
    return HospitalProfile(
        institution=f"HOSPITAL {number}",
        manufacturer=str(rng.choice(["Acme Imaging", "Borealis Medical", "Cobalt Systems"])),
        modality=modality,
        photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
        bits_stored=int(rng.choice([10, 12, 14, 16])),
        transfer_syntax=UID(str(rng.choice([ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless]))),
        pixel_spacing_mm=round(float(rng.uniform(0.7, 0.85)), 3),
        gamma=round(float(rng.uniform(0.8, 1.25)), 3),
        noise=round(float(rng.uniform(0.008, 0.02)), 4),
        rescale=None if modality == "DX" or rng.random() < 0.5 else (1.0, -float(rng.integers(0, 1025))),
        window=bool(rng.random() < 0.5),
        class_mix=tuple(float(p) for p in rng.dirichlet([2.0, 2.0, 2.0])),
    )


# ---------------------------------------------------------------- rendering


def _ramp(t: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 to 1 over `width` around t = 0 (a cheap sigmoid)."""
    return np.clip(0.5 + t / width, 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, edge: float) -> np.ndarray:
    """Soft-edged filled ellipse; `edge` is the blur width in pixels."""
    radius = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return _ramp((1.0 - radius) * min(a, b), edge)


@dataclass(frozen=True)
class _Lung:
    cx: float
    cy: float
    a: float  # half width, px
    b: float  # half height, px
    side: int  # -1 image left, +1 image right


@dataclass(frozen=True)
class _Chest:
    cx: float
    cy: float
    mm: float  # pixels per millimetre for this patient (spacing and body size)
    lungs: tuple[_Lung, _Lung]


def _chest(rng: np.random.Generator, spacing_mm: float) -> _Chest:
    mm = rng.uniform(0.9, 1.08) / spacing_mm
    cx, cy = IMAGE_SIZE / 2 + rng.normal(0, 6), IMAGE_SIZE / 2 + rng.normal(0, 6)
    lungs = tuple(
        _Lung(cx + side * 78 * mm, cy - 15 * mm + (6 * mm if side < 0 else 0),
              58 * mm * rng.uniform(0.92, 1.08), 115 * mm * rng.uniform(0.92, 1.08) * (0.95 if side < 0 else 1),
              side)
        for side in (-1, 1)
    )
    return _Chest(cx, cy, mm, lungs)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    return x, y


_X, _Y = _grid()
# Broadcastable row/column coordinates for shapes that vary along one axis only (cheaper).
_COLUMNS, _ROWS = _X[:1, :], _Y[:, :1]


def _window(cx: float, cy: float, half_width: float, half_height: float) -> tuple[slice, slice]:
    """Image rows/columns of a box around a shape, so it is only evaluated where it is non-zero."""
    rows = slice(int(np.clip(cy - half_height, 0, IMAGE_SIZE)), int(np.clip(np.ceil(cy + half_height) + 1, 0, IMAGE_SIZE)))
    cols = slice(int(np.clip(cx - half_width, 0, IMAGE_SIZE)), int(np.clip(np.ceil(cx + half_width) + 1, 0, IMAGE_SIZE)))
    return rows, cols


def _ellipse_image(cx: float, cy: float, a: float, b: float, edge: float) -> np.ndarray:
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    box = _window(cx, cy, a + edge, b + edge)
    image[box] = _ellipse(_X[box], _Y[box], cx, cy, a, b, edge)
    return image


def _upsampling_matrix(small: int, large: int = IMAGE_SIZE) -> np.ndarray:
    """Linear interpolation as a matrix, so a coarse field upsamples with two cheap matmuls."""
    position = np.clip((np.arange(large) + 0.5) * small / large - 0.5, 0, small - 1)
    low = np.minimum(position.astype(int), small - 2)
    matrix = np.zeros((large, small), np.float32)
    matrix[np.arange(large), low] = 1 - (position - low)
    matrix[np.arange(large), low + 1] = position - low
    return matrix


_UPSAMPLE_64 = _upsampling_matrix(64)


def _lung_mask(chest: _Chest) -> np.ndarray:
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for lung in chest.lungs:
        box = _window(lung.cx, lung.cy, lung.a + 5, lung.b + 5)
        x, y = _X[box], _Y[box]
        # Diaphragm dome: highest mid-lung, deepest in the lateral costophrenic recess.
        dome = lung.cy + 0.8 * lung.b + 0.3 * lung.b * ((x - lung.cx) / lung.a) ** 2
        mask[box] = np.maximum(mask[box], _ellipse(x, y, lung.cx, lung.cy, lung.a, lung.b, 5.0) * _ramp(dome - y, 4.0))
    return mask


def _branches(rng: np.random.Generator, x0: np.ndarray, y0: np.ndarray, angle: np.ndarray,
              length: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gently wandering, tapering vessel paths sampled every pixel: x, y, weight and heading (n, steps)."""
    steps = np.arange(1, int(length.max()) + 2, dtype=np.float32)
    heading = angle[:, None] + np.cumsum(rng.normal(0, 0.035, (len(angle), len(steps))), axis=1)
    x = x0[:, None] + np.cumsum(np.cos(heading), axis=1)
    y = y0[:, None] + np.cumsum(np.sin(heading), axis=1)
    taper = weight[:, None] * np.clip(1 - steps[None, :] / length[:, None], 0, 1) ** 0.8
    return x, y, taper, heading


def _vessels(rng: np.random.Generator, chest: _Chest, n_trunks: int = 26, n_dots: int = 40) -> np.ndarray:
    """Vessels fanning out from both hila plus end-on vessels (round dots that mimic small nodules)."""
    xs, ys, ws = [], [], []
    for lung in chest.lungs:
        lateral = 0.0 if lung.side > 0 else np.pi
        angle = lateral + lung.side * rng.choice([-1, 1], n_trunks) * rng.uniform(0.15, 1.45, n_trunks)
        hilum_x = lung.cx - lung.side * 0.55 * lung.a + rng.normal(0, 0.06 * lung.a, n_trunks)
        hilum_y = lung.cy + 0.05 * lung.b + rng.normal(0, 0.1 * lung.b, n_trunks)
        length = rng.uniform(0.35, 1.0, n_trunks) * 1.5 * lung.b
        x, y, w, heading = _branches(rng, hilum_x, hilum_y, angle, length, np.ones(n_trunks))
        # Side branches leave the trunks part-way out: thinner, shorter, turned off the trunk's course.
        fork = (rng.uniform(0.2, 0.7, n_trunks) * length).astype(int)
        rows = np.arange(n_trunks)
        bx, by, bw, _ = _branches(
            rng, x[rows, fork], y[rows, fork],
            heading[rows, fork] + rng.choice([-1, 1], n_trunks) * rng.uniform(0.3, 0.9, n_trunks),
            (length - fork) * rng.uniform(0.4, 0.8, n_trunks) + 1, 0.6 * w[rows, fork],
        )
        xs += [x.ravel(), bx.ravel()]
        ys += [y.ravel(), by.ravel()]
        ws += [w.ravel(), bw.ravel()]
        inside = rng.uniform(-0.8, 0.8, (2, n_dots // 2))
        xs.append(lung.cx + inside[0] * lung.a)
        ys.append(lung.cy + inside[1] * lung.b)
        ws.append(rng.uniform(1.5, 4.0, n_dots // 2))
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    keep = (x >= 0) & (x < IMAGE_SIZE - 0.5) & (y >= 0) & (y < IMAGE_SIZE - 0.5) & (w > 0)
    flat = np.rint(y[keep]).astype(np.int64) * IMAGE_SIZE + np.rint(x[keep]).astype(np.int64)
    splat = np.bincount(flat, weights=w[keep], minlength=IMAGE_SIZE * IMAGE_SIZE).astype(np.float32)
    splat = splat.reshape(IMAGE_SIZE, IMAGE_SIZE)
    # Thick central vessels (wide blur of the dense splats near the hila) plus fine peripheral ones.
    return gaussian_filter(splat, 1.0) + 0.25 * gaussian_filter(np.minimum(splat, 4.0), 3.0, truncate=3.0)


def _band(phase: np.ndarray, duty: float) -> np.ndarray:
    """Periodic trapezoid pulses: 1 over `duty` of each period with soft flanks, else 0."""
    return np.clip((duty / 2 - np.abs(np.mod(phase, 1.0) - 0.5)) / 0.1, 0.0, 1.0)


def _bones(chest: _Chest) -> np.ndarray:
    """Posterior and anterior ribs (their crossings make nodule-like spots) and clavicles."""
    bones = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    split = int(np.clip(round(chest.cx), 1, IMAGE_SIZE - 1))
    bottom = max(lung.cy + 1.08 * lung.b for lung in chest.lungs) + 10
    rows = slice(int(np.clip(chest.cy - 160 * chest.mm, 0, IMAGE_SIZE)), int(np.clip(bottom, 0, IMAGE_SIZE)))
    for lung, cols in zip(chest.lungs, (slice(0, split), slice(split, IMAGE_SIZE))):
        x, y = _X[rows, cols], _Y[rows, cols]
        lateral = lung.side * (x - chest.cx) / chest.mm
        down = (y - chest.cy) / chest.mm
        cage = _ellipse(x, y, lung.cx, lung.cy, 1.2 * lung.a, 1.08 * lung.b, 10.0) * _ramp(lateral - 15, 8.0)
        posterior = _band((down - 0.0045 * (lateral - 35) ** 2) / 23.0, 0.45)
        anterior = _band((down + 0.45 * lateral) / 28.0, 0.35)
        clavicle = _ramp(6 - np.abs(down + 122 + 0.18 * lateral), 3.0) * _ramp(lateral - 12, 5.0) * _ramp(135 - lateral, 10.0)
        bones[rows, cols] = cage * (posterior + 0.5 * anterior) + clavicle
    return bones


# ---------------------------------------------------------------- lesions (patch coordinates u, v)


def _nodule(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """A round/oval opacity with a soft margin, sometimes with small satellite nodules."""
    radius = size * rng.uniform(0.1, 0.26)
    cu, cv = rng.normal(0, 0.06 * size, 2).tolist()
    turn, aspect = rng.uniform(0, np.pi), rng.uniform(0.75, 1.3)
    along = (u - cu) * np.cos(turn) + (v - cv) * np.sin(turn)
    across = (v - cv) * np.cos(turn) - (u - cu) * np.sin(turn)
    rho = np.sqrt(along**2 + (across / aspect) ** 2) / radius
    shape = 0.5 * _ramp(1 - rho, rng.uniform(0.3, 0.9)) + 0.5 * np.sqrt(np.clip(1 - rho**2, 0, 1))
    for _ in range(rng.integers(0, 6)):
        su, sv = (rng.uniform(-0.4, 0.4, 2) * size).tolist()
        shape += rng.uniform(0.3, 0.8) * _ramp(1 - np.hypot(u - su, v - sv) / rng.uniform(2, 5), 0.6)
    return shape


def _reticular(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Reticular net (zero crossings of smooth noise form polygons) plus a few linear streaks."""
    field = gaussian_filter(rng.standard_normal(u.shape).astype(np.float32), rng.uniform(1.5, 3.0))
    net = np.exp(-((field / (field.std() + 1e-6) / 0.4) ** 2))
    for _ in range(rng.integers(0, 4)):
        turn, offset = rng.normal(0, 0.4), rng.uniform(-0.35, 0.35) * size
        distance = np.abs(v * np.cos(turn) - u * np.sin(turn) - offset)
        extent = 0.4 * size - np.abs(u * np.cos(turn) + v * np.sin(turn))
        net += np.exp(-(distance**2)) * _ramp(extent, 4.0)
    reach = (0.45 * size * rng.uniform(0.85, 1.1, 2)).tolist()
    return net * _ellipse(u, v, 0.0, 0.0, reach[0], reach[1], 0.25 * size)


def _lucency(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Hyperlucent area (negative density) with thin-walled bullae; also returns its extent."""
    reach = (0.42 * size * rng.uniform(0.85, 1.15, 2)).tolist()
    extent = _ellipse(u, v, *rng.normal(0, 0.05 * size, 2).tolist(), reach[0], reach[1], 0.3 * size)
    shape = -extent
    for _ in range(rng.integers(0, 4)):
        bu, bv = (rng.uniform(-0.3, 0.3, 2) * size).tolist()
        rho = np.hypot(u - bu, v - bv) / rng.uniform(4, max(0.18 * size, 5))
        shape += -0.6 * _ramp(1 - rho, 0.3) + 0.8 * np.exp(-(((rho - 1) / 0.12) ** 2))
    return shape, extent


# Median lesion contrast in density units (lung field ~0.25 below soft tissue, ribs +0.045):
# subtle on purpose, so that the classes overlap.
_CONTRAST = {"nodule": 0.07, "interstitial": 0.04, "emphysema": 0.045}


def _lesion(rng: np.random.Generator, finding: str, u: np.ndarray, v: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray | None]:
    contrast = float(np.clip(rng.lognormal(np.log(_CONTRAST[finding]), 0.5), 0.01, 0.15))
    if finding == "nodule":
        return contrast * _nodule(rng, u, v, size), None
    if finding == "interstitial":
        return contrast * _reticular(rng, u, v, size), None
    shape, extent = _lucency(rng, u, v, size)
    return contrast * shape, extent


def _overlap(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> int:
    (x, y, w, h), (ox, oy, ow, oh) = box, other
    return max(0, min(x + w, ox + ow) - max(x, ox)) * max(0, min(y + h, oy + oh) - max(y, oy))


def _place_box(rng: np.random.Generator, chest: _Chest, finding: str, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A box centred in the finding's preferred lung zone; of 30 candidates, the first that barely
    overlaps boxes already placed (else the least overlapping one)."""
    candidates = []
    for _ in range(30):
        width = int(rng.integers(BOX_SIZE_RANGE[0], BOX_SIZE_RANGE[1] + 1))
        height = int(np.clip(round(width * rng.uniform(0.8, 1.25)), *BOX_SIZE_RANGE))
        lung = chest.lungs[rng.integers(2)]
        zone = rng.choice(3, p=ZONE_P[finding])
        top, bottom = lung.cy - 0.8 * lung.b, lung.cy + 0.7 * lung.b
        yc = top + (zone + rng.random()) * (bottom - top) / 3
        half = lung.a * np.sqrt(max(1 - ((yc - lung.cy) / lung.b) ** 2, 0.0))
        xc = lung.cx + rng.uniform(-1, 1) * max(half - 0.4 * width, 0.0)
        box = (int(np.clip(round(xc - width / 2), 0, IMAGE_SIZE - width)),
               int(np.clip(round(yc - height / 2), 0, IMAGE_SIZE - height)), width, height)
        overlap = max((_overlap(box, other) for other in taken), default=0) / (width * height)
        if overlap < 0.1:
            return box
        candidates.append((overlap, box))
    return min(candidates)[1]


def _render(rng: np.random.Generator, profile: HospitalProfile, findings: list[str]) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Stored pixel values (uint16, the profile's bit depth and photometric) and one box per finding."""
    chest = _chest(rng, profile.pixel_spacing_mm)
    boxes: list[tuple[int, int, int, int]] = []
    lesions = []
    vessel_keep = np.ones((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for finding in findings:
        x, y, w, h = box = _place_box(rng, chest, finding, boxes)
        boxes.append(box)
        patch = np.s_[y:y + h, x:x + w]
        u, v = _X[patch] - (x + w / 2), _Y[patch] - (y + h / 2)
        delta, lucent = _lesion(rng, finding, u, v, min(w, h))
        # Pneumoconiosis patterns mix: some ROIs carry a faint second pattern that is not their label.
        if rng.random() < 0.3:
            other = str(rng.choice([f for f in FINDINGS if f != finding]))
            extra, extra_lucent = _lesion(rng, other, u, v, min(w, h))
            delta += rng.uniform(0.2, 0.5) * extra
            lucent = extra_lucent if lucent is None else lucent
        if lucent is not None:  # emphysema destroys the capillary bed: fewer visible vessels
            vessel_keep[patch] = np.minimum(vessel_keep[patch], 1 - 0.85 * lucent)
        lesions.append((patch, delta))

    mm = chest.mm
    lungs = _lung_mask(chest)
    texture = gaussian_filter(rng.standard_normal((64, 64)).astype(np.float32), 2.0)
    texture = _UPSAMPLE_64 @ (texture / texture.std()) @ _UPSAMPLE_64.T
    # Lungs clear less toward the bases (overlying soft tissue) and vary in aeration.
    aeration = 0.3 - 0.05 * (_ROWS - chest.cy) / chest.lungs[0].b + 0.025 * texture
    hila = sum(_ellipse_image(lung.cx - lung.side * 0.6 * lung.a, lung.cy + 0.05 * lung.b,
                        0.22 * lung.a, 0.25 * lung.b, 12.0) for lung in chest.lungs)
    density = (
        0.05
        + 0.5 * _ellipse_image(chest.cx, chest.cy + 40 * mm, 175 * mm, 270 * mm, 8.0)
        + 0.14 * _ramp(32 * mm - np.abs(_COLUMNS - chest.cx), 30.0)
        + 0.05 * _ramp(13 * mm - np.abs(_COLUMNS - chest.cx), 8.0)
        + 0.1 * _ellipse_image(chest.cx + 22 * mm, chest.cy + 50 * mm, 68 * mm, 55 * mm, 25.0)
        - lungs * aeration
        + 0.045 * _bones(chest)
        + lungs * (0.06 * hila + 0.18 * vessel_keep * _vessels(rng, chest))
    )
    for patch, delta in lesions:
        density[patch] += delta * lungs[patch]
    display = np.clip(density, 0, 1) ** profile.gamma
    display *= 1 + rng.uniform(-0.05, 0.05) * (_ROWS / IMAGE_SIZE - 0.5)  # anode heel: exposure gradient
    display += profile.noise * np.sqrt(display + 0.05) * rng.standard_normal(display.shape, dtype=np.float32)
    top = 2**profile.bits_stored - 1
    stored = np.rint((0.02 + 0.96 * np.clip(display, 0, 1)) * top).astype(np.uint16)
    if profile.photometric == "MONOCHROME1":
        stored = top - stored
    return stored, boxes


# ---------------------------------------------------------------- DICOM


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ds(value: float) -> str:
    return f"{value:.6g}"


def _dataset(profile: HospitalProfile, stored: np.ndarray, rng: np.random.Generator, patient_id: str,
             uid_key: tuple[object, ...]) -> Dataset:
    sop_class = DigitalXRayImageStorageForPresentation if profile.modality == "DX" else ComputedRadiographyImageStorage
    study_date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 9 * 365)))
    age = int(rng.integers(38, 78))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = _uid(*uid_key, "instance")
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = _uid(*uid_key, "study")
    ds.SeriesInstanceUID = _uid(*uid_key, "series")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    ds.AccessionNumber = f"A{rng.integers(10**7, 10**8)}"
    ds.Modality = profile.modality
    if profile.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.InstitutionAddress = f"{rng.integers(1, 999)} Main Street"
    ds.ReferringPhysicianName = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN)}"
    ds.OperatorsName = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN)}"
    ds.StationName = f"XR{rng.integers(1, 9)}"
    ds.StudyDescription = ds.SeriesDescription = "CHEST PA"
    ds.PatientName = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN)}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = study_date.replace(year=study_date.year - age, day=1).strftime("%Y%m%d")
    ds.PatientSex = "M" if rng.random() < 0.9 else "F"
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.DeviceSerialNumber = f"SN{rng.integers(10**5, 10**6)}"
    ds.StudyID = f"{rng.integers(1, 10**6)}"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    spacing = [_ds(profile.pixel_spacing_mm)] * 2
    if profile.modality == "DX":
        ds.ImagerPixelSpacing = spacing
    else:
        ds.PixelSpacing = spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, profile.bits_stored, profile.bits_stored - 1
    ds.PixelRepresentation = 0
    slope, intercept = (1.0, 0.0) if profile.modality == "DX" else profile.rescale or (None, None)
    if slope is not None:
        ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
        ds.RescaleType = "US"
    if profile.window:
        # A vendor-style window: the 1st..99th percentile of the modality values.
        low, high = np.percentile(stored[::4, ::4], (1, 99)) * (slope or 1.0) + (intercept or 0.0)
        ds.WindowCenter, ds.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, 1.0))
    if profile.transfer_syntax.is_compressed:
        ds.compress(profile.transfer_syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = profile.transfer_syntax
        ds.PixelData = stored.tobytes()
    return ds


# ---------------------------------------------------------------- hospitals


@dataclass(frozen=True)
class PlannedPatient:
    number: int  # 1-based within the hospital; also keys the patient's random stream
    patient_id: str
    findings: tuple[str, ...]  # one per ROI


def plan_hospital(number: int, n_rois: int, seed: int = 0) -> list[PlannedPatient]:
    """Patients and their ROI findings, `n_rois` in all: cheap, so class mixes can be inspected."""
    profile = hospital_profile(number, seed)
    rng = np.random.default_rng([seed, number])
    id_prefix = "".join(word[0] for word in profile.institution.split()[:2])
    id_base = int(rng.integers(10**5, 9 * 10**5))
    patients: list[PlannedPatient] = []
    remaining = n_rois
    while remaining > 0:
        count = min(remaining, 1 + int(rng.choice(3, p=ROIS_PER_PATIENT_P)))
        # Most of a patient's ROIs share one finding; the rest follow the hospital's class mix.
        first = str(rng.choice(FINDINGS, p=profile.class_mix))
        findings = [first] + [first if rng.random() < 0.6 else str(rng.choice(FINDINGS, p=profile.class_mix))
                              for _ in range(count - 1)]
        number_in_hospital = len(patients) + 1
        patients.append(PlannedPatient(number_in_hospital, f"{id_prefix}{id_base + number_in_hospital}", tuple(findings)))
        remaining -= count
    return patients


def _write_hospital(folder: Path, number: int, n_rois: int, seed: int) -> None:
    profile = hospital_profile(number, seed)
    (folder / "dicom").mkdir(parents=True)
    rows = []
    for patient in plan_hospital(number, n_rois, seed):
        rng = np.random.default_rng([seed, number, patient.number])
        stored, boxes = _render(rng, profile, list(patient.findings))
        ds = _dataset(profile, stored, rng, patient.patient_id, (seed, number, patient.number))
        file = f"dicom/IMG{patient.number:05d}.dcm"
        ds.save_as(folder / file, enforce_file_format=True)
        rows += [(file, patient.patient_id, *box, finding) for box, finding in zip(boxes, patient.findings)]
    with open(folder / "annotations.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(rows)


def write_hospitals(out_dir: str | Path, n_hospitals: int = 3, rois_per_hospital: int = 200, seed: int = 0) -> list[Path]:
    """Write `out_dir/hospital-<i>/` (i = 1..n) with `dicom/*.dcm` and `annotations.csv`; returns the folders."""
    if n_hospitals < 1 or rois_per_hospital < 1:
        raise ValueError(f"need at least one hospital and one ROI, got {n_hospitals} and {rois_per_hospital}")
    folders = [Path(out_dir) / f"hospital-{number}" for number in range(1, n_hospitals + 1)]
    occupied = [str(f) for f in folders if f.exists() and any(f.iterdir())]
    if occupied:
        raise FileExistsError(f"refusing to write into non-empty folders: {', '.join(occupied)}")
    for number, folder in enumerate(folders, start=1):
        _write_hospital(folder, number, rois_per_hospital, seed)
    return folders
