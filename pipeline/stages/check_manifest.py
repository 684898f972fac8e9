"""`check-manifest`: verify an artifact folder against its manifest.json.

Every listed file must exist with the recorded size and sha256. Missing and tampered
files are each named; exit 1 when anything is wrong, 0 when everything matches.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import add_model_arguments
from pipeline.package.manifest import check_manifest
from pipeline.paths import ArtifactPaths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--dir", default=None, metavar="FOLDER",
                        help="artifact folder holding manifest.json (default OUT/<model>)")
    parser.add_argument("--strict", action="store_true", help="also fail on files the manifest does not list")


def run(args: argparse.Namespace) -> int:
    # Reads only: no recipe resolution, so config.json is not rewritten by checking.
    root = Path(args.dir) if args.dir else ArtifactPaths.for_model(args.out, args.model).root
    result = check_manifest(root)
    for path in result.missing:
        print(f"MISSING  {path}")
    for path in result.tampered:
        print(f"TAMPERED {path}")
    for path in result.unlisted:
        print(f"{'UNLISTED' if args.strict else 'note: not in manifest:'} {path}")
    bad = len(result.missing) + len(result.tampered) + (len(result.unlisted) if args.strict else 0)
    if result.ok(args.strict):
        print(f"ok: {result.checked} files match {root / 'manifest.json'}")
        return 0
    print(f"{bad} problem(s) in {root}: {len(result.missing)} missing, {len(result.tampered)} tampered"
          + (f", {len(result.unlisted)} unlisted" if args.strict else ""))
    return 1
