"""A stage's writes as one set: when the stage fails, every file it replaced is put back and every file it
created is removed, so a failed stage changes no artifact however many files it had written by then.

Every artifact write goes through `pipeline.io.atomic_path`, which calls `before_replace` just before it
renames a finished file into place. Inside `Transaction`, that keeps the file's previous version as a hard
link (`.<name>.<token>.prev`, a dot-file beside it) and lists it in the folder's journal `.transaction.json`.
A folder (the Triton repositories) is replaced the same way: `new_folder` gives a hidden staging folder to
assemble it in, `swap_folder` renames it into place and keeps the previous folder as `.<name>.<token>.old`.
`commit` marks the journal committed, then drops the old versions (files and folders) and the journal;
`rollback` renames them back. A run killed with SIGKILL leaves the journal behind: the next run in that folder
calls `recover` first and rolls the unfinished set back (or, when the journal says committed, finishes the
clean-up), so the folder again holds what the last finished stage wrote.

A transaction may have a scope: the paths its stage declares it writes (pipeline/declaration.py; a folder covers
everything under it). A write outside the scope raises `UndeclaredWrite`, which rolls the stage back: a stage
cannot write what its declaration, and so engine's records and the transaction, do not know of.

Training checkpoints (`*.ckpt`) are the exception the README promises: they must outlive a failed or
interrupted run (`--resume` continues from them), so they are written straight through.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

JOURNAL = ".transaction.json"
_active: list[Transaction] = []


class UndeclaredWrite(RuntimeError):
    """A stage wrote a path its declaration does not name (a bug in the stage or its declaration)."""


class Transaction:
    """Usage: `with Transaction(folder): ...` commits on success and rolls back on any
    exception; `commit_on` names exceptions after which the writes stay (a failed gate keeps its report);
    `scope` (None: anything) the paths the stage may write, `owner` the stage, for the error."""

    KEEP_SUFFIXES = (".ckpt",)  # checkpoints: kept whatever happens

    def __init__(
        self,
        root: Path,
        commit_on: tuple[type[BaseException], ...] = (),
        scope: Iterable[Path] | None = None,
        owner: str = "",
    ):
        self.root = Path(root)
        self.commit_on = commit_on
        self.scope = None if scope is None else [Path(path).absolute() for path in scope]
        self.owner = owner
        self.token = secrets.token_hex(4)
        self.saved: dict[Path, Path | None] = {}  # replaced file -> its previous version (None: it was new)
        self.folders: dict[Path, dict[str, Any]] = {}  # folder -> {"new": staging, "old": kept, "existed": bool}

    def __enter__(self) -> Transaction:
        _active.append(self)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        _active.remove(self)
        if exc is None or isinstance(exc, self.commit_on):
            self.commit()
        else:
            self.rollback()

    def allows(self, path: Path) -> bool:
        path = Path(path).absolute()
        if self.scope is None:
            return True
        return any(path == item or item in path.parents for item in self.scope + self._staging())

    def _staging(self) -> list[Path]:
        return [entry["new"] for entry in self.folders.values()]

    def before_replace(self, path: Path) -> None:
        path = Path(path).absolute()
        if not self.allows(path):
            where = f"pipeline/stages/{self.owner}.py" if self.owner else "its stage module"
            raise UndeclaredWrite(
                f"{self.owner or 'the stage'} wrote {path}, which its DECLARATION ({where}) does not name among "
                "its writes; add it there (engine's records and the rollback follow from that list)"
            )
        if any(staging in path.parents for staging in self._staging()):
            return  # inside a staging folder: the folder goes or stays as a whole
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

    def new_folder(self, target: Path) -> Path:
        """An empty hidden folder beside TARGET to assemble its replacement in (`swap_folder` puts it in place;
        a failed or killed stage removes it)."""
        target = Path(target).absolute()
        if not self.allows(target):
            self.before_replace(target)  # raises UndeclaredWrite
        staging = target.with_name(f".{target.name}.{self.token}.new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.folders[target] = {"new": staging, "old": None, "existed": None}
        self._write_journal()
        return staging

    def swap_folder(self, target: Path) -> None:
        """Replace TARGET by its staging folder with renames; the previous folder stays, hidden, until commit
        (rollback and recover rename it back)."""
        target = Path(target).absolute()
        entry = self.folders[target]
        os.chmod(entry["new"], 0o755)
        entry["existed"] = target.exists()
        if entry["existed"]:
            entry["old"] = target.with_name(f".{target.name}.{self.token}.old")
        self._write_journal()  # before any rename: a kill at any point below is undone by recover
        if entry["old"] is not None:
            os.replace(target, entry["old"])
        os.replace(entry["new"], target)

    def commit(self) -> None:
        self._write_journal(committed=True)
        _finish(self.saved, self.folders)
        self._journal().unlink(missing_ok=True)
        self.saved.clear()
        self.folders.clear()

    def rollback(self) -> None:
        _restore(self.saved, self.folders)
        self._journal().unlink(missing_ok=True)
        self.saved.clear()
        self.folders.clear()

    def _journal(self) -> Path:
        return self.root / JOURNAL

    def _write_journal(self, committed: bool = False) -> None:
        """The journal itself is written plainly (temp file, rename), outside any transaction."""
        self.root.mkdir(parents=True, exist_ok=True)
        entries = {
            "files": {str(path): (str(previous) if previous else None) for path, previous in self.saved.items()},
            "folders": {
                str(target): {key: (str(value) if isinstance(value, Path) else value) for key, value in entry.items()}
                for target, entry in self.folders.items()
            },
            "committed": committed,
        }
        temporary = self.root / f"{JOURNAL}.{self.token}.tmp"
        temporary.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(temporary, self._journal())


def _restore(saved: dict[Path, Path | None], folders: dict[Path, dict[str, Any]]) -> None:
    for path, previous in reversed(list(saved.items())):
        if previous is None:
            path.unlink(missing_ok=True)
        elif previous.exists():
            os.replace(previous, path)
    for target, entry in reversed(list(folders.items())):
        old = entry.get("old")
        if old is not None and old.exists():  # the swap had begun: TARGET, if there, is the new folder
            if target.exists():
                shutil.rmtree(target)
            os.replace(old, target)
        elif entry.get("existed") is False and target.exists():  # there was none before: the new one goes
            shutil.rmtree(target)
        shutil.rmtree(entry["new"], ignore_errors=True)


def _finish(saved: dict[Path, Path | None], folders: dict[Path, dict[str, Any]]) -> None:
    """After the commit point: drop the previous versions and any staging folder never swapped in."""
    for previous in saved.values():
        if previous is not None:
            previous.unlink(missing_ok=True)
    for entry in folders.values():
        for key in ("old", "new"):
            if entry.get(key) is not None:
                shutil.rmtree(entry[key], ignore_errors=True)


def before_replace(path: Path) -> None:
    """Called by every atomic write just before it renames its file into place."""
    if _active:
        _active[-1].before_replace(path)


def active() -> Transaction | None:
    """The transaction of the stage running now (None outside one), for folder swaps."""
    return _active[-1] if _active else None


def _read_journal(journal: Path) -> tuple[dict[Path, Path | None], dict[Path, dict[str, Any]], bool]:
    try:
        entries = json.loads(journal.read_text())
        if "files" not in entries:  # a journal written before folder swaps: file -> previous version
            entries = {"files": entries, "folders": {}, "committed": False}
        saved = {Path(path): (Path(previous) if previous else None) for path, previous in entries["files"].items()}
        folders = {
            Path(target): {
                "new": Path(entry["new"]),
                "old": Path(entry["old"]) if entry.get("old") else None,
                "existed": entry.get("existed"),
            }
            for target, entry in entries["folders"].items()
        }
        return saved, folders, bool(entries.get("committed"))
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}, {}, False  # a journal cut short before its first rename: nothing of that run was written yet


def recover(root: Path) -> list[str]:
    """Roll back the writes of a run that was killed inside its transaction (SIGKILL, power loss); the names
    of the files and folders put back or removed. A run killed after its commit point has its clean-up finished
    instead (nothing put back). Call it while holding the folder's lock, before a new run writes."""
    journal = Path(root) / JOURNAL
    if not journal.is_file():
        return []
    saved, folders, committed = _read_journal(journal)
    if committed:
        _finish(saved, folders)
        journal.unlink(missing_ok=True)
        return []
    _restore(saved, folders)
    journal.unlink(missing_ok=True)
    return sorted([path.name for path in saved] + [target.name + "/" for target in folders])
