"""Every bad recipe value or flag: exit 2, one `error:` line naming the key, no traceback, no file changed.

Recipes are validated when they are loaded and once more after every flag is applied, before a stage
does any work, so a rejected run leaves the model folder (config.json included) exactly as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.recipe.config import validate
from pipeline.recipe.registry import get_recipe, list_models, recipes_dir
from pipeline.recipe.resolve import ModelOptions, resolve_recipe
from tests.nm_fixtures import snapshot

MODEL = "tiny_resnet"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A model folder with artifacts (layers.json, config.json) that a bad run must leave alone."""
    root = tmp_path_factory.mktemp("validation")
    assert main(["layers", "--model", MODEL, "--out", str(root)]) == 0
    assert (root / MODEL / "config.json").is_file()
    return root


BAD_SETTINGS = [  # (--set assignment, text the error must contain)
    ("masks.prior=foo", "masks.prior = 'foo'"),
    ("masks.lr=-1", "masks.lr = -1.0"),
    ("masks.batch_size=0", "masks.batch_size = 0"),
    ("masks.n=4", "masks.n = 4"),  # 4:4 prunes nothing
    ("masks.steps=0", "masks.steps = 0"),
    ("masks.validation_images=-5", "masks.validation_images = -5"),
    ("masks.tau_schedule=step", "masks.tau_schedule = 'step'"),
    ("masks.loss=mse", "masks.loss = 'mse'"),
    ("masks.loss=distill+ce", "masks.loss = 'distill+ce'"),  # terms in the documented order
    ("masks.loss=ce+ce", "masks.loss = 'ce+ce'"),
    ("masks.loss=ce+", "masks.loss = 'ce+'"),
    ("masks.feature_weight=0", "masks.feature_weight = 0.0"),
    ("masks.lr_final=2", "masks.lr_final = 2.0"),
    ("masks.stop_changed=1", "masks.stop_changed = 1.0"),
    ("masks.cooldown=1", "masks.cooldown = 1.0"),
    ("masks.cooldown=-0.1", "masks.cooldown = -0.1"),
    ("masks.lr=fast", "masks.lr = 'fast'"),
    ("masks.lrr=0.1", "unknown field 'lrr'"),
    ("num_classes=0", "num_classes = 0"),
    ("input_shape=3,7", "input_shape = [3, 7]"),
    ("input_shape=1,0,28", "input_shape = [1, 0, 28]"),
    ("build.precision=int3", "build.precision = 'int3'"),
    ("build.backend=tpu", "build.backend = 'tpu'"),
    ("build.min_batch=9", "build.opt_batch = 8"),  # min 9 > opt 8
    ("build.max_batch=4", "build.opt_batch = 8"),  # opt 8 > max 4
    ("verify.serving_batch=0", "verify.serving_batch = 0"),
    ("verify.min_masked_coverage=1.5", "verify.min_masked_coverage = 1.5"),
    ("verify.latency_iters=0", "verify.latency_iters = 0"),
    ("masks.checkpoint_every=-1", "masks.checkpoint_every = -1"),
    ("serve.preferred_batch_sizes=4,32", "serve.preferred_batch_sizes [32] must lie in"),  # max_batch_size 16
    ("serve.max_batch_size=0", "serve.max_batch_size = 0"),
    ("data.kind=csv", "data.kind = 'csv'"),
    ("data.batch_size=0", "data.batch_size = 0"),
    ("preprocess.color=CMYK", "preprocess.color = 'CMYK'"),
    ("preprocess.std=0", "preprocess.std = [0.0]"),
    ("pretrain.lr=0", "pretrain.lr = 0.0"),
    ("arch=resnet18", "arch = 'resnet18'"),
]

BAD_FLAGS = [  # (stage, extra argv, text the error must contain)
    ("train-masks", ["--set", "masks.n=3", "--set", "masks.m=2"], "masks.n = 3"),
    ("train-masks", ["--device", "tpu"], "--device tpu"),
    ("train-masks", ["--steps", "0"], "masks.steps = 0"),
    ("train-masks", ["--prior", "zeros"], "invalid choice: 'zeros'"),
    ("train-masks", ["--set", "masks.epochs=2"], "masks.epochs was removed; use masks.steps"),
    ("train-masks", ["--set", "masks.lr_gamma=0.5"], "masks.lr_gamma was removed; use masks.lr_final"),
    ("train-masks", ["--unlabeled", "--set", "masks.loss=ce"], "masks.loss = 'ce' reads labels"),
    ("train-masks", ["--unlabeled", "--set", "masks.loss=ce+distill"], "masks.loss = 'ce+distill' reads labels"),
    ("verify", ["--min-accelerable-coverage", "5"], "verify.min_accelerable_coverage = 5.0"),
    ("verify", ["--iters", "0"], "verify.latency_iters = 0"),
    ("build", ["--backend", "tpu"], "invalid choice: 'tpu'"),
    ("layers", ["--input-size", "3,7"], "--input-size 3,7"),
    ("layers", ["--input-size", "abc"], "--input-size abc"),
    ("layers", ["--num-classes", "0"], "num_classes = 0"),
    ("layers", ["--mean", "0.5,0.5"], "preprocess.mean = [0.5, 0.5]"),
    ("layers", ["--model", "resnet51"], "unknown model 'resnet51'"),
    ("layers", ["--model", "nowhere.toml"], "no such recipe file"),
    ("bench-train", ["--reps", "0"], "--reps 0"),
    ("updatable", ["--finetune-steps", "0"], "--finetune-steps 0"),
]


