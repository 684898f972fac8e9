"""Typed recipe configuration and its validation: the one place that says which values are valid.

A recipe file (`models/<name>.toml`) becomes a `Recipe` through `recipe_from_dict`; CLI flags and
`--set section.field=value` overrides are applied on top (`apply_override`), `validate` checks every
field, and the resolved config is written next to the artifacts as `config.json`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError
from pipeline.triton_releases import TRITON_TENSORRT


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
    warmup_share: float = 0.25  # share of the one-cycle schedule spent raising the learning rate
    augment: bool = True  # random crop and flip of the training images
    seed: int = 0


@dataclass
class MaskConfig:
    """Mask learning. The budget is in optimizer steps, never epochs, so the defaults fit a 1k-image
    folder and ImageNet alike; every schedule runs over `steps` (epochs are reported, not chosen)."""

    n: int = 2
    m: int = 4
    include: list[str] = field(default_factory=list)  # fnmatch patterns; empty = all eligible
    exclude: list[str] = field(default_factory=list)
    include_classifier: bool = False
    method: str = "learned"  # learned | magnitude (others come with the baselines)
    prior: str = "magnitude"  # heuristic the logits start from: magnitude | wanda | sparsegpt | uniform
    prior_strength: float = 20.0  # logits = strength x share of the block's heuristic score a pattern keeps
    logit_scale: float = 1.0  # MaskLLM's logit scaling: sampling uses scale x logits + Gumbel noise
    bn_reestimate_images: int = 0  # bake: re-estimate BatchNorm statistics of the sparse model on this many
    # training images (changes running statistics, never weights; reported apart); 0 = off
    kept_magnitude_weight: float = 5.0  # MaskLLM's regulariser: loss -= weight x expected kept share of |w|; 0 = off
    # (README "Harder demo": it is what brings the 1,500-image run within 1 pt)
    steps: int = 1000  # the budget
    lr: float = 0.1  # AdamW on the logits (README "Harder demo" has the measurements)
    lr_final: float = 0.0  # share of lr the cosine decays to at the last step
    warmup_share: float = 0.05  # share of the budget spent warming the learning rate up
    weight_decay: float = 0.0
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_schedule: str = "exponential"  # constant | linear | exponential | cosine
    loss: str = "auto"  # auto (ce+distill with labels, distill without), or terms joined by "+": ce (labels),
    # pseudo (ce on the dense model's classes),
    # distill (KL of the dense model's logits), features (the masked layers' outputs)
    distill_temperature: float = 1.0
    feature_weight: float = 1.0  # weight of the features term (mean relative squared error over masked layers)
    batch_size: int = 128
    augment: bool = False  # random crop and flip of the training images (the validation split never is)
    train_images: int = 0  # learn from a seeded subset of this many training images; 0 = all
    validation_images: int = 1000  # held out from the training images (at most a fifth of them); 0 = none
    eval_every: int = 0  # steps between validation evaluations; 0 = a twentieth of the budget
    stop_patience: int = 4  # plateau rule: stop once validation top-1 has not risen by more than one image for this
    # many evaluations and the argmax changed on at most stop_changed of the blocks; 0 = run all masks.steps
    stop_changed: float = 0.005  # (docs/time-to-accuracy.md has the measurements behind both defaults)
    checkpoint_every: int = 200  # steps; a checkpoint is also written on SIGTERM
    seed: int = 0


@dataclass
class ExportConfig:
    opset: int = 18  # the torch.export-based ONNX exporter writes opset 18 or newer
    fp16: bool = True
    input_name: str = "input"
    output_name: str = "logits"
    int8_calibration_images: int = 512  # training images that set the Q/DQ activation ranges (build.precision=int8)


@dataclass
class BuildConfig:
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    precision: str = "fp16"  # for tensorrt: fp32 | fp16 | int8
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    workspace_mib: int = 2048
    hardware_compatibility: str = "none"  # tensorrt: none | ampere_plus | same_compute_capability (docs/tensorrt.md)


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
    triton_release: str = ""  # e.g. "24.05": refuse TensorRT plans built by another TensorRT than it ships


@dataclass
class Recipe:
    name: str
    arch: str  # source spec: builtin:NAME | torchvision:NAME | timm:NAME | python:MODULE:FACTORY
    num_classes: int  # 0 = from the weights file's head (or the image folder's classes)
    input_shape: list[int]  # C, H, W
    weights: str  # random | pretrain | torchvision | hub | path to a weights file
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


def _convert(value: Any, target: Any, key: str, origin: str) -> Any:
    """`value` (a command-line string, or a value read from a recipe file) as the field's type."""
    kind = typing.get_origin(target)
    name = getattr(target, "__name__", str(target))
    if kind is list:
        (item,) = typing.get_args(target)
        if isinstance(value, str):
            value = [part for part in value.split(",") if part != ""]
        if not isinstance(value, list):
            raise PipelineError(f"{origin}: {key} = {value!r} is not valid: expected a list of {item.__name__}")
        return [_convert(part, item, key, origin) for part in value]
    if isinstance(value, str) and target is not str:
        try:
            if target is bool:
                lowered = value.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if target in (int, float):
                return target(value)
        except ValueError:
            raise PipelineError(f"{origin}: {key} = {value!r} is not valid: expected {name}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target in (bool, int, float, str) and type(value) is target:
        return value
    raise PipelineError(f"{origin}: {key} = {value!r} is not valid: expected {name}")


def _field_names(obj: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(obj))


def set_field(recipe: Recipe, key: str, value: Any, origin: str) -> None:
    """Set `section.field` (or a top-level `field`) to `value`, converted to the field's type."""
    target: Any = recipe
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise PipelineError(f"{origin}: {key}: unknown section {part!r}; valid: {_field_names(recipe)}")
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target):
        raise PipelineError(f"{origin}: {key}: {parts[-2]!r} is not a section")
    hints = typing.get_type_hints(type(target))
    if key.strip() in RENAMED:
        raise PipelineError(f"{origin}: {key.strip()} was removed; use {RENAMED[key.strip()]}")
    if leaf not in hints or dataclasses.is_dataclass(hints[leaf]):
        raise PipelineError(f"{origin}: {key}: unknown field {leaf!r}; valid: {_field_names(target)}")
    setattr(target, leaf, _convert(value, hints[leaf], key, origin))


