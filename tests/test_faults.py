"""Every file the pipeline reads (pipeline/artifacts.py INVENTORY), broken in each way that applies.

Two tiers over the same (file x fault) table:
  * owner: the file's owner loader is called on the broken file: one PipelineError naming the file (stages.json,
    a cache, is dropped with a reason instead);
  * stage: every stage that reads the file runs through the CLI's main() in-process on a copy of a finished
    model folder: exit 2, exactly one `error:` line naming the file and what to do, no traceback, and every
    file of the folder byte-identical afterwards.
The first stage of each file runs in the fast subset; the other stages are marked slow.
Count: `pytest tests/test_faults.py --collect-only -q` (docs/reliability.md has the figures).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import write_imagefolder
from nm_fixtures import MODEL, dense_weights_file

from pipeline.artifacts import INVENTORY, Reader
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.io import sha256_file

FAST = ["--set", "masks.steps=1", "--set", "verify.latency_iters=2", "--set", "verify.warmup_iters=0"]
FIX_WORDS = (
    "run",
    "rerun",
    "re-run",
    "pass",
    "remove",
    "delete",
    "check",
    "fix",
    "reinstall",
    "install",
    "use",
    "save",
    "give",
    "put",
    "replace",
    "drop",
    "choose",
    "valid:",
)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- the finished folder
@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """OUT/tiny_resnet after engine (own weights file) and package, plus an image folder and IDX files."""
    root = tmp_path_factory.mktemp("faults")
    weights = dense_weights_file(root)
    out = root / "engines"
    common = ["--model", MODEL, "--out", str(out), "--weights", str(weights)]
    assert main(["engine", *common, *FAST]) == 0
    assert main(["package", *common, *FAST]) == 0
    shutil.copy(weights, out / MODEL / "dense.pt")  # what pretrain writes, for the --weights pretrain readers
    write_imagefolder(root / "images", list("abcdefghij"), per_class=2, size=28, val_per_class=1)
    write_idx_folder(root / "idx")
    return root, weights


def write_idx_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, count in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (count,), dtype=np.uint8)
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in images.shape) + images.tobytes()
        )
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + labels.tobytes()
        )


@pytest.fixture
def case(finished, tmp_path):
    """A private copy of everything the finished fixture made."""
    root, _ = finished
    shutil.copytree(root, tmp_path / "c")
    return tmp_path / "c"


# --------------------------------------------------------------------------- faults
def torch_fault(path: Path, fault: str) -> None:
    """NaN/Inf/shape/dtype damage inside a torch file, saved back as a valid torch file."""
    payload = torch.load(path, weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == "nm-mask-artifact":
        layer = payload["layers"][0]
        layer["indices"] = layer["indices"][..., :-1] if fault == "wrong_shape" else layer["indices"].float()
    elif isinstance(payload, dict) and payload.get("format") == "mask-training-checkpoint":
        name = next(iter(payload["logits"]))
        if fault in ("nan", "inf"):
            payload["logits"][name].view(-1)[0] = float(fault)
        else:
            indices = payload["indices"][name]
            payload["indices"][name] = indices[..., :-1] if fault == "wrong_shape" else indices.float()
    else:
        key = next(key for key, value in payload.items() if value.dim() == 4)
        tensor = payload[key]
        if fault in ("nan", "inf"):
            tensor.view(-1)[3] = float(fault)
        elif fault == "wrong_shape":
            payload[key] = torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:])
        else:
            payload[key] = tensor.to(torch.int64)
    torch.save(payload, path)


def json_fault(path: Path, fault: str, reader: Reader) -> None:
    literal = {"json_null": "null", "json_list": "[1, 2]", "json_number": "7"}
    if fault in literal:
        path.write_text(literal[fault])
        return
    data = json.loads(path.read_text())
    key, wrong = reader.required[0]
    if fault == "key_missing":
        data.pop(key)
    else:
        data[key] = json.loads(wrong)
    path.write_text(json.dumps(data))


def apply_fault(path: Path, fault: str, reader: Reader) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if fault == "missing":
        path.unlink()
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "random_bytes":
        path.write_bytes(random.Random(len(data)).randbytes(max(len(data), 64)))
    elif fault == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("x")
    elif fault == "unreadable":
        path.chmod(0)
    elif fault in ("nan", "inf", "wrong_shape", "wrong_dtype"):
        torch_fault(path, fault)
    elif fault == "toml_syntax":
        path.write_text(path.read_text() + "\n[masks\nsteps = = 3\n")
    elif fault == "unknown_key":
        path.write_text(path.read_text().replace("[masks]", "[masks]\nstepz = 3", 1))
    elif fault == "pickled_module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif fault == "text_file":
        path.write_text("these are not weights\n")
    elif reader.kind == "toml" and fault == "wrong_type":
        path.write_text(path.read_text().replace("num_classes = 10", 'num_classes = "ten"'))
    else:
        json_fault(path, fault, reader)


# --------------------------------------------------------------------------- what reads each file
@dataclass
class Wiring:
    """Where READER's file lies in a case folder, how its owner loads it, and the stage runs that read it."""

    target: Callable[[Path], Path]
    owner: Callable[[Path, Path], object]  # (file, case folder) -> the loaded value
    stages: list[list[str]] = field(default_factory=list)  # argv after the stage name, {out} {weights} {case}
    optional: dict[int, tuple[str, ...]] = field(default_factory=dict)  # stage index -> faults it may ignore


