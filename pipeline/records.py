"""Inputs checked against the records of the stage that wrote them.

Every stage records the sha256 of what it writes (train_masks.json, bake.json, export.json, build.json,
report.json). A stage that reads an earlier stage's file checks it here first, so a replaced, truncated or
edited artifact is refused with the file and the stage to re-run, never used or sealed into a package.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pipeline.errors import PipelineError
from pipeline.io import read_json, sha256_file, write_json

T = TypeVar("T")


def rerun(stage: str, model: str) -> str:
    return f"re-run `python -m pipeline {stage} --model {model}`"


def verify_recorded(path: Path, record: dict[str, Any] | None, stage: str, model: str) -> Path:
    """PATH, refused unless it exists and its sha256 is the one STAGE recorded (RECORD: a report's file entry)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; {rerun(stage, model)}")
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(expected, str):
        raise PipelineError(
            f"{path} is not recorded by the {stage} stage (no sha256 in its report); {rerun(stage, model)}"
        )
    if sha256_file(path) != expected:
        raise PipelineError(
            f"{path} changed since {stage} wrote it (sha256 differs from its {stage} report); it "
            f"is damaged or replaced: {rerun(stage, model)}"
        )
    return path


def file_record(path: Path) -> dict[str, Any]:
    """The record a stage keeps of a file it wrote."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def load_report(
    path: Path, stage: str, model: str, required: Mapping[str, type | tuple[type, ...]] | None = None
) -> dict[str, Any]:
    """A stage's JSON report (a dict whose REQUIRED keys hold values of their types), or one error naming the
    file and the stage that writes it."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} does not exist; run `python -m pipeline {stage} --model {model}` first")
    data = read_json(path, fix=rerun(stage, model))
    if not isinstance(data, dict):
        raise PipelineError(
            f"{path} is not a {stage} report (JSON {type(data).__name__}, not an object); {rerun(stage, model)}"
        )
    check_keys(data, required or {}, path, f"a {stage} report", rerun(stage, model))
    return data


def check_keys(
    data: dict[str, Any], required: Mapping[str, type | tuple[type, ...]], path: Path, what: str, fix: str
) -> None:
    """Refuse DATA (read from PATH) unless each REQUIRED key is there with a value of its type."""
    for key, kind in required.items():
        if key not in data:
            raise PipelineError(f"{path} is not {what} (no {key!r}); {fix}")
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            names = "/".join(t.__name__ for t in _types(kind))
            raise PipelineError(f"{path} is not {what} ({key!r} is {type(value).__name__}, expected {names}); {fix}")


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# --------------------------------------------------------------------------- typed records from JSON
def typed_from_json(cls: type[T], data: Any, what: str, fix: str, at: str = "") -> T:
    """An instance of the dataclass CLS from JSON DATA, every field checked against its annotation (nested
    dataclasses, lists, string-keyed tables, `X | None`, Any); a field with a default may be absent. Anything else
    is one PipelineError: WHAT (e.g. "PATH is not a build report"), the key path and what is wrong there, and FIX
    (never a TypeError or KeyError)."""
    if not isinstance(data, dict):
        raise PipelineError(f"{what} ({at or 'the whole'} is {_json_type(data)}, not an object); {fix}")
    hints = typing.get_type_hints(cls)
    values = {}
    for entry in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{at}.{entry.name}" if at else entry.name
        if not entry.init:
            continue
        if entry.name not in data:
            if entry.default is dataclasses.MISSING and entry.default_factory is dataclasses.MISSING:
                raise PipelineError(f"{what} (no {key!r}); {fix}")
            continue
        values[entry.name] = _typed_value(hints[entry.name], data[entry.name], what, fix, key)
    return cls(**values)


def _typed_value(kind: Any, value: Any, what: str, fix: str, at: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    wrong = PipelineError(f"{what} ({at!r} is {_json_type(value)}, expected {_name(kind)}); {fix}")
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _typed_value(option, value, what, fix, at)
            except PipelineError:
                continue
        raise wrong
    if dataclasses.is_dataclass(kind):
        return typed_from_json(kind, value, what, fix, at)  # type: ignore[arg-type]
    if origin is list or kind is list:
        if not isinstance(value, list):
            raise wrong
        return [_typed_value(args[0], item, what, fix, f"{at}[{i}]") for i, item in enumerate(value)] if args else value
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise wrong
        return (
            {key: _typed_value(args[1], item, what, fix, f"{at}.{key}") for key, item in value.items()}
            if args
            else value
        )
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise wrong


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _name(kind: Any) -> str:
    names = {float: "a number", int: "an integer", str: "a string", bool: "a boolean", list: "a list", dict: "a table"}
    origin = typing.get_origin(kind) or kind
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_name(arg) for arg in typing.get_args(kind))
    return names.get(origin) or ("null" if kind is type(None) else str(getattr(kind, "__name__", kind)))


