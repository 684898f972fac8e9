"""`verify`: accuracy, latency and coverage of the dense and sparse engines; CI gates.

Two inputs:
  * the engines the build stage made from the recipe (`verify --model NAME`): pipeline/verify/engines.py;
  * any dense/sparse pair (`verify --dense DENSE.onnx --sparse SPARSE.onnx --data DIR`, or TensorRT plans): no
    recipe, with the sparse model's per-layer 2:4 layout report: pipeline/verify/external.py.
Accuracy runs the evaluation set through the engines (not PyTorch). Latency interleaves dense and sparse rounds
in the same process so drift hits both. Exit 0 when every gate passes, 1 when one fails (GateFailed), 2 on bad
input (PipelineError). What each gate means: docs/ci-gate.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from pipeline.args import add_junit_argument
from pipeline.declaration import MODEL, PREPROCESS_CHOICE, StageDeclaration, int8, option_files, record, when
from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.stages import as_one_set
from pipeline.verify.output import print_summary, raise_if_failed, write_report


def _plots(recipe: Recipe, options: Options | None) -> bool:
    return not (options is not None and options.no_plots)


DECLARATION = StageDeclaration(
    help="accuracy, latency and coverage of the engines; CI gates",
    reads=(
        "build_report",
        "engines",
        "sparse_onnx",  # the layout of the graph the engine was built from
        "layers",
        "masks",
        record("bake_report", "export_report"),
        when(int8, "int8_onnx"),
        PREPROCESS_CHOICE,
    ),
    writes=(
        "config",
        "report_json",
        "report_md",
        when(_plots, "verify_plots"),
        option_files("junit"),
        PREPROCESS_CHOICE,
    ),
    recipe=(*MODEL, "data", "preprocess", "verify", "labels", "weights", "build", "export"),
    options=("junit", "no_plots"),
    data=True,
    in_engine=True,
)


@dataclass
class Options:
    max_top1_drop: float | None = field(default=None, metadata={"recipe": "verify.max_top1_drop"})
    min_speedup: float | None = field(default=None, metadata={"recipe": "verify.min_speedup"})
    min_masked_coverage: float | None = field(default=None, metadata={"recipe": "verify.min_masked_coverage"})
    min_accelerable_coverage: float | None = field(default=None, metadata={"recipe": "verify.min_accelerable_coverage"})
    iters: int | None = field(default=None, metadata={"recipe": "verify.latency_iters"})
    junit: str | None = None
    no_plots: bool = False
    dense: str | None = None
    sparse: str | None = None
    sparse_onnx: str | None = None


class Replaced(argparse.Action):
    """--min-coverage gated two different shares (masked MACs on the recipe path, accelerable MACs with
    --dense/--sparse): refused in one line that names the two gates that replace it."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--min-coverage is gone (it meant two things): pass --min-masked-coverage F (share of MACs in layers "
            "that carry 2:4 masks) or --min-accelerable-coverage F (share in layers TensorRT's sparse kernels can "
            "run), or both"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gates (default: the recipe's verify section)")
    group.add_argument("--max-top1-drop", type=float, default=None, help="points of top-1 the sparse engine may lose")
    group.add_argument(
        "--min-speedup",
        type=float,
        default=None,
        help="dense/sparse latency ratio at the serving batch, median of paired rounds "
        "(gated only on backends with sparse kernels)",
    )
    group.add_argument(
        "--min-masked-coverage",
        type=float,
        default=None,
        help="gate masked_mac_fraction: share of MACs (0-1) in layers that carry 2:4 masks "
        "(verify.min_masked_coverage)",
    )
    group.add_argument(
        "--min-accelerable-coverage",
        type=float,
        default=None,
        help="gate accelerable_mac_fraction: share of MACs (0-1) in layers whose weights are in the 2:4 layout "
        "TensorRT's sparse kernels take, from the sparse ONNX (verify.min_accelerable_coverage)",
    )
    group.add_argument("--min-coverage", action=Replaced, dest="replaced_min_coverage", help=argparse.SUPPRESS)
    parser.add_argument(
        "--iters", type=int, default=None, help="timed iterations per engine and batch (verify.latency_iters)"
    )
    add_junit_argument(parser, "also write the gates as JUnit XML")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    files = parser.add_argument_group(
        "any sparse model (no recipe): --dense and --sparse; preprocessing from --input-size/--mean/--std or "
        "--model NAME|RECIPE.toml, data from --data DIR|fashion_mnist|synthetic, report in --out "
        "(default engines/<sparse file stem>/)"
    )
    files.add_argument("--dense", default=None, metavar="DENSE.onnx|X.plan", help="the dense model")
    files.add_argument("--sparse", default=None, metavar="SPARSE.onnx|Y.plan", help="the sparse model to gate")
    files.add_argument(
        "--sparse-onnx",
        default=None,
        metavar="SPARSE.onnx",
        help="with TensorRT plans: the sparse ONNX the plan was built from, for the layout report",
    )


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    from pipeline.verify.engines import verify_built_engines

    report, raw = verify_built_engines(recipe, paths)
    write_report(report, raw, paths, options.junit, not options.no_plots)
    print_summary(report, paths)
    return raise_if_failed(report)


def without_recipe(options: Options) -> bool:
    return bool(options.dense or options.sparse or options.sparse_onnx)


def run_without_recipe(options: Options, model) -> int:
    """verify --dense/--sparse: `model` holds the shared model flags as given (None where not)."""
    from pipeline.verify.external import FileOptions, verify_files

    if not (options.dense and options.sparse):
        raise PipelineError("pass both --dense and --sparse (the dense model and the sparse model to gate)")
    for flag, value in (
        ("--weights", model.weights),
        ("--num-classes", model.num_classes),
        ("--classifier", model.classifier),
    ):
        if value is not None:
            raise PipelineError(
                f"{flag} has no meaning with --dense/--sparse (the models carry their weights and head); drop it"
            )
    report, raw, paths = verify_files(
        FileOptions(
            dense=options.dense,
            sparse=options.sparse,
            sparse_onnx=options.sparse_onnx,
            model=model.model,
            data=model.data,
            input_size=model.input_size,
            mean=model.mean,
            std=model.std,
            out=model.out,
            overrides=list(model.overrides),
            max_top1_drop=options.max_top1_drop,
            min_speedup=options.min_speedup,
            min_masked_coverage=options.min_masked_coverage,
            min_accelerable_coverage=options.min_accelerable_coverage,
            iters=options.iters,
        )
    )

    def write() -> int:  # the report's files as one set, as a recipe stage's (a failed write leaves none)
        write_report(report, raw, paths, options.junit, not options.no_plots)
        print_summary(report, paths)
        return raise_if_failed(report)

    return as_one_set(paths.root, write)
