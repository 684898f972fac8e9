"""Atomic artifact writes and content hashes.

Every artifact is written to a temporary file in the destination folder and renamed
into place, so a killed or failed stage never leaves a half-written file behind; inside a stage's
`pipeline.transaction.Transaction` the previous version is kept until the whole stage succeeds.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline import transaction
from pipeline.errors import PipelineError

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_dir(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create output folder {path}: {exc.strerror}; choose a writable --out") from None
    if not os.access(path, os.W_OK):
        raise PipelineError(f"output folder {path} is not writable; fix its permissions or choose another --out")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only on success.

    A full disk or quota (ENOSPC, EDQUOT) becomes one PipelineError naming the file and the free space."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get normal permissions
        transaction.before_replace(path)  # inside a stage: keep the previous version until the stage succeeds
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise PipelineError(f"cannot write {path}: {os.strerror(exc.errno).lower()} ({free / 1e6:.0f} MB free "
                                f"in {path.parent}); free some space or choose another --out, then run again; "
                                f"{path} was left as it was") from None
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); delete it and rerun the stage that writes it") from None


def torch_save(obj: Any, path: Path) -> None:
    """Byte-reproducible: torch.save names the archive's members after the file it writes, so saving straight
    to the random temporary name would make equal contents differ; an in-memory save names them `archive/`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def torch_load(path: Path, what: str = "checkpoint") -> Any:
    """Load a torch file safely (weights_only=True) with a one-line error on failure."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        text = ANSI_ESCAPE.sub("", str(exc)).strip()  # torch colours parts of its messages
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise PipelineError(f"{what} {path} holds a pickled Python object ({refused.group(1)}) that safe loading "
                                "(weights_only) refuses, e.g. a whole nn.Module saved with torch.save(model); save "
                                "tensors only, e.g. torch.save(model.state_dict(), PATH)") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise PipelineError(f"{what} {path} cannot be read ({first[:160]}); it is corrupt or not a PyTorch file") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
