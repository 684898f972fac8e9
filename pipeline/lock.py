"""One run at a time per model folder: an exclusive lock on OUT/<model>/.lock.

The lock is `flock` on the file, which the kernel releases when its holder exits in any way, SIGKILL included,
so a lock left behind by a dead run is free again at once: there is nothing stale to clean up. The pid written
into the file only names the holder in the message a second run gets. A run that ends having written nothing into
a folder it created (bad input found inside the stage) removes the lock file and the folders it made, so a failed
command leaves no `--out` behind; the lock file is unlinked while held, and a run that locked a file since
unlinked locks the new one instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import ensure_dir

LOCK_NAME = ".lock"  # a dot-file: manifests leave it out


@contextlib.contextmanager
def model_folder_lock(folder: Path) -> Iterator[None]:
    """Hold FOLDER for this run; a PipelineError naming the holder's pid if another run holds it.

    Not reentrant (a second `with` in the same process is refused like another run): take it once per run.
    """
    created = missing_folders(Path(folder))
    folder = ensure_dir(Path(folder))
    path = folder / LOCK_NAME
    fd = locked_file(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty file: nobody holds the folder
            if created:
                remove_if_unused(folder, created)
    finally:
        os.close(fd)  # releases the flock


def locked_file(path: Path, folder: Path) -> int:
    """An open descriptor of PATH holding its exclusive flock, taken without waiting."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PipelineError(f"cannot open the lock file {path}: {exc.strerror}; choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PipelineError(
                f"{folder} is in use by another run (pid {holder}); wait for it to finish or stop it, then run again"
            ) from None
        if is_current(fd, path):
            return fd
        os.close(fd)  # its holder unlinked the file before releasing it: lock the one at PATH now


def is_current(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def missing_folders(folder: Path) -> list[Path]:
    """FOLDER and those of its parents that do not exist yet, innermost first: what this run will create."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def remove_if_unused(folder: Path, created: list[Path]) -> None:
    """Remove FOLDER's lock file and the CREATED folders (innermost first) when the run wrote nothing into them."""
    try:
        if os.listdir(folder) != [LOCK_NAME]:
            return
        os.unlink(folder / LOCK_NAME)  # still held: a run that opened it meanwhile retries on a new file
        for candidate in created:
            os.rmdir(candidate)  # OSError once a folder holds anything else
    except OSError:
        return


def is_main_process() -> bool:
    """False on the ranks other than 0 of a torchrun launch, which write no artifacts."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def run_lock(folder: Path) -> contextlib.AbstractContextManager:
    """The lock one run of a model-level stage takes (the CLI takes it once per command, `engine` included).

    Under torchrun every rank runs the command: rank 0 holds the lock for the whole launch, the other ranks
    (which write no artifacts) take none, so they do not refuse each other.
    """
    if not is_main_process():
        return contextlib.nullcontext()
    return model_folder_lock(folder)