def run_in_process(out: Path, stage: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    before = snapshot(out)
    model = [] if "--model" in argv or stage == "bench-train" else ["--model", MODEL]
    where = ["--out", str(out)]
    try:
        code = main([stage, *model, *where, *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert snapshot(out) == before, "a rejected run changed files"
    return code, lines


@pytest.mark.parametrize("assignment, expected", BAD_SETTINGS, ids=[a for a, _ in BAD_SETTINGS])
def test_bad_set_value(out, capsys, assignment, expected):
    code, lines = run_in_process(out, "train-masks", ["--set", assignment], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert expected in lines[0] and "valid" in lines[0], lines[0]


@pytest.mark.parametrize("stage, argv, expected", BAD_FLAGS, ids=[" ".join([s, *a]) for s, a, _ in BAD_FLAGS])
def test_bad_flag(out, capsys, stage, argv, expected):
    code, lines = run_in_process(out, stage, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert expected in lines[0], lines[0]


def recipe_file(tmp_path: Path, replace: tuple[str, str] | None = None, append: str = "") -> Path:
    text = (recipes_dir() / f"{MODEL}.toml").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "mine.toml"
    path.write_text(text + append)
    return path


@pytest.mark.parametrize(
    "replace, append, expected",
    [
        (("lr = 0.05", "lr = -0.05"), "", "masks.lr = -0.05"),
        (("lr = 0.05", 'lr = "fast"'), "", "masks.lr = 'fast'"),
        (("lr = 0.05", "lrr = 0.05"), "", "unknown field 'lrr'"),
        (("opt_batch = 8", "opt_batch = 32"), "", "build.opt_batch = 32"),
        (("num_classes = 10", "num_classes = 0"), "", "num_classes = 0"),
        (None, "\n[nonsense]\nx = 1\n", "unknown field 'nonsense'"),
        (None, "\n[[broken", "not valid TOML"),
    ],
    ids=["negative-lr", "string-lr", "unknown-key", "opt-above-max", "no-classes", "unknown-section", "syntax"],
)
def test_bad_value_in_a_recipe_file(out, tmp_path, capsys, replace, append, expected):
    path = recipe_file(tmp_path, replace, append)
    code, lines = run_in_process(out, "layers", ["--model", str(path)], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert expected in lines[0] and str(path) in lines[0], lines[0]
    assert not (out / "mine").exists()


def test_a_recipe_file_path_runs_like_a_registered_name(tmp_path):
    path = recipe_file(tmp_path)
    assert main(["layers", "--model", str(path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "mine" / "layers.json").is_file()


def test_unknown_model_lists_the_registered_recipes(capsys):
    assert main(["layers", "--model", "resnet51"]) == 2
    error = capsys.readouterr().err
    assert "tiny_resnet" in error and "fmnist_resnet" in error and ".toml" in error


def test_model_flags_override_the_recipe():
    recipe = resolve_recipe(
        ModelOptions(
            model="resnet18",
            weights="random",
            data="synthetic",
            input_size="160",
            num_classes=10,
            classifier="fc",
            mean="0.5,0.5,0.5",
            std="0.2,0.2,0.2",
        )
    )
    assert recipe.input_shape == [3, 160, 160] and recipe.preprocess.crop == 160
    assert recipe.preprocess.resize == round(160 * 256 / 224)  # the recipe's resize/crop ratio is kept
    assert recipe.num_classes == 10 and recipe.preprocess.mean == [0.5] * 3 and recipe.preprocess.std == [0.2] * 3
    grey = resolve_recipe(
        ModelOptions(model="resnet18", weights="random", data="synthetic", input_size="1,64,64", mean="0.5", std="0.25")
    )
    assert grey.input_shape == [1, 64, 64] and grey.preprocess.color == "L"


@pytest.mark.parametrize("name", list_models())
def test_every_registered_recipe_is_valid(name):
    """Enumerates the registry itself (models/*.toml), so a recipe added there is checked without editing this."""
    recipe = get_recipe(name)
    assert recipe.name == name and recipe.arch.split(":")[0] in ("builtin", "torchvision")
    validate(recipe)


def test_the_registry_lists_every_recipe_file():
    files = {path.stem for path in (ROOT / "models").glob("*.toml") if not path.stem.startswith("_")}
    assert set(list_models()) == files and "fmnist_resnet18" in files


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train-masks", "--set", "masks.prior=foo"], "masks.prior = 'foo'"),
        (["verify", "--min-masked-coverage", "5"], "verify.min_masked_coverage = 5.0"),
    ],
)
def test_bad_value_from_the_command_line_has_no_traceback(out, argv, expected):
    before = snapshot(out)
    env = {**os.environ, "PIPELINE_NO_PROGRESS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv, "--model", MODEL, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr + result.stdout
    assert snapshot(out) == before
