"""`package`: write the Triton model repository (dense and sparse side by side) and manifest.json.

Reads dense.onnx / sparse.onnx (export), TensorRT plans with their metadata (build, when
present) and report.json (verify) for the verdict. Every config.pbtxt is parsed with
Triton's ModelConfig schema and cross-checked against its model file before the
repository replaces the previous one; manifest.json is written last. See docs/triton.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.errors import GateFailed
from pipeline.package.manifest import build_manifest, verification_verdict, write_manifest
from pipeline.package.repository import FORMATS, write_repository
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.resolve import write_config


@dataclass
class Options:
    format: str = "auto"
    onnx_device: str = "cpu"
    require_verified: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="model files to serve: auto (TensorRT plans when both variants have one, else ONNX), "
                             "plan, onnx (default auto)")
    parser.add_argument("--onnx-device", default="cpu", choices=("cpu", "gpu"),
                        help="instance kind for ONNX models: cpu (KIND_CPU) or gpu (KIND_GPU, onnxruntime CUDA)")
    parser.add_argument("--require-verified", action="store_true",
                        help="fail (exit 1) unless report.json says the verification gates passed")


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    verdict = verification_verdict(paths.report_json)
    if options.require_verified and verdict != "passed":
        raise GateFailed(f"verification verdict is {verdict!r} ({paths.report_json}); run "
                         f"`python -m pipeline verify --model {recipe.name}` and fix what fails")
    write_config(recipe, paths)
    summary = write_repository(recipe, paths, fmt=options.format, onnx_device=options.onnx_device)
    manifest = build_manifest(paths.root, recipe.digest(), recipe.name, verdict, {"triton": summary})
    write_manifest(paths.root, manifest)
    print(f"triton repository: {paths.triton} ({summary['reason']})")
    for name, info in summary["models"].items():
        print(f"  {name}: {', '.join(info['files'])} [{info['instance_kind']}]")
    print(f"manifest: {paths.manifest} ({len(manifest['files'])} files, verification {verdict})")
    if verdict == "failed":
        print(f"warning: the verification gates failed ({paths.report_json}); this package is not fit to ship")
    return 0
