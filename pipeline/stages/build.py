"""`build`: dense and sparse engines from the exported ONNX with the chosen backend; writes build.json.

`--backend auto` takes TensorRT when it imports and a CUDA GPU is present, else ONNX Runtime
(which has no sparse kernels: its engines check accuracy, not speed-up).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.args import add_backend_argument
from pipeline.backends import pick_backend
from pipeline.backends.build_report import VARIANTS, BuildReport
from pipeline.declaration import MODEL, StageDeclaration, fp16_exported, int8, record, when
from pipeline.errors import PipelineError
from pipeline.export.report import ExportReport
from pipeline.io import sha256_file
from pipeline.paths import ArtifactPaths, relative_to_root
from pipeline.recipe.config import BuildConfig, InputSpec, Recipe

DECLARATION = StageDeclaration(
    help="build dense and sparse engines with a backend",
    reads=(
        record("export_report"),
        "dense_onnx",
        "sparse_onnx",
        when(fp16_exported, "dense_onnx_fp16", "sparse_onnx_fp16"),
        when(int8, "int8_onnx"),
    ),
    writes=("config", "build_report", "engines"),
    recipe=(*MODEL, "build", "export.fp16", "serve.triton_release"),
    in_engine=True,
)


@dataclass
class Options:
    backend: str | None = field(default=None, metadata={"recipe": "build.backend"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backend_argument(parser)


def onnx_inputs(config: BuildConfig, paths, backend) -> tuple[dict[str, Path], str]:
    """The ONNX files the backend builds from (its own rule, `onnx_for`), and why those."""
    sources = {variant: backend.onnx_for(paths, variant, config) for variant in VARIANTS}
    names = ", ".join(path.name for path in sources.values())
    return sources, f"{names}: the {backend.name} backend's graphs for build.precision={config.precision}"


def check_onnx_inputs(sources: dict[str, Path], paths, model: str) -> None:
    """Every ONNX input exists, is the file export wrote (sha256 in export.json) and loads."""
    import onnx

    exported = ExportReport.load(paths.export_report, model)
    for path in sources.values():
        if not path.is_file():
            hint = (
                " with export.fp16=true"
                if ".fp16." in path.name
                else " with --set build.precision=int8"
                if ".int8." in path.name
                else ""
            )
            raise PipelineError(f"{path} does not exist; run `python -m pipeline export --model {model}`{hint} first")
        exported.checked(path)
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:
            raise PipelineError(
                f"{path} is not a valid ONNX model ({str(exc).splitlines()[0][:160]}); re-run "
                f"`python -m pipeline export --model {model}`"
            ) from None


def check_tensorrt_inputs(recipe: Recipe, paths: ArtifactPaths) -> None:
    """Before any GPU work, and where TensorRT is not installed: the graphs exist and its ONNX parser reads them."""
    from pipeline.backends.tensorrt import preflight
    from pipeline.backends.tensorrt.parser_support import check_parsable

    sources, (version, target) = preflight(recipe.build, paths)
    check_onnx_inputs(sources, paths, recipe.name)
    check_parsable(list(sources.values()), version, target)


def tensorrt_parser_check(sources: dict[str, Path]) -> dict:
    """What the target TensorRT's ONNX parser cannot read in the graphs built (recorded for verify's report)."""
    from pipeline.backends.tensorrt.engine import target_version
    from pipeline.backends.tensorrt.parser_support import parser_problems

    version, target = target_version()
    problems = {variant: parser_problems(path, version) for variant, path in sources.items()}
    return {"target": target, "problems": problems}


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    requested = recipe.build.backend
    if requested == "tensorrt":
        check_tensorrt_inputs(recipe, paths)
    backend, reason = pick_backend(requested)
    print(f"backend: {backend.name} ({reason})")
    if not backend.has_sparse_kernels:
        print(f"note: {backend.name} has no sparse kernels; its engines check accuracy, not speed-up")
    sources, why = onnx_inputs(recipe.build, paths, backend)
    check_onnx_inputs(sources, paths, recipe.name)
    parser = tensorrt_parser_check(sources)
    if any(parser["problems"].values()):
        print(
            f"note: {parser['target']} could not parse these graphs: "
            + "; ".join(f"{variant}: {', '.join(found)}" for variant, found in parser["problems"].items() if found)
        )
    folder = paths.engines(backend.name)
    engines = {}  # a failed build leaves no half-finished pair: the stage's transaction puts the old ones back
    spec = InputSpec.of(recipe, names=False)  # backends get the build section and the input spec, not the recipe
    for variant, onnx_path in sources.items():
        print(f"building {variant} engine from {onnx_path.name} ...", flush=True)
        result = backend.build(onnx_path, folder, variant, recipe.build, spec, sparse=variant == "sparse")
        # paths relative to the model folder, so the folder can be moved or copied whole
        engines[variant] = {
            "engine": relative_to_root(result.engine_path, paths.root),
            "sha256": sha256_file(result.engine_path),
            "onnx": relative_to_root(onnx_path, paths.root),
            "onnx_sha256": sha256_file(onnx_path),
            "sidecar": result.sidecar_record(),  # the sidecar beside the engine is the one copy of its metadata
            "sparse_layers": result.sparse_layers,
        }
        print(f"  {result.engine_path}")
    BuildReport(
        model=recipe.name,
        backend=backend.name,
        requested=requested,
        reason=reason,
        has_sparse_kernels=backend.has_sparse_kernels,
        inputs=why,
        batch_range=[recipe.build.min_batch, recipe.build.opt_batch, recipe.build.max_batch],
        note=""
        if backend.has_sparse_kernels
        else f"{backend.name} has no sparse kernels: these engines verify correctness and accuracy, not speed-up",
        engines=engines,
        tensorrt_parser=parser,
    ).save(paths.build_report)
    print(f"build report: {paths.build_report}")
    return 0