def model(case_dir: Path) -> Path:
    return case_dir / "engines" / MODEL


def _recipe(case_dir: Path, **data):
    from pipeline.recipe.registry import get_recipe

    recipe = get_recipe(MODEL)
    for key, value in data.items():
        section, leaf = key.split("__")
        setattr(getattr(recipe, section), leaf, value)
    return recipe


def load_weights_strict(path: Path, case_dir: Path):
    from pipeline.recipe.weight_files import read_state_dict
    from pipeline.recipe.weights import build_network, load_state_dict_strict

    load_state_dict_strict(build_network(_recipe(case_dir)), read_state_dict(path), f"weights file {path}")


def load_images(path: Path, case_dir: Path):
    from pipeline.data.datasets import build_datasets

    return build_datasets(_recipe(case_dir, data__kind="imagefolder", data__root=str(case_dir / "images")))


def owner_of(name: str) -> Callable[[Path, Path], object]:
    from pipeline.backends.build_report import BuildReport
    from pipeline.export.report import ExportReport
    from pipeline.masks.artifact import MaskArtifact
    from pipeline.masks.bake_report import BakeReport
    from pipeline.masks.checkpoint import MaskCheckpoint, TrainingRecord
    from pipeline.package.manifest import check_manifest
    from pipeline.records import load_layer_table
    from pipeline.verify.report import VerificationReport

    return {
        "layers.json": lambda p, c: load_layer_table(p, MODEL),
        "train_masks.json": lambda p, c: TrainingRecord.load(p, MODEL),
        "bake.json": lambda p, c: BakeReport.load(p, MODEL),
        "export.json": lambda p, c: ExportReport.load(p, MODEL),
        "build.json": lambda p, c: BuildReport.load(p, MODEL),
        "report.json": lambda p, c: VerificationReport.load(p),
        "manifest.json": lambda p, c: check_manifest(p.parent),
        "masks.ckpt": lambda p, c: MaskCheckpoint.load(p).to_artifact(p, MODEL, "builtin:tiny_resnet", "magnitude"),
        "masks.pt": lambda p, c: MaskArtifact.load(p),
    }[name]


def _stages_json_owner(path: Path, case_dir: Path):
    from pipeline.records import StageRecords

    records, dropped = StageRecords.load(path)
    if dropped:  # a cache: dropped with a reason (engine prints it as one warning line), never an exception
        raise PipelineError(dropped)
    return records


def _recipe_owner(path: Path, case_dir: Path):
    from pipeline.recipe.registry import get_recipe

    return get_recipe(str(path))


def _idx_owner(path: Path, case_dir: Path):
    from pipeline.data.datasets import read_idx

    return read_idx(path)


def _onnx_owner(path: Path, case_dir: Path):
    from pipeline.package.tensors import specs_from_onnx

    return specs_from_onnx(path)


def _pbtxt_owner(path: Path, case_dir: Path):
    from pipeline.package.model_config import parse_config

    return parse_config(path)


