"""`engine`: pretrain (demo only), train-masks, bake, export, build, verify — skipping unchanged stages.

Every stage function is called directly with a copy of the resolved recipe and the stage's
Options defaults (plus --resume/--force/--junit where the plan says), so a stage runs exactly as
by hand. engines/<model>/stages.json keeps, per stage,
a hash of its inputs (the recipe sections it reads, sha256 of its input files, where the
dense weights come from, the dataset's fingerprint for the stages that read data) and the sha256
of each output (paths relative to the model folder, so the folder can be moved). A stage is skipped when its input
hash is unchanged and every recorded output still exists with its recorded hash.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.args import add_backend_argument, add_junit_argument
from pipeline.backends.build_report import VARIANTS, BuildReport
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, sha256_file
from pipeline.paths import ArtifactPaths, relative_to_root
from pipeline.recipe.config import Recipe
from pipeline.records import StageRecords
from pipeline.stages import load_stage, run_stage

STAGE_ORDER = ["pretrain", "train-masks", "bake", "export", "build", "verify"]
MODEL_FIELDS = ("name", "arch", "num_classes", "input_shape", "classifier")


RECORDS_CONFIG = False  # each stage it runs records config.json
GROUPS_WRITES = False  # each stage it runs is a set of its own; stages.json outlives a failed stage


@dataclass
class Options:
    force: bool = False
    backend: str | None = field(default=None, metadata={"recipe": "build.backend"})
    junit: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rerun every stage even when its inputs did not change")
    add_backend_argument(parser, "passed to build")
    add_junit_argument(parser, "passed to verify")


def file_digest(path: Path) -> str:
    return sha256_file(path) if Path(path).is_file() else f"missing:{path}"


def weights_identity(recipe, paths) -> str:
    """Where the dense weights come from, as a value that changes when they change."""
    source = recipe.weights
    if source == "pretrain":
        return "pretrain:" + file_digest(paths.dense_weights)
    if source in ("random", "torchvision", "hub"):
        return f"{source}:{recipe.arch}"
    return "file:" + file_digest(Path(source))


def combine(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    def __init__(
        self,
        name: str,
        inputs: Callable[[], dict[str, Any]],
        outputs: Callable[[], list[Path]],
        extra: Callable[[bool], dict[str, Any]] = lambda rerun: {},
    ) -> None:
        self.name, self.inputs, self.outputs, self.extra = name, inputs, outputs, extra


def stage_plan(recipe: Recipe, paths: ArtifactPaths, options: Options) -> list[Stage]:
    digest = recipe.digest

    @functools.cache
    def dataset() -> str:
        """The dataset's contents (changed val images change verify's inputs), computed once per run."""
        from pipeline.data.datasets import dataset_fingerprint

        return dataset_fingerprint(recipe)

    def onnx_files() -> list[Path]:
        files = [paths.dense_onnx, paths.sparse_onnx]
        if recipe.export.fp16:
            files += [paths.dense_onnx_fp16, paths.sparse_onnx_fp16]
        if recipe.build.precision == "int8":
            files += [paths.int8_onnx("dense"), paths.int8_onnx("sparse")]
        return files

    def export_inputs() -> dict[str, Any]:
        parts = {
            "recipe": digest(*MODEL_FIELDS, "export"),
            "weights": weights_identity(recipe, paths),
            "sparse.pt": file_digest(paths.sparse_weights),
            "masks.pt": file_digest(paths.masks),
        }
        if recipe.build.precision == "int8":
            parts["int8_calibration"] = [digest("data", "preprocess"), dataset()]
        return parts

    def bake_inputs() -> dict[str, Any]:
        parts = {
            "recipe": digest(*MODEL_FIELDS, "masks"),
            "weights": weights_identity(recipe, paths),
            "masks.ckpt": file_digest(paths.mask_checkpoint),
        }
        if recipe.masks.bn_reestimate_images:  # BatchNorm statistics re-estimated on training images
            parts["bn_reestimation"] = [digest("data", "preprocess"), dataset()]
        return parts

    def engine_files() -> list[Path]:
        if not paths.build_report.is_file():
            return [paths.build_report]
        build = BuildReport.load(paths.build_report, recipe.name)
        return [paths.build_report] + [build.engine_path(variant, paths.root) for variant in VARIANTS]

    plan = []
    if recipe.weights == "pretrain":
        plan.append(
            Stage(
                "pretrain",
                lambda: {"recipe": digest(*MODEL_FIELDS, "data", "preprocess", "pretrain"), "dataset": dataset()},
                lambda: [paths.dense_weights],
                lambda rerun: {"force": rerun},
            )
        )
    plan += [
        Stage(
            "train-masks",
            lambda: {
                "recipe": digest(*MODEL_FIELDS, "data", "preprocess", "masks"),
                "weights": weights_identity(recipe, paths),
                "dataset": dataset(),
            },
            lambda: [paths.mask_checkpoint, paths.mask_training, paths.layers],
        ),
        Stage("bake", bake_inputs, lambda: [paths.masks, paths.sparse_weights, paths.bake_report]),
        Stage("export", export_inputs, lambda: onnx_files() + [paths.export_report]),
        Stage(
            "build",
            lambda: {
                "recipe": digest(*MODEL_FIELDS, "build"),
                **{path.name: file_digest(path) for path in onnx_files()},
            },
            engine_files,
        ),
        Stage(
            "verify",
            lambda: {
                "recipe": digest(*MODEL_FIELDS, "data", "preprocess", "verify"),
                "dataset": dataset(),
                "build.json": file_digest(paths.build_report),
                "layers.json": file_digest(paths.layers),
                "masks.pt": file_digest(paths.masks),
                "junit": options.junit,
            },
            lambda: [paths.report_json, paths.report_md],
            lambda rerun: {"junit": options.junit},
        ),
    ]
    return plan


def up_to_date(record: dict[str, Any] | None, input_hash: str, root: Path) -> bool:
    if not record or record.get("inputs") != input_hash:
        return False
    outputs = record.get("outputs") or {}
    return bool(outputs) and all(
        isinstance(digest, str) and (root / path).is_file() and sha256_file(root / path) == digest
        for path, digest in outputs.items()
    )


def load_records(paths: ArtifactPaths) -> StageRecords:
    """stages.json, or empty records when it is damaged (said in one `warning:` line: it is rebuilt)."""
    records, dropped = StageRecords.load(paths.stages)
    if dropped:
        print(f"warning: {dropped}", file=sys.stderr, flush=True)
    return records


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    records = load_records(paths)
    # A stage killed mid-run left its checkpoint behind: rerun with the same inputs resumes it.
    checkpoints = {"pretrain": paths.pretrain_checkpoint, "train-masks": paths.mask_checkpoint}
    started = time.time()
    for stage in stage_plan(recipe, paths, options):
        parts = stage.inputs()
        input_hash = combine(parts)
        record = records.stages.get(stage.name)
        if not options.force and up_to_date(record, input_hash, paths.root):
            print(f"== {stage.name}: up to date (inputs unchanged, outputs intact), skipped", flush=True)
            continue
        why = (
            "--force"
            if options.force
            else (
                "no record"
                if not record
                else "inputs changed"
                if record.get("inputs") != input_hash
                else "outputs missing or changed"
            )
        )
        resume = (
            not options.force
            and stage.name in checkpoints
            and checkpoints[stage.name].is_file()
            and records.in_progress.get(stage.name) == input_hash
        )
        print(f"== {stage.name}: {'resuming' if resume else 'running'} ({why})", flush=True)
        stage_started = time.time()
        code = run_planned_stage(stage, recipe, paths, records, input_hash, record is not None or options.force, resume)
        if code != 0:
            print(f"== {stage.name} exited with {code}; stopping", flush=True)
            return code
        records.stages[stage.name] = {
            "inputs": input_hash,
            "input_parts": parts,
            "outputs": {
                relative_to_root(path, paths.root): sha256_file(path)
                for path in stage.outputs()
                if Path(path).is_file()
            },
            "seconds": round(time.time() - stage_started, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        records.save(paths.stages)
    print(f"engine: all stages done in {time.time() - started:.0f}s; report {paths.report_md}")
    return 0


def run_planned_stage(
    stage: Stage,
    recipe: Recipe,
    paths: ArtifactPaths,
    records: StageRecords,
    input_hash: str,
    rerun: bool,
    resume: bool,
) -> int:
    """Run one stage with its in-progress mark in stages.json (so a killed run resumes). A stage refusing its
    input (PipelineError) ran no work: stages.json is put back as it was, byte for byte."""
    before = paths.stages.read_bytes() if paths.stages.is_file() else None
    previous = records.in_progress.get(stage.name)
    records.in_progress[stage.name] = input_hash
    records.save(paths.stages)
    module = load_stage(stage.name)
    stage_options = module.Options(**stage.extra(rerun), **({"resume": True} if resume else {}))
    try:
        code = run_stage(module, copy.deepcopy(recipe), paths, stage_options)
    except PipelineError:
        restore_records(paths, records, stage.name, previous, before)
        raise
    except BaseException:
        # A failed stage changed no artifact: the previous record (if any) still describes them. Its inputs
        # differ from this run's unless --force, so the next run repeats the stage either way.
        records.save(paths.stages)
        print(f"== {stage.name} failed; stopping", flush=True)
        raise
    if code != 0:
        records.save(paths.stages)
    else:
        records.in_progress.pop(stage.name, None)
    return code


def restore_records(
    paths: ArtifactPaths, records: StageRecords, name: str, previous: str | None, before: bytes | None
) -> None:
    if previous is None:
        records.in_progress.pop(name, None)
    else:
        records.in_progress[name] = previous
    if before is None:
        paths.stages.unlink(missing_ok=True)
    else:
        with atomic_path(paths.stages) as tmp:
            tmp.write_bytes(before)
