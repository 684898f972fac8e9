"""Which layers get an N:M mask, which are skipped and why, and their share of the MACs."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.recipe.config import MaskConfig

GROUPED_REASON = "conv: TensorRT has no sparse kernels for groups > 1"


@dataclass
class LayerReport:
    name: str
    kind: str  # conv | linear | other
    weight_shape: list[int]
    macs: int
    eligible: bool
    reason: str = ""  # why it is skipped


@dataclass
class EligibilityReport:
    layers: list[LayerReport] = field(default_factory=list)
    total_macs: int = 0

    @property
    def masked(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.eligible]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.eligible]

    @property
    def masked_mac_fraction(self) -> float:
        return sum(layer.macs for layer in self.masked) / max(self.total_macs, 1)

    @property
    def grouped_mac_fraction(self) -> float:
        """Share of the MACs in depthwise/grouped convolutions, which never get sparse kernels."""
        grouped = sum(layer.macs for layer in self.skipped if layer.reason.endswith(GROUPED_REASON))
        return grouped / max(self.total_macs, 1)

    def gain_note(self, n: int, m: int) -> str:
        """One plain line on the most N:M masks can save on this network, and what holds it back."""
        masked = self.masked_mac_fraction
        best = 1 / max(1 - masked * (1 - n / m), 1e-9)
        note = f"{n}:{m} masks cover {100 * masked:.1f}% of the MACs: at best {best:.2f}x fewer MACs per image"
        if self.grouped_mac_fraction > 0:
            note += (
                f"; depthwise/grouped convolutions hold {100 * self.grouped_mac_fraction:.1f}% of the MACs and "
                "never get sparse kernels, and being memory-bound they usually take a larger share of the run "
                "time than of the MACs, so expect less end to end"
            )
        return note

    @classmethod
    def load(cls, path, model: str = "") -> EligibilityReport:
        """layers.json as train-masks and the layers stage write it (to_dict), read and checked by its owner
        (pipeline.records.load_layer_table: one `error:` line unless every entry has the types read here)."""
        from pipeline.records import load_layer_table

        data = load_layer_table(path, model)
        layers = [
            LayerReport(
                e["name"],
                e["kind"],
                list(e.get("weight_shape", [])),
                int(e["macs"]),
                bool(e["eligible"]),
                e.get("reason", ""),
            )
            for e in data["masked"] + data["skipped"]
        ]
        return cls(layers, int(data.get("total_macs") or sum(layer.macs for layer in layers)))

    def to_dict(self) -> dict:
        return {
            "total_macs": self.total_macs,
            "masked_macs": sum(layer.macs for layer in self.masked),
            "masked_mac_fraction": self.masked_mac_fraction,
            "masked": [layer.__dict__ for layer in self.masked],
            "skipped": [layer.__dict__ for layer in self.skipped],
        }


def count_macs(model: nn.Module, input_shape: list[int]) -> dict[str, int]:
    """Multiply-accumulates per Conv2d/Linear for one image, measured with forward hooks."""
    macs: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                macs[name] = int(out[0].numel() * per_output)
            else:
                macs[name] = int(out[0].numel() * module.in_features)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return macs


class MaskedModel(Protocol):
    """What deciding the masked layers reads of a recipe: its masks section, its input shape and its head."""

    @property
    def masks(self) -> MaskConfig: ...

    @property
    def input_shape(self) -> Sequence[int]: ...

    @property
    def classifier(self) -> str: ...


def eligible_layers(model: nn.Module, recipe: MaskedModel) -> EligibilityReport:
    """`find_layers` as the recipe states it: masks.m, masks.include/exclude, masks.include_classifier, the input
    shape and the classifier head (one call for every stage that masks a recipe's model)."""
    cfg = recipe.masks
    return find_layers(
        model, list(recipe.input_shape), cfg.m, cfg.include, cfg.exclude, recipe.classifier, cfg.include_classifier
    )


def find_layers(
    model: nn.Module,
    input_shape: list[int],
    m: int = 4,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    classifier: str = "fc",
    include_classifier: bool = False,
) -> EligibilityReport:
    """Decide for every Conv2d/Linear whether it gets a mask; skipped ones carry their reason."""
    check_patterns(model, include or [], exclude or [])
    macs = count_macs(model, input_shape)
    report = EligibilityReport(total_macs=sum(macs.values()))
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        reason = ""
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                depthwise = module.groups == module.in_channels
                reason = ("depthwise " if depthwise else "grouped ") + GROUPED_REASON
            elif module.in_channels % m:
                reason = f"in_channels={module.in_channels} is not a multiple of {m}"
        elif module.in_features % m:
            reason = f"in_features={module.in_features} is not a multiple of {m}"
        if not reason and name == classifier and not include_classifier:
            reason = "classifier head (excluded by default; set masks.include_classifier=true)"
        if not reason and include and not any(fnmatch.fnmatch(name, pattern) for pattern in include):
            reason = "not matched by the recipe's include rules"
        if not reason and exclude and any(fnmatch.fnmatch(name, pattern) for pattern in exclude):
            reason = "matched by the recipe's exclude rules"
        if name not in macs:
            reason = reason or "not reached by a forward pass"
        report.layers.append(LayerReport(name, kind, list(module.weight.shape), macs.get(name, 0), not reason, reason))
    return report


def check_patterns(model: nn.Module, include: list[str], exclude: list[str]) -> None:
    """Refuse an include/exclude pattern that matches no Conv2d/Linear layer: a typo would otherwise mask (or
    keep dense) layers the user meant otherwise, without a word."""
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    for field_name, patterns in (("masks.include", include), ("masks.exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatch(name, pattern) for name in names):
                shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                raise PipelineError(
                    f"{field_name} pattern {pattern!r} matches no Conv2d/Linear layer of this model "
                    f"(fnmatch patterns on module names such as: {shown}); fix the pattern (`python -m "
                    "pipeline layers --set masks.include= --set masks.exclude=` lists every layer)"
                )