def apply_override(recipe: Recipe, assignment: str) -> None:
    """Apply one `section.field=value` (or `field=value` for top-level fields)."""
    if "=" not in assignment:
        raise PipelineError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set masks.lr=0.1")
    key, value = assignment.split("=", 1)
    set_field(recipe, key, value, f"--set {key.strip()}={value}")


def recipe_from_dict(data: dict[str, Any], origin: str = "config") -> Recipe:
    """A Recipe from nested plain data (a recipe file, or a resolved config.json); every key and type checked."""
    recipe = Recipe(name=str(data.get("name", "")), arch="", num_classes=0, input_shape=[], weights="")
    sections = {f.name for f in dataclasses.fields(recipe) if dataclasses.is_dataclass(getattr(recipe, f.name))}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise PipelineError(f"{origin}: [{key}] must be a table of fields, not {value!r}")
            for leaf, item in value.items():
                set_field(recipe, f"{key}.{leaf}", item, origin)
        else:
            set_field(recipe, key, value, origin)
    return recipe


# --------------------------------------------------------------------------- validation
MASK_PRIORS = ("magnitude", "wanda", "sparsegpt", "uniform")
TAU_SCHEDULES = ("constant", "linear", "exponential", "cosine")
# masks.loss: auto, or distinct terms joined by "+" in this order (e.g. ce+distill)
MASK_LOSS_TERMS = ("ce", "pseudo", "distill", "features")
# Fields that were removed, with what replaces them (a recipe or --set naming one gets this as its error).
RENAMED = {
    "masks.epochs": "masks.steps (the budget is in optimizer steps; epochs are derived from it)",
    "masks.max_steps": "masks.steps (the budget is in optimizer steps)",
    "masks.lr_step_epochs": "masks.lr_final and masks.warmup_share (warm-up then cosine decay over masks.steps)",
    "masks.lr_gamma": "masks.lr_final (warm-up then cosine decay over masks.steps)",
    "masks.init": "masks.prior (magnitude, wanda, sparsegpt or uniform)",
    "masks.init_scale": "masks.prior_strength",
}
BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
TRITON_RELEASES = tuple(TRITON_TENSORRT)
DATA_KINDS = ("fashion_mnist", "imagefolder", "synthetic")
COLORS = ("L", "RGB")
CHANNELS = {"L": 1, "RGB": 3}


