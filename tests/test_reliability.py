"""Issue 13's guarantees through the real CLI: exit code, one `error:` line, no traceback, no artifact changed.

The lock (two real processes), inputs checked against the records of the stage that wrote them, failed stages
that leave every artifact as it was, stage records, signals, and names and disk space.
"""
import signal
import sys

import pytest

from nm_fixtures import MODEL, BackgroundRun, cli, snapshot
from test_bad_input import assert_one_error_line
from test_lock import HOLDER

LONG_TRAINING = ["--set", "data.synthetic_size=2048", "--set", "masks.checkpoint_every=0", "--max-steps", "100000",
                 "--epochs", "1000"]


def test_second_run_on_a_locked_folder_exits_2_naming_the_holder_and_changes_nothing(tmp_path):
    out = tmp_path / "engines"
    folder = out / MODEL
    assert cli("layers", "--model", MODEL, "--out", str(out)).returncode == 0
    holder = BackgroundRun([str(folder)], command=[sys.executable, "-c", HOLDER])
    holder.wait_for_line("holding", timeout=60)
    before = snapshot(folder)
    result = cli("train-masks", "--model", MODEL, "--out", str(out), "--max-steps", "1")
    assert_one_error_line(result, f"{folder} is in use by another run (pid {holder.process.pid})")
    assert snapshot(folder) == before
    holder.process.send_signal(signal.SIGKILL)  # a holder that dies leaves its pid but no lock
    holder.finish(timeout=60)
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
        training.finish(timeout=60)
