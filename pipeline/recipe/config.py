"""Typed recipe configuration: each field carries its default, what it means and its validator.

A recipe file (`models/<name>.toml`) becomes a `Recipe` through `recipe_from_dict`; CLI flags and
`--set section.field=value` overrides are applied on top (`apply_override`), `validate` runs every field's own
check (declared next to the field with `rule`, as ModelOpt's configs do), and the resolved config is written next
to the artifacts as `config.json`. Rules are checked here once; no later step checks them again.

The resolved recipe is frozen (`freeze`, applied by pipeline.recipe.resolve.resolve_recipe): assigning a field
raises `FrozenRecipeError`; a changed recipe is a new one made through the override path (`with_fields`: set_field
on a copy, then validate), before config.json is written. Library seams take sections, not the recipe: backends a
`BuildConfig` and an `InputSpec`, the exporter an `InputSpec`, the mask learner `MaskLearning` (masks section).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError
from pipeline.triton_releases import TRITON_TENSORRT

MASK_PRIORS = ("magnitude", "wanda", "sparsegpt", "uniform")
TAU_SCHEDULES = ("constant", "linear", "exponential", "cosine")
MASK_KERNELS = ("auto", "torch")  # masks.kernel: the per-block mask work in a fused C kernel (auto) or PyTorch ops
MASK_SELECTIONS = ("final", "best")  # masks.keep: which argmax masks a mask-training run returns
# masks.loss: auto, or distinct terms joined by "+" in this order (e.g. ce+distill)
MASK_LOSS_TERMS = ("ce", "pseudo", "distill", "features")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# training steps (pretrain, masks): auto = bfloat16 autocast where it is faster (CUDA, CPUs with AMX or AVX512-BF16)
TRAINING_PRECISIONS = ("auto", "float32", "bfloat16")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
TRITON_RELEASES = tuple(TRITON_TENSORRT)
DATA_KINDS = ("fashion_mnist", "imagefolder", "synthetic")
COLORS = ("L", "RGB")
CHANNELS = {"L": 1, "RGB": 3}
RESIZE_MODES = ("auto", "fixed")
RESIZE_SHAPES = ("shorter", "square")  # the shorter side to `resize` (aspect kept) | the whole image to resize x resize
INTERPOLATIONS = ("bilinear", "bicubic")

Check = Callable[[Any, "Recipe", bool], bool]  # (value, recipe, resolved) -> valid


def rule(
    default: Any = dataclasses.MISSING,
    *,
    check: Check,
    valid: str | Callable[[Recipe], str],
    factory: Callable[[], Any] | None = None,
    message: Callable[[Any, Recipe], str] | None = None,
) -> Any:
    """A dataclass field with its validator: CHECK(value, recipe, resolved), VALID says (or computes from the
    recipe) what is valid, MESSAGE replaces the default `key = value is not valid` when given."""
    metadata = {"check": check, "valid": valid, "message": message}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(low: float, default: Any, valid: str = "") -> Any:
    return rule(default, check=lambda v, r, _: v >= low, valid=valid or f"at least {low}")


def above(low: float, default: Any, valid: str = "") -> Any:
    return rule(default, check=lambda v, r, _: v > low, valid=valid or f"greater than {low}")


def within(low: float, high: float, default: Any, valid: str, high_open: bool = False) -> Any:
    return rule(default, check=lambda v, r, _: low <= v < high if high_open else low <= v <= high, valid=valid)


def choice(choices: tuple[str, ...], default: str) -> Any:
    return rule(default, check=lambda v, r, _: v in choices, valid="one of " + ", ".join(choices))


def _channels(recipe: Recipe) -> int:
    return (recipe.input_shape or [0])[0]


def _colour_fits(value: str, recipe: Recipe, _: bool) -> bool:
    return len(recipe.input_shape) != 3 or recipe.input_shape[0] == CHANNELS.get(value, recipe.input_shape[0])


def _loss_ok(value: str, recipe: Recipe, _: bool) -> bool:
    terms = value.split("+")
    return value == "auto" or (
        len(set(terms)) == len(terms)
        and set(terms) <= set(MASK_LOSS_TERMS)
        and sorted(terms, key=MASK_LOSS_TERMS.index) == terms
    )


def _batch_order(value: int, recipe: Recipe, _: bool) -> bool:
    return recipe.build.min_batch <= value <= recipe.build.max_batch


def _preferred_outside(value: list[int], recipe: Recipe) -> list[int]:
    return [x for x in value if not 1 <= x <= recipe.serve.max_batch_size]


@dataclass
class DataConfig:
    kind: str = choice(DATA_KINDS, "fashion_mnist")  # imagefolder needs root
    root: str = ""  # dataset folder; empty = search the default places
    train_split: str = "train"
    eval_split: str = "val"
    batch_size: int = at_least(1, 128)
    eval_batch_size: int = at_least(1, 512)
    workers: int = at_least(0, 0, "0 or more")
    eval_limit: int = at_least(0, 0, "0 (the whole set) or more")  # 0 = the whole evaluation set
    synthetic_size: int = at_least(1, 256)
    # damaged images: false = stop before any work naming them; true = skip them and count them in the report
    skip_bad_images: bool = False


@dataclass
class PreprocessConfig:
    """How raw images become the network input (also written for the inference server)."""

    # shorter side before the centre crop; 0 = no resize
    resize: int = rule(
        0,
        check=lambda v, r, _: v == 0 or v >= r.preprocess.crop,
        valid=lambda r: f"0 (no resize) or at least the crop {r.preprocess.crop}",
    )
    # auto: fit an image folder for your own weights (pipeline/recipe/preprocessing.py) | fixed: resize as given
    resize_mode: str = choice(RESIZE_MODES, "auto")
    # shorter: the shorter side to `resize`, aspect kept (torchvision Resize(N)) | square: the whole image to
    # resize x resize (Resize((N, N))); chosen by measurement for your own weights (pipeline/data/preprocess_choice.py)
    resize_shape: str = choice(RESIZE_SHAPES, "shorter")
    interpolation: str = choice(INTERPOLATIONS, "bilinear")  # of the resize
    crop: int = rule(
        28,
        check=lambda v, r, _: len(r.input_shape) != 3 or v == r.input_shape[1] == r.input_shape[2],
        valid=lambda r: f"the crop is the input size: input_shape is {r.input_shape} (set both with --input-size)",
    )
    mean: list[float] = rule(
        check=lambda v, r, _: len(v) == _channels(r), valid="one value per input channel", factory=lambda: [0.2860]
    )
    std: list[float] = rule(
        check=lambda v, r, _: len(v) == _channels(r) and all(x > 0 for x in v),
        valid="one positive value per input channel",
        factory=lambda: [0.3530],
    )
    color: str = rule(
        "L",
        check=lambda v, r, resolved: v in COLORS and _colour_fits(v, r, resolved),
        valid=lambda r: (
            "one of L, RGB"
            if r.preprocess.color not in COLORS
            else f"{r.preprocess.color} images have {CHANNELS[r.preprocess.color]} channel(s), input_shape has "
            f"{_channels(r)}"
        ),
    )


@dataclass
class PretrainConfig:
    """Dense training of the demo network (only recipes whose weights come from `pretrain`)."""

    epochs: int = at_least(1, 4)
    lr: float = above(0, 0.2)
    momentum: float = within(0, 1, 0.9, "in [0, 1)", high_open=True)
    weight_decay: float = at_least(0, 5e-4, "0 or more")
    batch_size: int = at_least(1, 128)
    label_smoothing: float = within(0, 1, 0.0, "in [0, 1)", high_open=True)
    # share of the one-cycle schedule spent raising the learning rate
    warmup_share: float = rule(0.25, check=lambda v, r, _: 0 < v < 1, valid="in (0, 1)")
    augment: bool = True  # random crop and flip of the training images
    # auto: bfloat16 autocast + channels_last on CUDA and on CPUs with AMX or AVX512-BF16 (1.5-2.3x faster there),
    # else float32 (channels_last on CPUs)
    precision: str = choice(TRAINING_PRECISIONS, "auto")
    seed: int = 0


@dataclass
class MaskConfig:
    """Mask learning. The budget is in optimizer steps, never epochs, so the defaults fit a 1k-image
    folder and ImageNet alike; every schedule runs over `steps` (epochs are reported, not chosen)."""

    n: int = rule(
        2,
        check=lambda v, r, _: 0 < v < r.masks.m,
        valid=lambda r: f"between 1 and masks.m - 1 = {r.masks.m - 1} (n = m would prune nothing)",
    )
    m: int = at_least(2, 4, "at least 2 (2:4 is n=2, m=4)")
    include: list[str] = field(default_factory=list)  # fnmatch patterns; empty = all eligible
    exclude: list[str] = field(default_factory=list)
    include_classifier: bool = False
    prior: str = choice(MASK_PRIORS, "magnitude")  # heuristic the logits start from
    # logits = strength x share of the block's heuristic score a pattern keeps
    prior_strength: float = at_least(0, 20.0, "0 (a uniform start) or more")
    logit_scale: float = above(0, 1.0)  # MaskLLM's logit scaling: sampling uses scale x logits + Gumbel noise
    # bake: re-estimate BatchNorm statistics of the sparse model on this many training images (changes running
    # statistics, never weights; reported apart); 0 = off
    bn_reestimate_images: int = at_least(0, 0, "0 (off) or a number of training images")
    # MaskLLM's regulariser: loss -= weight x expected kept share of |w|; 0 = off (docs/notebook/results.md "Harder demo": it is
    # what brings the 1,500-image run within 1 pt)
    kept_magnitude_weight: float = at_least(0, 5.0, "0 (off) or more")
    steps: int = at_least(1, 1000, "at least 1 optimizer step")  # the budget
    lr: float = above(0, 0.1)  # AdamW on the logits (docs/notebook/results.md "Harder demo" has the measurements)
    lr_final: float = within(0, 1, 0.0, "a share of masks.lr in [0, 1]")  # share of lr the cosine decays to
    warmup_share: float = within(0, 1, 0.05, "a share of the budget in [0, 1)", high_open=True)
    weight_decay: float = at_least(0, 0.0, "0 or more")
    tau_start: float = above(0, 1.0)
    tau_end: float = above(0, 0.1)
    tau_schedule: str = choice(TAU_SCHEDULES, "exponential")
    # auto (ce+distill with labels, distill without), or terms joined by "+": ce (labels), pseudo (ce on the
    # dense model's classes), distill (KL of the dense model's logits), features (the masked layers' outputs)
    loss: str = rule(
        "auto",
        check=_loss_ok,
        valid="auto, or distinct terms of "
        + ", ".join(MASK_LOSS_TERMS)
        + " joined by '+' in that order (e.g. ce+distill)",
    )
    distill_temperature: float = above(0, 1.0)
    # weight of the features term (mean relative squared error over masked layers)
    feature_weight: float = above(0, 1.0, "greater than 0 (leave features out of masks.loss to turn the term off)")
    batch_size: int = at_least(1, 128)
    augment: bool = False  # random crop and flip of the training images (the validation split never is)
    # learn from a seeded subset of this many training images; 0 = all
    train_images: int = at_least(0, 0, "0 (all training images) or more")
    # held out from the training images (at most a fifth of them); 0 = none
    validation_images: int = at_least(0, 1000, "0 (no validation split) or more")
    # steps between validation evaluations; 0 = a twentieth of the budget
    eval_every: int = at_least(0, 0, "0 (a twentieth of masks.steps) or more steps")
    # plateau rule: once validation top-1 has not risen by more than one image for stop_patience evaluations, stop
    # at once if the argmax changed on at most stop_changed of the blocks, else anneal the learning rate and the
    # temperature to their final values over `cooldown` of the budget and stop then; 0 = run all masks.steps
    # (docs/notebook/time-to-accuracy.md has the measurements behind the defaults)
    stop_patience: int = at_least(0, 3, "0 (run all masks.steps) or more evaluations")
    stop_changed: float = within(0, 1, 0.005, "a share of blocks in [0, 1)", high_open=True)
    cooldown: float = within(
        0,
        1,
        0.15,
        "a share of masks.steps in [0, 1) (0: no cooldown, stop only once the argmax has settled by itself)",
        high_open=True,
    )
    # which argmax masks a run returns: final (at its last step, after the cooldown; the best ones seen instead
    # if the final ones score below the prior's on the validation split) or best (the highest validation top-1
    # of any evaluation; with a 1,000-image split that choice is mostly luck: docs/notebook/time-to-accuracy.md)
    keep: str = choice(MASK_SELECTIONS, "final")
    # steps; a checkpoint is also written on SIGTERM
    checkpoint_every: int = at_least(0, 200, "0 (only on SIGTERM) or more steps")
    # auto: bfloat16 autocast + channels_last on CUDA and on CPUs with AMX or AVX512-BF16, else float32
    # (channels_last on CPUs); the logits, their optimiser and every evaluation stay float32
    precision: str = choice(TRAINING_PRECISIONS, "auto")
    # auto: sample, mask and differentiate each layer's blocks in the fused C kernel of pipeline/masks/fused.py on
    # CPU (compiled with the system's cc on first use; PyTorch ops where it cannot be built, said in the log);
    # torch: PyTorch ops only. Same computation up to float rounding
    kernel: str = choice(MASK_KERNELS, "auto")
    seed: int = 0


@dataclass
class ExportConfig:
    opset: int = at_least(18, 18, "18 or newer (the torch.export-based exporter)")
    fp16: bool = True
    input_name: str = rule("input", check=lambda v, r, _: bool(v), valid="a non-empty tensor name")
    output_name: str = rule(
        "logits",
        check=lambda v, r, _: bool(v) and v != r.export.input_name,
        valid="two different, non-empty tensor names",
    )
    # training images that set the Q/DQ activation ranges (build.precision=int8)
    int8_calibration_images: int = at_least(1, 512)


@dataclass
class BuildConfig:
    backend: str = choice(BACKENDS, "auto")
    precision: str = choice(PRECISIONS, "fp16")  # for tensorrt
    min_batch: int = at_least(1, 1)
    opt_batch: int = rule(
        32,
        check=_batch_order,
        valid=lambda r: (
            f"min_batch <= opt_batch <= max_batch (here {r.build.min_batch}, {r.build.opt_batch}, {r.build.max_batch})"
        ),
    )
    max_batch: int = at_least(1, 64)
    workspace_mib: int = at_least(1, 2048)
    hardware_compatibility: str = choice(HARDWARE_COMPATIBILITY, "none")  # tensorrt (docs/tensorrt.md)


@dataclass
class VerifyConfig:
    serving_batch: int = at_least(1, 32)
    latency_iters: int = at_least(1, 50)
    warmup_iters: int = at_least(0, 5, "0 or more")
    max_top1_drop: float = 0.5  # points
    min_speedup: float = above(0, 2.0)  # only gated on backends with sparse kernels
    # gate masked_mac_fraction: share of MACs in layers that carry 2:4 masks (pipeline/verify/assemble.py)
    min_masked_coverage: float = within(0, 1, 0.5, "a share of MACs in [0, 1]")
    # gate accelerable_mac_fraction: share of MACs in layers whose weights are in the 2:4 layout TensorRT's sparse
    # kernels take (they can run sparse), from the sparse ONNX's weights (pipeline/verify/layout.py)
    min_accelerable_coverage: float = within(0, 1, 0.5, "a share of MACs in [0, 1]")
    # share of the evaluation images on which sparse and dense predict the same class (pipeline/verify/gates.py)
    min_agreement: float = within(0, 1, 0.8, "a share of images in [0, 1]")
    # points sparse top-1 may lie above dense: more means the evaluation is wrong, not the masks better
    max_sparse_gain: float = at_least(0, 5.0, "0 or more points")
    # the dense baseline (own weights, before training) must reach this top-1 (%); 0: only refuse near-chance
    min_dense_top1: float = within(0, 100, 0.0, "a top-1 in [0, 100]")
    # false: a dense baseline near chance is one `warning:` line instead of a refusal (a model not meant to be
    # accurate, e.g. a smoke test with random weights); min_dense_top1 still applies
    refuse_chance_baseline: bool = True


@dataclass
class ServeConfig:
    max_batch_size: int = at_least(1, 64)
    preferred_batch_sizes: list[int] = rule(
        check=lambda v, r, _: not _preferred_outside(v, r),
        factory=lambda: [8, 32],
        valid=lambda r: f"sizes between 1 and {r.serve.max_batch_size}",
        message=lambda v, r: (
            f"serve.preferred_batch_sizes {_preferred_outside(v, r)} must lie in "
            f"1..serve.max_batch_size ({r.serve.max_batch_size})"
        ),
    )
    max_queue_delay_us: int = at_least(0, 500, "0 or more")
    instance_count: int = at_least(1, 1)
    # e.g. "24.05": refuse TensorRT plans built by another TensorRT than it ships
    triton_release: str = rule(
        "",
        check=lambda v, r, _: not v or v in TRITON_RELEASES,
        valid=f"empty (no check) or a release of the table in docs/tensorrt.md ({', '.join(TRITON_RELEASES)})",
    )


@dataclass
class Recipe:
    name: str = rule(check=lambda v, r, _: bool(v), valid="a recipe needs a name")
    # source spec: builtin:NAME | torchvision:NAME | timm:NAME | python:MODULE:FACTORY
    arch: str = rule(
        check=lambda v, r, _: ":" in v and all(v.split(":", 1)),
        valid="a source spec such as builtin:tiny_resnet or torchvision:resnet18",
    )
    # 0 = from the weights file's head (or the image folder's classes); a resolved recipe needs at least 1
    num_classes: int = rule(
        check=lambda v, r, resolved: v >= 1 or (v == 0 and not resolved),
        valid="at least 1, or 0 in a recipe file to take it from the weights file",
    )
    input_shape: list[int] = rule(
        check=lambda v, r, _: len(v) == 3 and all(x >= 1 for x in v),
        valid="three positive integers C,H,W, e.g. 3,224,224",
    )  # C, H, W
    weights: str = rule(
        check=lambda v, r, _: bool(v), valid="random, pretrain, torchvision, hub or a path to a weights file"
    )
    description: str = ""
    classifier: str = "fc"  # module name of the classification head
    labels: list[str] = rule(
        check=lambda v, r, _: not v or not r.num_classes or len(v) == r.num_classes,
        valid=lambda r: f"{len(r.labels)} labels for {r.num_classes} classes; give one label per class or none",
        factory=list,
    )
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
        return digest_of(data)


def digest_of(data: dict[str, Any]) -> str:
    """`Recipe.digest` of plain data: {section or field: its value as `to_dict` gives it}."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class InputSpec:
    """The network's input and output as the library seams need them (backends, exporters), instead of the whole
    recipe: which model (for messages), the sample shape C,H,W, the I/O tensor names and the classes. The batch
    range is the build section's (BuildConfig)."""

    model: str
    shape: tuple[int, ...]
    num_classes: int
    input_name: str = ""  # "": not given; the seam takes it from the graph (a backend build does)
    output_name: str = ""

    @classmethod
    def of(cls, recipe: Recipe, names: bool = True) -> InputSpec:
        """RECIPE's spec; NAMES: with export.input_name/output_name (an exporter's), else without (a backend
        build reads the names from the graph, so its result does not depend on them)."""
        if not names:
            return cls(recipe.name, tuple(recipe.input_shape), recipe.num_classes)
        return cls(
            recipe.name,
            tuple(recipe.input_shape),
            recipe.num_classes,
            recipe.export.input_name,
            recipe.export.output_name,
        )


