"""tools/ensure-dataset.sh: install Fashion-MNIST when missing and allowed, else print the command and exit 2."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "ensure-dataset.sh"
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
COMMAND = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


def ensure(dataset_dir: Path, apt_get: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "ENSURE_DATASET_DIR": str(dataset_dir), "ENSURE_DATASET_APT_GET": apt_get}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)


def fake_apt_get(tmp_path: Path, dataset_dir: Path, fills: bool = True, fails: bool = False) -> tuple[str, Path]:
    """An apt-get stand-in that logs its arguments and, on `install`, puts the IDX files in place."""
    calls = tmp_path / "calls.log"
    fill = f'mkdir -p "{dataset_dir}"; for f in {" ".join(FILES)}; do : > "{dataset_dir}/$f.gz"; done'
    if not fills:
        fill = ":"
    script = tmp_path / "apt-get"
    script.write_text(
        f'#!/bin/bash\necho "$@" >> "{calls}"\n{"exit 100" if fails else ""}\n'
        f'[ "$1" = install ] && {{ {fill}; }}\nexit 0\n'
    )
    script.chmod(0o755)
    return str(script), calls


def test_present_dataset_needs_nothing(tmp_path):
    dataset = tmp_path / "fashion-mnist"
    dataset.mkdir()
    for name in FILES:
        (dataset / name).write_bytes(b"")
    apt_get, calls = fake_apt_get(tmp_path, dataset)
    result = ensure(dataset, apt_get)
    assert result.returncode == 0 and result.stdout == result.stderr == ""
    assert not calls.exists()


def test_missing_without_permission_prints_the_command_and_exits_2(tmp_path):
    result = ensure(tmp_path / "nowhere", "")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Fashion-MNIST")
    assert str(tmp_path / "nowhere") in lines[0] and lines[0].endswith(f"run: {COMMAND}")


def test_missing_with_permission_installs_the_debian_package(tmp_path):
    dataset = tmp_path / "fashion-mnist"
    apt_get, calls = fake_apt_get(tmp_path, dataset)
    result = ensure(dataset, apt_get)
    assert result.returncode == 0, result.stderr
    assert "installing dataset-fashion-mnist" in result.stdout
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq dataset-fashion-mnist"]
    assert sorted(path.name for path in dataset.iterdir()) == sorted(f"{name}.gz" for name in FILES)


@pytest.mark.parametrize(
    "fills,fails,message", [(True, True, "installing dataset-fashion-mnist failed"), (False, False, "still lacks")]
)
def test_failed_install_exits_2_with_the_command(tmp_path, fills, fails, message):
    apt_get, _ = fake_apt_get(tmp_path, tmp_path / "fashion-mnist", fills=fills, fails=fails)
    result = ensure(tmp_path / "fashion-mnist", apt_get)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.rstrip().endswith(COMMAND)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    "goal,checks",
    [
        (["engine"], True),
        (["engine", "DATA=synthetic"], False),
        (["engine", "MODEL=tiny_resnet"], False),
        (["train-masks"], True),
        (["export"], False),
        (["test"], True),
    ],
)
def test_make_checks_the_dataset_only_where_it_is_read(goal, checks):
    dry_run = subprocess.run(["make", "-n", *goal], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert dry_run.returncode == 0, dry_run.stderr
    assert ("tools/ensure-dataset.sh" in dry_run.stdout) == checks
