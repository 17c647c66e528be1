"""``pneumofed prepare``: one hospital's DICOM archive + annotation table -> its pseudonymised ROI store.

Inputs
  * ``--dicom-dir``: searched at any depth; every regular file is a candidate (not only ``*.dcm``).
    Files are opened read-only and never modified.
  * ``--dicom-dir`` symlinks: a link to a file is followed; a link to a folder is not (it could lead
    anywhere, ``/`` included) and is listed as ``symlinked-folder``; loops, broken links and
    folders that cannot be listed are listed as rejects too, and the scan goes on.
  * ``--annotations``: UTF-8 CSV (a BOM and Windows line endings are fine; ``;`` or tab as the
    separator are recognised from the header) with at least
    ``file,patient_id,x,y,width,height,finding`` (more columns are ignored). ``file`` is resolved
    relative to the CSV's folder first (the layout of the NIH set and of ``pneumofed synth``:
    ``dicom/xxx.dcm``), then relative to ``--dicom-dir``; either way it must name a file inside
    ``--dicom-dir`` (a path leading out of it is rejected as ``outside-dicom-dir``). Boxes are in
    stored-pixel coordinates.
  * Patient key: HMAC-SHA256 of the DICOM PatientID under the site secret; the CSV's
    ``patient_id`` is used only when the file has no PatientID.

Each ROI is padded to a square around the box centre (the square is shifted to stay inside the
image; only a square larger than the image is zero-padded), then resized with antialiasing to
``roi_size``, so anatomy is never stretched. Bad input is skipped and explained in
``rejects.json``; the run fails (exit 1) only when no ROI at all remains, and exits 2 without
writing anything when the CSV lacks required columns or the arguments are unusable: ``--out``
is checked before any file is decoded, and a store that another ``prepare`` is writing is refused
(an exclusive lock, see `store_write_lock`). An interrupted run leaves the previous store, or none.

``rejects.json`` names source files by their site-local relative paths so they can be fixed; it is
a local report, not part of the pseudonymised store (``index.json`` + ``pixels/``).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import stat
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torchvision.transforms.v2.functional as TF
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pneumofed.common.data.dicom import DicomRejected, load_radiograph
from pneumofed.common.data.store import (
    FORMAT_VERSION,
    INDEX_FILE,
    LOCK_FILE,
    PIXELS_DIR,
    RoiIndex,
    RoiRecord,
    StoreBusy,
    read_index,
    shard_path,
    store_write_lock,
    write_index,
    write_shard,
)
from pneumofed.common.files import atomic_write

DEFAULT_LABEL_MAP: dict[str, int] = {"nodule": 0, "interstitial": 1, "emphysema": 2}
# Letter codes of the imaging features (A-C from Dong et al. 2022; D, E for extended label maps).
FINDING_CODES: dict[str, str] = {
    "A": "nodule",
    "B": "interstitial",
    "C": "emphysema",
    "D": "pleural_plaque",
    "E": "mediastinal_mass",
}
REQUIRED_COLUMNS = ("file", "patient_id", "x", "y", "width", "height", "finding")
MIN_ROI_SIDE = 30  # source pixels; Dong et al. cut ROIs of at least 30 x 30
DEFAULT_SECRET_PATH = Path("~/.config/pneumofed/site-secret")
REJECTS_FILE = "rejects.json"
CSV_DELIMITERS = (",", ";", "\t")  # comma first; Excel writes ';' where ',' is the decimal mark
_SECRET_CHECK_MESSAGE = b"pneumofed/secret-check"
_SHARD_NAME = re.compile(r"^[0-9a-f]{64}\.npy$")

Box = tuple[int, int, int, int]


class PrepareInputError(ValueError):
    """The inputs as a whole are unusable (missing CSV columns, bad label map ...): nothing is written."""


# ---------------------------------------------------------------------------------------------
# Report


class Reject(BaseModel):
    reason: str
    file: str | None = None  # path relative to --dicom-dir (or as written in the CSV)
    row: int | None = None  # CSV line number
    detail: str = ""


class PrepareReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: int  # regular files found under --dicom-dir
    rois: int
    decoded: int  # source files decoded in this run
    reused: int  # source files whose ROIs were kept from the previous run
    class_counts: dict[str, int]
    rejects: list[Reject] = Field(default_factory=list)
    unannotated_files: list[str] = Field(default_factory=list)  # not an error, listed for review

    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejects).most_common())

    def summary(self) -> str:
        line = f"prepared {self.rois} ROIs from {self.files} files ({self.decoded} decoded, {self.reused} reused)"
        counts = ", ".join(f"{n} {reason}" for reason, n in self.reject_counts().items())
        line += f"; rejected {len(self.rejects)}" + (f": {counts}" if counts else "")
        return line + f"; {len(self.unannotated_files)} files without annotation"


# ---------------------------------------------------------------------------------------------
# Label map, site secret, patient keys


def normalise_finding(text: str) -> str:
    name = text.strip()
    return FINDING_CODES.get(name.upper(), name.lower().replace("-", "_").replace(" ", "_"))


def validate_label_map(label_map: dict[str, int]) -> tuple[str, ...]:
    """Class names ordered by label; labels must be exactly 0..K-1."""
    if not label_map:
        raise PrepareInputError("the label map is empty")
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise PrepareInputError(f"label map values must be 0..{len(label_map) - 1}, each once: {label_map}")
    for name in label_map:
        if normalise_finding(name) != name:
            raise PrepareInputError(f"label map name {name!r} must be lower-case with underscores")
    return tuple(sorted(label_map, key=label_map.__getitem__))


def parse_label_map(text: str) -> dict[str, int]:
    """A JSON file, inline JSON, or ``nodule=0,interstitial=1,emphysema=2``."""
    try:
        if Path(text).is_file():
            value = json.loads(Path(text).read_text())
        elif text.lstrip().startswith("{"):
            value = json.loads(text)
        else:
            value = {}
            for pair in filter(None, (p.strip() for p in text.split(","))):
                name, sep, label = pair.partition("=")
                if not sep:
                    raise ValueError(f"expected name=label, got {pair!r}")
                value[normalise_finding(name)] = int(label)
    except (ValueError, OSError) as error:
        raise PrepareInputError(f"cannot read label map {text!r}: {error}") from error
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise PrepareInputError(f"label map must map finding names to integer labels, got {value!r}")
    validate_label_map(value)
    return value


def load_site_secret(path: str | Path | None = None) -> bytes:
    """The site's HMAC key; created on first use (32 random bytes, file 0600, new folder 0700)."""
    path = Path(path or DEFAULT_SECRET_PATH).expanduser()
    if not path.exists():
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
            path.parent.chmod(0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it meanwhile: use theirs
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
    secret = path.read_bytes()
    if len(secret) < 16:
        raise PrepareInputError(f"site secret {path} holds {len(secret)} bytes; at least 16 are needed")
    return secret


def patient_key(patient_id: str, secret: bytes) -> str:
    return hmac.new(secret, patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()


def secret_check(secret: bytes) -> str:
    return hmac.new(secret, _SECRET_CHECK_MESSAGE, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------
# ROI geometry


def _square_start(start: int, length: int, side: int, limit: int) -> int:
    if side > limit:  # image narrower than the square: centre the image in it, zero-pad both sides
        return -((side - limit) // 2)
    return min(max(start - (side - length) // 2, 0), limit - side)


def square_crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The square around the box centre with side max(w, h), moved inside the image where it fits."""
    x, y, w, h = box
    side = max(w, h)
    top, left = _square_start(y, h, side, image.shape[0]), _square_start(x, w, side, image.shape[1])
    crop = np.zeros((side, side), dtype=image.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src = image[src_top : top + side, src_left : left + side]
    crop[src_top - top : src_top - top + src.shape[0], src_left - left : src_left - left + src.shape[1]] = src
    return crop


def resize_roi(crop: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of a float [0, 1] square to uint8 (size, size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None]
    resized = TF.resize(tensor, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return resized[0].clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()


def scale_box(box: Box, scale: float, shape: tuple[int, int]) -> Box:
    """A source-pixel box in the resampled image's pixels, clipped to it (rounding may overshoot by one)."""
    x0, y0 = min(round(box[0] * scale), shape[1] - 1), min(round(box[1] * scale), shape[0] - 1)
    x1, y1 = min(round((box[0] + box[2]) * scale), shape[1]), min(round((box[1] + box[3]) * scale), shape[0])
    return x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)


def box_inside(box: Box, shape: tuple[int, int]) -> bool:
    x, y, w, h = box
    return x >= 0 and y >= 0 and x + w <= shape[1] and y + h <= shape[0]


# ---------------------------------------------------------------------------------------------
# Annotations


class AnnotationRow(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="ignore")

    file: str = Field(min_length=1)
    patient_id: str
    x: int
    y: int
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    finding: str = Field(min_length=1)

    @property
    def box(self) -> Box:
        return self.x, self.y, self.width, self.height


@dataclass(frozen=True)
class Annotation:
    line: int
    row: AnnotationRow


def _csv_delimiter(header: str) -> str:
    """The separator that splits the header line into all required columns; ',' when none does."""
    for delimiter in CSV_DELIMITERS:
        names = next(csv.reader([header], delimiter=delimiter), [])
        if all(column in names for column in REQUIRED_COLUMNS):
            return delimiter
    return ","


def _not_utf8(csv_path: Path, error: UnicodeDecodeError) -> PrepareInputError:
    data = csv_path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        what = "is UTF-16 text (Excel's 'Unicode Text')"
    else:
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as located:  # the reader's error counts bytes from its buffer, not the file
            error = located
        line = data.count(b"\n", 0, error.start) + 1
        what = f"is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line})"
    return PrepareInputError(
        f"annotations {csv_path} {what}; save it as 'CSV UTF-8' or convert it, "
        f"e.g. iconv -f WINDOWS-1252 -t UTF-8 {csv_path.name} > annotations-utf8.csv"
    )


def read_annotations(csv_path: Path) -> tuple[list[Annotation], list[Reject]]:
    """Valid rows with their CSV line numbers, and a ``bad-row`` reject for each malformed row."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            delimiter = _csv_delimiter(handle.readline())
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=delimiter)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PrepareInputError(
                    f"{csv_path} lacks required column(s) {', '.join(missing)}; "
                    f"expected at least {','.join(REQUIRED_COLUMNS)}"
                )
            annotations, rejects = [], []
            for raw in reader:
                line = reader.line_num
                if None in raw or any(raw.get(c) is None for c in REQUIRED_COLUMNS):
                    detail = "more fields than columns" if None in raw else "fewer fields than columns"
                    rejects.append(Reject(reason="bad-row", file=raw.get("file"), row=line, detail=detail))
                    continue
                try:
                    annotations.append(Annotation(line, AnnotationRow.model_validate(raw)))
                except ValidationError as error:
                    detail = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
                    rejects.append(Reject(reason="bad-row", file=raw.get("file"), row=line, detail=detail))
    except UnicodeDecodeError as error:
        raise _not_utf8(csv_path, error) from error
    except (OSError, csv.Error) as error:
        raise PrepareInputError(f"cannot read annotations {csv_path}: {error}") from error
    return annotations, rejects


# ---------------------------------------------------------------------------------------------
# Decoding (runs in worker processes when there is enough work)


@dataclass(frozen=True)
class RoiCut:
    """What decoding one source file gave: ROIs for the boxes inside the image, in input order."""

    image_shape: tuple[int, int] = (0, 0)
    patient_id: str = ""
    rois: np.ndarray | None = None
    inside: tuple[bool, ...] = ()
    rejected: tuple[str, str] | None = None  # (reason, detail)


def cut_rois(path: Path, boxes: list[Box], roi_size: int, spacing_mm: float | None) -> RoiCut:
    try:
        radiograph = load_radiograph(path, target_spacing_mm=spacing_mm)
    except DicomRejected as rejected:
        return RoiCut(rejected=(rejected.reason, rejected.detail))
    except Exception as error:  # noqa: BLE001 - any decoder failure is a rejected file, never a crash
        return RoiCut(rejected=("undecodable", f"{type(error).__name__}: {error}"))
    pixels, scale = radiograph.pixels, radiograph.scale
    shape = pixels.shape if scale == 1.0 else stored_shape(path)
    inside = tuple(box_inside(box, shape) for box in boxes)
    rois = [
        resize_roi(square_crop(pixels, scale_box(box, scale, pixels.shape) if scale != 1.0 else box), roi_size)
        for box, ok in zip(boxes, inside, strict=True)
        if ok
    ]
    stacked = np.stack(rois) if rois else np.empty((0, roi_size, roi_size), np.uint8)
    return RoiCut((int(shape[0]), int(shape[1])), radiograph.patient_id.strip(), stacked, inside)


# ---------------------------------------------------------------------------------------------
# The prepare run


def stored_shape(path: Path) -> tuple[int, int]:
    # Resampling floors the size, so the stored size cannot be inferred back from the pixels.
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return int(header.Rows), int(header.Columns)


@dataclass
class _Source:
    """One distinct source content (several paths with identical bytes share one shard)."""

    sha256: str
    path: Path
    rel: str
    rows: dict[Box, Annotation] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _scan(dicom_dir: Path, out_dir: Path, secret_path: Path) -> tuple[dict[Path, str], list[Reject]]:
    """Resolved path -> path relative to dicom_dir, for every regular file but the store's and the
    secret; and a reject for each entry the scan could not use (it goes on past all of them).

    Links to files are followed (to their resolved path); links to folders are not, as before:
    such a link may lead anywhere, back up the tree included, so following it could scan forever.
    """
    out_dir = out_dir.resolve()
    own = {out_dir / INDEX_FILE, out_dir / REJECTS_FILE, out_dir / LOCK_FILE, secret_path.expanduser().resolve()}
    pixels = out_dir / PIXELS_DIR
    located: list[tuple[Path, Path]] = []  # (path as found, resolved path)
    problems: list[Reject] = []

    def problem(reason: str, path: Path, detail: str) -> None:
        problems.append(Reject(reason=reason, file=path.relative_to(dicom_dir).as_posix(), detail=detail))

    pending = [dicom_dir]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            problem("unreadable-folder", folder, f"cannot list the folder: {error.strerror or error}; its files are skipped")
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    try:
                        mode = os.stat(path).st_mode
                    except OSError as error:
                        if error.errno == errno.ELOOP:
                            problem("symlink-loop", path, f"the link {os.readlink(path)!r} leads round in a loop")
                        elif error.errno in (errno.ENOENT, errno.ENOTDIR):
                            problem("broken-symlink", path, f"the link target {os.readlink(path)!r} does not exist")
                        else:
                            problem("unreadable", path, f"cannot follow the link: {error.strerror or error}")
                        continue
                    if stat.S_ISDIR(mode):
                        target = _real_path(path)
                        if _real_path(folder).is_relative_to(target):
                            problem("symlink-loop", path, f"links back to {target}, a folder that contains it")
                        else:
                            problem("symlinked-folder", path, f"links to the folder {target}, which is not searched; "
                                    "copy or mount its files into --dicom-dir, or prepare it as its own --dicom-dir")
                        continue
                    if stat.S_ISREG(mode):
                        located.append((path, _real_path(path)))
                elif entry.is_dir(follow_symlinks=False):
                    if _real_path(path) != pixels:
                        pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    located.append((path, _real_path(path)))
            except OSError as error:  # an entry removed or made unreachable while scanning
                problem("unreadable", path, f"{error.strerror or error}")
    found = {}
    for path, resolved in sorted(located):
        if resolved not in own and not resolved.is_relative_to(pixels):
            found[resolved] = path.relative_to(dicom_dir).as_posix()
    return found, sorted(problems, key=lambda r: r.file or "")


def _real_path(path: Path) -> Path:
    """`Path.resolve()` without its RuntimeError on a symlink loop (the loop is then left in the path)."""
    return Path(os.path.realpath(path))


def _previous_records(out_dir: Path, roi_size: int, spacing_mm: float | None, check: str) -> dict[str, list[RoiRecord]]:
    """Records of the existing store by source hash, if it was built with the same settings and secret."""
    try:
        index = read_index(out_dir)
    except (FileNotFoundError, ValueError):
        return {}
    if (index.roi_size, index.spacing_mm, index.secret_check) != (roi_size, spacing_mm, check):
        return {}
    by_source: dict[str, list[RoiRecord]] = {}
    for record in index.records:
        by_source.setdefault(record.source_sha256, []).append(record)
    return {sha: records for sha, records in by_source.items() if shard_path(out_dir, sha).is_file()}


def prepare_site(
    dicom_dir: str | Path,
    annotations_csv: str | Path,
    out_dir: str | Path,
    *,
    label_map: dict[str, int] = DEFAULT_LABEL_MAP,
    roi_size: int = 64,
    spacing_mm: float | None = None,
    secret_path: str | Path | None = None,
    workers: int | None = None,
) -> PrepareReport:
    """Build or incrementally update the ROI store in ``out_dir``; writes ``rejects.json`` beside it."""
    dicom_dir, csv_path, out_dir = Path(dicom_dir), Path(annotations_csv), Path(out_dir)
    class_names = validate_label_map(label_map)
    if roi_size < 8:
        raise PrepareInputError(f"roi size must be at least 8, got {roi_size}")
    if spacing_mm is not None and spacing_mm <= 0:
        raise PrepareInputError(f"spacing must be positive, got {spacing_mm}")
    if not dicom_dir.is_dir():
        raise PrepareInputError(f"DICOM folder {dicom_dir} does not exist")
    check_out_dir(out_dir)
    annotations, rejects = read_annotations(csv_path)
    secret = load_site_secret(secret_path)
    with ExitStack() as stack:
        try:
            stack.enter_context(store_write_lock(out_dir))
        except StoreBusy as busy:
            raise PrepareInputError(str(busy)) from None
        except OSError as error:
            raise PrepareInputError(f"cannot lock the ROI store {out_dir}: {error}") from error
        return _prepare_locked(dicom_dir, csv_path, out_dir, annotations, rejects, secret, label_map=label_map,
                               class_names=class_names, roi_size=roi_size, spacing_mm=spacing_mm,
                               secret_path=Path(secret_path or DEFAULT_SECRET_PATH), workers=workers)


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work and without creating anything, an ``--out`` the store cannot be written to."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise PrepareInputError(f"--out {out_dir} is a broken symlink; name a folder for the ROI store")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PrepareInputError(
                f"--out {out_dir} is an existing file, not a folder; name a folder for the ROI store (created if missing)")
        for name, is_dir in ((INDEX_FILE, False), (PIXELS_DIR, True), (REJECTS_FILE, False), (LOCK_FILE, False)):
            entry = out_dir / name
            if (entry.exists() or entry.is_symlink()) and entry.is_dir() != is_dir:
                raise PrepareInputError(f"--out {out_dir} is not a ROI store: {entry} is {'not ' if is_dir else ''}a folder")
    existing = next(folder for folder in (out_dir, *out_dir.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise PrepareInputError(f"--out {out_dir} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrepareInputError(f"--out {out_dir}: no permission to write in {existing}")


def _prepare_locked(
    dicom_dir: Path,
    csv_path: Path,
    out_dir: Path,
    annotations: list[Annotation],
    rejects: list[Reject],
    secret: bytes,
    *,
    label_map: dict[str, int],
    class_names: tuple[str, ...],
    roi_size: int,
    spacing_mm: float | None,
    secret_path: Path,
    workers: int | None,
) -> PrepareReport:
    files, scan_rejects = _scan(dicom_dir, out_dir, secret_path)
    rejects += scan_rejects
    sources = _match(annotations, files, dicom_dir, csv_path.parent, label_map, rejects)
    previous = _previous_records(out_dir, roi_size, spacing_mm, secret_check(secret))

    reused: dict[str, list[RoiRecord]] = {}
    to_decode: list[_Source] = []
    for source in sources.values():
        old = previous.get(source.sha256)
        if old and _reusable(source, old, rejects):
            reused[source.sha256] = old
        else:
            to_decode.append(source)
    cuts = _decode_all(to_decode, roi_size, spacing_mm, workers)

    if any(shard_path(out_dir, source.sha256).exists() for source in to_decode):
        # A shard the current index may rely on is about to change: withdraw the index first so
        # an interrupted run leaves "no store" (rebuilt by the next run), never a mismatched one.
        (out_dir / INDEX_FILE).unlink(missing_ok=True)
    records: list[RoiRecord] = []
    try:
        for source in sorted(sources.values(), key=lambda s: s.sha256):
            if source.sha256 in reused:
                records += _relabel(reused[source.sha256], source, label_map)
            elif source.sha256 in cuts:
                records += _store_cut(out_dir, source, cuts[source.sha256], label_map, secret, rejects)
        write_index(out_dir, RoiIndex(
            format_version=FORMAT_VERSION,
            roi_size=roi_size,
            spacing_mm=spacing_mm,
            class_names=class_names,
            secret_check=secret_check(secret),
            records=tuple(records),
        ))
    except BaseException:  # Ctrl-C or a full disk while storing: leave no shard that no index names
        for source in to_decode:
            if source.sha256 not in previous:
                shard_path(out_dir, source.sha256).unlink(missing_ok=True)
        raise
    _remove_orphan_shards(out_dir, {r.source_sha256 for r in records})

    annotated = {s.rel for s in sources.values()} | {r.file for r in rejects if r.file}
    counts = Counter(r.label for r in records)
    report = PrepareReport(
        files=len(files),
        rois=len(records),
        decoded=len(cuts),
        reused=len(reused),
        class_counts={name: counts[label] for label, name in enumerate(class_names)},
        rejects=sorted(rejects, key=lambda r: (r.row or 0, r.file or "")),
        unannotated_files=sorted(set(files.values()) - annotated),
    )
    atomic_write(out_dir / REJECTS_FILE, report.model_dump_json(indent=1))
    return report


def _match(
    annotations: list[Annotation],
    files: dict[Path, str],
    dicom_dir: Path,
    csv_dir: Path,
    label_map: dict[str, int],
    rejects: list[Reject],
) -> dict[str, _Source]:
    """Group the usable annotation rows by source content hash, rejecting rows that cannot be used."""
    sources: dict[str, _Source] = {}
    sha_of: dict[Path, str | None] = {}
    unreadable: dict[Path, str] = {}
    for annotation in annotations:
        row, line = annotation.row, annotation.line

        def reject(reason: str, detail: str, file: str = row.file, line: int = line) -> None:
            rejects.append(Reject(reason=reason, file=file, row=line, detail=detail))

        candidates = (csv_dir / row.file, dicom_dir / row.file)
        path = next((p for p in map(_real_path, candidates) if p in files), None)
        if path is None:
            root = os.path.abspath(dicom_dir)
            outside = [c for c in map(os.path.abspath, candidates) if os.path.commonpath([root, c]) != root]
            if len(outside) == len(candidates) or any(map(os.path.exists, outside)):
                reject("outside-dicom-dir", f"the path leads out of --dicom-dir {dicom_dir}; only files inside it are read")
            else:
                reject("missing-file", "no such file under --dicom-dir (looked relative to the CSV and to --dicom-dir)")
            continue
        rel = files[path]
        finding = normalise_finding(row.finding)
        if finding not in label_map:
            reject("unknown-finding", f"{row.finding!r} is not one of {', '.join(label_map)}", rel)
            continue
        if row.width < MIN_ROI_SIDE or row.height < MIN_ROI_SIDE:
            reject("roi-too-small", f"{row.width}x{row.height} px < {MIN_ROI_SIDE}x{MIN_ROI_SIDE}", rel)
            continue
        if row.x < 0 or row.y < 0:
            reject("roi-outside", f"box {row.box} starts outside the image", rel)
            continue
        if path not in sha_of:
            try:
                sha_of[path] = file_sha256(path)
            except OSError as error:
                sha_of[path] = None
                unreadable[path] = str(error)
        sha = sha_of[path]
        if sha is None:
            reject("unreadable", unreadable[path], rel)
            continue
        source = sources.setdefault(sha, _Source(sha, path, rel))
        first = source.rows.get(row.box)
        if first is not None:
            same = normalise_finding(first.row.finding) == finding
            reject("duplicate-row", f"same file content and box as line {first.line}"
                   + ("" if same else f" (which says {first.row.finding!r}; line {first.line} is kept)"), rel)
            continue
        source.rows[row.box] = annotation
    return sources


def _reusable(source: _Source, old: list[RoiRecord], rejects: list[Reject]) -> bool:
    """True when the old shard holds exactly this source's in-image boxes (the others are rejected)."""
    shape = old[0].image_shape
    outside = [annotation for box, annotation in source.rows.items() if not box_inside(box, shape)]
    inside = sorted(box for box in source.rows if box_inside(box, shape))
    if inside != sorted(record.box for record in old):
        return False
    rejects.extend(_outside_reject(source, annotation, shape) for annotation in outside)
    return True


def _outside_reject(source: _Source, annotation: Annotation, shape: tuple[int, int]) -> Reject:
    return Reject(
        reason="roi-outside",
        file=source.rel,
        row=annotation.line,
        detail=f"box {annotation.row.box} does not fit the {shape[1]}x{shape[0]} image",
    )


def _relabel(old: list[RoiRecord], source: _Source, label_map: dict[str, int]) -> list[RoiRecord]:
    """Old ROIs with labels from the current CSV and label map (labels never change pixels)."""
    relabelled = []
    for record in old:
        finding = normalise_finding(source.rows[record.box].row.finding)
        relabelled.append(record.model_copy(update={"finding": finding, "label": label_map[finding]}))
    return relabelled


def _decode_all(sources: list[_Source], roi_size: int, spacing_mm: float | None, workers: int | None) -> dict[str, RoiCut]:
    workers = workers or min(2, os.cpu_count() or 1)
    jobs = [(s.path, list(s.rows), roi_size, spacing_mm) for s in sources]
    if workers == 1 or len(jobs) < 8:  # a pool costs more than it saves on a handful of files
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cuts = [cut_rois(*job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    else:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)
        try:
            with _sigint_blocked():  # the workers start (forked in the first submit) with SIGINT blocked
                results = pool.map(cut_rois, *zip(*jobs), chunksize=4)
            cuts = list(results)
        except BaseException:  # Ctrl-C above all: stop now, not after the files already queued
            _stop_workers(pool)
            raise
        pool.shutdown()
    return {s.sha256: cut for s, cut in zip(sources, cuts, strict=True)}


def _init_worker() -> None:
    # Ctrl-C in a terminal signals the whole process group. Only the parent reacts (it stops the
    # workers); a worker interrupted in the middle of its queue would print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(1)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold back SIGINT meanwhile (a worker forked now inherits the mask until its initializer
    ignores the signal); one that arrived is delivered on leaving, so no Ctrl-C is lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down without running the files still queued: its workers are terminated, and
    its manager thread has ended. (Left running, that thread may close its wake-up pipe while the
    exiting interpreter writes to it, and a traceback follows the one line 'interrupted'.)

    ProcessPoolExecutor offers no terminate before Python 3.14, hence its private process table.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=not processes, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
    if manager is not None:
        manager.join(timeout=30)  # it ends once it sees its workers gone


def _store_cut(
    out_dir: Path, source: _Source, cut: RoiCut, label_map: dict[str, int], secret: bytes, rejects: list[Reject]
) -> list[RoiRecord]:
    lines = sorted(a.line for a in source.rows.values())
    if cut.rejected:
        reason, detail = cut.rejected
        rejects.append(Reject(reason=reason, file=source.rel, row=lines[0] if len(lines) == 1 else None,
                              detail=f"{detail} (annotation line(s) {', '.join(map(str, lines))})"))
        return []
    assert cut.rois is not None
    cut_rows = iter(range(len(cut.rois)))
    records: list[RoiRecord] = []
    kept: list[int] = []  # rows of cut.rois that go into the shard, in shard order
    for (box, annotation), inside in zip(source.rows.items(), cut.inside, strict=True):
        if not inside:
            rejects.append(_outside_reject(source, annotation, cut.image_shape))
            continue
        cut_row = next(cut_rows)
        patient_id = cut.patient_id or annotation.row.patient_id
        if not patient_id:
            rejects.append(Reject(reason="no-patient-id", file=source.rel, row=annotation.line,
                                  detail="neither the DICOM PatientID nor the CSV patient_id is set"))
            continue
        finding = normalise_finding(annotation.row.finding)
        records.append(RoiRecord(
            roi_id=f"{source.sha256[:16]}-{len(kept)}",
            source_sha256=source.sha256,
            row=len(kept),
            label=label_map[finding],
            finding=finding,
            patient_key=patient_key(patient_id, secret),
            box=box,
            image_shape=cut.image_shape,
        ))
        kept.append(cut_row)
    if kept:
        write_shard(out_dir, source.sha256, np.ascontiguousarray(cut.rois[kept]))
    return records


def _remove_orphan_shards(out_dir: Path, referenced: set[str]) -> None:
    for path in (out_dir / PIXELS_DIR).glob("*"):  # only shard names: never a file someone else put there
        if _SHARD_NAME.match(path.name) and path.is_file() and path.stem not in referenced:
            path.unlink()