def validate(recipe: Recipe, origin: str = "recipe", resolved: bool = True) -> Recipe:
    """Every value is usable, else a PipelineError naming the key, the value and what is valid.

    A recipe file may leave num_classes at 0 (from the weights file); a resolved recipe (`resolved`) may not.
    """
    from pipeline.masks.methods import METHODS

    problems: list[str] = []

    def check(ok: bool, key: str, valid: str, what: str = "") -> None:
        if not ok and not problems:
            value = recipe
            for part in key.split("."):
                value = getattr(value, part)
            problems.append(f"{origin}: {what or f'{key} = {value!r} is not valid'}; valid: {valid}")

    def one_of(key: str, choices) -> None:
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        check(value in choices, key, "one of " + ", ".join(choices))

    d, p, t, m, e, b, v, s = (recipe.data, recipe.preprocess, recipe.pretrain, recipe.masks, recipe.export,
                              recipe.build, recipe.verify, recipe.serve)
    check(bool(recipe.name), "name", "a recipe needs a name")
    check(":" in recipe.arch and all(recipe.arch.split(":", 1)), "arch",
          "a source spec such as builtin:tiny_resnet or torchvision:resnet18")
    check(recipe.num_classes >= 1 or (recipe.num_classes == 0 and not resolved), "num_classes",
          "at least 1, or 0 in a recipe file to take it from the weights file")
    check(len(recipe.input_shape) == 3 and all(x >= 1 for x in recipe.input_shape), "input_shape",
          "three positive integers C,H,W, e.g. 3,224,224")
    check(bool(recipe.weights), "weights", "random, pretrain, torchvision, hub or a path to a weights file")
    check(not recipe.labels or not recipe.num_classes or len(recipe.labels) == recipe.num_classes, "labels",
          f"{len(recipe.labels)} labels for {recipe.num_classes} classes; give one label per class or none")
    one_of("data.kind", DATA_KINDS)
    for key in ("batch_size", "eval_batch_size", "synthetic_size"):
        check(getattr(d, key) >= 1, f"data.{key}", "at least 1")
    check(d.workers >= 0, "data.workers", "0 or more")
    check(d.eval_limit >= 0, "data.eval_limit", "0 (the whole set) or more")
    one_of("preprocess.color", COLORS)
    if len(recipe.input_shape) == 3 and p.color in CHANNELS:
        check(recipe.input_shape[0] == CHANNELS[p.color], "preprocess.color",
              f"{p.color} images have {CHANNELS[p.color]} channel(s), input_shape has {recipe.input_shape[0]}")
        check(p.crop == recipe.input_shape[1] == recipe.input_shape[2], "preprocess.crop",
              f"the crop is the input size: input_shape is {recipe.input_shape} (set both with --input-size)")
    check(p.resize == 0 or p.resize >= p.crop, "preprocess.resize", f"0 (no resize) or at least the crop {p.crop}")
    check(len(p.mean) == (recipe.input_shape or [0])[0], "preprocess.mean", "one value per input channel")
    check(len(p.std) == (recipe.input_shape or [0])[0] and all(x > 0 for x in p.std), "preprocess.std",
          "one positive value per input channel")
    check(t.epochs >= 1, "pretrain.epochs", "at least 1")
    check(t.lr > 0, "pretrain.lr", "greater than 0")
    check(t.batch_size >= 1, "pretrain.batch_size", "at least 1")
    check(0 <= t.momentum < 1, "pretrain.momentum", "in [0, 1)")
    check(t.weight_decay >= 0, "pretrain.weight_decay", "0 or more")
    check(0 <= t.label_smoothing < 1, "pretrain.label_smoothing", "in [0, 1)")
    check(0 < t.warmup_share < 1, "pretrain.warmup_share", "in (0, 1)")
    check(m.m >= 2, "masks.m", "at least 2 (2:4 is n=2, m=4)")
    check(0 < m.n < m.m, "masks.n", f"between 1 and masks.m - 1 = {m.m - 1} (n = m would prune nothing)")
    one_of("masks.method", tuple(METHODS))
    one_of("masks.prior", MASK_PRIORS)
    one_of("masks.tau_schedule", TAU_SCHEDULES)
    loss_terms = m.loss.split("+")
    check(m.loss == "auto" or (len(set(loss_terms)) == len(loss_terms) and set(loss_terms) <= set(MASK_LOSS_TERMS)
                               and sorted(loss_terms, key=MASK_LOSS_TERMS.index) == loss_terms),
          "masks.loss", "auto, or distinct terms of " + ", ".join(MASK_LOSS_TERMS) + " joined by '+' in that order "
          "(e.g. ce+distill)")
    check(m.prior_strength >= 0, "masks.prior_strength", "0 (a uniform start) or more")
    check(m.logit_scale > 0, "masks.logit_scale", "greater than 0")
    check(m.bn_reestimate_images >= 0, "masks.bn_reestimate_images", "0 (off) or a number of training images")
    check(m.kept_magnitude_weight >= 0, "masks.kept_magnitude_weight", "0 (off) or more")
    check(m.steps >= 1, "masks.steps", "at least 1 optimizer step")
    check(m.lr > 0, "masks.lr", "greater than 0")
    check(0 <= m.lr_final <= 1, "masks.lr_final", "a share of masks.lr in [0, 1]")
    check(0 <= m.warmup_share < 1, "masks.warmup_share", "a share of the budget in [0, 1)")
    check(m.weight_decay >= 0, "masks.weight_decay", "0 or more")
    check(m.tau_start > 0, "masks.tau_start", "greater than 0")
    check(m.tau_end > 0, "masks.tau_end", "greater than 0")
    check(m.distill_temperature > 0, "masks.distill_temperature", "greater than 0")
    check(m.feature_weight > 0, "masks.feature_weight", "greater than 0 (leave features out of masks.loss to turn "
                                                        "the term off)")
    check(m.batch_size >= 1, "masks.batch_size", "at least 1")
    check(m.train_images >= 0, "masks.train_images", "0 (all training images) or more")
    check(m.validation_images >= 0, "masks.validation_images", "0 (no validation split) or more")
    check(m.checkpoint_every >= 0, "masks.checkpoint_every", "0 (only on SIGTERM) or more steps")
    check(m.eval_every >= 0, "masks.eval_every", "0 (a twentieth of masks.steps) or more steps")
    check(m.stop_patience >= 0, "masks.stop_patience", "0 (never stop early) or more evaluations")
    check(0 <= m.stop_changed < 1, "masks.stop_changed", "a share of blocks in [0, 1)")
    check(e.opset >= 18, "export.opset", "18 or newer (the torch.export-based exporter)")
    check(bool(e.input_name) and bool(e.output_name) and e.input_name != e.output_name, "export.output_name",
          "two different, non-empty tensor names")
    one_of("build.backend", BACKENDS)
    one_of("build.precision", PRECISIONS)
    one_of("build.hardware_compatibility", HARDWARE_COMPATIBILITY)
    check(e.int8_calibration_images >= 1, "export.int8_calibration_images", "at least 1")
    check(not s.triton_release or s.triton_release in TRITON_RELEASES, "serve.triton_release",
          f"empty (no check) or a release of the table in docs/tensorrt.md ({', '.join(TRITON_RELEASES)})")
    check(b.min_batch >= 1, "build.min_batch", "at least 1")
    check(b.min_batch <= b.opt_batch <= b.max_batch, "build.opt_batch",
          f"min_batch <= opt_batch <= max_batch (here {b.min_batch}, {b.opt_batch}, {b.max_batch})")
    check(b.workspace_mib >= 1, "build.workspace_mib", "at least 1")
    check(v.serving_batch >= 1, "verify.serving_batch", "at least 1")
    check(v.latency_iters >= 1, "verify.latency_iters", "at least 1")
    check(v.warmup_iters >= 0, "verify.warmup_iters", "0 or more")
    check(v.min_speedup > 0, "verify.min_speedup", "greater than 0")
    check(0 <= v.min_coverage <= 1, "verify.min_coverage", "a share of MACs in [0, 1]")
    check(s.max_batch_size >= 1, "serve.max_batch_size", "at least 1")
    outside = [x for x in s.preferred_batch_sizes if not 1 <= x <= s.max_batch_size]
    check(not outside, "serve.preferred_batch_sizes", f"sizes between 1 and {s.max_batch_size}",
          f"serve.preferred_batch_sizes {outside} must lie in 1..serve.max_batch_size ({s.max_batch_size})")
    check(s.max_queue_delay_us >= 0, "serve.max_queue_delay_us", "0 or more")
    check(s.instance_count >= 1, "serve.instance_count", "at least 1")
    if problems:
        raise PipelineError(problems[0])
    return recipe
