"""A stage's writes as one set: when the stage fails, every file it replaced is put back and every file it
created is removed, so a failed stage changes no artifact however many files it had written by then.

Every artifact write goes through `pipeline.io.atomic_path`, which calls `before_replace` just before it
renames a finished file into place. Inside `Transaction`, that keeps the file's previous version as a hard
link (`.<name>.<token>.prev`, a dot-file beside it) and lists it in the folder's journal `.transaction.json`.
`commit` drops the old versions; `rollback` renames them back. A run killed with SIGKILL leaves the journal
behind: the next run in that folder calls `recover` first and rolls the unfinished set back, so the folder
again holds what the last finished stage wrote.

Training checkpoints (`*.ckpt`) are the exception the README promises: they must outlive a failed or
interrupted run (`--resume` continues from them), so they are written straight through.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

JOURNAL = ".transaction.json"
_active: list[Transaction] = []


class Transaction:
    """Usage: `with Transaction(folder): ...` commits on success and rolls back on any
    exception; `commit_on` names exceptions after which the writes stay (a failed gate keeps its report)."""

    KEEP_SUFFIXES = (".ckpt",)  # checkpoints: kept whatever happens

    def __init__(self, root: Path, commit_on: tuple[type[BaseException], ...] = ()):
        self.root = Path(root)
        self.commit_on = commit_on
        self.token = secrets.token_hex(4)
        self.saved: dict[Path, Path | None] = {}  # replaced file -> its previous version (None: it was new)

    def __enter__(self) -> Transaction:
        _active.append(self)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        _active.remove(self)
        if exc is None or isinstance(exc, self.commit_on):
            self.commit()
        else:
            self.rollback()

    def before_replace(self, path: Path) -> None:
        path = Path(path).absolute()
        if path.suffix in self.KEEP_SUFFIXES or path in self.saved:
            return
        previous = None
        if path.is_file():
            previous = path.with_name(f".{path.name}.{self.token}.prev")
            try:
                os.link(path, previous)
            except OSError:  # a file system without hard links
                shutil.copy2(path, previous)
        self.saved[path] = previous
        self._write_journal()

    def commit(self) -> None:
        for previous in self.saved.values():
            if previous is not None:
                previous.unlink(missing_ok=True)
        self._journal().unlink(missing_ok=True)
        self.saved.clear()

    def rollback(self) -> None:
        _restore(self.saved)
        self._journal().unlink(missing_ok=True)
        self.saved.clear()

    def _journal(self) -> Path:
        return self.root / JOURNAL

    def _write_journal(self) -> None:
        """The journal itself is written plainly (temp file, rename), outside any transaction."""
        self.root.mkdir(parents=True, exist_ok=True)
        entries = {str(path): (str(previous) if previous else None) for path, previous in self.saved.items()}
        temporary = self.root / f"{JOURNAL}.{self.token}.tmp"
        temporary.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(temporary, self._journal())


def _restore(saved: dict[Path, Path | None]) -> None:
    for path, previous in reversed(list(saved.items())):
        if previous is None:
            path.unlink(missing_ok=True)
        elif previous.exists():
            os.replace(previous, path)


def before_replace(path: Path) -> None:
    """Called by every atomic write just before it renames its file into place."""
    if _active:
        _active[-1].before_replace(path)


def recover(root: Path) -> list[str]:
    """Roll back the writes of a run that was killed inside its transaction (SIGKILL, power loss); the names
    of the files put back or removed. Call it while holding the folder's lock, before a new run writes."""
    journal = Path(root) / JOURNAL
    if not journal.is_file():
        return []
    try:
        entries = json.loads(journal.read_text())
        saved = {Path(path): (Path(previous) if previous else None) for path, previous in entries.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        saved = {}  # a journal cut short before its first rename: nothing of that run was written yet
    _restore(saved)
    journal.unlink(missing_ok=True)
    return sorted(path.name for path in saved)
