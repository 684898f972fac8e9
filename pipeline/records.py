"""Inputs checked against the records of the stage that wrote them.

Every stage records the sha256 of what it writes (train_masks.json, bake.json, export.json, build.json,
report.json). A stage that reads an earlier stage's file checks it here first, so a replaced, truncated or
edited artifact is refused with the file and the stage to re-run, never used or sealed into a package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json


def rerun(stage: str, model: str) -> str:
    return f"re-run `python -m pipeline {stage} --model {model}`"


def verify_recorded(path: Path, record: dict[str, Any] | None, stage: str, model: str) -> Path:
    """PATH, refused unless it exists and its sha256 is the one STAGE recorded (RECORD: a report's file entry)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; {rerun(stage, model)}")
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(expected, str):
        raise PipelineError(f"{path} is not recorded by the {stage} stage (no sha256 in its report); "
                            f"{rerun(stage, model)}")
    if sha256_file(path) != expected:
        raise PipelineError(f"{path} changed since {stage} wrote it (sha256 differs from its {stage} report); it "
                            f"is damaged or replaced: {rerun(stage, model)}")
    return path


def file_record(path: Path) -> dict[str, Any]:
    """The record a stage keeps of a file it wrote."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def load_report(path: Path, stage: str, model: str) -> dict[str, Any]:
    """A stage's JSON report (a dict), or one error naming the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; run `python -m pipeline {stage} --model {model}` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is not a {stage} report ({type(exc).__name__}); {rerun(stage, model)}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a {stage} report (not a JSON object); {rerun(stage, model)}")
    return data


@dataclass
class StageReport:
    """A stage's JSON report with the files it wrote: `model` and `files` typed, every other key in `details`
    (the JSON stays flat). Subclasses name their stage; each report file has one subclass, its owner."""

    STAGE: ClassVar[str] = ""
    model: str
    files: dict[str, dict[str, Any]]  # file name -> sha256, bytes, and what the stage says about it
    details: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        write_json(path, {"model": self.model, **self.details, "files": self.files})

    @classmethod
    def load(cls, path: Path, model: str):
        data = load_report(path, cls.STAGE, model)
        files = data.pop("files", None)
        if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
            raise PipelineError(f"{path} records no files (no 'files' table); {rerun(cls.STAGE, model)}")
        return cls(str(data.pop("model", model)), files, data)

    def checked(self, path: Path) -> Path:
        """PATH (a file of this model folder), refused unless it is the file the stage wrote."""
        return verify_recorded(path, self.files.get(Path(path).name), self.STAGE, self.model)
