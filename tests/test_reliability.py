"""Issue 13's guarantees through the real CLI: exit code, one `error:` line, no traceback, no artifact changed.

The lock (two real processes), inputs checked against the records of the stage that wrote them, failed stages
that leave every artifact as it was, stage records, signals, and names and disk space.
"""

import json
import shutil
import signal
import sys

import pytest
from nm_fixtures import HOLDER, MODEL, REPO, BackgroundRun, assert_one_error_line, cli, snapshot, stage_lines

pytestmark = pytest.mark.slow  # every test runs the CLI end to end (two processes for the lock)

LONG_TRAINING = ["--set", "data.synthetic_size=2048", "--set", "masks.checkpoint_every=0", "--steps", "100000"]


def test_second_run_on_a_locked_folder_exits_2_naming_the_holder_and_changes_nothing(tmp_path):
    out = tmp_path / "engines"
    folder = out / MODEL
    assert cli("layers", "--model", MODEL, "--out", str(out)).returncode == 0
    holder = BackgroundRun([str(folder)], command=[sys.executable, "-c", HOLDER])
    holder.wait_for_line("holding", timeout=300)
    before = snapshot(folder)
    result = cli("train-masks", "--model", MODEL, "--out", str(out), "--steps", "1")
    assert_one_error_line(result, f"{folder} is in use by another run (pid {holder.process.pid})")
    assert snapshot(folder) == before
    holder.process.send_signal(signal.SIGKILL)  # a holder that dies leaves its pid but no lock
    holder.finish(timeout=300)
    assert cli("layers", "--model", MODEL, "--out", str(out)).returncode == 0


def test_a_running_stage_holds_the_folder_for_the_whole_run(tmp_path):
    out = tmp_path / "engines"
    training = BackgroundRun(["train-masks", "--model", MODEL, "--out", str(out), *LONG_TRAINING])
    try:
        training.wait_for_line("SIGTERM or Ctrl-C now stops at the next step")
        result = cli("engine", "--model", MODEL, "--out", str(out))
        assert_one_error_line(result, f"is in use by another run (pid {training.process.pid})")
    finally:
        training.process.kill()
        training.finish(timeout=300)


