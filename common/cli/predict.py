"""`pneumofed predict`: class probabilities for one box of one DICOM radiograph, as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pneumofed.common.data.prepare import MIN_ROI_SIDE, Box
from pneumofed.common.learning.predict import predict


def parse_box(text: str) -> Box:
    """``x,y,w,h`` in stored-pixel coordinates."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box must be four integers x,y,w,h, got {text!r}")
    return values  # type: ignore[return-value]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="pneumofed model file")
    parser.add_argument("dicom", type=Path, help="one DICOM radiograph")
    parser.add_argument("--box", type=parse_box, default=None,
                        help=f"x,y,w,h in stored pixels, each side >= {MIN_ROI_SIDE} (default: the whole image)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--heatmap", type=Path, default=None, metavar="OUT.png",
                        help="also write the Grad-CAM heatmap of the predicted class on the ROI to this PNG")


def run(args: argparse.Namespace) -> int:
    try:
        result = predict(args.model, args.dicom, args.box, device=args.device, heatmap=args.heatmap)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # PredictionError is a ValueError
        print(f"pneumofed predict: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0
