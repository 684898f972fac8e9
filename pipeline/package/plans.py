"""Find the TensorRT plans the build stage wrote, with their engine metadata.

The build stage (and the TensorRT backend) write each engine with a metadata JSON next
to it; build.json may also list engines. Both are read, tolerantly, because a plan's
compute capability, I/O tensors and batch range can only come from that metadata here
(reading a plan itself needs TensorRT and a GPU).

Metadata keys read (any spelling listed):
  compute capability: compute_capability | cc | sm, as "8.6", [8, 6], 8.6, "sm_86" or 86
                      (also inside a "gpu" / "device" object)
  I/O tensors:        inputs / outputs: [{"name", "dtype", "shape"}] (else the ONNX named by
                      onnx | onnx_path | source_onnx, which the TensorRT backend records)
  integrity:          engine_sha256 (or sha256 in build.json): the plan must still match it
  batch range:        max_batch | max_batch_size | batch.max (else recipe.build.max_batch)
  precision:          precision (used to choose between two plans of one variant)
  TensorRT version:   tensorrt_version (a plan runs only on the TensorRT release that built it)
  hardware level:     hardware_compatibility (none | ampere_plus | same_compute_capability)

A plan loads only in the TensorRT version that built it (major.minor.patch; engines built with
VERSION_COMPATIBLE aside, which this pipeline does not build). Triton's TensorRT backend is the
TensorRT of its container release, so packaging for a release whose TensorRT differs is refused
(`check_triton_release`, table `TRITON_TENSORRT`, also in docs/tensorrt.md).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import sha256_file
from pipeline.package.tensors import TensorSpec, specs_from_metadata, specs_from_onnx
from pipeline.triton_releases import TRITON_TENSORRT

PLAN_SUFFIXES = (".plan", ".engine", ".trt")
VARIANTS = ("dense", "sparse")
_CC_KEYS = ("compute_capability", "cc", "sm")
_ONNX_KEYS = ("onnx", "onnx_path", "source_onnx")


@dataclass
class PlanEngine:
    variant: str
    path: Path
    metadata: dict[str, Any]
    compute_capability: str  # "8.6"

    def tensor_specs(self, root: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        where = f"engine metadata of {self.path}"
        if "inputs" in self.metadata and "outputs" in self.metadata:
            return specs_from_metadata(self.metadata, where)
        for key in _ONNX_KEYS:
            if isinstance(self.metadata.get(key), str):
                onnx_path = Path(self.metadata[key])
                return specs_from_onnx(onnx_path if onnx_path.is_absolute() else _resolve(root, onnx_path))
        raise PipelineError(f"{where} has neither inputs/outputs nor the ONNX it was built from; rebuild with "
                            "the build stage or package ONNX with --format onnx")

    @property
    def tensorrt_version(self) -> str | None:
        version = self.metadata.get("tensorrt_version")
        return str(version) if version else None

    @property
    def hardware_compatibility(self) -> str:
        return str(self.metadata.get("hardware_compatibility", "none"))

    def min_batch(self) -> int | None:
        batch = self.metadata.get("batch")
        if isinstance(batch, dict) and isinstance(batch.get("min"), int):
            return batch["min"]
        return self.metadata.get("min_batch") if isinstance(self.metadata.get("min_batch"), int) else None

    def max_batch(self) -> int | None:
        for key in ("max_batch", "max_batch_size"):
            if isinstance(self.metadata.get(key), int):
                return self.metadata[key]
        batch = self.metadata.get("batch")  # the TensorRT backend writes {"min", "opt", "max"}
        if isinstance(batch, dict) and isinstance(batch.get("max"), int):
            return batch["max"]
        return None


def _resolve(root: Path, path: Path) -> Path:
    """Paths in build.json are relative to the model folder or to the working directory of the build
    (engines/<model>/...); when neither exists, the file of that name in the model folder."""
    for candidate in (root / path, path, root / path.name):
        if candidate.exists():
            return candidate
    return root / path


def normalise_cc(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value // 10}.{value % 10}" if value >= 10 else f"{value}.0"
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("sm_").removeprefix("sm")
        if re.fullmatch(r"\d+\.\d+", text):
            return text
        if re.fullmatch(r"\d{2,3}", text):
            return f"{text[:-1]}.{text[-1]}"
    return None


def compute_capability(meta: dict[str, Any]) -> str | None:
    for holder in (meta, meta.get("gpu"), meta.get("device")):
        if isinstance(holder, dict):
            for key in _CC_KEYS:
                if key in holder and (cc := normalise_cc(holder[key])) is not None:
                    return cc
    return None


def _variant(path: Path, context: dict[str, Any], trail: list[str]) -> str | None:
    if context.get("variant") in VARIANTS:
        return context["variant"]
    for key in reversed(trail):
        if key in VARIANTS:
            return key
    for variant in VARIANTS:
        if path.name.startswith(variant):
            return variant
    return None


def _metadata_file(path: Path) -> dict[str, Any]:
    for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json"),
                      path.with_suffix(".meta.json"), path.with_suffix(".metadata.json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise PipelineError(f"engine metadata {candidate} is not valid JSON; rebuild the engine") from None
            if isinstance(data, dict):
                return data
    return {}


def _from_build_report(root: Path, report: Any) -> list[tuple[Path, dict[str, Any], list[str]]]:
    """(engine path, the object that named it, key trail) for every plan path build.json mentions."""
    found = []

    def walk(node: Any, trail: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and value.endswith(PLAN_SUFFIXES):
                    found.append((_resolve(root, Path(value)), node, trail + [str(key)]))
                else:
                    walk(value, trail + [str(key)])
        elif isinstance(node, list):
            for item in node:
                walk(item, trail)

    walk(report, [])
    return found


def find_plans(root: Path, build_report: Path, precision: str,
               triton_release: str | None = None) -> dict[str, list[PlanEngine]]:
    """variant -> plans (one per compute capability) found via build.json and next to the ONNX files.

    With `triton_release`, every plan must have been built by that release's TensorRT.
    """
    root = Path(root)
    candidates: dict[Path, tuple[dict[str, Any], list[str]]] = {}
    if build_report.is_file():
        try:
            report = json.loads(build_report.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PipelineError(f"{build_report} is not valid JSON; rerun the build stage") from None
        for path, context, trail in _from_build_report(root, report):
            candidates.setdefault(path.resolve(), (context, trail))
    for pattern in ("*", "*/*"):
        for path in sorted(root.glob(pattern)):
            if path.suffix in PLAN_SUFFIXES and path.is_file() and "triton" not in path.relative_to(root).parts:
                candidates.setdefault(path.resolve(), ({}, []))

    plans: dict[str, dict[str, list[PlanEngine]]] = {variant: {} for variant in VARIANTS}
    for path, (context, trail) in candidates.items():
        if not path.is_file():
            continue  # build.json names an engine that was since removed
        variant = _variant(path, context, trail)
        if variant is None:
            continue
        meta: dict[str, Any] = dict(context)
        if isinstance(context.get("metadata"), dict):
            meta.update(context["metadata"])
        meta.update(_metadata_file(path))
        expected = meta.get("engine_sha256") or context.get("sha256")
        if isinstance(expected, str) and sha256_file(path) != expected:
            raise PipelineError(f"{path} differs from the engine the build stage wrote (sha256 in its metadata); "
                                "it was replaced or damaged: rerun the build stage")
        cc = compute_capability(meta)
        if cc is None:
            raise PipelineError(f"no compute capability in the metadata of {path} (looked for {', '.join(_CC_KEYS)} "
                                f"in {path.stem}.json and build.json); rebuild it or package with --format onnx")
        plans[variant].setdefault(cc, []).append(PlanEngine(variant, path, meta, cc))

    chosen: dict[str, list[PlanEngine]] = {}
    for variant, by_cc in plans.items():
        for cc, engines in sorted(by_cc.items()):
            if len(engines) > 1:
                engines = [e for e in engines if str(e.metadata.get("precision", "")).lower() == precision] or engines
            if len(engines) > 1:
                names = ", ".join(str(e.path) for e in engines)
                raise PipelineError(f"{variant}: several plans for compute capability {cc} ({names}); delete the "
                                    "stale ones or rerun the build stage")
            chosen.setdefault(variant, []).append(engines[0])
    if triton_release is not None:
        check_triton_release(chosen, triton_release)
    return chosen


def _release_of(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def check_triton_release(plans: dict[str, list[PlanEngine]], release: str) -> None:
    """Refuse plans that the TensorRT of Triton container `release` (e.g. "24.08") cannot load."""
    if release not in TRITON_TENSORRT:
        known = ", ".join(sorted(TRITON_TENSORRT))
        raise PipelineError(f"Triton release {release!r} is not in the TensorRT version table (known: {known}); "
                            "add it to TRITON_TENSORRT in pipeline/triton_releases.py or package with --format onnx")
    served = TRITON_TENSORRT[release]
    for engines in plans.values():
        for engine in engines:
            built = engine.tensorrt_version
            if built is None:
                raise PipelineError(f"{engine.path} does not record the TensorRT version that built it; rebuild it "
                                    "with the build stage or package with --format onnx")
            if _release_of(built) != _release_of(served):
                raise PipelineError(f"{engine.path} was built by TensorRT {built}, but Triton {release} runs TensorRT "
                                    f"{served} and cannot load it: rebuild inside the Triton {release} container (or "
                                    f"with tensorrt=={served}.*), package for a release that ships {built}, or "
                                    "package with --format onnx")


def plan_filename(cc: str) -> str:
    """File name of a plan inside the Triton version folder: model.sm86.plan for 8.6."""
    return f"model.sm{cc.replace('.', '')}.plan"