def _list_from_text(text: str, key: str, origin: str) -> list[Any]:
    """A list field's command-line text: `a,b` (items stripped, empty ones dropped) or a TOML/JSON-style list
    `["a", "b"]`, never the bracketed text taken as one item."""
    if not text.strip().startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise PipelineError(
            f'{origin}: {key} = {text!r} is not valid: write a list as a,b or as ["a", "b"] (double quotes)'
        )
    return value


def _convert(value: Any, target: Any, key: str, origin: str) -> Any:
    """`value` (a command-line string, or a value read from a recipe file) as the field's type."""
    kind = typing.get_origin(target)
    name = getattr(target, "__name__", str(target))
    if kind is list:
        (item,) = typing.get_args(target)
        if isinstance(value, str):
            value = _list_from_text(value, key, origin)
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
# Fields that were removed, with what replaces them (a recipe or --set naming one gets this as its error).
RENAMED = {
    "masks.epochs": "masks.steps (the budget is in optimizer steps; epochs are derived from it)",
    "masks.max_steps": "masks.steps (the budget is in optimizer steps)",
    "masks.lr_step_epochs": "masks.lr_final and masks.warmup_share (warm-up then cosine decay over masks.steps)",
    "masks.lr_gamma": "masks.lr_final (warm-up then cosine decay over masks.steps)",
    "masks.init": "masks.prior (magnitude, wanda, sparsegpt or uniform)",
    "masks.init_scale": "masks.prior_strength",
    "masks.method": "nothing: train-masks learns masks, `compare --methods` runs the other methods",
    "verify.min_coverage": "verify.min_masked_coverage (share of MACs in layers that carry 2:4 masks) or "
    "verify.min_accelerable_coverage (share in layers whose weights TensorRT's sparse kernels take); it meant each",
}


