"""Gates that catch a sparse model that is not its dense model (issue 34), for both verify paths.

A sparse model masks its dense model's weights: it predicts what the dense model predicts on nearly every image,
and its top-1 cannot lie far above the dense one. When it does, the masks are not better: the evaluation is wrong
(the dense baseline runs under a transform it was not trained with while mask training re-fitted the masks to it,
or the two engines see different inputs). So:

* `agreement`: the share of evaluation images on which both predict the same class, at least
  `verify.min_agreement` (0.8; `--set verify.min_agreement=0` turns it off);
* `sparse_top1_above_dense`: sparse top-1 minus dense top-1 in points, at most `verify.max_sparse_gain` (5) or
  three standard errors of the paired difference when the set is too small to tell 5 points (`allowed_gain`);
  when it fails, report.json's `symptoms` says what it means.

Both are skipped on data whose accuracy means nothing (synthetic images, random weights).
Applied by pipeline/verify/assemble.py on both verify paths (recipe and --dense/--sparse).
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.recipe.config import VerifyConfig
from pipeline.verify.report import Gate


def agreement_gates(accuracy: dict[str, Any], cfg: VerifyConfig, skipped: str = "") -> list[Gate]:
    """The agreement gate and the sparse-above-dense gate, from measure_accuracy's figures."""
    return [
        Gate.check("agreement", accuracy["agreement"], cfg.min_agreement, ">=", skipped),
        Gate.check("sparse_top1_above_dense", -accuracy["top1_drop"], allowed_gain(accuracy, cfg), "<=", skipped),
    ]


def allowed_gain(accuracy: dict[str, Any], cfg: VerifyConfig) -> float:
    """Points sparse top-1 may lie above dense: verify.max_sparse_gain, or 3 standard errors of the paired
    difference when that is more (McNemar: only the images the two disagree on move it; a few of them, all the
    sparse model's, are chance on a small set, not a symptom)."""
    samples = max(int(accuracy["samples"]), 1)
    disagreements = (1.0 - float(accuracy["agreement"])) * samples
    return round(max(cfg.max_sparse_gain, 300.0 * math.sqrt(disagreements) / samples), 2)


def symptoms(accuracy: dict[str, Any], cfg: VerifyConfig, skipped: str = "") -> list[str]:
    """What the figures say about the evaluation itself (report.json's `symptoms`); empty when nothing is wrong."""
    if skipped:
        return []
    found = []
    dense, sparse = accuracy["dense"]["top1"], accuracy["sparse"]["top1"]
    if sparse - dense > allowed_gain(accuracy, cfg):
        found.append(
            f"sparse top-1 {sparse:.2f}% is {sparse - dense:.2f} points above dense {dense:.2f}%: a model with "
            "masked weights cannot be that much better than the model it masks, so the evaluation is wrong (the "
            "dense model evaluated under a transform it was not trained with, masks trained to fit it, or the "
            "engines fed different inputs); check the preprocessing (preprocess_choice.json, --resize, "
            "--input-size, --mean/--std)"
        )
    if accuracy["agreement"] < cfg.min_agreement:
        found.append(
            f"sparse and dense predict the same class on {100 * accuracy['agreement']:.1f}% of "
            f"{accuracy['samples']} images (at least {100 * cfg.min_agreement:.0f}% needed, "
            "verify.min_agreement): the sparse engine is not its dense model"
        )
    return found


def not_meaningful(recipe, data_kind: str, accuracy_meaningful: bool) -> str:
    """Why the gates above are skipped for this run ('' when they apply)."""
    if not accuracy_meaningful or data_kind == "synthetic":
        return f"{data_kind} data: accuracy means nothing"
    if recipe is not None and recipe.weights == "random":
        return "random weights: predictions mean nothing"
    return ""
