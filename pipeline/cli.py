"""`python -m pipeline <stage> --model NAME [overrides]`.

Stages are imported lazily, so optional libraries are only needed by the stages that
use them. A PipelineError prints as one line (exit 2), a failed gate exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pipeline.config import Recipe, apply_override
from pipeline.errors import GateFailed, PipelineError

# stage name -> (module, one-line help)
STAGES = {
    "pretrain": ("pipeline.stages.pretrain", "train the demo network's dense weights (cached)"),
    "train-masks": ("pipeline.stages.train_masks", "learn N:M masks on frozen weights (Gumbel-Softmax)"),
    "bake": ("pipeline.stages.bake", "write masks.pt and sparse.pt from the learned masks (or re-apply masks)"),
    "export": ("pipeline.stages.export", "write dense/sparse ONNX (FP32 and FP16)"),
    "build": ("pipeline.stages.build", "build dense and sparse engines with a backend"),
    "verify": ("pipeline.stages.verify", "accuracy, latency and coverage of the engines; CI gates"),
    "engine": ("pipeline.stages.engine", "run every stage, skipping those whose inputs did not change"),
    "package": ("pipeline.stages.package", "write a Triton model repository"),
    "serve": ("pipeline.stages.serve", "run tritonserver (CPU repository) in the foreground on 127.0.0.1"),
    "serve-check": ("pipeline.stages.serve_check", "start tritonserver, check predictions, errors, load, crash"),
    "check-manifest": ("pipeline.stages.check_manifest", "verify an artifact folder against manifest.json"),
    "compare": ("pipeline.stages.compare", "compare mask methods on the evaluation set"),
    "certify": ("pipeline.stages.certify", "stability bounds of the masked classifier (paper, sec. 3.2)"),
    "bench-train": ("pipeline.stages.bench_train", "time a mask-training step against a dense training step"),
    "curves": ("pipeline.stages.curves", "plot top-1 against mask-training steps for every run of a model"),
    "layers": ("pipeline.stages.layers", "list masked and skipped layers with reasons and MAC shares"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every model-level stage shares."""
    from pipeline.registry import list_models

    group = parser.add_argument_group("model and recipe")
    group.add_argument("--model", default="fmnist_resnet",
                       help=f"registered model name (default fmnist_resnet); one of: {', '.join(list_models())}")
    group.add_argument("--out", default="engines", help="artifact root; files go to OUT/<model>/ (default engines)")
    group.add_argument("--weights", default=None,
                       help="dense weights: torchvision | random | pretrain | PATH to a .pth (default: recipe)")
    group.add_argument("--data", default=None,
                       help="dataset: synthetic | fashion_mnist | DIR (ImageFolder with train/ val/, or the "
                            "Fashion-MNIST IDX folder) (default: recipe)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override any recipe field, e.g. --set masks.lr=0.1 (repeatable)")


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    from pipeline.registry import get_recipe

    recipe = get_recipe(args.model)
    if args.weights:
        recipe.weights = args.weights
    if args.data:
        if args.data in ("synthetic", "fashion_mnist"):
            recipe.data.kind = args.data
        else:
            if not Path(args.data).is_dir():
                raise PipelineError(f"--data {args.data}: no such folder; pass a dataset folder or synthetic")
            recipe.data.root = args.data
            if recipe.data.kind == "synthetic":
                recipe.data.kind = "imagefolder"
    for assignment in args.overrides:
        apply_override(recipe, assignment)
    if recipe.data.kind == "imagefolder" and not recipe.data.root and recipe.weights != "random":
        raise PipelineError(f"model {recipe.name} reads ImageNet-style folders: pass --data DIR (with train/ "
                            "and val/) or --data synthetic for a smoke run")
    if recipe.data.kind == "imagefolder" and not recipe.data.root:
        print(f"note: {recipe.name} with random weights and no --data: using synthetic data (accuracy means nothing)",
              file=sys.stderr)
        recipe.data.kind = "synthetic"
    return recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="stage", metavar="STAGE")
    commands.required = True
    for name, (module_name, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Stage modules are imported only for the chosen stage, so add its flags after the name is known.
    stage = next((arg for arg in argv if not arg.startswith("-")), None)
    if stage in STAGES:
        module = _import_stage(stage)
        sub = parser._subparsers._group_actions[0].choices[stage]  # type: ignore[union-attr]
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(_import_stage(args.stage).run(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"gate failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _import_stage(stage: str):
    module_name = STAGES[stage][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pipeline"):
            print(f"error: stage {stage} is not available in this build ({exc.name} missing)", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"error: stage {stage} needs the package {exc.name}; install it with `pip install {exc.name}`",
              file=sys.stderr)
        raise SystemExit(2) from None