def _curves_owner(path: Path, case_dir: Path):
    from pipeline.paths import ArtifactPaths
    from pipeline.stages import curves

    return curves.run(_recipe(case_dir), ArtifactPaths(path.parent), curves.Options())


def _torch_owner(path: Path, case_dir: Path):
    from pipeline.io import torch_load

    return torch_load(path, "pretrain checkpoint")


def wiring() -> dict[str, Wiring]:
    m = model
    common = ["--model", MODEL, "--out", "{out}", "--weights", "{weights}", *FAST]
    images = [
        "--model",
        MODEL,
        "--out",
        "{out}",
        "--weights",
        "{weights}",
        "--data",
        "{case}/images",
        *FAST,
        "--set",
        "masks.validation_images=0",
    ]
    idx = [
        "--model",
        MODEL,
        "--out",
        "{out}",
        "--weights",
        "{weights}",
        "--data",
        "{case}/idx",
        "--set",
        "data.kind=fashion_mnist",
        *FAST,
    ]
    table = {
        "recipe TOML": Wiring(
            lambda c: c / "recipe.toml",
            _recipe_owner,
            [
                ["layers", "--model", "{case}/recipe.toml", "--out", "{out}"],
                ["export", "--model", "{case}/recipe.toml", "--out", "{out}"],
            ],
        ),
        "weights file": Wiring(
            lambda c: c / "tiny_dense.pth",
            load_weights_strict,
            [
                ["bake", *common],
                ["export", *common],
                ["train-masks", *common],
                [
                    "init-recipe",
                    "--model",
                    "builtin:tiny_resnet",
                    "--weights",
                    "{weights}",
                    "--input-size",
                    "28",
                    "--mean",
                    "0.5",
                    "--std",
                    "0.25",
                    "--out",
                    "{case}/written.toml",
                ],
            ],
        ),
        "image folder": Wiring(
            lambda c: c / "images" / "train" / "a" / "0.png",
            load_images,
            [["train-masks", *images], ["verify", *images]],
        ),
        "Fashion-MNIST IDX": Wiring(
            lambda c: c / "idx" / "train-images-idx3-ubyte", lambda p, c: _idx_owner(p, c), [["train-masks", *idx]]
        ),
        "stages.json": Wiring(lambda c: m(c) / "stages.json", _stages_json_owner, []),
        "layers.json": Wiring(lambda c: m(c) / "layers.json", owner_of("layers.json"), [["verify", *common]]),
        "train_masks*.json as learning curves": Wiring(
            lambda c: m(c) / "train_masks.json",
            lambda p, c: _curves_owner(p, c),
            [["curves", "--model", MODEL, "--out", "{out}"]],
        ),
        "train_masks.json": Wiring(
            lambda c: m(c) / "train_masks.json", owner_of("train_masks.json"), [["bake", *common]]
        ),
        "bake.json": Wiring(
            lambda c: m(c) / "bake.json",
            owner_of("bake.json"),
            [["export", *common], ["verify", *common], ["package", *common]],
        ),
        "export.json": Wiring(
            lambda c: m(c) / "export.json",
            owner_of("export.json"),
            [["build", *common, "--backend", "onnxruntime"], ["verify", *common], ["package", *common]],
            {1: ("missing",)},
        ),
        "build.json": Wiring(
            lambda c: m(c) / "build.json", owner_of("build.json"), [["verify", *common], ["package", *common]]
        ),
        "report.json": Wiring(lambda c: m(c) / "report.json", owner_of("report.json"), [["package", *common]]),
        "manifest.json": Wiring(
            lambda c: m(c) / "manifest.json",
            owner_of("manifest.json"),
            [["check-manifest", "--model", MODEL, "--out", "{out}"]],
        ),
        "masks.ckpt": Wiring(lambda c: m(c) / "masks.ckpt", owner_of("masks.ckpt"), [["bake", *common]]),
        "masks.pt": Wiring(
            lambda c: m(c) / "masks.pt",
            owner_of("masks.pt"),
            [["export", *common], ["verify", *common], ["certify", *common], ["package", *common]],
            {1: ("missing",), 3: ("missing",)},
        ),
        "sparse.pt": Wiring(
            lambda c: m(c) / "sparse.pt",
            load_weights_strict,
            [["export", *common], ["package", *common]],
            {1: ("missing",)},
        ),
        "dense.pt": Wiring(
            lambda c: m(c) / "dense.pt",
            load_weights_strict,
            [["bake", "--model", MODEL, "--out", "{out}", "--weights", "pretrain", *FAST]],
        ),
        "pretrain.ckpt": Wiring(lambda c: m(c) / "pretrain.ckpt", _torch_owner, []),
        "ONNX graphs": Wiring(
            lambda c: m(c) / "sparse.onnx",
            _onnx_owner,
            [["build", *common, "--backend", "onnxruntime"], ["package", *common]],
        ),
        "Triton configs": Wiring(lambda c: m(c) / "triton_cpu" / f"{MODEL}_dense" / "config.pbtxt", _pbtxt_owner, []),
    }
    return table


