"""End-to-end behaviour of `train-masks` and `bake` on the tiny smoke model (subprocesses)."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nm_fixtures import PIPELINE_ENV, BackgroundRun, cli, kill_at_first_checkpoint

pytestmark = pytest.mark.slow  # every test runs the CLI end to end, several seconds each

ROOT = Path(__file__).resolve().parents[1]
ENV = PIPELINE_ENV


# the plateau rule off: resume must reproduce a run over the whole budget (test_learning checks the rule)
LONG_RUN = [
    "--model",
    "tiny_resnet",
    "--set",
    "data.synthetic_size=2048",
    "--set",
    "masks.checkpoint_every=5",
    "--set",
    "masks.stop_patience=0",
    "--steps",
    "120",
]


def final_logits(out: Path):
    saved = torch.load(out / "tiny_resnet" / "masks.ckpt", weights_only=True)
    assert saved["final"]
    return saved["logits"], saved["state"]["step"]


def test_resume_after_kill_9_continues_to_the_same_masks(tmp_path):
    """Uninterrupted run vs run killed with SIGKILL and resumed: identical final logits."""
    cli("train-masks", *LONG_RUN, "--out", str(tmp_path / "straight"), check=True)
    reference, steps = final_logits(tmp_path / "straight")
    assert steps == 120

    out = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(
        ["train-masks", *LONG_RUN, "--out", str(out)], out / "tiny_resnet" / "masks.ckpt"
    )
    assert killed_at["state"]["step"] < 120

    result = cli("train-masks", *LONG_RUN, "--out", str(out), "--resume", check=True)
    assert f"resumed mask training at step {killed_at['state']['step']}" in result.stdout
    resumed, steps = final_logits(out)
    assert steps == 120
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path):
    args = [
        "train-masks",
        "--model",
        "tiny_resnet",
        "--set",
        "data.synthetic_size=2048",
        "--set",
        "masks.checkpoint_every=0",
        "--set",
        "masks.stop_patience=0",
        "--steps",
        "60",
        "--out",
        str(tmp_path),
    ]
    run = BackgroundRun(args)
    run.wait_for_line("SIGTERM or Ctrl-C now stops at the next step")
    run.process.send_signal(signal.SIGTERM)
    code, output = run.finish()
    assert code == 143, output  # 128 + SIGTERM, as every stage
    saved = torch.load(tmp_path / "tiny_resnet" / "masks.ckpt", weights_only=True)
    assert not saved["final"] and 0 < saved["state"]["step"] < 60
    assert "continue with --resume" in output.splitlines()[-1]

    result = cli(*args, "--resume", check=True)
    assert f"resumed mask training at step {saved['state']['step']}" in result.stdout
    finished = torch.load(tmp_path / "tiny_resnet" / "masks.ckpt", weights_only=True)
    assert finished["final"] and finished["state"]["step"] == 60


def test_two_process_ddp_gives_identical_masks_on_every_rank(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    # --standalone: torchrun's rendezvous store listens on a free port, so parallel runs never collide
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            "train-masks",
            "--model",
            "tiny_resnet",
            "--steps",
            "6",
            "--set",
            "masks.stop_patience=0",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "tiny_resnet" / "train_masks.json").read_text())
    assert summary["world_size"] == 2
    checksums = summary["rank_mask_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert summary["steps"] == 6


def test_bake_writes_nm_masks_with_bit_exact_kept_weights_and_reapplies(tmp_path):
    out = str(tmp_path)
    cli("train-masks", "--model", "tiny_resnet", "--steps", "3", "--out", out, check=True)
    cli("bake", "--model", "tiny_resnet", "--out", out, check=True)
    folder = tmp_path / "tiny_resnet"
    report = json.loads((folder / "bake.json").read_text())
    assert report["all_nm_in_tensorrt_layout"] and report["kept_weights_bit_exact"]
    assert abs(report["density_in_masked_layers"] - 0.5) < 0.01

    from pipeline.masks.artifact import MaskArtifact
    from pipeline.masks.patterns import is_nm

    artifact = MaskArtifact.load(folder / "masks.pt")
    assert artifact.layers and all(layer.indices.dtype == torch.long for layer in artifact.layers)
    assert (folder / "masks.pt").stat().st_size < (folder / "sparse.pt").stat().st_size / 4  # compact

    # "updated" dense weights of the same architecture: masks re-apply, kept weights are the new ones
    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.weights import build_network

    torch.manual_seed(123)
    updated = build_network(get_recipe("tiny_resnet")).state_dict()
    torch.save(updated, tmp_path / "updated.pt")
    shutil.copy(folder / "masks.pt", tmp_path / "saved_masks.pt")
    cli(
        "bake",
        "--model",
        "tiny_resnet",
        "--out",
        out,
        "--masks",
        str(tmp_path / "saved_masks.pt"),
        "--weights",
        str(tmp_path / "updated.pt"),
        check=True,
    )
    sparse = torch.load(folder / "sparse.pt", weights_only=True)
    for layer in artifact.layers:
        weight = sparse[f"{layer.name}.weight"]
        mask = layer.mask().bool()
        assert is_nm(weight, 2, 4)
        assert torch.equal(weight[mask], updated[f"{layer.name}.weight"][mask])

    # weights of another architecture: one clear line, exit 2
    other = {k: v for k, v in updated.items()}
    other["layer1.0.conv1.weight"] = torch.zeros(8, 12, 3, 3)
    torch.save(other, tmp_path / "other.pt")
    before = (folder / "sparse.pt").read_bytes()
    result = cli(
        "bake",
        "--model",
        "tiny_resnet",
        "--out",
        out,
        "--masks",
        str(tmp_path / "saved_masks.pt"),
        "--weights",
        str(tmp_path / "other.pt"),
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "shape" in result.stderr and "Traceback" not in result.stderr
    assert (folder / "sparse.pt").read_bytes() == before
