"""`check-manifest`: verify an artifact folder against its manifest.json.

Every listed file must exist with the recorded size and sha256. Missing and tampered
files are each named; exit 1 when anything is wrong, 0 when everything matches.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.declaration import StageDeclaration, manifest_files
from pipeline.package.manifest import check_manifest
from pipeline.paths import ArtifactPaths

DECLARATION = StageDeclaration(
    help="verify an artifact folder against manifest.json",
    reads=("manifest", manifest_files),
    needs_recipe=False,  # reads only: no recipe resolution, so checking rewrites no config.json
)


@dataclass
class Options:
    model: str = "fmnist_resnet"
    out: str = "engines"
    dir: str | None = None
    strict: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="fmnist_resnet", help="model folder name under OUT (default fmnist_resnet)")
    parser.add_argument("--out", default="engines", help="artifact root (default engines)")
    parser.add_argument(
        "--dir", default=None, metavar="FOLDER", help="artifact folder holding manifest.json (default OUT/<model>)"
    )
    parser.add_argument("--strict", action="store_true", help="also fail on files the manifest does not list")


def run(options: Options) -> int:
    root = Path(options.dir) if options.dir else ArtifactPaths.for_model(options.out, options.model).root
    result = check_manifest(root)
    for path in result.missing:
        print(f"MISSING  {path}")
    for path in result.tampered:
        print(f"TAMPERED {path}")
    for path in result.unlisted:
        print(f"{'UNLISTED' if options.strict else 'note: not in manifest:'} {path}")
    bad = len(result.missing) + len(result.tampered) + (len(result.unlisted) if options.strict else 0)
    if result.ok(options.strict):
        print(f"ok: {result.checked} files match {root / 'manifest.json'}")
        return 0
    print(
        f"{bad} problem(s) in {root}: {len(result.missing)} missing, {len(result.tampered)} tampered"
        + (f", {len(result.unlisted)} unlisted" if options.strict else "")
    )
    return 1
