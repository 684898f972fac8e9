"""`package`: write the Triton model repositories (dense and sparse side by side) and manifest.json.

triton/ is the production flavour (TensorRT plans or the onnxruntime backend), triton_cpu/
the CPU flavour (Python-backend models running the ONNX through ONNX Runtime); both hold a
preprocess model and an ensemble per variant, so clients can send encoded images.

Reads dense.onnx / sparse.onnx (export), TensorRT plans with their metadata (build, when
present) and report.json (verify) for the verdict, each checked first against the records of the
stage that wrote it (`checked_verdict`). Every config.pbtxt is parsed with
Triton's ModelConfig schema and cross-checked against its model file before the
repository replaces the previous one; manifest.json is written last. See docs/triton.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.backends.build_report import BuildReport
from pipeline.declaration import PREPROCESS_CHOICE, StageDeclaration, manifest_files, record
from pipeline.errors import GateFailed
from pipeline.export.report import ExportReport
from pipeline.masks.bake_report import BakeReport
from pipeline.package.manifest import build_manifest, write_manifest
from pipeline.package.repository import FORMATS, repository_dir, write_repositories
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.verify.report import VerificationReport

DECLARATION = StageDeclaration(
    help="write Triton model repositories (production and CPU flavours)",
    reads=(
        record("export_report"),
        "dense_onnx",
        "sparse_onnx",
        "dense_onnx_fp16",
        "sparse_onnx_fp16",
        "int8_onnx",
        "bake_report",
        "masks",
        "sparse_weights",
        "report_json",
        "build_report",
        "engines",
        PREPROCESS_CHOICE,
        manifest_files,
    ),
    writes=("config", "triton", "triton_cpu", "manifest", PREPROCESS_CHOICE),
    recipe=("*",),  # manifest.json records the whole recipe's hash
    options=("format", "onnx_device", "require_verified"),
)


@dataclass
class Options:
    format: str = "auto"
    onnx_device: str = "cpu"
    require_verified: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="model files to serve: auto (TensorRT plans when both variants have one, else ONNX), "
        "plan, onnx (default auto)",
    )
    parser.add_argument(
        "--onnx-device",
        default="cpu",
        choices=("cpu", "gpu"),
        help="instance kind for ONNX models: cpu (KIND_CPU) or gpu (KIND_GPU, onnxruntime CUDA)",
    )
    parser.add_argument(
        "--require-verified",
        action="store_true",
        help="fail (exit 1) unless report.json says the verification gates passed",
    )


def checked_verdict(recipe: Recipe, paths: ArtifactPaths) -> str:
    """Check every input against the records of the stage that wrote it, then the verification verdict.

    The ONNX files (export.json), masks.pt and sparse.pt (bake.json) and the engines report.json was measured
    on (build.json) must be the files those stages wrote: a replaced or truncated file is refused, never
    sealed into the manifest. (TensorRT plans are checked against build.json where package finds them.)
    """
    exported = ExportReport.load(paths.export_report, recipe.name)
    for path in [paths.dense_onnx, paths.sparse_onnx] + [paths.root / name for name in exported.files]:
        if path.is_file() or path in (paths.dense_onnx, paths.sparse_onnx):
            exported.checked(path)
    baked = [path for path in (paths.masks, paths.sparse_weights) if path.exists()]
    if baked:
        bake = BakeReport.load(paths.bake_report, recipe.name)
        for path in baked:
            bake.checked(path)
    report = VerificationReport.load(paths.report_json)
    if report.engine_sha256:
        report.check_engines(BuildReport.load(paths.build_report, recipe.name), recipe.name)
    return report.verdict


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    verdict = checked_verdict(recipe, paths)
    if options.require_verified and verdict != "passed":
        raise GateFailed(
            f"verification verdict is {verdict!r} ({paths.report_json}); run "
            f"`python -m pipeline verify --model {recipe.name}` and fix what fails"
        )
    summaries = write_repositories(recipe, paths, fmt=options.format, onnx_device=options.onnx_device)
    manifest = build_manifest(
        paths.root,
        recipe.digest(),
        recipe.name,
        verdict,
        {"triton": summaries["production"], "triton_cpu": summaries["cpu"]},
    )
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
