"""The inventory of readers (pipeline/artifacts.py) is complete: every read site under pipeline/ is registered,
every artifact of ArtifactPaths has one owner, and every owner named exists."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from pipeline.artifacts import (
    FILE_FAULTS,
    INVENTORY,
    JSON_FAULTS,
    TENSOR_FAULTS,
    WRITTEN_ONLY,
    allowed_sites,
    read_sites,
    unregistered_reads,
)
from pipeline.paths import ArtifactPaths

REPO = Path(__file__).resolve().parents[1]


def test_every_read_site_under_pipeline_is_in_the_inventory():
    assert unregistered_reads(REPO) == []


PLANTED = {
    "json": "import json\ndef peek(path):\n    return json.loads(open(path).read())\n",
    "torch": "import torch\nclass Cache:\n    def restore(self, path):\n        return torch.load(path)\n",
    "onnx": "import onnx\ndef graph(path):\n    return onnx.load(str(path)).graph\n",
    "image": "from PIL import Image\ndef size(path):\n    return Image.open(path).size\n",
    "toml": "import tomllib\ndef settings(path):\n    return tomllib.loads(path.read_text())\n",
    "binary": "def head(path):\n    with open(path, 'rb') as f:\n        return f.read(4)\n",
    "helper": "from pipeline.io import read_json\ndef notes(paths):\n    return read_json(paths.root / 'notes.json')\n",
    "bytes": "def raw(path):\n    return path.read_bytes()\n",
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_the_check_catches_a_planted_reader(tmp_path, kind):
    package = tmp_path / "pipeline"
    package.mkdir()
    (package / "planted.py").write_text(PLANTED[kind])
    problems = unregistered_reads(tmp_path)
    assert len(problems) >= 1 and all(p.startswith("pipeline.planted:") for p in problems), problems


def test_writes_and_registered_owners_are_not_flagged():
    source = (
        "import json\ndef save(path, obj):\n    with open(path, 'w') as f:\n        json.dump(obj, f)\n"
        "def log(path):\n    open(path, 'ab').write(b'x')\n"
    )
    assert read_sites(source, "pipeline.x") == []
    registered = next(iter(sorted(allowed_sites())))
    module, function = registered.split(":")
    assert all(
        site == registered
        for site, _, _ in read_sites(
            f"import json\ndef {function.split('.')[-1]}(p):\n    return json.loads(p.read_text())\n", module
        )
        if "." not in function
    )


def test_every_owner_and_site_named_exists():
    missing = []
    for site in sorted(allowed_sites()):
        module, qualname = site.split(":")
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(site)
                break
    assert missing == []


def test_every_artifact_path_has_exactly_one_owner():
    """issue 18: every artifact in ArtifactPaths has one reader/writer module; here each is enumerated."""
    names = [name for name, value in vars(ArtifactPaths).items() if isinstance(value, property)]
    assert len(names) >= 25
    for name in names:
        owners = [reader.owner for reader in INVENTORY if name in reader.paths]
        if name in WRITTEN_ONLY:
            assert owners == [], f"{name} is both read and listed as written only"
        else:
            assert len(owners) == 1, f"ArtifactPaths.{name}: owners {owners} (needs exactly one, or WRITTEN_ONLY)"
    declared = {path for reader in INVENTORY for path in reader.paths} | set(WRITTEN_ONLY)
    assert declared <= set(names), declared - set(names)


def test_the_inventory_is_a_table_of_known_faults():
    known = set(FILE_FAULTS + JSON_FAULTS + TENSOR_FAULTS) | {
        "toml_syntax",
        "wrong_type",
        "unknown_key",
        "pickled_module",
        "text_file",
        "not_an_image",
        "truncated_image",
    }
    for reader in INVENTORY:
        assert set(reader.faults) <= known, reader.file
        assert reader.faults or reader.note, f"{reader.file}: no fault applies and no note says why"
        if "key_missing" in reader.faults:
            assert reader.required, reader.file
    assert dataclasses.is_dataclass(INVENTORY[0])


def test_every_artifact_a_stage_declares_it_reads_is_in_the_inventory():
    """A stage that starts reading an artifact declares it; the artifact then needs its owner and faults here."""
    from pipeline.artifacts import declarations, stages_reading

    inventoried = {path for reader in INVENTORY for path in reader.paths}
    method_artifacts = {"int8_onnx", "engines"}  # graphs and engines: the ONNX and plan readers above
    for name, declaration in declarations().items():
        missing = declaration.artifact_names("reads") - inventoried - method_artifacts
        assert missing == set(), f"{name} reads {missing}, which the inventory does not list"
    masks = next(reader for reader in INVENTORY if reader.file == "masks.pt")
    readers = stages_reading(masks)
    assert {"export", "verify", "package"} <= set(readers) and "build" not in readers  # from the declarations
