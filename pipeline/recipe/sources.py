"""Model sources: what an `arch` spec (`builtin:`, `torchvision:`, `timm:`, `python:`) builds, and what it knows.

A source builds the network for a number of classes, names its classifier head when it knows it, gives the
input size and normalisation its pretrained weights expect, and fetches those weights from the hub for users
who are online.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.recipe.nets import ARCHITECTURES

SPEC_FORMS = "builtin:NAME, torchvision:NAME, timm:NAME or python:PACKAGE.MODULE:FACTORY"
# An output size no real hidden layer has: the head is the last layer that produces it.
_PROBE_CLASSES = 1013


@dataclass(frozen=True)
class SourceDefaults:
    """What a source's pretrained weights expect; None where the source does not know."""

    num_classes: int | None = None
    input_size: int | None = None  # crop (H = W)
    resize: int | None = None  # shorter side before the centre crop
    mean: list[float] | None = None
    std: list[float] | None = None
    color: str | None = None  # RGB | L
    interpolation: str | None = None  # bilinear | bicubic | ...
    labels: list[str] | None = None


class ModelSource:
    """One `arch` spec. Subclasses build the network and say what they know about it."""

    def __init__(self, spec: str, name: str) -> None:
        self.spec, self.name = spec, name

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The network with `num_classes` outputs (None: the source's own default)."""
        raise NotImplementedError

    def classifier_name(self) -> str | None:
        """Module name of the classification head, or None when this source cannot know it."""
        return find_classifier(self._probe_model(), _PROBE_CLASSES)

    def defaults(self) -> SourceDefaults:
        return SourceDefaults()

    def pretrained_state_dict(self) -> tuple[dict[str, torch.Tensor], str]:
        """The published weights (needs network access) and a line saying which they are."""
        raise PipelineError(f"{self.spec} has no published weights; pass --weights FILE (a saved state_dict)")

    def _probe_model(self) -> nn.Module:
        # Building on the meta device allocates nothing; a few constructors read tensor values and need real ones.
        try:
            with torch.device("meta"):
                return self.build(_PROBE_CLASSES)
        except (NotImplementedError, RuntimeError):
            return self.build(_PROBE_CLASSES)


def find_classifier(model: nn.Module, num_classes: int) -> str | None:
    """The last Linear (or 1x1-conv head, as SqueezeNet's) producing `num_classes` outputs.

    Taking the last one skips auxiliary heads (GoogLeNet's aux1/aux2, Inception-v3's AuxLogits).
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes:
            found = name
    return found


def channel_color(channels: int | None) -> str | None:
    """The image mode a network with this many input channels reads: L (1), RGB (3), else unknown (None)."""
    return None if channels is None else {1: "L", 3: "RGB"}.get(channels)


def input_channels(model: nn.Module) -> int | None:
    """in_channels of the first convolution: 3 for RGB networks, 1 for grayscale ones."""
    first = next((module for module in model.modules() if isinstance(module, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def _closest(name: str, valid: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        return f"{what} {name!r} does not exist; closest: {', '.join(close)}"
    return f"{what} {name!r} does not exist; valid: {', '.join(valid)}"


# --------------------------------------------------------------------------- torchvision
def _torchvision_models():
    import torchvision

    return torchvision.models


class TorchvisionSource(ModelSource):
    def __init__(self, spec: str, name: str) -> None:
        super().__init__(spec, name)
        models = _torchvision_models()
        classification = models.list_models(module=models)
        if name not in classification:
            if name in models.list_models():
                raise PipelineError(
                    f"{spec}: {name} is a detection, segmentation or video model; this pipeline "
                    f"takes image classifiers (torchvision.models.list_models(module=torchvision.models))"
                )
            raise PipelineError(_closest(name, classification, f"{spec}: torchvision classification model"))

    def build(self, num_classes: int | None = None) -> nn.Module:
        models = _torchvision_models()
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return models.get_model(self.name, weights=None, **kwargs)

    @cached_property
    def _weights(self):
        return _torchvision_models().get_model_weights(self.name).DEFAULT

    def defaults(self) -> SourceDefaults:
        weights = self._weights
        transform = weights.transforms()
        categories = list(weights.meta.get("categories") or [])
        return SourceDefaults(
            num_classes=len(categories) or None,
            input_size=int(transform.crop_size[0]),
            resize=int(transform.resize_size[0]),
            mean=[float(value) for value in transform.mean],
            std=[float(value) for value in transform.std],
            color="RGB",
            interpolation=transform.interpolation.value,
            labels=categories or None,
        )

    def pretrained_state_dict(self) -> tuple[dict[str, torch.Tensor], str]:
        weights = self._weights
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # urllib, SSL, hash and disk errors all mean "not available here"
            raise PipelineError(
                f"cannot download torchvision weights {weights} ({type(exc).__name__}); "
                "pass --weights FILE with a saved state_dict"
            ) from None
        return state, f"torchvision {weights}"


# --------------------------------------------------------------------------- timm
def _timm():
    try:
        import timm
    except ImportError:
        raise PipelineError(
            "timm: sources need the timm package; install it with "
            "`pip install 'sparse-pipeline[timm]'` (or `pip install timm`)"
        ) from None
    return timm


class TimmSource(ModelSource):
    def __init__(self, spec: str, name: str) -> None:
        super().__init__(spec, name)
        timm = _timm()
        if not timm.is_model(name):
            raise PipelineError(_closest(name, timm.list_models(), f"{spec}: timm model"))

    def build(self, num_classes: int | None = None) -> nn.Module:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return _timm().create_model(self.name, pretrained=False, **kwargs)

    @cached_property
    def _config(self) -> dict:
        config = _timm().get_pretrained_cfg(self.name)
        return config.to_dict() if config is not None else {}

    def classifier_name(self) -> str | None:
        model = self._probe_model()
        get_classifier = getattr(model, "get_classifier", None)  # timm's models have it; nn.Module declares none
        head = get_classifier() if callable(get_classifier) else None
        for name, module in model.named_modules():
            if module is head and name:
                return name
        named = self._config.get("classifier")
        return named if isinstance(named, str) else find_classifier(model, _PROBE_CLASSES)

    def defaults(self) -> SourceDefaults:
        config = self._config
        if not config:
            return SourceDefaults()
        channels, size = config["input_size"][0], config["input_size"][-1]
        crop_pct = config.get("crop_pct") or 1.0
        return SourceDefaults(
            num_classes=config.get("num_classes") or None,
            input_size=int(size),
            resize=int(math.floor(size / crop_pct)),
            mean=[float(value) for value in config.get("mean", ())] or None,
            std=[float(value) for value in config.get("std", ())] or None,
            color="RGB" if channels == 3 else "L",
            interpolation=config.get("interpolation") or None,
        )

    def pretrained_state_dict(self) -> tuple[dict[str, torch.Tensor], str]:
        try:
            model = _timm().create_model(self.name, pretrained=True)
        except Exception as exc:  # hub, network and cache errors
            raise PipelineError(
                f"cannot download timm weights for {self.name} ({type(exc).__name__}); "
                "pass --weights FILE with a saved state_dict"
            ) from None
        return model.state_dict(), f"timm pretrained {self.name}"


# --------------------------------------------------------------------------- python:package.module:factory
class PythonSource(ModelSource):
    """The user's own `nn.Module` factory; it may take `num_classes` or build a fixed head."""

    def __init__(self, spec: str, name: str) -> None:
        super().__init__(spec, name)
        module_name, _, attribute = name.rpartition(":")
        if not module_name or not attribute:
            raise PipelineError(f"{spec}: expected python:PACKAGE.MODULE:FACTORY, e.g. python:mynets.cnn:build")
        self.factory = _import_factory(spec, module_name, attribute)

    @property
    def takes_num_classes(self) -> bool:
        try:
            parameters = inspect.signature(self.factory).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    def build(self, num_classes: int | None = None) -> nn.Module:
        kwargs = {"num_classes": num_classes} if num_classes is not None and self.takes_num_classes else {}
        try:
            model = self.factory(**kwargs)
        except Exception as exc:
            raise PipelineError(f"{self.spec}: the factory raised {type(exc).__name__}: {_first_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise PipelineError(f"{self.spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def classifier_name(self) -> str | None:
        return None  # a user's network: the recipe or --classifier names the head

    def suggested_classifier(self) -> str | None:
        """The last Linear layer: what to suggest when the user has not named the head."""
        linears = [name for name, module in self.build().named_modules() if isinstance(module, nn.Linear)]
        return linears[-1] if linears else None

    def defaults(self) -> SourceDefaults:
        channels = input_channels(self.build())
        return SourceDefaults(color=channel_color(channels))


def _import_factory(spec: str, module_name: str, attribute: str) -> Callable[..., nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PipelineError(
            f"{spec}: cannot import {module_name} ({_first_line(exc)}); put its folder on "
            "PYTHONPATH or install its package"
        ) from None
    except Exception as exc:  # SyntaxError, or anything the module's top level raises
        raise PipelineError(
            f"{spec}: importing {module_name} failed with {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise PipelineError(
                f"{spec}: {module_name} has no {attribute!r}; it defines: "
                f"{', '.join(callables) or 'no public callables'}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise PipelineError(f"{spec}: {module_name}.{attribute} is a {type(target).__name__}, not a factory function")
    return target


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- builtin
class BuiltinSource(ModelSource):
    """The demo networks of pipeline.recipe.nets."""

    def __init__(self, spec: str, name: str) -> None:
        super().__init__(spec, name)
        if name not in ARCHITECTURES:
            raise PipelineError(
                _closest(name, list(ARCHITECTURES), f"{spec}: built-in architecture") + f" (or use {SPEC_FORMS})"
            )

    def build(self, num_classes: int | None = None) -> nn.Module:
        return ARCHITECTURES[self.name](10 if num_classes is None else num_classes)  # Fashion-MNIST's 10

    def defaults(self) -> SourceDefaults:
        channels = input_channels(ARCHITECTURES[self.name](10))
        return SourceDefaults(color=channel_color(channels))


SOURCE_KINDS: dict[str, type[ModelSource]] = {
    "builtin": BuiltinSource,
    "torchvision": TorchvisionSource,
    "timm": TimmSource,
    "python": PythonSource,
}


def resolve_source(spec: str) -> ModelSource:
    """The ModelSource for an `arch` spec (KIND:NAME)."""
    spec = spec.strip()
    kind, separator, name = spec.partition(":")
    if not separator:
        raise PipelineError(f"model source {spec!r} names no kind; use {SPEC_FORMS}")
    if kind not in SOURCE_KINDS:
        raise PipelineError(f"unknown model source {kind + ':'!r} in {spec!r}; use {SPEC_FORMS}")
    if not name:
        raise PipelineError(f"model source {spec!r} names no model; use {SPEC_FORMS}")
    return SOURCE_KINDS[kind](spec, name)


def is_source_spec(text: str) -> bool:
    """Whether `--model TEXT` is a source spec rather than a recipe name or file."""
    return text.partition(":")[0] in SOURCE_KINDS and ":" in text
