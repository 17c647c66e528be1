"""The `pneumofed` command: one entry point; every top-level package contributes its own subcommands.

A package lists its subcommands in a `COMMANDS` table (name -> (module, one-line help)) and registers
that table under the `pneumofed.commands` entry-point group in `pyproject.toml`. The dispatcher finds
the tables through the installed metadata, so `common` never imports the packages above it. A
subcommand module (`configure_parser(parser)`, `run(args) -> int`) is imported only when chosen, so
`pneumofed --help` stays instant and a hospital node never imports coordinator-only code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "pneumofed.commands"

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pneumofed.common.cli.synth", "write synthetic hospitals (DICOM files + annotation CSV)"),
    "prepare": ("pneumofed.common.cli.prepare", "turn a DICOM folder + annotations into a site ROI store"),
    "train": ("pneumofed.common.cli.train", "train one model centrally on ROI stores"),
    "evaluate": ("pneumofed.common.cli.evaluate", "evaluate a model file on a ROI store or DICOM folder"),
    "predict": ("pneumofed.common.cli.predict", "class probabilities for one DICOM file and box"),
}

# Listing order of `pneumofed --help`: a hospital's and a researcher's path through the tool.
ORDER = ("synth", "prepare", "train", "simulate", "experiment", "evaluate", "predict", "provision")


def subcommands() -> dict[str, tuple[str, str]]:
    """Every registered subcommand, in `ORDER` (unknown names last, alphabetically)."""
    found: dict[str, tuple[str, str]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        for name, spec in entry.load().items():
            if name in found:
                raise RuntimeError(f"subcommand {name!r} is registered twice ({found[name][0]}, {spec[0]})")
            found[name] = spec
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(ORDER)), item[0])))


def build_parser(commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumofed",
        description="Federated multicentre training of chest X-ray pneumoconiosis imaging features.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in commands.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = subcommands()
    parser = build_parser(commands)
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # prints usage / --help / "invalid choice" and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = commands[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"pneumofed {name}", description=help_text)
    module.configure_parser(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
