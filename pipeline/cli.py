"""`python -m pipeline <stage> --model NAME [overrides]`, or the installed command `sparse-pipeline <stage> ...`.

A thin dispatcher: parse the flags, resolve and validate the recipe, build the stage's Options, call the
stage while holding the model folder's lock (pipeline/lock.py). Stages are imported lazily, so optional libraries are only needed by the stages that use them.
A PipelineError prints as one line (exit 2), a failed gate exits 1, a signal ends every stage alike: one
`interrupted by SIGTERM` line, exit 128 + the signal (143 for SIGTERM, 130 for SIGINT/Ctrl-C), no partial
artifact (atomic writes), and the training stages save their checkpoint first (continue with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
from pathlib import Path

from pipeline.errors import GateFailed, Interrupted, PipelineError
from pipeline.lock import run_lock
from pipeline.paths import ArtifactPaths
from pipeline.stages import (
    STAGES,
    load_stage,
    needs_recipe,
    recipe_fields,
    run_stage,
    runs_without_recipe,
    stage_summaries,
)


class OneLineParser(argparse.ArgumentParser):
    """Flag mistakes are bad input too: one `error:` line, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} -h)", file=sys.stderr)
        raise SystemExit(2)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every model-level stage shares (they fill pipeline.recipe.resolve.ModelOptions)."""
    from pipeline.recipe.registry import list_models

    group = parser.add_argument_group("model and recipe")
    group.add_argument(
        "--model",
        default=None,
        help=f"registered model name (default fmnist_resnet; one of: {', '.join(list_models())}), "
        "a path to a recipe .toml file, or a model source: torchvision:NAME, timm:NAME, "
        "python:PACKAGE.MODULE:FACTORY (your own nn.Module factory)",
    )
    group.add_argument("--out", default=None, help="artifact root; files go to OUT/<model>/ (default engines)")
    group.add_argument(
        "--weights",
        default=None,
        help="dense weights: PATH to a saved state_dict (plain, or wrapped as training scripts save "
        "it; its head sets --num-classes) | random | pretrain | torchvision | hub (download the "
        "source's published weights) (default: recipe)",
    )
    group.add_argument(
        "--data",
        default=None,
        help="dataset: synthetic | fashion_mnist | DIR (ImageFolder with train/<class>/ and "
        "val/<class>/: the class folder names become the labels; or the Fashion-MNIST IDX "
        "folder) (default: recipe)",
    )
    group.add_argument(
        "--input-size",
        default=None,
        metavar="SIZE|C,H,W",
        help="network input: 224 (square, the recipe's channels) or 3,224,224; crop and resize follow",
    )
    group.add_argument(
        "--resize",
        default=None,
        metavar="auto|none|N",
        help="shorter side before the centre crop: auto (default: for your own weights on an image "
        "folder, whole images when they are the input size or smaller, else the source's "
        "ratio), none (no resize) or N pixels (recipe preprocess.resize / resize_mode)",
    )
    group.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip damaged images of an image folder and count them in the report (default: stop "
        "before any work, naming them; recipe data.skip_bad_images)",
    )
    group.add_argument("--mean", default=None, metavar="M1,M2,M3", help="per-channel normalisation mean")
    group.add_argument("--std", default=None, metavar="S1,S2,S3", help="per-channel normalisation std")
    group.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier outputs (default: the weights file's head, else the data's class folders, else the recipe)",
    )
    group.add_argument(
        "--classifier",
        default=None,
        metavar="MODULE",
        help="module name of the classification head, e.g. fc (default: the recipe, or found by "
        "the torchvision/timm source; needed for python: factories)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any recipe field, e.g. --set masks.lr=0.1 (repeatable)",
    )


def program_name() -> str:
    """How the user called us: the console script `sparse-pipeline`, else `python -m pipeline`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name == "sparse-pipeline" else "python -m pipeline"


LAB_NOTE = "research and benchmark stages: available, not part of the product pipeline"


def stage_list(summaries: dict[str, tuple[str, str]]) -> str:
    """The stages by kind (their declarations say which), product stages first, each with its one-line help."""
    width = max(len(name) for name in summaries) + 2
    blocks = []
    for kind, title in (("product", "stages"), ("lab", f"lab stages ({LAB_NOTE})")):
        rows = [f"  {name:<{width}}{text}" for name, (found, text) in summaries.items() if found == kind]
        blocks.append(f"{title}:\n" + "\n".join(rows))
    return "\n\n".join(blocks)


def build_parser() -> argparse.ArgumentParser:
    summaries = stage_summaries()
    parser = OneLineParser(
        prog=program_name(),
        description=__doc__.split("\n\n")[0] + "\n\n" + stage_list(summaries),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="stage", metavar="STAGE", parser_class=OneLineParser, help="see above")
    commands.required = True
    for name, (_, help_text) in summaries.items():
        commands.add_parser(name, description=help_text)
    return parser


def options_from(cls, args: argparse.Namespace, drop_none: bool = False):
    """CLS from the parsed flags; with `drop_none`, flags not given take CLS's defaults (ModelOptions: --model, --out)."""
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if not (drop_none and value is None)})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Stage modules are imported only for the chosen stage, so add its flags after the name is known.
    stage = next((arg for arg in argv if not arg.startswith("-")), None)
    module = None
    if stage in STAGES:
        module = _import_stage(stage)
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        sub = commands.choices[stage]
        if needs_recipe(module):
            add_model_arguments(sub)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    with _sigterm_raises():
        return _run(module, args)


def _run(module, args: argparse.Namespace) -> int:
    try:
        options = options_from(module.Options, args)
        if not needs_recipe(module):
            return int(module.run(options) or 0)
        from pipeline.recipe.resolve import ModelOptions, resolve_recipe

        if runs_without_recipe(module, options):  # e.g. verify --dense/--sparse: the model flags as given
            return int(module.run_without_recipe(options, options_from(ModelOptions, args)) or 0)
        model_options = options_from(ModelOptions, args, drop_none=True)
        recipe = resolve_recipe(model_options, recipe_fields(options))
        paths = ArtifactPaths.for_model(model_options.out, recipe.name)
        with run_lock(paths.root):  # one run per model folder; engine calls its stages inside this one lock
            return run_stage(module, recipe, paths, options)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"gate failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(Interrupted(signal.SIGINT))
    except Interrupted as exc:
        return _interrupted(exc)


def _interrupted(exc: Interrupted) -> int:
    name = signal.Signals(exc.signum).name
    print(f"interrupted by {name}" + (f": {exc.note}" if exc.note else "; nothing written"), file=sys.stderr)
    return exc.exit_code


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM unwinds the stage like Ctrl-C does (atomic writes drop their temporaries), instead of killing it."""

    def handler(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding caller): keep the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _import_stage(stage: str):
    try:
        return load_stage(stage)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pipeline"):
            print(f"error: stage {stage} is not available in this build ({exc.name} missing)", file=sys.stderr)
            raise SystemExit(2) from None
        print(
            f"error: stage {stage} needs the package {exc.name}; install it with `pip install {exc.name}`",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
