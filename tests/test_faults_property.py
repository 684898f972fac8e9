"""Property-based faults (hypothesis): whatever JSON a record holds, whatever bytes a file holds, its owner either
loads it or raises one PipelineError naming the file; no other exception escapes (pipeline/artifacts.py owners)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.backends.build_report import BuildReport
from pipeline.errors import PipelineError
from pipeline.masks.bake_report import BakeReport
from pipeline.masks.checkpoint import TrainingRecord
from pipeline.package.manifest import check_manifest
from pipeline.records import StageRecords, load_layer_table
from pipeline.verify.report import VerificationReport

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
RECORD_KEYS = [
    "model",
    "files",
    "engines",
    "backend",
    "gates",
    "engine_sha256",
    "masked",
    "skipped",
    "stages",
    "in_progress",
    "sha256",
    "engine",
    "dense",
    "sparse",
    "has_sparse_kernels",
    "batch_range",
    "passed",
]
# JSON objects shaped like the records: the keys the owners look for, with values of any type
RECORD_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(RECORD_KEYS), inner, max_size=6),
    max_leaves=16,
)
OWNERS = {
    "build.json": lambda p: BuildReport.load(p, "m"),
    "bake.json": lambda p: BakeReport.load(p, "m"),
    "train_masks.json": lambda p: TrainingRecord.load(p, "m"),
    "report.json": VerificationReport.load,
    "layers.json": lambda p: load_layer_table(p, "m"),
    "manifest.json": lambda p: check_manifest(p.parent),
}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def loads_or_refuses(name: str, payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(payload)
        try:
            OWNERS[name](path)
        except PipelineError as exc:
            assert "\n" not in str(exc) and name in str(exc), str(exc)


@pytest.mark.parametrize("name", sorted(OWNERS))
@SETTINGS
@given(value=JSON | RECORD_LIKE)
def test_any_json_value_is_loaded_or_refused_in_one_line(name, value):
    loads_or_refuses(name, json.dumps(value).encode())


@pytest.mark.parametrize("name", sorted(OWNERS))
@SETTINGS
@given(data=st.binary(max_size=64))
def test_any_bytes_are_loaded_or_refused_in_one_line(name, data):
    loads_or_refuses(name, data)


@SETTINGS
@given(value=JSON | RECORD_LIKE)
def test_any_stages_json_is_read_or_dropped_with_a_reason(value):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stages.json"
        path.write_text(json.dumps(value))
        records, dropped = StageRecords.load(path)
        if dropped:  # dropped: empty records, and one line naming the file
            assert (records.stages, records.in_progress) == ({}, {})
            assert str(path) in dropped and "\n" not in dropped
        else:  # read as it is
            assert (value["stages"], value.get("in_progress", {})) == (records.stages, records.in_progress)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=256))
def test_any_bytes_as_a_weights_file_are_refused_in_one_line(data):
    from pipeline.recipe.weight_files import read_weight_file

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pth"
        path.write_bytes(data)
        with pytest.raises(PipelineError) as raised:
            read_weight_file(path)
        assert str(path) in str(raised.value) and "\n" not in str(raised.value)
