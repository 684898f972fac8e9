"""`engine`: every stage through the CLI, then skipping what did not change (stages.json)."""

import json

import pytest
from nm_fixtures import MODEL, cli, stage_lines

pytestmark = pytest.mark.slow  # every test runs the CLI end to end, several seconds each

# One mask-training step and short timing keep the whole pipeline to seconds.
FAST = ["--set", "masks.steps=1", "--set", "verify.latency_iters=2"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "engines"
    result = cli("engine", "--model", MODEL, "--out", str(out), *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_all_stages_run_and_produce_artifacts(first_run):
    out, result = first_run
    lines = stage_lines(result.stdout)
    # tiny_resnet takes random weights, so there is no pretrain stage
    assert list(lines) == ["train-masks", "bake", "export", "build", "verify"]
    assert all("running (no record)" in line for line in lines.values())
    folder = out / MODEL
    for name in (
        "masks.ckpt",
        "masks.pt",
        "sparse.pt",
        "layers.json",
        "bake.json",
        "dense.onnx",
        "sparse.onnx",
        "dense.fp16.onnx",
        "sparse.fp16.onnx",
        "export.json",
        "build.json",
        "report.json",
        "report.md",
    ):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "report.json").read_text())
    assert report["backend"] == "onnxruntime" and report["gates"]["passed"]
    assert report["latency"]["by_batch"]["8"]["dense"]["iterations"] == 2  # --set reached verify
    stages = json.loads((folder / "stages.json").read_text())["stages"]
    assert set(stages) == set(lines)
    assert all(record["inputs"] and record["outputs"] for record in stages.values())
    assert any(path.endswith("dense.ort.onnx") for path in stages["build"]["outputs"])


def test_second_run_skips_then_reruns_only_what_changed(first_run):
    out, _ = first_run
    again = cli("engine", "--model", MODEL, "--out", str(out), *FAST)
    assert again.returncode == 0, again.stderr
    assert all("up to date" in line for line in stage_lines(again.stdout).values())

    # a verify setting changes only verify's inputs
    changed = cli("engine", "--model", MODEL, "--out", str(out), *FAST, "--set", "verify.serving_batch=4")
    lines = stage_lines(changed.stdout)
    assert changed.returncode == 0, changed.stderr
    assert "running (inputs changed)" in lines["verify"]
    assert all("up to date" in lines[name] for name in ("train-masks", "bake", "export", "build"))

    # a missing output reruns its stage; export is deterministic, so build sees the same ONNX and skips
    (out / MODEL / "sparse.onnx").unlink()
    repaired = cli("engine", "--model", MODEL, "--out", str(out), *FAST, "--set", "verify.serving_batch=4")
    lines = stage_lines(repaired.stdout)
    assert repaired.returncode == 0, repaired.stderr
    assert "outputs missing or changed" in lines["export"] and "up to date" in lines["bake"]
    assert "up to date" in lines["build"] and "up to date" in lines["verify"]
    assert (out / MODEL / "sparse.onnx").is_file()


def test_failing_gate_stops_engine_with_exit_1(first_run):
    out, _ = first_run
    before = json.loads((out / MODEL / "stages.json").read_text())["stages"]["verify"]
    result = cli("engine", "--model", MODEL, "--out", str(out), *FAST, "--set", "verify.min_masked_coverage=0.999")
    assert result.returncode == 1
    assert "gate failed: masked_mac_fraction" in result.stderr
    stages = json.loads((out / MODEL / "stages.json").read_text())["stages"]
    # a failed verify keeps the previous record, whose inputs differ from this run's: the next run repeats it
    assert stages["verify"] == before


def test_engine_killed_during_mask_training_resumes_it(tmp_path):
    import torch
    from nm_fixtures import kill_at_first_checkpoint

    out = tmp_path / "engines"
    args = [
        "engine",
        "--model",
        MODEL,
        "--out",
        str(out),
        "--set",
        "data.synthetic_size=2048",
        "--set",
        "masks.checkpoint_every=5",
        "--set",
        "masks.steps=120",
        "--set",
        "masks.stop_patience=0",
        "--set",
        "verify.latency_iters=2",
    ]  # the plateau rule off: the resumed run must reach the budget
    checkpoint = out / MODEL / "masks.ckpt"
    killed_at = kill_at_first_checkpoint(args, checkpoint)

    result = cli(*args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "== train-masks: resuming" in result.stdout
    assert f"resumed mask training at step {killed_at['state']['step']}" in result.stdout
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 120


def test_a_new_mask_split_retrains_the_dense_weights(tmp_path):
    """issue 33: pretraining leaves out mask training's validation split, so `--set masks.seed=1` after a finished
    engine must pretrain again (engine's key), and so must `pretrain` by hand (its cache, pretrain.json)."""
    out = tmp_path / "engines"
    pretrained = ["--weights", "pretrain", "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=32"]
    pretrained += ["--set", "masks.validation_images=16"]
    args = ["engine", "--model", MODEL, "--out", str(out), *pretrained, *FAST]
    first = cli(*args, check=True)
    assert "running (no record)" in stage_lines(first.stdout)["pretrain"]
    dense = out / MODEL / "dense.pt"
    trained_first = dense.read_bytes()

    again = cli(*args, "--set", "masks.seed=1", check=True)
    lines = stage_lines(again.stdout)
    assert "running (inputs changed)" in lines["pretrain"], again.stdout
    assert "dense weights exist" not in again.stdout  # really trained, not kept by pretrain's own cache
    assert dense.read_bytes() != trained_first  # another split held out: other training images, other weights
    assert "running (inputs changed)" in lines["train-masks"]

    by_hand = cli("pretrain", "--model", MODEL, "--out", str(out), *pretrained, "--set", "masks.seed=2", check=True)
    assert "trained with other settings (masks.seed); retraining" in by_hand.stdout
    kept = cli("pretrain", "--model", MODEL, "--out", str(out), *pretrained, "--set", "masks.seed=2", check=True)
    assert "dense weights exist" in kept.stdout