# --------------------------------------------------------------------------- inputs checked against their records
FAST = ["--set", "masks.steps=1", "--set", "verify.latency_iters=2"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """engines/tiny_resnet after `engine` (train-masks, bake, export, build, verify): every stage's records."""
    out = tmp_path_factory.mktemp("reliab") / "engines"
    result = cli("engine", "--model", MODEL, "--out", str(out), *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(pipeline_run, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(pipeline_run, out)
    return out


def refused_without_change(out, argv, *fragments):
    """Run a stage on OUT; it must exit 2 with one error line holding FRAGMENTS and change no artifact."""
    folder = out / MODEL
    before = snapshot(folder)
    result = cli(*argv, "--model", MODEL, "--out", str(out), *FAST)
    assert_one_error_line(result, *fragments)
    assert snapshot(folder) == before


def test_package_refuses_dense_onnx_in_place_of_sparse(run_copy):
    folder = run_copy / MODEL
    shutil.copyfile(folder / "dense.onnx", folder / "sparse.onnx")
    refused_without_change(
        run_copy,
        ["package"],
        "sparse.onnx changed since export",
        "re-run `python -m pipeline export --model tiny_resnet`",
    )
    assert not (folder / "manifest.json").exists()


def test_package_refuses_a_truncated_masks_pt(run_copy):
    masks = run_copy / MODEL / "masks.pt"
    masks.write_bytes(masks.read_bytes()[:100])
    refused_without_change(run_copy, ["package"], "masks.pt changed since bake", "pipeline bake")


def test_package_refuses_a_verdict_about_other_engines(run_copy):
    report = run_copy / MODEL / "report.json"
    data = json.loads(report.read_text())
    data["engine_sha256"]["sparse"] = "0" * 64  # as if build had run again after verify
    report.write_text(json.dumps(data))
    refused_without_change(run_copy, ["package"], "verified another sparse engine", "pipeline verify")


@pytest.mark.parametrize(
    "stage,damaged,writer",
    [
        ("export", "sparse.pt", "bake"),
        ("export", "masks.pt", "bake"),
        ("bake", "masks.ckpt", "train-masks"),
        ("build", "sparse.onnx", "export"),
        ("verify", "onnxruntime/sparse.ort.onnx", "build"),
    ],
)
def test_every_stage_checks_what_it_reads_against_its_writer(run_copy, stage, damaged, writer):
    path = run_copy / MODEL / damaged
    path.write_bytes(path.read_bytes()[:-10])
    refused_without_change(run_copy, [stage], f"{path.name} changed since {writer}", f"pipeline {writer}")


def test_a_missing_record_is_refused(run_copy):
    (run_copy / MODEL / "bake.json").unlink()
    refused_without_change(run_copy, ["export"], "bake.json does not exist", "pipeline bake")


# --------------------------------------------------------------------------- a failing stage changes no artifact
@pytest.fixture
def other_architecture(tmp_path):
    import torch

    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.weights import build_network

    path = tmp_path / "fmnist_resnet.pth"
    torch.save(build_network(get_recipe("fmnist_resnet")).state_dict(), path)
    return path


@pytest.mark.parametrize("argv", [["compare", "--methods", "magnitude"], ["updatable"], ["train-masks"], ["engine"]])
def test_a_stage_failing_on_its_weights_changes_no_artifact(run_copy, other_architecture, argv):
    """config.json, layers.json and stages.json' records included (engine keeps only its in-progress note)."""
    folder = run_copy / MODEL
    records = json.loads((folder / "stages.json").read_text())["stages"]
    before = snapshot(folder)
    result = cli(*argv, "--model", MODEL, "--out", str(run_copy), "--weights", str(other_architecture), *FAST)
    assert_one_error_line(result, "has shape", "same architecture")
    after = snapshot(folder)
    if argv == ["engine"]:
        assert json.loads((folder / "stages.json").read_text())["stages"] == records
        before.pop("stages.json"), after.pop("stages.json")
    assert after == before


def test_train_masks_failing_after_finding_layers_keeps_layers_json(run_copy, tmp_path):
    refused_without_change(
        run_copy, ["train-masks", "--masks-from", str(tmp_path / "missing.pt")], "missing.pt does not exist"
    )


# --------------------------------------------------------------------------- stage records
def test_pt_files_are_byte_reproducible(tmp_path):
    import torch

    from pipeline.io import sha256_file, torch_save

    state = {"weight": torch.arange(12.0).reshape(3, 4), "step": 7}
    torch_save(state, tmp_path / "a.pt")
    torch_save(state, tmp_path / "b.pt")  # another name, another random temporary file
    assert sha256_file(tmp_path / "a.pt") == sha256_file(tmp_path / "b.pt")


def test_stage_records_are_relative_and_follow_the_dataset(run_copy, tmp_path):

    moved = tmp_path / "moved"
    run_copy.rename(moved)  # records relative to the model folder survive a move
    stages = json.loads((moved / MODEL / "stages.json").read_text())["stages"]
    assert all(not path.startswith("/") for record in stages.values() for path in record["outputs"])
    assert "dataset" in stages["train-masks"]["input_parts"] and "dataset" in stages["verify"]["input_parts"]
    again = cli("engine", "--model", MODEL, "--out", str(moved), *FAST)
    assert again.returncode == 0, again.stderr
    assert all("up to date" in line for line in stage_lines(again.stdout).values()), again.stdout


def test_changed_images_rerun_the_stages_that_read_them(tmp_path):
    """Stage records hash the dataset: a changed validation image reruns train-masks and verify."""
    from image_folders import write_imagefolder

    data = write_imagefolder(
        tmp_path / "images", [f"class{i}" for i in range(10)], per_class=2, size=28, val_per_class=1
    )
    argv = [
        "engine",
        "--model",
        MODEL,
        "--out",
        str(tmp_path / "engines"),
        "--data",
        str(data),
        *FAST,
        "--set",
        "masks.batch_size=8",
    ]
    first = cli(*argv)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    image = data / "val" / "class3" / "0.png"
    image.write_bytes((data / "val" / "class4" / "0.png").read_bytes())
    again = cli(*argv)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    lines = stage_lines(again.stdout)
    assert "running (inputs changed)" in lines["train-masks"] and "running (inputs changed)" in lines["verify"]


def test_rerunning_train_masks_with_the_same_result_does_not_export_again(run_copy):
    """masks.pt and sparse.pt are byte-reproducible, so export (and build) see unchanged inputs."""

    (run_copy / MODEL / "masks.ckpt").unlink()
    again = cli("engine", "--model", MODEL, "--out", str(run_copy), *FAST)
    assert again.returncode == 0, again.stderr
    lines = stage_lines(again.stdout)
    assert "running" in lines["train-masks"] and "running" in lines["bake"]
    assert all("up to date" in lines[stage] for stage in ("export", "build", "verify")), again.stdout


# --------------------------------------------------------------------------- signals and messages
def test_sigterm_ends_a_stage_without_checkpoint_with_143_and_one_line(run_copy):
    folder = run_copy / MODEL
    before = snapshot(folder)
    export = BackgroundRun(["export", "--model", MODEL, "--out", str(run_copy)])
    export.wait_for_line("exporting dense.onnx")
    export.process.send_signal(signal.SIGTERM)
    code, output = export.finish()
    assert code == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and output.splitlines()[-1] == "interrupted by SIGTERM; nothing written"
    assert snapshot(folder) == before


def test_sigterm_in_mask_training_saves_its_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "engines"
    training = BackgroundRun(["train-masks", "--model", MODEL, "--out", str(out), *LONG_TRAINING])
    training.wait_for_line("SIGTERM or Ctrl-C now stops at the next step")
    training.process.send_signal(signal.SIGTERM)
    code, output = training.finish()
    assert code == 143, output
    assert "Traceback" not in output
    assert output.splitlines()[-1].startswith("interrupted by SIGTERM: checkpoint ")
    assert output.splitlines()[-1].endswith("continue with --resume")
    assert (out / MODEL / "masks.ckpt").is_file() and not (out / MODEL / "layers.json").exists()


@pytest.mark.parametrize("stage,checkpoint", [("train-masks", "masks.ckpt"), ("pretrain", "pretrain.ckpt")])
def test_resume_without_a_checkpoint_is_refused(tmp_path, stage, checkpoint):
    model = "fmnist_resnet" if stage == "pretrain" else MODEL
    out = tmp_path / "engines"
    result = cli(stage, "--model", model, "--out", str(out), "--resume", "--data", "synthetic")
    assert_one_error_line(result, f"--resume: there is no checkpoint {out / model / checkpoint}", "drop --resume")
    assert snapshot(out) == {}


def test_a_pickled_module_is_named_without_ansi_codes(tmp_path):
    import torch

    from pipeline.errors import PipelineError
    from pipeline.io import torch_load

    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(PipelineError) as info:
        torch_load(path, "mask file")
    assert "\x1b" not in str(info.value) and "torch.nn.modules.linear.Linear" in str(info.value)
    assert "corrupt" not in str(info.value)


# --------------------------------------------------------------------------- names and disk space
def test_a_tag_that_leaves_the_output_folder_is_refused(tmp_path):
    out = tmp_path / "engines"
    result = cli("train-masks", "--model", MODEL, "--out", str(out), "--tag", "../../escaped", "--steps", "1")
    assert_one_error_line(result, "--tag '../../escaped' cannot name files")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("name", ["../outside", "/tmp/absolute"])
def test_a_recipe_name_that_leaves_the_output_folder_is_refused(tmp_path, name):

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'name = "{name}"\n' + (REPO / "models" / "tiny_resnet.toml").read_text())
    out = tmp_path / "engines"
    before = snapshot(tmp_path)
    result = cli("layers", "--model", str(recipe), "--out", str(out))
    assert_one_error_line(result, f"model name {name!r} cannot name files")
    assert snapshot(tmp_path) == before and not out.exists()


def test_a_full_disk_is_one_error_line_and_damages_nothing(run_copy, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from pipeline.cli import main

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = run_copy / MODEL
    before = snapshot(folder)
    monkeypatch.setattr(Path, "write_bytes", disk_full)  # what torch_save writes masks.pt and sparse.pt with
    code = main(["bake", "--model", MODEL, "--out", str(run_copy)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: cannot write {folder / 'masks.pt'}: no space left on device (")
    assert "MB free" in lines[0]
    assert snapshot(folder) == before
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]  # no temporary left


# --------------------------------------------------------------------------- progress in log files
def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    from pipeline.progress import progress

    monkeypatch.delenv("PIPELINE_NO_PROGRESS", raising=False)
    bar = progress(total=20, desc="work")
    for _ in range(20):
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    assert list(progress(range(3), desc="loop")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    assert err.splitlines()[0] == "work: 2/20 (10%) loss=0.5" and "work: 20/20 (100%) loss=0.5" in err
    assert "loop: 3/3 (100%)" in err


@pytest.mark.slow
def test_a_log_file_of_a_real_run_holds_no_escape_codes(tmp_path):
    import os
    import subprocess

    from nm_fixtures import REPO

    env = {key: value for key, value in os.environ.items() if key != "PIPELINE_NO_PROGRESS"}
    log = tmp_path / "run.log"
    with open(log, "wb") as handle:
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "train-masks",
                "--model",
                MODEL,
                "--out",
                str(tmp_path / "engines"),
                "--steps",
                "3",
            ],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=600,
        ).returncode
    text = log.read_bytes()
    assert code == 0, text[-2000:]
    assert b"train masks: 3/3 (100%)" in text  # progress was written, as plain lines
    assert b"\x1b[" not in text and b"\r" not in text
