"""manifest.json written by package, and check-manifest against tampering and missing files."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from nm_fixtures import record_export
from report_fixtures import verify_report, write_verify_report

from pipeline.cli import main
from pipeline.io import sha256_file
from pipeline.recipe.registry import get_recipe

MODEL = "tiny_resnet"


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    from test_package import export_tiny_onnx

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_tiny_onnx(path, seed=0)
    return path


@pytest.fixture
def packaged(tmp_path, onnx_file) -> Path:
    """engines/tiny_resnet/ after package: ONNX pair, a checkpoint, a report; returns the --out root."""
    root = tmp_path / "engines"
    folder = root / MODEL
    folder.mkdir(parents=True)
    shutil.copyfile(onnx_file, folder / "dense.onnx")
    shutil.copyfile(onnx_file, folder / "sparse.onnx")
    record_export(folder)
    (folder / "masks.ckpt").write_bytes(b"resumable checkpoint")
    (folder / "stages.json").write_text("{}")
    write_verify_report(folder, MODEL, passed=True)
    assert main(["package", "--model", MODEL, "--out", str(root)]) == 0
    return root


def manifest_of(root: Path) -> dict:
    return json.loads((root / MODEL / "manifest.json").read_text())


def test_manifest_lists_every_artifact_with_hash_and_size(packaged):
    folder = packaged / MODEL
    manifest = manifest_of(packaged)
    listed = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk - set(listed) == {"manifest.json", "masks.ckpt", "stages.json", ".lock"}  # .lock: the run lock
    assert {
        "dense.onnx",
        "sparse.onnx",
        "config.json",
        "report.json",
        f"triton/{MODEL}_sparse/config.pbtxt",
        f"triton/{MODEL}_sparse/1/model.onnx",
        f"triton/{MODEL}_dense/labels.txt",
        f"triton/{MODEL}_dense/preprocessing.json",
    } <= set(listed)
    for path, entry in listed.items():
        assert entry["sha256"] == sha256_file(folder / path)
        assert entry["size"] == (folder / path).stat().st_size
    assert manifest["recipe_hash"] == get_recipe(MODEL).digest()
    assert manifest["verification"] == "passed"
    versions = manifest["versions"]
    assert versions["torch"] == importlib.metadata.version("torch")
    assert set(versions) >= {"torch", "onnx", "onnxruntime", "tensorrt"}
    if importlib.util.find_spec("tensorrt") is None:
        assert versions["tensorrt"] == "not installed"
    if not torch.cuda.is_available():
        assert manifest["gpu"] == "none"


@pytest.mark.parametrize("report,verdict", [(None, "not verified"), (False, "failed")])
def test_verdict_comes_from_report_gates(tmp_path, onnx_file, report, verdict, capsys):
    folder = tmp_path / MODEL
    folder.mkdir()
    shutil.copyfile(onnx_file, folder / "dense.onnx")
    shutil.copyfile(onnx_file, folder / "sparse.onnx")
    record_export(folder)
    if report is not None:
        write_verify_report(folder, MODEL, passed=report)
    assert main(["package", "--model", MODEL, "--out", str(tmp_path)]) == 0
    assert json.loads((folder / "manifest.json").read_text())["verification"] == verdict
    assert main(["package", "--model", MODEL, "--out", str(tmp_path), "--require-verified"]) == 1
    assert f"verification verdict is '{verdict}'" in capsys.readouterr().err


def test_check_manifest_passes_on_untouched_folder(packaged, capsys):
    assert main(["check-manifest", "--model", MODEL, "--out", str(packaged)]) == 0
    count = len(manifest_of(packaged)["files"])
    assert f"ok: {count} files match" in capsys.readouterr().out
    # the transient files it leaves out may change freely
    (packaged / MODEL / "masks.ckpt").write_bytes(b"step 200")
    (packaged / MODEL / "stages.json").write_text('{"package": "done"}')
    for server_file in ("serve_check.json", "serve_check.log", "serve.log"):  # a server run after packaging
        (packaged / MODEL / server_file).write_text("written by serve-check / serve")
    assert main(["check-manifest", "--dir", str(packaged / MODEL)]) == 0


def test_check_manifest_reports_tampered_and_missing(packaged, capsys):
    folder = packaged / MODEL
    labels = folder / "triton" / f"{MODEL}_sparse" / "labels.txt"
    labels.write_text(labels.read_text().replace("class_3", "class_X"))  # same size, other bytes
    with open(folder / "triton" / f"{MODEL}_dense" / "1" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    (folder / "dense.onnx").unlink()
    assert main(["check-manifest", "--dir", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "MISSING  dense.onnx" in out
    assert f"TAMPERED triton/{MODEL}_sparse/labels.txt (sha256 differs)" in out
    assert f"TAMPERED triton/{MODEL}_dense/1/model.onnx (size" in out
    assert "3 problem(s)" in out and "1 missing, 2 tampered" in out


def test_unlisted_files_fail_only_with_strict(packaged, capsys):
    folder = packaged / MODEL
    (folder / "triton" / f"{MODEL}_sparse" / "2").mkdir()
    (folder / "triton" / f"{MODEL}_sparse" / "2" / "model.onnx").write_bytes(b"smuggled")
    assert main(["check-manifest", "--dir", str(folder)]) == 0
    assert f"not in manifest: triton/{MODEL}_sparse/2/model.onnx" in capsys.readouterr().out
    assert main(["check-manifest", "--dir", str(folder), "--strict"]) == 1
    assert f"UNLISTED triton/{MODEL}_sparse/2/model.onnx" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json", "is not valid JSON"),
        ('{"files": "x"}', "has no 'files' list"),
        ('{"files": [{"path": "../secret", "sha256": "0", "size": 1}]}', "points outside the folder"),
        ('{"files": [{"path": "a"}]}', "malformed entry"),
    ],
)
def test_malformed_manifest_is_a_clear_error(tmp_path, content, message, capsys):
    (tmp_path / "manifest.json").write_text(content)
    assert main(["check-manifest", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_manifest_says_how_to_make_one(tmp_path, capsys):
    assert main(["check-manifest", "--dir", str(tmp_path)]) == 2
    assert "run `python -m pipeline package`" in capsys.readouterr().err


def test_a_report_without_gates_is_refused_as_damaged(tmp_path, onnx_file, capsys):
    """A report.json verify did not write (no schema, no gates) is a damaged record: one error line, nothing
    packaged; so is one of this schema that lacks its gates."""
    folder = tmp_path / MODEL
    folder.mkdir()
    shutil.copyfile(onnx_file, folder / "dense.onnx")
    shutil.copyfile(onnx_file, folder / "sparse.onnx")
    record_export(folder)
    (folder / "report.json").write_text(json.dumps({"summary": "no gates"}))
    assert main(["package", "--model", MODEL, "--out", str(tmp_path)]) == 2
    assert "report.json is not a verify report of schema" in capsys.readouterr().err
    assert not (folder / "manifest.json").exists()
    content = verify_report(MODEL, passed=True).to_json()
    del content["gates"]
    (folder / "report.json").write_text(json.dumps(content))
    assert main(["package", "--model", MODEL, "--out", str(tmp_path)]) == 2
    assert "gates" in capsys.readouterr().err
    assert not (folder / "manifest.json").exists()
