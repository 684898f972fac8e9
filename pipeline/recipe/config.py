"""Typed recipe configuration.

A recipe (one file per model under `models/`) returns a `Recipe`. CLI flags and
`--set section.field=value` overrides are applied on top, and the resolved config is
written next to the artifacts as `config.json`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"  # fashion_mnist | imagefolder | synthetic
    root: str = ""  # dataset folder; empty = search the default places
    train_split: str = "train"
    eval_split: str = "val"
    batch_size: int = 128
    eval_batch_size: int = 512
    workers: int = 0
    eval_limit: int = 0  # 0 = the whole evaluation set
    synthetic_size: int = 256


@dataclass
class PreprocessConfig:
    """How raw images become the network input (also written for the inference server)."""

    resize: int = 0  # shorter side before crop; 0 = no resize
    crop: int = 28
    mean: list[float] = field(default_factory=lambda: [0.2860])
    std: list[float] = field(default_factory=lambda: [0.3530])
    color: str = "L"  # L (grayscale) or RGB


@dataclass
class PretrainConfig:
    """Dense training of the demo network (only recipes whose weights come from `pretrain`)."""

    epochs: int = 4
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    seed: int = 0


@dataclass
class MaskConfig:
    n: int = 2
    m: int = 4
    include: list[str] = field(default_factory=list)  # fnmatch patterns; empty = all eligible
    exclude: list[str] = field(default_factory=list)
    include_classifier: bool = False
    method: str = "learned"  # learned | magnitude (others come with the baselines)
    init: str = "magnitude"  # magnitude | uniform
    init_scale: float = 20.0
    epochs: float = 1.0
    max_steps: int = 0  # 0 = no cap
    lr: float = 0.01
    weight_decay: float = 0.0
    lr_step_epochs: float = 1.0  # StepLR period in epochs
    lr_gamma: float = 0.5
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_schedule: str = "exponential"  # constant | linear | exponential
    batch_size: int = 128
    checkpoint_every: int = 200  # steps; a checkpoint is also written every epoch and on SIGTERM
    eval_every: int = 0  # steps between extra evaluations for the learning curve; 0 = per epoch only
    seed: int = 0


@dataclass
class ExportConfig:
    opset: int = 18  # the torch.export-based ONNX exporter writes opset 18 or newer
    fp16: bool = True
    input_name: str = "input"
    output_name: str = "logits"


@dataclass
class BuildConfig:
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    precision: str = "fp16"  # for tensorrt: fp16 | fp32
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    workspace_mib: int = 2048


@dataclass
class VerifyConfig:
    serving_batch: int = 32
    latency_iters: int = 50
    warmup_iters: int = 5
    max_top1_drop: float = 0.5  # points
    min_speedup: float = 2.0  # only gated on backends with sparse kernels
    min_coverage: float = 0.5  # share of MACs in masked layers


@dataclass
class ServeConfig:
    max_batch_size: int = 64
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 32])
    max_queue_delay_us: int = 500
    instance_count: int = 1


@dataclass
class Recipe:
    name: str
    arch: str  # key of pipeline.recipe.nets.ARCHITECTURES
    num_classes: int
    input_shape: list[int]  # C, H, W
    weights: str  # pretrain | torchvision | random | path to a .pth
    description: str = ""
    classifier: str = "fc"  # module name of the classification head
    labels: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, *sections: str) -> str:
        """Stable hash of the whole recipe or of the named sections."""
        data = self.to_dict()
        if sections:
            data = {key: data[key] for key in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _convert(value: str, target: Any, key: str) -> Any:
    origin = typing.get_origin(target)
    try:
        if target is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target is int:
            return int(value)
        if target is float:
            return float(value)
        if target is str:
            return value
        if origin is list:
            (item,) = typing.get_args(target)
            parts = [part for part in value.split(",") if part != ""]
            return [_convert(part, item, key) for part in parts]
    except ValueError:
        name = getattr(target, "__name__", str(target))
        raise PipelineError(f"--set {key}={value}: expected {name}") from None
    raise PipelineError(f"--set {key}: field type {target} cannot be set from the command line")


def apply_override(recipe: Recipe, assignment: str) -> None:
    """Apply one `section.field=value` (or `field=value` for top-level fields)."""
    if "=" not in assignment:
        raise PipelineError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set masks.lr=0.1")
    key, value = assignment.split("=", 1)
    target: Any = recipe
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise PipelineError(f"--set {key}: unknown section {part!r}; valid: {_field_names(recipe)}")
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target):
        raise PipelineError(f"--set {key}: {parts[-2]!r} is not a section")
    hints = typing.get_type_hints(type(target))
    if leaf not in hints or dataclasses.is_dataclass(getattr(target, leaf, None)):
        raise PipelineError(f"--set {key}: unknown field {leaf!r}; valid: {_field_names(target)}")
    setattr(target, leaf, _convert(value, hints[leaf], key))


def _field_names(obj: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(obj))


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a Recipe from its `to_dict()` form (e.g. a resolved config.json)."""
    hints = typing.get_type_hints(Recipe)
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if hint is not None and dataclasses.is_dataclass(hint):
            kwargs[key] = hint(**value)
        else:
            kwargs[key] = value
    return Recipe(**kwargs)
