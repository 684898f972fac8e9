"""The images of an image folder, checked before any work: the one reader of image files in the data step.

The rule for damaged data (docs/reliability.md): a file ImageFolder would load that does not decode stops the
run before training, naming the file (default), or, with `--skip-bad-images` (recipe `data.skip_bad_images`),
is left out and counted in the stage's report. The scan decodes every image when a split holds at most
FULL_DECODE_LIMIT of them (JPEGs in draft mode, at 1/8 scale: the whole entropy-coded stream is still read, so
truncation shows); larger splits get PIL's verify(), which reads headers and checksums. An image that passes the
scan and still fails to decode later is named in one error line, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.progress import progress

FULL_DECODE_LIMIT = 20000
_SCANNED: dict[tuple, ScanResult] = {}  # (folder, files' sizes and mtimes) -> result: one scan per process


@dataclass
class ScanResult:
    checked: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def decode_error(path: str, full: bool) -> str | None:
    """Why PATH does not decode as an image, or None when it does."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if full:
                image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
                image.load()
            else:
                image.verify()
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        text = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        return f"{type(exc).__name__}: {text}"
    return None


def scan_images(folder: Path, samples: list[tuple[str, int]]) -> ScanResult:
    """Decode (or verify) each of SAMPLES (ImageFolder's (path, class) list) once per process, with progress."""
    import os

    key = (str(folder), hash(tuple((path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path, _ in samples)))
    if key in _SCANNED:
        return _SCANNED[key]
    full = len(samples) <= FULL_DECODE_LIMIT
    result = ScanResult(len(samples))
    for path, _ in progress(samples, desc=f"check images of {folder}", total=len(samples), enabled=len(samples) > 2000):
        why = decode_error(path, full)
        if why:
            result.bad.append((path, why))
    _SCANNED[key] = result
    return result


def drop_bad_images(dataset, folder: Path, skip: bool) -> list[str]:
    """Scan DATASET (an ImageFolder); refuse damaged images, or with SKIP leave them out. The skipped paths."""
    result = scan_images(folder, list(dataset.samples))
    if not result.bad:
        return []
    if not skip:
        path, why = result.bad[0]
        more = f" and {len(result.bad) - 1} more" if len(result.bad) > 1 else ""
        raise PipelineError(
            f"image {path} cannot be decoded ({why}){more}; remove or replace it, or pass "
            "--skip-bad-images (data.skip_bad_images) to leave damaged images out and count them"
        )
    bad = {path for path, _ in result.bad}
    dataset.samples = [sample for sample in dataset.samples if sample[0] not in bad]
    dataset.imgs = dataset.samples
    dataset.targets = [target for _, target in dataset.samples]
    return sorted(bad)


def checked_loader(path: str):
    """ImageFolder's loader, with an image that fails to decode named in one error line."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise PipelineError(
            f"image {path} cannot be decoded ({type(exc).__name__}: {str(exc)[:100]}) although "
            "it passed the scan before training; remove or replace it and run again"
        ) from None
