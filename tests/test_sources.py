"""Model sources: builtin:, torchvision:, timm:, python: specs, head detection and source defaults."""

from __future__ import annotations

import sys
import textwrap
import urllib.error

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.recipe.sources import find_classifier, resolve_source


def head(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", "fc"),
        ("regnet_y_400mf", "fc"),
        ("resnext50_32x4d", "fc"),
        ("efficientnet_b0", "classifier.1"),
        ("mobilenet_v3_large", "classifier.3"),
        ("convnext_tiny", "classifier.2"),
        ("densenet121", "classifier"),
        ("vgg11_bn", "classifier.6"),
        ("squeezenet1_0", "classifier.1"),  # a 1x1 conv head
        ("googlenet", "fc"),  # not the auxiliary heads aux1.fc2 / aux2.fc2
    ],
)
def test_torchvision_head_found_per_family(name, expected):
    source = resolve_source(f"torchvision:{name}")
    assert source.classifier_name() == expected
    try:
        with torch.device("meta"):  # no memory for the big ones; RegNet's constructor needs real tensors
            model = source.build(10)
    except NotImplementedError:
        model = source.build(10)
    layer = head(model, expected)
    assert (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == 10


def test_torchvision_build_and_defaults_from_weight_metadata():
    source = resolve_source("torchvision:regnet_y_400mf")
    model = source.build(10).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    defaults = source.defaults()
    assert (defaults.input_size, defaults.resize, defaults.interpolation) == (224, 232, "bilinear")
    assert defaults.mean == pytest.approx([0.485, 0.456, 0.406]) and defaults.std == pytest.approx(
        [0.229, 0.224, 0.225]
    )
    assert defaults.color == "RGB" and defaults.num_classes == 1000 and len(defaults.labels) == 1000
    assert resolve_source("torchvision:efficientnet_b0").defaults().interpolation == "bicubic"


def test_torchvision_unknown_names():
    with pytest.raises(PipelineError) as error:
        resolve_source("torchvision:resnet19")
    assert str(error.value) == (
        "torchvision:resnet19: torchvision classification model 'resnet19' does not exist; "
        "closest: resnet18, resnet152, resnet101"
    )
    with pytest.raises(PipelineError, match="fasterrcnn_resnet50_fpn is a detection, segmentation or video model"):
        resolve_source("torchvision:fasterrcnn_resnet50_fpn")


def test_torchvision_hub_path_offline_says_use_weights_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(PipelineError) as error:
        resolve_source("torchvision:resnet18").pretrained_state_dict()
    assert str(error.value) == (
        "cannot download torchvision weights ResNet18_Weights.IMAGENET1K_V1 (URLError); "
        "pass --weights FILE with a saved state_dict"
    )


def test_builtin_sources():
    tiny = resolve_source("builtin:tiny_resnet")
    assert tiny.spec == "builtin:tiny_resnet" and tiny.classifier_name() == "fc"
    assert tiny.defaults().color == "L" and tiny.defaults().input_size is None
    assert head(tiny.build(7), "fc").out_features == 7
    with pytest.raises(
        PipelineError, match=r"built-in architecture 'smal_resnet' does not exist; closest: small_resnet"
    ):
        resolve_source("builtin:smal_resnet")
    with pytest.raises(PipelineError, match=r"built-in architecture 'resnet18' does not exist.*torchvision:NAME"):
        resolve_source("builtin:resnet18")  # torchvision's networks are torchvision:NAME


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "foo:bar",
            "unknown model source 'foo:' in 'foo:bar'; use builtin:NAME, torchvision:NAME, timm:NAME or "
            "python:PACKAGE.MODULE:FACTORY",
        ),
        (
            "torchvision:",
            "model source 'torchvision:' names no model; use builtin:NAME, torchvision:NAME, timm:NAME or "
            "python:PACKAGE.MODULE:FACTORY",
        ),
        (
            "resnet18",
            "model source 'resnet18' names no kind; use builtin:NAME, torchvision:NAME, timm:NAME or "
            "python:PACKAGE.MODULE:FACTORY",
        ),
        (
            "python:justamodule",
            "python:justamodule: expected python:PACKAGE.MODULE:FACTORY, e.g. python:mynets.cnn:build",
        ),
    ],
)
def test_malformed_specs(spec, message):
    with pytest.raises(PipelineError) as error:
        resolve_source(spec)
    assert str(error.value) == message


# --------------------------------------------------------------------------- timm
def test_timm_source_builds_finds_head_and_reads_pretrained_config():
    pytest.importorskip("timm")
    source = resolve_source("timm:resnet10t")
    assert source.classifier_name() == "fc"
    model = source.build(10).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    defaults = source.defaults()
    # timm's config: input_size (3, 176, 176) with crop_pct 0.875 -> resize floor(176 / 0.875)
    assert (defaults.input_size, defaults.resize, defaults.color) == (176, 201, "RGB")
    assert defaults.interpolation == "bicubic" and defaults.num_classes == 1000
    with pytest.raises(PipelineError, match=r"timm model 'resnet10x' does not exist; closest: resnet10t"):
        resolve_source("timm:resnet10x")


