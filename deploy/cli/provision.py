"""`pneumofed provision`: CA, certificates, node keys and one kit per party (see `deploy.provision`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumofed.deploy.provision import load_federation, provision


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("federation_file", type=Path, help="TOML federation file (name, superlink, hospitals)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CA and the kits")
    parser.add_argument(
        "--rotate", action="append", default=[], metavar="NAME",
        help="replace this key instead of keeping it: 'ca', 'superlink', a hospital name or 'all' (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_federation(args.federation_file)
        report = provision(spec, args.out, rotate=frozenset(args.rotate))
    except (OSError, ValueError) as err:
        print(f"pneumofed provision: {err}", file=sys.stderr)
        return 2
    print(f"coordinator kit: {report.coordinator_kit}")
    for name, kit in report.hospital_kits.items():
        print(f"hospital kit {name}: {kit}")
    print(f"keys created: {', '.join(report.created_keys) or 'none'}; kept: {', '.join(report.kept_keys) or 'none'}")
    if report.stale_hospital_kits:
        print(f"not in the federation file any more (kits left untouched, keys no longer registered by "
              f"register-hospitals.sh): {', '.join(report.stale_hospital_kits)}")
    return 0
