"""The one report base (issue 33): a StageReport subclass's own fields are typed on reading and writing, the sha256
records of its files are checked, and the keys it does not type stay in `details` (the JSON flat)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from pipeline.errors import PipelineError
from pipeline.records import StageReport, file_record


@dataclass
class Step:
    name: str
    seconds: float


@dataclass
class DemoReport(StageReport):
    STAGE = "demo"
    layers_masked: int = 0
    density: float | None = None
    steps: list[Step] = field(default_factory=list)


@pytest.fixture
def written(tmp_path):
    output = tmp_path / "out.bin"
    output.write_bytes(b"made by demo")
    report = DemoReport("m", {output.name: file_record(output)}, {"note": "untyped"}, 3, 0.5, [Step("a", 1.25)])
    report.save(tmp_path / "demo.json")
    return tmp_path, report


def test_typed_fields_round_trip_and_the_json_stays_flat(written):
    folder, report = written
    data = json.loads((folder / "demo.json").read_text())
    assert list(data) == ["model", "layers_masked", "density", "steps", "note", "files"]
    assert data["steps"] == [{"name": "a", "seconds": 1.25}] and "details" not in data
    loaded = DemoReport.load(folder / "demo.json", "m")
    assert loaded == report and loaded.steps[0] == Step("a", 1.25) and loaded.details == {"note": "untyped"}
    assert loaded.checked(folder / "out.bin") == folder / "out.bin"
    (folder / "out.bin").write_bytes(b"replaced")
    with pytest.raises(PipelineError, match="changed since demo wrote it"):
        loaded.checked(folder / "out.bin")


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: d.update(layers_masked="3"), "'layers_masked' is a string, expected an integer"),
        (lambda d: d.update(density=True), "'density' is a boolean, expected a number or null"),
        (lambda d: d["steps"][0].pop("seconds"), "(no 'steps[0].seconds')"),
        (lambda d: d["files"]["out.bin"].pop("sha256"), "its entry for out.bin has no sha256"),
    ],
)
def test_a_wrong_typed_field_is_one_error_naming_it(written, change, named):
    folder, _ = written
    data = json.loads((folder / "demo.json").read_text())
    change(data)
    (folder / "demo.json").write_text(json.dumps(data))
    with pytest.raises(PipelineError) as caught:
        DemoReport.load(folder / "demo.json", "m")
    message = str(caught.value)
    assert named in message and "is not a demo report" in message and "re-run `python -m pipeline demo" in message
