"""Can TensorRT's ONNX parser read a graph? Checked on CPU, before any GPU work.

The table (onnx_operators.json) is onnx-tensorrt's docs/operators.md at each release branch:
the operators marked supported and the opset range the page states, with the commit it was read
from. A TensorRT newer than the newest row is checked against that row (operators are added
between releases, not removed; newer pages allow higher opsets, so a graph passing the newest row
passes later parsers too). The check is about what the parser accepts, not about every attribute
restriction the page lists: TensorRT still names those when it parses.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pipeline.errors import PipelineError

TABLE = Path(__file__).with_name("onnx_operators.json")
MIN_VERSION = (10, 0)  # docs/tensorrt.md, "Versions": why not 8.x
ONNX_DOMAINS = ("", "ai.onnx")


@lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    return json.loads(TABLE.read_text())["versions"]


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def table_row(version: tuple[int, int]) -> tuple[str, dict]:
    """(table version, row) of the newest table row not newer than `version`."""
    rows = sorted(_table(), key=_key)
    usable = [row for row in rows if _key(row) <= tuple(version)]
    if not usable:
        raise PipelineError(
            f"TensorRT {version[0]}.{version[1]} is older than every row of {TABLE.name} "
            f"(oldest {rows[0]}); this pipeline needs TensorRT >= {MIN_VERSION[0]}.{MIN_VERSION[1]}"
        )
    return usable[-1], _table()[usable[-1]]


def graph_opset_and_ops(onnx_path: Path) -> tuple[int, dict[str, str]]:
    """(default-domain opset, op type -> first node of that type); ops of other domains as "domain::Op"."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    opset = max((entry.version for entry in model.opset_import if entry.domain in ONNX_DOMAINS), default=0)
    ops: dict[str, str] = {}
    for index, node in enumerate(model.graph.node):
        op = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
        ops.setdefault(op, node.name or f"{node.op_type}_{index}")
    return opset, ops


def parser_problems(onnx_path: Path, version: tuple[int, int]) -> list[str]:
    """What the ONNX parser of TensorRT `version` cannot read in `onnx_path`, one phrase each ([] when none)."""
    row_version, row = table_row(version)
    opset, ops = graph_opset_and_ops(onnx_path)
    low, high = row["opset"]
    problems = []
    if not low <= opset <= high:
        problems.append(f"opset {opset} (the TensorRT {row_version} parser reads opsets {low}..{high})")
    supported = set(row["supported"])
    problems += [f"{op} (node {node!r})" for op, node in ops.items() if op not in supported]
    return problems


def check_parsable(onnx_paths: list[Path], version: tuple[int, int], target: str) -> None:
    """One `error:` line naming every operator/opset the target parser cannot read, before any GPU work."""
    row_version, row = table_row(version)
    for path in onnx_paths:
        problems = parser_problems(path, version)
        if problems:
            raise PipelineError(
                f"TensorRT cannot parse {path.name} for {target}: {'; '.join(problems)} (onnx-tensorrt "
                f"{row_version} operator table, commit {row['commit'][:12]}); export the model without "
                "them, or build with --backend onnxruntime"
            )
