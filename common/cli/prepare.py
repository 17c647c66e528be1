"""`pneumofed prepare`: a hospital's DICOM folder + annotation CSV -> its pseudonymised ROI store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumofed.common.data.prepare import (
    DEFAULT_LABEL_MAP,
    DEFAULT_SECRET_PATH,
    REJECTS_FILE,
    PrepareInputError,
    parse_label_map,
    prepare_site,
)

# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dicom-dir", type=Path, required=True, help="folder of DICOM files (searched at any depth)")
    parser.add_argument("--annotations", type=Path, required=True,
                        help="CSV: file,patient_id,x,y,width,height,finding (file relative to the CSV's folder "
                             "or to --dicom-dir)")
    parser.add_argument("--out", type=Path, required=True, help="ROI store folder (created or updated)")
    parser.add_argument("--label-map", default=None,
                        help="JSON file, inline JSON or 'nodule=0,interstitial=1,emphysema=2' (the default); "
                             "pleural_plaque and mediastinal_mass are also known findings")
    parser.add_argument("--roi-size", type=int, default=64, help="side of the stored square ROIs in pixels")
    parser.add_argument("--spacing-mm", type=float, default=None,
                        help="resample every image to this pixel spacing first (boxes scale with it)")
    parser.add_argument("--secret-file", type=Path, default=DEFAULT_SECRET_PATH,
                        help="site secret for patient keys; created (0600) on first use; never leaves the site")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: up to 2)")


def run(args: argparse.Namespace) -> int:
    try:
        label_map = DEFAULT_LABEL_MAP if args.label_map is None else parse_label_map(args.label_map)
        report = prepare_site(
            args.dicom_dir,
            args.annotations,
            args.out,
            label_map=label_map,
            roi_size=args.roi_size,
            spacing_mm=args.spacing_mm,
            secret_path=args.secret_file,
            workers=args.workers,
        )
    except PrepareInputError as error:
        print(f"pneumofed prepare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The store is as the last complete run left it (or absent): every file is written atomically,
        # and the index is withdrawn before any shard it relies on is replaced.
        print("interrupted", file=sys.stderr)
        return 130
    print(report.summary())
    if report.rejects:
        print(f"details: {Path(args.out) / REJECTS_FILE}")
    return 0 if report.rois else 1