def test_timm_hub_path_failure_is_one_line(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    source = resolve_source("timm:resnet10t")
    with pytest.raises(PipelineError) as error:
        source.pretrained_state_dict()
    assert str(error.value) == (
        "cannot download timm weights for resnet10t (OSError); pass --weights FILE with a saved state_dict"
    )


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(PipelineError) as error:
        resolve_source("timm:resnet10t")
    assert str(error.value) == (
        "timm: sources need the timm package; install it with "
        "`pip install 'sparse-pipeline[timm]'` (or `pip install timm`)"
    )


# --------------------------------------------------------------------------- python:
FACTORIES = """
from torch import nn

def with_classes(num_classes=5):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
                         nn.ReLU(), nn.Linear(16, num_classes))

def fixed_head():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

def not_a_module(num_classes=2):
    return "model"

def broken(num_classes=2):
    raise ValueError("bad width\\nsecond line")

class Nets:
    @staticmethod
    def small(**kwargs):
        return with_classes(**kwargs)
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    package = tmp_path / "usernets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cnn.py").write_text(textwrap.dedent(FACTORIES))
    (package / "syntax.py").write_text("def f(:\n")
    (package / "raises.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usernets"
    for name in [name for name in sys.modules if name.startswith("usernets")]:
        del sys.modules[name]


def test_python_factory_with_and_without_num_classes(factories):
    source = resolve_source("python:usernets.cnn:with_classes")
    assert source.takes_num_classes
    assert source.build(10)[-1].out_features == 10
    assert source.build()[-1].out_features == 5  # None: the factory's own default
    assert source.classifier_name() is None and source.suggested_classifier() == "5"
    assert source.defaults().color == "RGB"
    fixed = resolve_source("python:usernets.cnn:fixed_head")
    assert not fixed.takes_num_classes and fixed.build(10)[-1].out_features == 3
    assert fixed.defaults().color == "L"
    nested = resolve_source("python:usernets.cnn:Nets.small")
    assert nested.takes_num_classes and nested.build(4)[-1].out_features == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "python:usernets.missing:f",
            "python:usernets.missing:f: cannot import usernets.missing (No module named "
            "'usernets.missing'); put its folder on PYTHONPATH or install its package",
        ),
        ("python:usernets.syntax:f", "python:usernets.syntax:f: importing usernets.syntax failed with SyntaxError: "),
        (
            "python:usernets.raises:f",
            "python:usernets.raises:f: importing usernets.raises failed with RuntimeError: needs a GPU",
        ),
        (
            "python:usernets.cnn:nope",
            "python:usernets.cnn:nope: usernets.cnn has no 'nope'; it defines: Nets, broken, "
            "fixed_head, not_a_module, with_classes",
        ),
    ],
)
def test_python_import_errors_are_one_line(factories, spec, message):
    with pytest.raises(PipelineError) as error:
        resolve_source(spec)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_python_factory_failures_are_one_line(factories):
    with pytest.raises(PipelineError) as error:
        resolve_source("python:usernets.cnn:broken").build(3)
    assert str(error.value) == "python:usernets.cnn:broken: the factory raised ValueError: bad width"
    with pytest.raises(PipelineError) as error:
        resolve_source("python:usernets.cnn:not_a_module").build(3)
    assert str(error.value) == "python:usernets.cnn:not_a_module: the factory returned str, not a torch.nn.Module"


def test_find_classifier_takes_the_last_matching_layer():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3))
    assert find_classifier(model, 6) == "1"
    assert find_classifier(model, 9) is None


def test_layer_report_states_what_depthwise_layers_cost():
    from pipeline.masks.eligibility import find_layers

    source = resolve_source("torchvision:mobilenet_v3_small")
    model = source.build(10)
    report = find_layers(model, [3, 64, 64], 4, classifier=source.classifier_name())
    modules = dict(model.named_modules())
    grouped = sum(
        layer.macs
        for layer in report.layers
        if isinstance(modules[layer.name], nn.Conv2d) and modules[layer.name].groups > 1
    )
    assert grouped > 0 and report.grouped_mac_fraction == pytest.approx(grouped / report.total_macs)
    masked = report.masked_mac_fraction
    assert report.gain_note(2, 4) == (
        f"2:4 masks cover {100 * masked:.1f}% of the MACs: at best {1 / (1 - masked / 2):.2f}x fewer MACs per image; "
        f"depthwise/grouped convolutions hold {100 * grouped / report.total_macs:.1f}% of the MACs and never get "
        "sparse kernels, and being memory-bound they usually take a larger share of the run time than of the MACs, "
        "so expect less end to end"
    )
    dense_only = find_layers(resolve_source("builtin:tiny_resnet").build(10), [1, 28, 28], 4)
    assert "depthwise" not in dense_only.gain_note(2, 4)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("torchvision:resnet18", True),
        ("timm:resnet10t", True),
        ("python:pkg.mod:build", True),
        ("builtin:tiny_resnet", True),
        ("resnet18", False),
        ("models/mine.toml", False),
        ("C:/recipes/mine.toml", False),
    ],
)
def test_is_source_spec(text, expected):
    from pipeline.recipe.sources import is_source_spec

    assert is_source_spec(text) is expected