def validate(recipe: Recipe, origin: str = "recipe", resolved: bool = True) -> Recipe:
    """Run every field's own check (in declaration order); the first failure is one PipelineError naming the key,
    the value and what is valid. A recipe file may leave num_classes at 0; a resolved recipe (`resolved`) may not."""
    for key, value, meta in _rules(recipe):
        if not meta["check"](value, recipe, resolved):
            valid = meta["valid"](recipe) if callable(meta["valid"]) else meta["valid"]
            what = meta["message"](value, recipe) if meta["message"] else f"{key} = {value!r} is not valid"
            raise PipelineError(f"{origin}: {what}; valid: {valid}")
    return recipe


def _rules(recipe: Recipe):
    """(key, value, rule metadata) of every field that declares a rule, sections included, in order."""
    for item in dataclasses.fields(recipe):
        value = getattr(recipe, item.name)
        if dataclasses.is_dataclass(value):
            for leaf in dataclasses.fields(value):
                if "check" in leaf.metadata:
                    yield f"{item.name}.{leaf.name}", getattr(value, leaf.name), leaf.metadata
        elif "check" in item.metadata:
            yield item.name, value, item.metadata


# --------------------------------------------------------------------------- freezing
# A resolved, validated recipe is frozen: library code reads it and cannot change it. What changes a run's recipe
# goes through the override path (set_field on a copy, then validate) before config.json is written: `with_fields`.
SECTIONS = (
    DataConfig,
    PreprocessConfig,
    PretrainConfig,
    MaskConfig,
    ExportConfig,
    BuildConfig,
    VerifyConfig,
    ServeConfig,
    Recipe,
)
_FROZEN = "_frozen"