WIRING = wiring()


def wiring_for(reader: Reader) -> Wiring | None:
    return next((wire for name, wire in WIRING.items() if reader.file.startswith(name)), None)


def test_every_inventory_entry_with_faults_is_wired():
    """A reader added to the inventory with faults but no wiring here fails this test."""
    unwired = [reader.file for reader in INVENTORY if reader.faults and wiring_for(reader) is None]
    assert unwired == []


def _prepare(case_dir: Path, reader: Reader, fault: str) -> Path:
    if fault == "unreadable" and AS_ROOT:
        pytest.skip("tests run as root here: permissions do not stop root from reading")
    if reader.kind == "toml":
        shutil.copy(Path(__file__).resolve().parents[1] / "models" / f"{MODEL}.toml", case_dir / "recipe.toml")
    if reader.file.startswith("pretrain.ckpt"):
        torch.save({"model": {}, "state": {"epoch": 0}}, model(case_dir) / "pretrain.ckpt")
    path = wiring_for(reader).target(case_dir)
    if fault == "truncated_image":
        path.write_bytes(path.read_bytes()[:60])
    elif fault == "not_an_image":
        path.write_text("not an image\n")
    else:
        apply_fault(path, fault, reader)
    return path


def contents(folder: Path) -> dict[str, str]:
    """Every file under FOLDER (dot-files aside: the run lock) -> sha256: equal means byte-identical."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and os.access(p, os.R_OK)
    }


OWNER_CASES = [(reader, fault) for reader in INVENTORY for fault in reader.faults]
STAGE_CASES = [
    pytest.param(
        reader,
        fault,
        index,
        id=f"{reader.file.split(' ')[0]}-{fault}-{index}",
        marks=[pytest.mark.slow] if index else [],
    )
    for reader in INVENTORY
    if wiring_for(reader)
    for fault in reader.faults
    for index in range(len(wiring_for(reader).stages))
    if fault not in wiring_for(reader).optional.get(index, ())
]


@pytest.mark.parametrize("reader,fault", OWNER_CASES, ids=[f"{r.file.split(' ')[0]}-{f}" for r, f in OWNER_CASES])
def test_owner_refuses_the_broken_file_in_one_line(case, reader, fault, monkeypatch):
    path = _prepare(case, reader, fault)
    _offline_fashion_mnist(monkeypatch)
    with pytest.raises(PipelineError) as raised:
        wiring_for(reader).owner(path, case)
    message = str(raised.value)
    assert "\n" not in message and (path.name in message or str(path.parent) in message), message


@pytest.mark.parametrize("reader,fault,index", STAGE_CASES)
def test_stage_refuses_the_broken_file_and_changes_nothing(case, reader, fault, index, capsys, monkeypatch):
    path = _prepare(case, reader, fault)
    _offline_fashion_mnist(monkeypatch)
    _, weights = case, case / "tiny_dense.pth"
    argv = [arg.format(out=case / "engines", weights=weights, case=case) for arg in wiring_for(reader).stages[index]]
    before = contents(case)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in out + err, (code, out[-2000:], err[-2000:])
    assert len(errors) == 1 and len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert path.name in errors[0] or str(path.parent) in errors[0], errors[0]
    assert any(word in errors[0].split(";", 1)[-1] for word in FIX_WORDS), f"no fix named: {errors[0]}"
    assert contents(case) == before


def _offline_fashion_mnist(monkeypatch) -> None:
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)


# --------------------------------------------------------------------------- the rules beyond one file
@pytest.mark.slow
def test_engine_rebuilds_a_damaged_stages_json_and_says_so(case, capsys):
    stages = model(case) / "stages.json"
    stages.write_text("null")
    argv = [
        "engine",
        "--model",
        MODEL,
        "--out",
        str(case / "engines"),
        "--weights",
        str(case / "tiny_dense.pth"),
        *FAST,
    ]
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(stages) in warnings[0] and "rebuilt" in warnings[0], err
    assert "Traceback" not in out + err
    assert isinstance(json.loads(stages.read_text())["stages"], dict)
    assert main(argv) == 0  # rebuilt: the next run skips every stage
    assert "running" not in capsys.readouterr().out


def test_a_damaged_image_stops_the_run_before_training_or_is_skipped_and_counted(case, capsys):
    bad = case / "images" / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:50])
    argv = [
        "train-masks",
        "--model",
        MODEL,
        "--out",
        str(case / "engines"),
        "--weights",
        str(case / "tiny_dense.pth"),
        "--data",
        str(case / "images"),
        *FAST,
        "--set",
        "masks.batch_size=8",
        "--set",
        "masks.validation_images=0",
        "--set",  # the fixture's weights are not trained on these random images: near chance, warned about only
        "verify.refuse_chance_baseline=false",
    ]
    before = contents(case)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("error:") == 1 and str(bad) in err and "--skip-bad-images" in err
    assert "dense: top1" not in out  # stopped before any evaluation or training
    assert contents(case) == before
    assert main([*argv, "--skip-bad-images"]) == 0
    out, err = capsys.readouterr()
    assert "warning: 1 damaged image(s)" in err and str(bad) in err
    assert "near chance" in err and "verify.refuse_chance_baseline = false" in err
    record = json.loads((model(case) / "train_masks.json").read_text())
    assert "1 damaged images skipped" in record["data"]


def test_an_image_folder_with_gzip_idx_and_plain_idx_reads_alike(tmp_path):
    """read_idx reads .gz copies too (the Debian package ships them): a truncated .gz is one error line."""
    from pipeline.data.datasets import read_idx

    write_idx_folder(tmp_path)
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    packed = tmp_path / "copy.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert (read_idx(packed) == read_idx(plain)).all()
    packed.write_bytes(packed.read_bytes()[:20])
    with pytest.raises(PipelineError, match="copy.gz"):
        read_idx(packed)


def test_a_damaged_image_found_in_a_dataloader_worker_is_one_line(case, monkeypatch):
    """An image that passes the scan but fails to decode while loading, in a worker process: one line."""
    import pipeline.data.images
    from pipeline.data.datasets import build_datasets, make_loader

    bad = case / "images" / "val" / "c" / "0.png"
    bad.write_bytes(bad.read_bytes()[:50])
    monkeypatch.setattr(pipeline.data.images, "decode_error", lambda path, full: None)  # the scan passes it
    bundle = build_datasets(_recipe(case, data__kind="imagefolder", data__root=str(case / "images")))
    with pytest.raises(PipelineError) as raised:
        for _ in make_loader(bundle.eval, batch_size=4, workers=1):
            pass
    message = str(raised.value)
    assert "\n" not in message and str(bad) in message and "Traceback" not in message, message


@pytest.mark.parametrize("reader", [r for r in INVENTORY if r.faults], ids=lambda r: r.file.split(" ")[0])
def test_owner_loads_the_intact_file(case, reader, monkeypatch):
    """The control: each owner loads the unbroken file, so a refusal above is the fault's doing."""
    if reader.kind == "toml":
        shutil.copy(Path(__file__).resolve().parents[1] / "models" / f"{MODEL}.toml", case / "recipe.toml")
    if reader.file.startswith("pretrain.ckpt"):
        torch.save({"model": {}, "state": {"epoch": 0}}, model(case) / "pretrain.ckpt")
    if reader.file.startswith("Fashion-MNIST"):
        _offline_fashion_mnist(monkeypatch)
    wiring_for(reader).owner(wiring_for(reader).target(case), case)
