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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import transaction
from pipeline.errors import PipelineError

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _normal_mode() -> int:
    """0o666 less the process umask. Read from /proc (Linux) so nothing changes the umask, even for a moment;
    elsewhere a file made with the default mode tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    fd, probe = tempfile.mkstemp()
    os.close(fd)
    try:
        os.unlink(probe)
        descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(descriptor)
        return os.stat(probe).st_mode & 0o777
    finally:
        Path(probe).unlink(missing_ok=True)


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
        os.chmod(tmp_path, _normal_mode())  # mkstemp makes 0600 files; artifacts get normal permissions
        transaction.before_replace(path)  # inside a stage: keep the previous version until the stage succeeds
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise PipelineError(
                f"cannot write {path}: {os.strerror(exc.errno).lower()} ({free / 1e6:.0f} MB free "
                f"in {path.parent}); free some space or choose another --out, then run again; "
                f"{path} was left as it was"
            ) from None
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def readable_file(path: Path, what: str, fix: str, empty_fix: str = "") -> Path:
    """PATH, refused in one line when it is missing, a folder, unreadable or empty (WHAT names it, FIX says what
    to do; EMPTY_FIX, when given, for an empty file)."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{what} {path} is a folder, not a file; {fix}")
    if not path.exists():
        raise PipelineError(f"{what} {path} does not exist; {fix}")
    if not os.access(path, os.R_OK):
        raise PipelineError(f"{what} {path} is not readable (permission denied); fix its permissions or {fix}")
    if path.stat().st_size == 0:
        raise PipelineError(f"{what} {path} is empty; {empty_fix or fix}")
    return path


def read_json(path: Path, fix: str = "delete it and rerun the stage that writes it", what: str = "") -> Any:
    """The JSON value in PATH, or one PipelineError naming the file and FIX. Callers check its shape."""
    path = readable_file(path, what or "JSON file", fix or "delete it")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise PipelineError(f"{path} is not valid JSON ({reason})" + (f"; {fix}" if fix else "")) from None
    except OSError as exc:
        raise PipelineError(f"cannot read {path} ({exc.strerror})" + (f"; {fix}" if fix else "")) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def torch_save(obj: Any, path: Path) -> None:
    """Byte-reproducible: torch.save names the archive's members after the file it writes, so saving straight
    to the random temporary name would make equal contents differ; an in-memory save names them `archive/`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def torch_load(path: Path, what: str = "checkpoint", fix: str = "re-run the stage that writes it") -> Any:
    """Load a torch file safely (weights_only=True) with a one-line error naming it and FIX on failure."""
    import torch

    path = readable_file(path, what, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        text = ANSI_ESCAPE.sub("", str(exc)).strip()  # torch colours parts of its messages
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise PipelineError(
                f"{what} {path} holds a pickled Python object ({refused.group(1)}) that safe loading "
                "(weights_only) refuses, e.g. a whole nn.Module saved with torch.save(model); save "
                "tensors only, e.g. torch.save(model.state_dict(), PATH)"
            ) from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise PipelineError(
            f"{what} {path} cannot be read ({first[:160]}); it is corrupt or not a PyTorch file: {fix}"
        ) from None


def load_versioned(cls, path: Path, what: str, format_name: str, version: int, fix: str):
    """A dataclass saved with torch_save as {"format": FORMAT_NAME, "version": VERSION, **fields}: refused in one
    line (naming WHAT and FIX) unless the file is one, of this version, with exactly the fields of CLS."""
    saved = torch_load(path, what, fix)
    if not isinstance(saved, dict) or saved.get("format") != format_name:
        raise PipelineError(f"{path} is not a {what}; {fix}")
    if saved.get("version") != version:
        raise PipelineError(f"{path} has {what} version {saved.get('version')!r}, this pipeline reads {version}; {fix}")
    try:
        return cls(**{key: value for key, value in saved.items() if key not in ("format", "version")})
    except TypeError as exc:
        raise PipelineError(f"{path} is a damaged {what} ({exc}); {fix}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
