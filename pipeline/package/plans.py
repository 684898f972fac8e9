"""The TensorRT plans the build stage wrote, read through their owners: build.json (`BuildReport`) and each
engine's sidecar (`EngineInfo`); nothing else is looked at (no stray `*.plan` files).

A plan loads only in the TensorRT version that built it, build number included (pipeline/triton_releases.py),
so packaging for a Triton release whose TensorRT differs is refused (`check_triton_release`).
A plan built with hardware_compatibility=ampere_plus runs on every Ampere or newer GPU: it is registered
under every such compute capability and as the model's default file (`served_filenames`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.backends.build_report import VARIANTS, BuildReport
from pipeline.backends.tensorrt.info import EngineInfo
from pipeline.errors import PipelineError
from pipeline.package.tensors import TensorSpec, specs_from_onnx
from pipeline.triton_releases import FLAVOUR, RELEASES

__all__ = ["VARIANTS", "PlanEngine", "find_plans", "check_triton_release", "plan_filename", "served_filenames"]
# Compute capabilities of Ampere and newer GPUs (CUDA's list of GPUs: A100 8.0, GA10x 8.6, Orin 8.7, Ada 8.9,
# Hopper 9.0, Blackwell 10.0/10.3/11.0/12.0/12.1); a default_model_filename covers any later one.
AMPERE_PLUS_CCS = ("8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "11.0", "12.0", "12.1")


@dataclass
class PlanEngine:
    variant: str
    path: Path
    info: EngineInfo
    onnx: Path  # the graph the plan was built from (for its tensors)

    @property
    def metadata(self) -> dict:
        return self.info.to_dict()

    @property
    def compute_capability(self) -> str:
        return str(self.info.compute_capability)

    @property
    def tensorrt_version(self) -> str:
        return self.info.tensorrt_version

    @property
    def hardware_compatibility(self) -> str:
        return self.info.hardware_compatibility

    def tensor_specs(self, root: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return specs_from_onnx(self.onnx)

    def min_batch(self) -> int:
        return self.info.batch["min"]

    def max_batch(self) -> int:
        return self.info.batch["max"]


def find_plans(
    root: Path, build_report: Path, precision: str, triton_release: str | None = None
) -> dict[str, list[PlanEngine]]:
    """variant -> [plan] from build.json when the tensorrt backend wrote it; {} when there is none."""
    root = Path(root)
    if not Path(build_report).is_file():
        return {}
    report = BuildReport.load(Path(build_report), root.name)
    if report.backend != "tensorrt":
        return {}
    plans = {}
    for variant in VARIANTS:
        path = report.checked_engine(variant, root)
        info = EngineInfo.load(path)
        if info.compute_capability is None:
            raise PipelineError(
                f"{path} records no compute capability (built where torch saw no GPU); rebuild it "
                "on the GPU it is for, or package with --format onnx"
            )
        onnx = Path(report.engines[variant]["onnx"])
        plans[variant] = [PlanEngine(variant, path, info, onnx if onnx.is_absolute() else root / onnx)]
    if triton_release is not None:
        check_triton_release(plans, triton_release)
    return plans


def check_triton_release(plans: dict[str, list[PlanEngine]], release: str) -> None:
    """Refuse plans that the TensorRT of Triton container `release` (e.g. "24.08", `-py3` image) cannot load."""
    row = RELEASES.get(release)
    if row is None:
        raise PipelineError(
            f"Triton release {release!r} is not in the table of pipeline/triton_releases.py (known: "
            f"{', '.join(RELEASES)}); add it with its four-part TensorRT version, or package with "
            "--format onnx"
        )
    image = f"nvcr.io/nvidia/tritonserver:{release}-{FLAVOUR}"
    if row.tensorrt is None or not row.four_part:
        raise PipelineError(
            f"the TensorRT build number of {image} is not recorded (table: {row.tensorrt or 'unknown'}"
            "), and a plan loads only in the exact build: read it in that container (dpkg -l | grep "
            "libnvinfer), add it to pipeline/triton_releases.py, or package with --format onnx"
        )
    for engines in plans.values():
        for engine in engines:
            if engine.tensorrt_version.split(".")[:4] != row.tensorrt.split("."):
                raise PipelineError(
                    f"{engine.path} was built by TensorRT {engine.tensorrt_version}, but {image} runs "
                    f"TensorRT {row.tensorrt} and cannot load it: rebuild inside that container, "
                    "package for a release that ships the TensorRT that built it, or package with "
                    "--format onnx"
                )


def plan_filename(cc: str) -> str:
    """File name of a plan inside the Triton version folder: model.sm86.plan for 8.6."""
    return f"model.sm{cc.replace('.', '')}.plan"


def served_filenames(engines: list[PlanEngine]) -> tuple[dict[str, str], str]:
    """(cc_model_filenames, default_model_filename) for a model's plans: an ampere_plus plan under every
    Ampere+ compute capability and as the default; other plans under the compute capability they were built on."""
    by_cc: dict[str, str] = {}
    default = ""
    for engine in engines:
        filename = plan_filename(engine.compute_capability)
        if engine.hardware_compatibility == "ampere_plus":
            by_cc.update({cc: filename for cc in AMPERE_PLUS_CCS if cc not in by_cc})
            default = filename
        by_cc[engine.compute_capability] = filename
    return by_cc, default
