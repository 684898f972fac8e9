"""`engine`: every stage whose declaration says `in_engine` (pretrain for the demo, train-masks, bake, export,
build, verify), in the registry's order, skipping unchanged stages.

Every stage function is called directly with a copy of the resolved recipe and the stage's Options defaults (plus
the engine flags of the same name, --resume/--force where the plan says), so a stage runs exactly as by hand.
engines/<model>/stages.json keeps, per stage, a hash of its inputs and the sha256 of each output (paths relative to
the model folder, so the folder can be moved). Both come from the stage's declaration (pipeline/declaration.py):
the inputs are the recipe fields it names, the sha256 of every file it reads (its own outputs and checkpoint
aside), where the dense weights come from, the dataset's fingerprint and the options it names; the outputs are the
files it declares it writes. A stage is skipped when its input hash is unchanged and every recorded output still
exists with its recorded hash. No list of inputs is kept here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.args import add_backend_argument, add_junit_argument
from pipeline.declaration import StageDeclaration, StageRun, file_digest, recipe_values, weights_identity
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, sha256_file
from pipeline.paths import ArtifactPaths, relative_to_root
from pipeline.recipe.config import Recipe
from pipeline.records import StageRecords
from pipeline.stages import declaration_of, engine_stages, load_stage, run_stage

DECLARATION = StageDeclaration(
    help="run every stage, skipping those whose inputs did not change",
    reads=("stages",),
    writes=("stages",),
    recipe=("*",),
    options=("force", "junit"),
    groups_writes=False,  # each stage it runs is a set of its own; stages.json outlives a failed stage
)


@dataclass
class Options:
    force: bool = False
    backend: str | None = field(default=None, metadata={"recipe": "build.backend"})
    junit: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rerun every stage even when its inputs did not change")
    add_backend_argument(parser, "passed to build")
    add_junit_argument(parser, "passed to verify")


def combine(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """One planned stage: its module, its declaration, the Options engine runs it with."""

    def __init__(self, name: str, module: ModuleType, run: StageRun, dataset: Callable[[], str]) -> None:
        self.name, self.module, self.run, self.dataset = name, module, run, dataset
        self.declaration: StageDeclaration = run.declaration

    def inputs(self) -> dict[str, Any]:
        """What the stage's result depends on, from its declaration."""
        run = self.run
        parts: dict[str, Any] = {"recipe": recipe_values(run.recipe, run.recipe_keys())}
        files = run.input_files()
        if files:
            parts["files"] = {relative_to_root(path, run.paths.root): file_digest(path) for path in files}
        if run.reads_weights():
            parts["weights"] = weights_identity(run.recipe, run.paths)
        if run.reads_data():
            parts["dataset"] = self.dataset()
        options = {name: getattr(run.options, name) for name in self.declaration.options}
        if options:
            parts["options"] = options
        return parts

    def outputs(self) -> list[Path]:
        return self.run.output_files()

    def checkpoint(self) -> Path | None:
        return getattr(self.run.paths, self.declaration.checkpoint) if self.declaration.checkpoint else None

    def options(self, rerun: bool, resume: bool) -> Any:
        extra = {"force": True} if rerun and self.declaration.cached else {}
        return dataclasses.replace(self.run.options, **extra, **({"resume": True} if resume else {}))


def stage_options(module: ModuleType, options: Options) -> Any:
    """The stage's Options defaults, with the engine flags of the same name its declaration names."""
    names = {item for item in declaration_of(module).options if item in Options.__dataclass_fields__}
    return module.Options(**{name: getattr(options, name) for name in names})


def stage_plan(recipe: Recipe, paths: ArtifactPaths, options: Options) -> list[Stage]:
    """The stages engine runs for RECIPE: every registered stage declared `in_engine` that applies to it."""

    @functools.cache
    def dataset() -> str:
        """The dataset's contents (changed val images change verify's inputs), computed once per run."""
        from pipeline.data.datasets import dataset_fingerprint

        return dataset_fingerprint(recipe)

    plan = []
    for name in engine_stages():
        module = load_stage(name)
        declaration = declaration_of(module)
        if declaration.applies is None or declaration.applies(recipe):
            run = StageRun(declaration, recipe, paths, stage_options(module, options))
            plan.append(Stage(name, module, run, dataset))
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
        checkpoint = stage.checkpoint()  # a stage killed mid-run left it behind: the same inputs resume it
        resume = (
            not options.force
            and checkpoint is not None
            and checkpoint.is_file()
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
    try:
        code = run_stage(stage.module, copy.deepcopy(recipe), paths, stage.options(rerun, resume))
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
