"""verify --dense/--sparse: a sparse ONNX made outside the pipeline, gated without a recipe; bad input exits 2."""

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import onnx_fixtures as fx
import pytest

from pipeline.cli import main
from pipeline.verify.report import VerificationReport


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_onnx")
    return {
        "root": root,
        "dense": fx.save(fx.classifier(), root / "dense.onnx"),
        "tensorrt": fx.save(fx.pruned("tensorrt"), root / "sparse_trt.onnx"),
        "flattened": fx.save(fx.pruned("flattened"), root / "sparse_flat.onnx"),
        "images": fx.image_folder(root / "images", classes=4),
    }


def _verify(files, sparse, *extra, out=None):
    args = ["verify", "--dense", str(files["dense"]), "--sparse", str(sparse), "--iters", "2"]
    return main(args + (["--out", str(out)] if out else []) + list(extra))


def test_tensorrt_layout_passes_on_an_image_folder(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is engines/<sparse file stem>/
    junit = tmp_path / "gate.xml"
    code = _verify(
        files,
        files["tensorrt"],
        "--data",
        str(files["images"]),
        "--mean",
        "0.5",
        "--std",
        "0.25",
        "--max-top1-drop",
        "100",
        "--junit",
        str(junit),
    )
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "engines" / "sparse_trt"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "sparse-pipeline/report/v2" and report["inputs"]["kind"] == "onnx"
    assert report["data"]["kind"] == "imagefolder" and report["accuracy"]["samples"] == 12
    for variant in ("dense", "sparse"):
        assert 0 <= report["accuracy"][variant]["top1"] <= report["accuracy"][variant]["top5"] <= 100
    gates = {gate["name"]: gate for gate in report["gates"]["checks"]}
    assert gates["top1_drop"]["passed"] is True and gates["speedup"]["passed"] is None
    assert gates["accelerable_mac_fraction"]["passed"] is True and report["gates"]["passed"] is True
    typed = VerificationReport.from_json(report, "report.json")  # the one typed report, as on the recipe path
    assert typed.coverage.basis == "layout" and typed.to_json() == report
    layers = {layer["name"]: layer for layer in report["layout"]["layers"]}
    assert layers["/conv2/Conv"]["layout"] == "tensorrt 2:4" and layers["/conv2/Conv"]["kept"] == "masks only"
    assert layers["/dw/Conv"]["layout"] == "grouped/depthwise (never sparse)"
    assert sum(report["layout"]["macs_by_class"].values()) == report["layout"]["total_macs"] == 50208
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `/conv2/Conv` | `conv2.weight` | Conv | [8, 8, 3, 3]" in (out / "report.md").read_text()
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    assert "layer /conv2/Conv (Conv conv2.weight [8, 8, 3, 3]): tensorrt 2:4" in capsys.readouterr().out


def test_flattened_layout_fails_the_coverage_gate(files, tmp_path, capsys):
    junit = tmp_path / "gate.xml"
    code = _verify(
        files, files["flattened"], "--data", "synthetic", "--no-plots", "--junit", str(junit), out=tmp_path / "out"
    )
    assert code == 1
    assert "gate failed: accelerable_mac_fraction" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = {layer["name"]: layer for layer in report["layout"]["layers"]}
    assert layers["/conv2/Conv"]["layout"] == "2:4 in another layout"
    assert layers["/conv2/Conv"]["axis"] == "flattened C*R*S" and layers["/conv3/Conv"]["layout"] == "tensorrt 2:4"
    assert report["gates"]["passed"] is False and report["plots"] == []
    # masked by count, in the wrong layout: the masked gate passes, the accelerable one fails
    gates = {gate["name"]: gate for gate in report["gates"]["checks"]}
    assert gates["masked_mac_fraction"]["passed"] is True and gates["accelerable_mac_fraction"]["passed"] is False
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
    # the same model passes when the gate asks for less than its 8% accelerable MACs
    assert (
        _verify(
            files,
            files["flattened"],
            "--data",
            "synthetic",
            "--no-plots",
            "--min-accelerable-coverage",
            "0.05",
            out=tmp_path / "out",
        )
        == 0
    )


def test_top1_gate_and_a_recipe_for_preprocessing(files, tmp_path, capsys):
    code = _verify(
        files,
        files["tensorrt"],
        "--data",
        str(files["images"]),
        "--model",
        "fmnist_resnet",
        "--max-top1-drop",
        "-1",
        "--no-plots",
        out=tmp_path / "out",
    )
    assert code == 1 and "gate failed: top1_drop" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"]["samples"] == 12


def test_make_verify_onnx_runs_the_stage():
    dry = subprocess.run(
        ["make", "-n", "verify-onnx", "DENSE=d.onnx", "SPARSE=s.onnx", "DATA=synthetic"],
        cwd=fx.REPO,
        capture_output=True,
        text=True,
    )
    assert "-m pipeline verify --dense d.onnx --sparse s.onnx --data synthetic" in dry.stdout


# --------------------------------------------------------------------------- bad input: one line, exit 2, nothing written
def _truncated(files, root):
    data = files["tensorrt"].read_bytes()
    return {"--sparse": _write(root / "truncated.onnx", data[: len(data) // 2])}


def _write(path, data):
    path.write_bytes(data)
    return path


def _external_data_missing(files, root):
    model = fx.pruned("tensorrt")
    onnx.save(
        model,
        str(root / "external.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="external.onnx.data",
        size_threshold=0,
    )
    (root / "external.onnx.data").unlink()
    return {"--sparse": root / "external.onnx"}


BAD = {
    "truncated onnx": (_truncated, "is not an ONNX model or is truncated"),
    "not onnx": (
        lambda f, r: {"--sparse": _write(r / "notes.onnx", b"hello, this is not a model\n" * 20)},
        "not an ONNX model",
    ),
    "empty file": (lambda f, r: {"--sparse": _write(r / "empty.onnx", b"")}, "is empty (0 bytes)"),
    "missing file": (lambda f, r: {"--sparse": r / "nowhere.onnx"}, "no such file"),
    "directory": (lambda f, r: {"--dense": r}, "is a directory"),
    "weights not initializers": (
        lambda f, r: {
            "--dense": fx.save(fx.classifier(as_inputs=True), r / "d.onnx"),
            "--sparse": fx.save(fx.classifier(as_inputs=True), r / "s.onnx"),
        },
        "no Conv/Gemm/MatMul with constant weights",
    ),
    "external data missing": (_external_data_missing, "stored outside the file"),
    "mismatched inputs": (
        lambda f, r: {"--sparse": fx.save(fx.classifier(input_name="x"), r / "x.onnx")},
        "inputs differ: ",
    ),
    "mismatched outputs": (
        lambda f, r: {"--sparse": fx.save(fx.classifier(classes=5), r / "five.onnx")},
        "outputs differ: ",
    ),
    "other layer structure": (
        lambda f, r: {
            "--sparse": fx.save(
                fx.classifier({**fx.weights(), "conv3.weight": fx.weights()["conv2.weight"]}), r / "other.onnx"
            )
        },
        "layer 3 differs: ",
    ),
    "class count of the data": (
        lambda f, r: {"--data": str(fx.image_folder(r / "three", classes=3))},
        "has 3 classes but",
    ),
    "onnx and plan mixed": (
        lambda f, r: {"--sparse": _write(r / "sparse.plan", b"plan")},
        "must both be ONNX files or both TensorRT plans",
    ),
    "plans without tensorrt": (
        lambda f, r: {"--dense": _write(r / "d.plan", b"x"), "--sparse": _write(r / "s.plan", b"y")},
        "tensorrt",
    ),
    "no normalisation for real data": (lambda f, r: {"--mean": None}, "pass --mean and --std"),
    "weights flag": (lambda f, r: {"--weights": "random"}, "--weights has no meaning"),
    "only sparse": (lambda f, r: {"--dense": None}, "pass both --dense and --sparse"),
    "input size against the onnx": (lambda f, r: {"--input-size": "16"}, "does not fit"),
    "model source for preprocessing": (lambda f, r: {"--model": "torchvision:resnet18"}, "names a registered recipe"),
    "float16 input": (
        lambda f, r: {
            "--dense": fx.save(_half_input(fx.classifier()), r / "d16.onnx"),
            "--sparse": fx.save(_half_input(fx.pruned()), r / "s16.onnx"),
        },
        "is not a float32 image batch",
    ),
}


def _half_input(model):
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return model


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, files, tmp_path, capsys):
    make, message = BAD[case]
    args = {
        "--dense": files["dense"],
        "--sparse": files["tensorrt"],
        "--data": str(files["images"]),
        "--mean": "0.5",
        "--std": "0.25",
    }
    args.update(make(files, tmp_path))
    if case == "plans without tensorrt":
        try:
            import tensorrt  # noqa: F401

            pytest.skip("TensorRT imports here: plans are verified, not refused")
        except ImportError:
            pass
    out, junit = tmp_path / "out", tmp_path / "gate.xml"
    argv = ["verify", "--out", str(out), "--junit", str(junit), "--iters", "2"]
    for flag, value in args.items():
        argv += [] if value is None else [flag, str(value)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists() and not junit.exists()


def test_weights_in_external_data_beside_the_file(files, tmp_path):
    onnx.save(
        fx.pruned("tensorrt"),
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert _verify(files, tmp_path / "ext.onnx", "--data", "synthetic", "--no-plots", out=tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["layout"]["layers"][1]["layout"] == "tensorrt 2:4"


def test_plan_layers_map_sparse_tactics_to_macs(monkeypatch):
    """The plan path's own logic, with the engine inspector's JSON given (TensorRT itself cannot run here); the
    runner hands the JSON over (TensorRTRunner.inspector_json), plans.py asks no `runner.engine` of its own."""
    import types

    from pipeline.verify import layout as L
    from pipeline.verify.plans import plan_layers

    inspector_json = json.dumps(
        {
            "Layers": [
                {
                    "Name": "/conv2/Conv + /Relu_1",
                    "LayerType": "CaskConvolution",
                    "HasSparseWeights": 1,
                    "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8",
                    "Metadata": "[ONNX Layer: /conv2/Conv]\x1e[ONNX Layer: /Relu_1]",
                },
                {
                    "Name": "/conv3/Conv",
                    "LayerType": "CaskConvolution",
                    "HasSparseWeights": 1,
                    "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16",
                    "Metadata": "[ONNX Layer: /conv3/Conv]",
                },
                {
                    "Name": "Reformatting CopyNode for Input Tensor 0 to /conv3/Conv",
                    "LayerType": "Reformat",
                    "TacticName": "copy",
                },
            ]
        }
    )
    layers, skipped = L.weighted_layers(fx.pruned("tensorrt"), [1, 8, 8])
    layout = L.layout_report(layers, skipped)
    found = plan_layers(types.SimpleNamespace(inspector_json=lambda: inspector_json), layout)
    assert [entry["sparse_tactic"] for entry in found["layers"]] == [True, False]  # the reformat layer is left out
    assert found["sparse_kernel_mac_fraction"] == pytest.approx(8 * 8 * 9 * 64 / layout.total_macs)
    bare = json.dumps({"Layers": ["/conv2/Conv", "/conv3/Conv"]})  # built without detailed verbosity
    unknown = plan_layers(types.SimpleNamespace(inspector_json=lambda: bare), layout)
    assert unknown["sparse_kernel_mac_fraction"] is None and "DETAILED" in unknown["note"]


def test_image_folder_with_a_val_split(files, tmp_path):
    """DIR/val/<class>/ is used when DIR/val exists (an ImageNet-style folder with train/ and val/)."""
    fx.image_folder(tmp_path / "data" / "val", classes=4, per_class=2)
    (tmp_path / "data" / "train").mkdir()
    assert (
        _verify(
            files,
            files["tensorrt"],
            "--data",
            str(tmp_path / "data"),
            "--mean",
            "0.5",
            "--std",
            "0.25",
            "--max-top1-drop",
            "100",
            "--no-plots",
            out=tmp_path / "out",
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"]["samples"] == 8 and report["data"]["preprocess"]["mean"] == [0.5]


def test_bad_input_from_the_command_line_has_no_traceback(files, tmp_path):
    """As a CI job runs it: `python -m pipeline verify ...` in a fresh process, one stderr line, exit 2."""
    from nm_fixtures import cli

    result = cli(
        "verify",
        "--dense",
        str(files["dense"]),
        "--sparse",
        str(tmp_path / "missing.onnx"),
        "--data",
        "synthetic",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --sparse {tmp_path / 'missing.onnx'}: no such file; pass the ONNX file"
    ]
    assert not (tmp_path / "out").exists()


def test_preprocessing_from_a_recipe_file(files, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text((fx.REPO / "models" / "fmnist_resnet.toml").read_text().replace("[0.2860]", "[0.25]"))
    assert (
        _verify(
            files,
            files["tensorrt"],
            "--model",
            str(recipe),
            "--data",
            str(files["images"]),
            "--max-top1-drop",
            "100",
            "--no-plots",
            out=tmp_path / "out",
        )
        == 0
    )
    preprocess = json.loads((tmp_path / "out" / "report.json").read_text())["data"]["preprocess"]
    assert preprocess["mean"] == [0.25] and preprocess["crop"] == 8 and preprocess["color"] == "L"


def test_a_failed_write_leaves_the_last_report_whole(files, tmp_path, monkeypatch, capsys):
    """verify --dense/--sparse writes its report's files as one set, as a recipe stage does: when a later write
    fails (here the JUnit file), the plots and report.md it had replaced are put back."""
    import pipeline.verify.output as output
    from pipeline.errors import PipelineError

    out = tmp_path / "out"
    assert _verify(files, files["tensorrt"], "--data", "synthetic", "--max-top1-drop", "100", out=out) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert {"report.json", "report.md", "verify_latency.png"} <= set(before)

    def failing_junit(path, report):
        raise PipelineError(f"--junit {path}: cannot write it")

    monkeypatch.setattr(output, "write_junit", failing_junit)
    code = _verify(
        files,
        files["tensorrt"],
        "--data",
        "synthetic",
        "--max-top1-drop",
        "50",
        "--junit",
        str(tmp_path / "gate.xml"),
        out=out,
    )
    assert code == 2 and "error: --junit" in capsys.readouterr().err
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after == before  # report.md (which names the new threshold) and the plots were put back