class FrozenRecipeError(dataclasses.FrozenInstanceError):
    """A field of a frozen recipe was assigned: a programming error (the change belongs in the override path)."""


def _guarded_setattr(self: Any, name: str, value: Any) -> None:
    if self.__dict__.get(_FROZEN, False):
        raise FrozenRecipeError(
            f"the resolved recipe is frozen: {type(self).__name__}.{name} cannot be assigned after validation; "
            "change a recipe field before config.json is written (--set, a stage flag standing for the field, "
            "or pipeline.recipe.config.with_fields)"
        )
    object.__setattr__(self, name, value)


for _section in SECTIONS:
    _section.__setattr__ = _guarded_setattr  # type: ignore[assignment,method-assign]


def _parts(recipe: Recipe) -> list[Any]:
    return [recipe, *(getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name in _SECTION_FIELDS)]


_SECTION_FIELDS = {f.name for f in dataclasses.fields(Recipe) if f.type in {s.__name__ for s in SECTIONS}}


def freeze(recipe: Recipe) -> Recipe:
    """RECIPE (and each of its sections), frozen in place; returned for chaining."""
    for part in _parts(recipe):
        object.__setattr__(part, _FROZEN, True)
    return recipe


def is_frozen(recipe: Recipe) -> bool:
    return all(part.__dict__.get(_FROZEN, False) for part in _parts(recipe))


def thawed(recipe: Recipe) -> Recipe:
    """A mutable deep copy of RECIPE (for code that builds a recipe step by step, e.g. a measured choice)."""
    import copy

    twin = copy.deepcopy(recipe)
    for part in _parts(twin):
        object.__setattr__(part, _FROZEN, False)
    return twin


def with_fields(recipe: Recipe, values: dict[str, Any], origin: str) -> Recipe:
    """A new frozen recipe: RECIPE with each `section.field` of VALUES set through the override path (set_field,
    then every field's check); RECIPE itself is unchanged."""
    twin = thawed(recipe)
    for key, value in values.items():
        set_field(twin, key, value, origin)
    return freeze(validate(twin, origin=origin))