def to_json(record: Any) -> dict[str, Any]:
    """A typed record as JSON (nested dataclasses as objects, in field order)."""
    return dataclasses.asdict(record)


@dataclass
class StageReport:
    """A stage's JSON report with the files it wrote (their sha256 records): `model` and `files` typed, a
    subclass's own dataclass fields typed too (each with a default; read back through `typed_from_json`, so a
    value of the wrong type is one error naming the key), every other key in `details` (the JSON stays flat).
    Subclasses name their stage; each report file has one subclass, its owner."""

    STAGE: ClassVar[str] = ""
    REQUIRED: ClassVar[dict[str, type | tuple[type, ...]]] = {"model": str, "files": dict}
    model: str
    files: dict[str, dict[str, Any]]  # file name -> sha256, bytes, and what the stage says about it
    details: dict[str, Any] = field(default_factory=dict)  # the keys the subclass does not type

    @classmethod
    def typed_fields(cls) -> list[str]:
        """The subclass's own typed fields (beyond model, files and details)."""
        return [entry.name for entry in dataclasses.fields(cls) if entry.name not in ("model", "files", "details")]

    def save(self, path: Path) -> None:
        content = to_json(self)
        files, details = content.pop("files"), content.pop("details")
        write_json(path, {**content, **details, "files": files})

    @classmethod
    def load(cls, path: Path, model: str):
        data = load_report(path, cls.STAGE, model, cls.REQUIRED)
        for name, entry in data["files"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise PipelineError(
                    f"{path} is not a {cls.STAGE} report (its entry for {name} has no sha256); "
                    f"{rerun(cls.STAGE, model)}"
                )
        typed = set(cls.typed_fields())
        payload = {key: value for key, value in data.items() if key in typed or key in ("model", "files")}
        payload["details"] = {key: value for key, value in data.items() if key not in payload}
        return typed_from_json(cls, payload, f"{path} is not a {cls.STAGE} report", rerun(cls.STAGE, model))

    def checked(self, path: Path) -> Path:
        """PATH (a file of this model folder), refused unless it is the file the stage wrote."""
        return verify_recorded(path, self.files.get(Path(path).name), self.STAGE, self.model)


@dataclass
class StageRecords:
    """stages.json: what `engine` ran (per stage: the hash of its inputs, the sha256 of each output) and which
    stage is under way. A cache, not a truth: a damaged file is dropped with a `warning:` line and rebuilt, so
    every stage runs again (and it records afresh) instead of trusting or crashing on it."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_progress: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        write_json(path, {"stages": self.stages, "in_progress": self.in_progress})

    @classmethod
    def load(cls, path: Path) -> tuple[StageRecords, str]:
        """The records, and why they were dropped ('' when they were read as they are)."""
        path = Path(path)
        if not path.exists():
            return cls(), ""
        try:
            data = read_json(path, fix="")
            if not isinstance(data, dict):
                raise PipelineError(f"{path} is not an engine record (JSON {type(data).__name__}, not an object)")
            data.setdefault("in_progress", {})  # records written before runs could resume have none
            check_keys(data, {"stages": dict, "in_progress": dict}, path, "an engine record", "")
            stages, in_progress = data["stages"], data["in_progress"]
            for name, record in stages.items():
                check_keys(
                    record if isinstance(record, dict) else {},
                    {"inputs": str, "outputs": dict},
                    path,
                    f"an engine record (stage {name})",
                    "",
                )
            if not all(isinstance(value, str) for value in in_progress.values()):
                raise PipelineError(f"{path} is not an engine record (in_progress holds a non-string)")
        except PipelineError as exc:
            reason = str(exc).rstrip("; ")
            return cls(), (
                f"{reason}; it is a cache of what engine ran, so it is rebuilt: every stage runs again "
                f"(delete {path} to silence this)"
            )
        return cls(stages, in_progress), ""


def load_layer_table(path: Path, model: str) -> dict[str, Any]:
    """layers.json (written by train-masks: every Conv/Linear, masked or skipped with its reason, and MACs),
    refused in one line unless its lists and entries have the types verify reads."""
    data = load_report(path, "train-masks", model, {"masked": list, "skipped": list})
    for entry in data["masked"] + data["skipped"]:
        check_keys(
            entry if isinstance(entry, dict) else {},
            {"name": str, "kind": str, "macs": int, "eligible": bool},
            path,
            "a layer table (an entry lacks name, kind, macs or eligible)",
            rerun("train-masks", model),
        )
    if not isinstance(data.get("total_macs", 0), (int, float)):
        raise PipelineError(f"{path} is not a layer table (total_macs is not a number); {rerun('train-masks', model)}")
    return data
