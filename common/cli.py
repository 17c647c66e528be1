"""The `pneumofed` command: one entry point, each subcommand implemented next to its feature.

Subcommand modules are imported only when chosen, so `pneumofed --help` stays instant and a
hospital node never imports coordinator-only code (and vice versa).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module implementing `configure_parser(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pneumofed.common.synth", "write synthetic hospitals (DICOM files + annotation CSV)"),
    "prepare": ("pneumofed.common.prepare", "turn a DICOM folder + annotations into a site ROI store"),
    "train": ("pneumofed.common.centralised", "train one model centrally on ROI stores"),
    "simulate": ("pneumofed.simulations.run", "run a local multicentre Flower simulation"),
    "experiment": ("pneumofed.simulations.experiment", "centralised vs federated vs local-only from one config"),
    "evaluate": ("pneumofed.common.evaluate", "evaluate a model file on a ROI store or DICOM folder"),
    "predict": ("pneumofed.common.predict", "class probabilities for one DICOM file and box"),
    "provision": ("pneumofed.deploy.provision", "create CA, certificates, keys and per-party kits"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumofed",
        description="Federated multicentre training of chest X-ray pneumoconiosis imaging features.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / --help / "invalid choice" and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"pneumofed {name}", description=help_text)
    module.configure_parser(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
