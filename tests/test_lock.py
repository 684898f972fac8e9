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
    assert not (tmp_path / "engines").exists()  # the holder made the folders and wrote nothing: they are gone
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


def test_a_run_that_wrote_nothing_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PipelineError):
        with model_folder_lock(out / "engines" / "tiny_resnet"):
            raise PipelineError("bad input found inside the stage")
    assert not out.exists()
    with model_folder_lock(out / "tiny_resnet"):
        pass
    assert not out.exists()


def test_folders_that_hold_anything_else_stay(tmp_path):
    out = tmp_path / "out"
    with model_folder_lock(out / "a"):
        (out / "b").mkdir()  # another model's folder appears in --out meanwhile
    assert sorted(path.name for path in out.iterdir()) == ["b"]  # a (lock only) removed, out kept
    with model_folder_lock(out / "a"):
        (out / "a" / "dense.pt").write_bytes(b"x")
    assert (out / "a" / "dense.pt").exists() and (out / "a" / LOCK_NAME).read_text() == ""


def test_an_existing_folder_is_never_removed(tmp_path):
    folder = tmp_path / "tiny_resnet"
    folder.mkdir()
    with model_folder_lock(folder):
        pass
    assert folder.is_dir() and (folder / LOCK_NAME).read_text() == ""


def test_a_lock_file_unlinked_while_it_was_being_locked_is_locked_again(tmp_path, monkeypatch):
    """The retry in `locked_file`: the last holder unlinks the file between this run's open and its flock (as
    `remove_if_unused` does); the run must end up holding the file now at the path, not the unlinked one."""
    import fcntl

    import pipeline.lock
    from pipeline.lock import locked_file

    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / LOCK_NAME
    path.write_text("")
    real_flock, calls = fcntl.flock, []

    def flock_after_an_unlink(fd, operation):
        real_flock(fd, operation)
        if not calls:  # the first file was unlinked and a new run made another meanwhile
            os.unlink(path)
            path.write_text("")
        calls.append(fd)

    monkeypatch.setattr(pipeline.lock.fcntl, "flock", flock_after_an_unlink)
    fd = locked_file(path, folder)
    try:
        assert len(calls) == 2 and os.path.samestat(os.fstat(fd), os.stat(path))
    finally:
        os.close(fd)
