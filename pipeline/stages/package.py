"""`package`: write the Triton model repositories (dense and sparse side by side) and manifest.json.

triton/ is the production flavour (TensorRT plans or the onnxruntime backend), triton_cpu/
the CPU flavour (Python-backend models running the ONNX through ONNX Runtime); both hold a
preprocess model and an ensemble per variant, so clients can send encoded images.

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
from pipeline.package.repository import FORMATS, repository_dir, write_repositories
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
    summaries = write_repositories(recipe, paths, fmt=options.format, onnx_device=options.onnx_device)
    manifest = build_manifest(paths.root, recipe.digest(), recipe.name, verdict,
                              {"triton": summaries["production"], "triton_cpu": summaries["cpu"]})
    write_manifest(paths.root, manifest)
    for flavour, summary in summaries.items():
        print(f"triton repository ({flavour}): {repository_dir(paths, flavour)} ({summary['reason']})")
        for name, info in summary["models"].items():
            detail = ", ".join(info["files"]) or "ensemble of " + " -> ".join(info.get("steps", []))
            print(f"  {name}: {detail}" + (f" [{info['instance_kind']}]" if "instance_kind" in info else ""))
    print(f"manifest: {paths.manifest} ({len(manifest['files'])} files, verification {verdict})")
    if verdict == "failed":
        print(f"warning: the verification gates failed ({paths.report_json}); this package is not fit to ship")
    return 0
