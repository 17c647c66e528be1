"""`pneumofed synth`: write synthetic hospitals (real DICOM files + an annotation CSV each)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from pneumofed.common.data.synth import FINDINGS, hospital_profile, write_hospitals


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to create hospital-<i>/ folders in")
    parser.add_argument("--hospitals", type=_positive_int, default=3, help="number of hospitals (default 3)")
    parser.add_argument("--rois", type=_positive_int, default=200, help="ROIs per hospital (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, identical files (default 0)")


def run(args: argparse.Namespace) -> int:
    try:
        folders = write_hospitals(args.out, args.hospitals, args.rois, args.seed)
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 1
    for number, folder in enumerate(folders, start=1):
        with open(folder / "annotations.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        counts = ", ".join(f"{sum(r['finding'] == f for r in rows)} {f}" for f in FINDINGS)
        profile = hospital_profile(number, args.seed)
        print(f"wrote {folder}: {len({r['file'] for r in rows})} DICOM files ({profile.modality}, "
              f"{profile.photometric}, {profile.bits_stored}-bit, {profile.transfer_syntax.name}), "
              f"{len(rows)} ROIs ({counts})")
    return 0
