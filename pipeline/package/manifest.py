"""manifest.json: every artifact of a model folder with its sha256 and size, plus provenance.

Listed: every file under engines/<model>/ (the Triton repository included), as paths
relative to that folder. Not listed:
  - manifest.json itself (a file cannot hold its own hash);
  - hidden files and folders (names starting with "."): atomic-write temporaries and
    the staging folders of the package stage;
  - *.ckpt and *.tmp: resumable training checkpoints, rewritten while training and
    deleted when it finishes, so they are not deliverables;
  - stages.json: the engine stage's bookkeeping, rewritten after package runs;
  - serve_check.json, serve_check.log and serve.log: written by serve-check and serve after packaging,
    about a server run, not part of the deliverable (check-manifest stays valid after them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import read_json, sha256_file, write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
EXCLUDED_NAMES = frozenset({MANIFEST_NAME, "stages.json", "serve_check.json", "serve_check.log", "serve.log"})
EXCLUDED_SUFFIXES = (".ckpt", ".tmp")


def is_listed(relative: PurePosixPath) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False
    return relative.name not in EXCLUDED_NAMES and not relative.name.endswith(EXCLUDED_SUFFIXES)


def artifact_files(root: Path) -> list[PurePosixPath]:
    root = Path(root)
    found = []
    for path in root.rglob("*"):
        relative = PurePosixPath(path.relative_to(root).as_posix())
        if path.is_file() and is_listed(relative):
            found.append(relative)
    return sorted(found)


def _version(*distributions: str, module: str | None = None) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if module:
        try:
            return str(importlib.import_module(module).__version__)
        except Exception:  # a broken install is as good as none for provenance
            pass
    return "not installed"


def gpu_description() -> str:
    try:
        import torch

        if not torch.cuda.is_available():
            return "none"
        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    except Exception:  # no usable CUDA runtime
        return "none"


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "tensorrt": _version("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12", module="tensorrt"),
        "tritonclient": _version("tritonclient"),
    }


def build_manifest(
    root: Path, recipe_hash: str, model: str, verdict: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    root = Path(root)
    files = [
        {"path": str(rel), "sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        for rel in artifact_files(root)
    ]
    return {
        "format": MANIFEST_FORMAT,
        "model": model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe_hash": recipe_hash,
        "verification": verdict,
        "versions": environment(),
        "gpu": gpu_description(),
        **(extra or {}),
        "excluded": "manifest.json, stages.json, *.ckpt, *.tmp, hidden files (see docs/triton.md)",
        "files": files,
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    path = Path(root) / MANIFEST_NAME
    write_json(path, manifest)
    return path


@dataclass
class ManifestCheck:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    tampered: list[str] = field(default_factory=list)  # "path (why)"
    unlisted: list[str] = field(default_factory=list)

    def ok(self, strict: bool = False) -> bool:
        return not self.missing and not self.tampered and not (strict and self.unlisted)


def _entries(manifest: Any, path: Path) -> list[dict[str, Any]]:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        raise PipelineError(
            f"{path} has no 'files' list; it is not a manifest written by the package stage: "
            "rerun `python -m pipeline package`"
        )
    for entry in files:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("size"), int)
        ):
            raise PipelineError(f"{path}: malformed entry {entry!r} (needs path, sha256, size); rerun package")
        relative = PurePosixPath(entry["path"])
        if relative.is_absolute() or ".." in relative.parts:
            raise PipelineError(f"{path}: entry {entry['path']!r} points outside the folder; refusing to check it")
    return files


def check_manifest(root: Path) -> ManifestCheck:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise PipelineError(f"{root} is not a folder; pass the artifact folder (engines/<model>) or --model NAME")
    if not path.exists():
        raise PipelineError(f"{path} does not exist; run `python -m pipeline package` to write it")
    entries = _entries(read_json(path, fix="rerun `python -m pipeline package` to rewrite it"), path)
    result = ManifestCheck()
    listed = set()
    for entry in entries:
        relative = PurePosixPath(entry["path"])
        listed.add(relative)
        target = root / relative
        result.checked += 1
        if not target.is_file():
            result.missing.append(entry["path"])
            continue
        size = target.stat().st_size
        if size != entry["size"]:
            result.tampered.append(f"{entry['path']} (size {size} bytes, manifest says {entry['size']})")
        elif sha256_file(target) != entry["sha256"]:
            result.tampered.append(f"{entry['path']} (sha256 differs)")
    result.unlisted = [str(rel) for rel in artifact_files(root) if rel not in listed]
    return result
