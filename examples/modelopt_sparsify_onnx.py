"""Sparsify a network with NVIDIA ModelOpt and export it to ONNX, outside the pipeline, for `verify --dense/--sparse`.

    python examples/modelopt_sparsify_onnx.py --model fmnist_resnet --weights engines/fmnist_resnet/dense.pt \\
        --out /tmp/modelopt [--mode sparse_magnitude|sparsegpt]

Writes OUT/dense.onnx and OUT/modelopt_<mode>.onnx with plain `torch.onnx.export` (dynamo, dynamic batch, input
`input`, output `logits`), after `mts.sparsify(model, MODE)` and `mts.export(model)`. `sparsegpt` calibrates on
128 Fashion-MNIST training images. The network and its dense weights come from the pipeline's recipe only to
have the demo model; ModelOpt does the pruning. ModelOpt is not a dependency of the project: install it in a
separate venv that sees the project's packages (docs/ci-gate.md), so it cannot replace torch or onnx.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch


def export(model: torch.nn.Module, input_shape: list[int], path: Path) -> None:
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, *input_shape),),
        str(path),
        dynamo=True,
        optimize=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )


def calibration_loader(recipe, images: int = 128):
    from pipeline.data.datasets import build_datasets, make_loader

    return make_loader(torch.utils.data.Subset(build_datasets(recipe).plain_train, range(images)), batch_size=32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist_resnet")
    parser.add_argument("--weights", required=True, help="dense state_dict (e.g. engines/fmnist_resnet/dense.pt)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("sparse_magnitude", "sparsegpt"), default="sparse_magnitude")
    args = parser.parse_args(argv)
    import modelopt.torch.sparsity as mts

    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.weights import build_network

    recipe = get_recipe(args.model)
    model = build_network(recipe)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export(model, recipe.input_shape, out / "dense.onnx")
    config = None
    if args.mode == "sparsegpt":
        config = {"data_loader": calibration_loader(recipe), "collect_func": lambda batch: batch[0]}
    sparse = mts.export(mts.sparsify(copy.deepcopy(model), args.mode, config=config))
    for name, parameter in sparse.named_parameters():
        if parameter.dim() > 1 and (parameter == 0).float().mean() > 0.4:
            print(
                f"ModelOpt sparsified {name} {list(parameter.shape)}: {100 * float((parameter == 0).float().mean()):.0f}% zeros"
            )
    export(sparse, recipe.input_shape, out / f"modelopt_{args.mode}.onnx")
    print(f"wrote {out / 'dense.onnx'} and {out / f'modelopt_{args.mode}.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
