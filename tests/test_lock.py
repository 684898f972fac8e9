"""pipeline.lock: one run per model folder, between real processes."""
import os
import signal
import sys

import pytest

from nm_fixtures import HOLDER, BackgroundRun
from pipeline.errors import PipelineError
from pipeline.lock import LOCK_NAME, model_folder_lock

def hold(folder) -> BackgroundRun:
    holder = BackgroundRun([str(folder)], command=[sys.executable, "-c", HOLDER])
    holder.wait_for_line("holding", timeout=300)
    return holder


def test_second_run_is_refused_with_the_holders_pid_until_it_ends(tmp_path):
    folder = tmp_path / "engines" / "tiny_resnet"
    holder = hold(folder)
    with pytest.raises(PipelineError, match=rf"{folder} is in use by another run \(pid {holder.process.pid}\)"):
        with model_folder_lock(folder):
            pass
    holder.process.stdin.close()
    assert holder.finish(timeout=300)[0] == 0
    assert (folder / LOCK_NAME).read_text() == ""
    with model_folder_lock(folder):
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_lock_of_a_killed_run_is_recovered(tmp_path):
    folder = tmp_path / "tiny_resnet"
    holder = hold(folder)
    holder.process.send_signal(signal.SIGKILL)
    assert holder.finish(timeout=300)[0] == -signal.SIGKILL
    assert (folder / LOCK_NAME).read_text().strip() == str(holder.process.pid)  # stale pid left behind
    with model_folder_lock(folder):
        pass


def test_a_failing_run_releases_the_folder(tmp_path):
    with pytest.raises(ValueError):
        with model_folder_lock(tmp_path):
            raise ValueError("stage failed")
    with model_folder_lock(tmp_path):
        pass


def test_folder_that_cannot_be_created_is_one_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PipelineError, match="cannot create output folder"):
        with model_folder_lock(blocker / "tiny_resnet"):
            pass
