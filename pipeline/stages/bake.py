"""`bake`: turn learned logits into the mask artifact (masks.pt) and the sparse weights (sparse.pt).

With `--masks FILE` it re-applies saved masks to (possibly updated) dense weights given by
`--weights FILE`: the masks stay valid while the model is updated (paper, sec. 3.2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import add_model_arguments
from pipeline.errors import PipelineError
from pipeline.io import torch_load, torch_save, write_json
from pipeline.masks.learning import CHECKPOINT_FORMAT
from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
from pipeline.masks.checks import check_baked
from pipeline.masks.methods import dense_for_artifact
from pipeline.stages._common import prepare
from pipeline.recipe.weights import dense_state_dict, build_network, load_state_dict_strict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--masks", default=None, metavar="MASKS_PT",
                        help="re-apply this mask artifact instead of the learned logits in masks.ckpt")
    parser.add_argument("--checkpoint", default=None, help="mask-training checkpoint (default engines/<model>/masks.ckpt)")


def artifact_from_checkpoint(path: Path, recipe) -> MaskArtifact:
    saved = torch_load(path, "mask-training checkpoint")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path} is not a mask-training checkpoint; run train-masks first")
    if not saved.get("final"):
        raise PipelineError(f"{path} is from an unfinished run (step {saved['state']['step']}); "
                            "finish it with `train-masks --resume`")
    layers = [LayerMask(name, saved["shapes"][name], saved["n"], saved["m"], indices.long())
              for name, indices in saved["indices"].items()]
    return MaskArtifact(recipe.name, recipe.arch, "learned", layers,
                        {"init": recipe.masks.init, "steps": saved["state"]["step"],
                         "final_top1": (saved["state"]["history"] or [{}])[-1].get("top1")})


def run(args: argparse.Namespace) -> int:
    recipe, paths = prepare(args)
    if args.masks:
        artifact = MaskArtifact.load(Path(args.masks))
        if artifact.arch != recipe.arch:
            raise PipelineError(f"masks {args.masks} are for arch {artifact.arch}, model {recipe.name} is "
                                f"{recipe.arch}; use masks of the same architecture")
    else:
        checkpoint = Path(args.checkpoint) if args.checkpoint else paths.mask_checkpoint
        if not checkpoint.is_file():
            raise PipelineError(f"no learned masks at {checkpoint}; run `python -m pipeline train-masks "
                                f"--model {recipe.name}` first or pass --masks FILE")
        artifact = artifact_from_checkpoint(checkpoint, recipe)
    dense, source = dense_state_dict(recipe, args.out)
    load_state_dict_strict(build_network(recipe), dense, source)  # same architecture, clear error otherwise
    dense = dense_for_artifact(dense, artifact)  # channel-permuted masks belong to permuted weights
    sparse = apply_masks(dense, artifact, source)
    checks = check_baked(dense, sparse, artifact)
    if not checks["ok"]:
        bad = [l["name"] for l in checks["layers"] if l["nm_violations"] or not l["kept_bit_exact"]]
        raise RuntimeError(f"baked weights fail their own checks ({bad or checks['other_tensors_changed']})")
    artifact.meta["weights"] = source
    artifact.save(paths.masks)
    torch_save(sparse, paths.sparse_weights)
    masked = sum(l["density"] * _numel(l["shape"]) for l in checks["layers"])
    total = sum(_numel(l["shape"]) for l in checks["layers"])
    write_json(paths.bake_report, {
        "model": recipe.name, "method": artifact.method, "weights": source,
        "masks_source": str(args.masks or args.checkpoint or paths.mask_checkpoint),
        "layers_masked": len(artifact.layers), "density_in_masked_layers": masked / max(total, 1),
        "all_nm_in_tensorrt_layout": all(l["nm_violations"] == 0 for l in checks["layers"]),
        "kept_weights_bit_exact": all(l["kept_bit_exact"] for l in checks["layers"]),
        "other_tensors_unchanged": not checks["other_tensors_changed"], "layers": checks["layers"],
    })
    print(f"baked {len(artifact.layers)} layers: every masked weight is {artifact.layers[0].n}:{artifact.layers[0].m} "
          f"along input channels, kept weights bit-exact -> {paths.masks}, {paths.sparse_weights}")
    return 0


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
