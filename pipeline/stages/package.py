"""`package`: write the Triton model repository (dense and sparse side by side) and manifest.json.

Reads dense.onnx / sparse.onnx (export), TensorRT plans with their metadata (build, when
present) and report.json (verify) for the verdict. Every config.pbtxt is parsed with
Triton's ModelConfig schema and cross-checked against its model file before the
repository replaces the previous one; manifest.json is written last. See docs/triton.md.
"""
from __future__ import annotations

import argparse

from pipeline.cli import add_model_arguments
from pipeline.errors import GateFailed
from pipeline.package.manifest import build_manifest, verification_verdict, write_manifest
from pipeline.package.repository import FORMATS, write_repository
from pipeline.stages._common import prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="model files to serve: auto (TensorRT plans when both variants have one, else ONNX), "
                             "plan, onnx (default auto)")
    parser.add_argument("--onnx-device", default="cpu", choices=("cpu", "gpu"),
                        help="instance kind for ONNX models: cpu (KIND_CPU) or gpu (KIND_GPU, onnxruntime CUDA)")
    parser.add_argument("--require-verified", action="store_true",
                        help="fail (exit 1) unless report.json says the verification gates passed")


def run(args: argparse.Namespace) -> int:
    recipe, paths = prepare(args)
    verdict = verification_verdict(paths.report_json)
    if args.require_verified and verdict != "passed":
        raise GateFailed(f"verification verdict is {verdict!r} ({paths.report_json}); run "
                         f"`python -m pipeline verify --model {recipe.name}` and fix what fails")
    summary = write_repository(recipe, paths, fmt=args.format, onnx_device=args.onnx_device)
    manifest = build_manifest(paths.root, recipe.digest(), recipe.name, verdict, {"triton": summary})
    write_manifest(paths.root, manifest)
    print(f"triton repository: {paths.triton} ({summary['reason']})")
    for name, info in summary["models"].items():
        print(f"  {name}: {', '.join(info['files'])} [{info['instance_kind']}]")
    print(f"manifest: {paths.manifest} ({len(manifest['files'])} files, verification {verdict})")
    if verdict == "failed":
        print(f"warning: the verification gates failed ({paths.report_json}); this package is not fit to ship")
    return 0
