"""A stage's writes are one set (pipeline/transaction.py): all stay, or none does; checkpoints always stay;
a run killed mid-stage is rolled back by the next one."""

import os
import signal
import subprocess
import sys

import pytest
from nm_fixtures import PIPELINE_ENV, REPO, snapshot

from pipeline.errors import GateFailed, PipelineError
from pipeline.io import write_text
from pipeline.transaction import JOURNAL, Transaction, recover


def contents(folder):
    return {path.name: path.read_text() for path in folder.iterdir() if path.is_file()}


def test_a_failed_set_puts_back_replaced_files_and_removes_new_ones(tmp_path):
    write_text(tmp_path / "a.json", "old a")
    with pytest.raises(PipelineError):
        with Transaction(tmp_path):
            write_text(tmp_path / "a.json", "new a")
            write_text(tmp_path / "b.json", "new b")
            assert contents(tmp_path)["a.json"] == "new a"  # the stage reads what it wrote
            raise PipelineError("the stage failed after two writes")
    assert contents(tmp_path) == {"a.json": "old a"}


def test_a_finished_set_keeps_every_write_and_leaves_no_backup(tmp_path):
    write_text(tmp_path / "a.json", "old a")
    with Transaction(tmp_path):
        write_text(tmp_path / "a.json", "new a")
        write_text(tmp_path / "a.json", "newer a")
        write_text(tmp_path / "b.json", "new b")
    assert contents(tmp_path) == {"a.json": "newer a", "b.json": "new b"}


def test_a_failed_gate_keeps_its_report_and_checkpoints_outlive_a_failure(tmp_path):
    with pytest.raises(GateFailed):
        with Transaction(tmp_path, commit_on=(GateFailed,)):
            write_text(tmp_path / "report.json", "verdict")
            raise GateFailed("top-1 drop")
    with pytest.raises(KeyboardInterrupt):
        with Transaction(tmp_path):
            write_text(tmp_path / "masks.ckpt", "step 40")
            write_text(tmp_path / "train_masks.json", "half")
            raise KeyboardInterrupt
    assert contents(tmp_path) == {"report.json": "verdict", "masks.ckpt": "step 40"}


KILLED_MID_STAGE = """
import os, sys
from pathlib import Path
from pipeline.io import write_text
from pipeline.transaction import Transaction
root = Path(sys.argv[1])
with Transaction(root):
    write_text(root / "a.json", "new a")
    write_text(root / "b.json", "new b")
    print("written", flush=True)
    sys.stdin.read()
"""


def test_the_next_run_rolls_back_a_run_killed_mid_stage(tmp_path):
    write_text(tmp_path / "a.json", "old a")
    before = snapshot(tmp_path)
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_STAGE, str(tmp_path)],
        cwd=REPO,
        env=PIPELINE_ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout.readline().strip() == "written"  # readiness: both files are in place
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=300)
    assert contents(tmp_path)["b.json"] == "new b" and (tmp_path / JOURNAL).is_file()
    assert recover(tmp_path) == ["a.json", "b.json"]
    assert snapshot(tmp_path) == before and not (tmp_path / JOURNAL).exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert recover(tmp_path) == []


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def old_repository(root):
    write_text(root / "triton" / "model" / "config.pbtxt", "old config")
    write_text(root / "manifest.json", "old manifest")
    return tree(root)


def swap_in_new(transaction, root):
    staging = transaction.new_folder(root / "triton")
    write_text(staging / "model" / "config.pbtxt", "new config")
    transaction.swap_folder(root / "triton")


def test_a_folder_swap_removes_the_old_folder_only_at_commit(tmp_path):
    old_repository(tmp_path)
    with Transaction(tmp_path) as transaction:
        swap_in_new(transaction, tmp_path)
        assert (tmp_path / "triton" / "model" / "config.pbtxt").read_text() == "new config"
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".old")]  # the old one kept until commit
        write_text(tmp_path / "manifest.json", "new manifest")
    assert tree(tmp_path) == {"triton/model/config.pbtxt": "new config", "manifest.json": "new manifest"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_after_a_folder_swap_puts_the_old_folder_back(tmp_path):
    before = old_repository(tmp_path)
    with pytest.raises(PipelineError):
        with Transaction(tmp_path) as transaction:
            swap_in_new(transaction, tmp_path)
            raise PipelineError("the manifest write failed")
    assert tree(tmp_path) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_write_outside_the_declared_scope_fails_the_stage_and_rolls_it_back(tmp_path):
    from pipeline.transaction import UndeclaredWrite

    write_text(tmp_path / "a.json", "old a")
    with pytest.raises(UndeclaredWrite, match="b.json"):
        with Transaction(tmp_path, scope=[tmp_path / "a.json", tmp_path / "triton"], owner="bake"):
            write_text(tmp_path / "a.json", "new a")
            write_text(tmp_path / "triton" / "x" / "config.pbtxt", "inside a declared folder")
            write_text(tmp_path / "b.json", "not declared")
    assert tree(tmp_path) == {"a.json": "old a"}  # (an emptied folder may stay, as after any rollback)


KILLED_AFTER_SWAP = """
import sys
from pathlib import Path
from pipeline.io import write_text
from pipeline.transaction import Transaction
root = Path(sys.argv[1])
with Transaction(root) as transaction:
    staging = transaction.new_folder(root / "triton")
    write_text(staging / "model" / "config.pbtxt", "new config")
    transaction.swap_folder(root / "triton")
    write_text(root / "manifest.json", "new manifest")
    if sys.argv[2] == "commit":
        transaction._write_journal(committed=True)  # killed right after the commit point
    print("written", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("point", ["before commit", "commit"])
def test_a_run_killed_after_a_folder_swap_is_recovered(tmp_path, point):
    before = old_repository(tmp_path)
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_AFTER_SWAP, str(tmp_path), point],
        cwd=REPO,
        env=PIPELINE_ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout.readline().strip() == "written"
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=300)
    restored = recover(tmp_path)
    if point == "commit":  # the set was committed: recovery only drops the old folder
        assert restored == [] and tree(tmp_path) == {
            "triton/model/config.pbtxt": "new config",
            "manifest.json": "new manifest",
        }
    else:
        assert restored == ["manifest.json", "triton/"] and tree(tmp_path) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
