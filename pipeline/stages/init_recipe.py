"""`init-recipe`: write a recipe file for your own model and print the command to run next.

    python -m pipeline init-recipe --model torchvision:resnet18 --weights model.pth --data DIR

The head size comes from the weights file, the labels from the ImageFolder class names, the input size and
normalisation from the source's pretrained metadata unless --input-size / --mean / --std say otherwise.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.declaration import StageDeclaration
from pipeline.recipe.init_recipe import RecipeRequest, write_recipe
from pipeline.recipe.sources import SPEC_FORMS

Options = RecipeRequest  # one field per flag


DECLARATION = StageDeclaration(
    help="write a recipe file for your own model and print the next command",
    needs_recipe=False,  # it writes the recipe (--out FILE), and reads the weights file it is given
)
NEEDS_RECIPE = DECLARATION.needs_recipe


def float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "--source", dest="source", required=True, metavar="SPEC", help=f"the network: {SPEC_FORMS}"
    )
    parser.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="your trained weights (a state_dict, plain or as training scripts wrap it), or "
        "random / torchvision (download) (default random)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="ImageFolder with train/<class>/ and val/<class>/: class names become the labels",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="outputs of the head (default: from the weights file, else the data, else the source)",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        metavar="MODULE",
        help="module name of the classification head (default: found by the source; needed for python: factories)",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="PIXELS",
        help="square input side (default: the source's pretrained size)",
    )
    parser.add_argument(
        "--resize",
        default=None,
        metavar="auto|none|N",
        help="shorter side before the centre crop (default auto: whole images when the folder's "
        "images are the input size or smaller, else the source's ratio)",
    )
    parser.add_argument("--mean", type=float_list, default=None, help="per-channel mean, e.g. 0.485,0.456,0.406")
    parser.add_argument("--std", type=float_list, default=None, help="per-channel std, e.g. 0.229,0.224,0.225")
    parser.add_argument(
        "--name",
        default=None,
        help="recipe name, also the artifact folder (default: the --out "
        "file's name, else the weights file's or the model's)",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="recipe file to write (default NAME.toml)")
    parser.add_argument("--force", action="store_true", help="replace an existing recipe file")


def run(options: Options) -> int:
    written = write_recipe(options)
    for note in written.notes:  # valid but probably wrong inputs go to stderr, as every stage prints them
        print(note, file=sys.stderr if note.startswith("warning: ") else sys.stdout)
    print(f"wrote {written.path}")
    print(f"next: {written.next_command}")
    return 0
