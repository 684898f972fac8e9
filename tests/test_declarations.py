"""Every stage declares what it reads, writes and depends on (pipeline/declaration.py), and does only that.

The product stages run here on tiny_resnet (pretrained by the pipeline, so pretrain runs too); every file each
one opens or renames and every recipe field it reads is recorded (an audit hook for the files, a recording
`__getattribute__` on the recipe's dataclasses for the fields) and compared with its declaration. A stage that
starts reading a file, or a recipe field, that its declaration does not name fails here: engine's cache keys and
the transaction's scope, which come from the declarations, would miss it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import typing
from pathlib import Path

import pytest

from pipeline.declaration import ALL_FIELDS, StageDeclaration, StageRun, covers, weight_files
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.resolve import ModelOptions, resolve_recipe
from pipeline.stages import STAGES, engine_stages, load_stage, run_stage, stage_summaries

MODULES = {name: load_stage(name) for name in STAGES}


def test_every_stage_module_declares_itself():
    for name, module in MODULES.items():
        declaration = module.DECLARATION
        assert isinstance(declaration, StageDeclaration), name
        options = {item.name for item in dataclasses.fields(module.Options)}
        assert set(declaration.options) <= options, (name, set(declaration.options) - options)


def test_help_reads_kind_and_help_from_the_declarations_without_importing_them():
    summaries = stage_summaries()
    assert summaries == {name: (module.DECLARATION.kind, module.DECLARATION.help) for name, module in MODULES.items()}
    lab = {name for name, (kind, _) in summaries.items() if kind == "lab"}
    assert lab == {"compare", "updatable", "certify", "curves", "bench-train", "bench-masks", "gpu-check"}


def test_help_lists_product_stages_apart_from_lab_stages(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    product, lab = text.split("lab stages")
    assert "  engine " in product and "  package " in product and "  compare " not in product
    assert "  compare " in lab and "  gpu-check " in lab and "  engine " not in lab


def test_a_declaration_refuses_what_it_cannot_mean():
    with pytest.raises(ValueError, match="reads"):
        StageDeclaration(help="x", reads=("no_such_artifact",))
    with pytest.raises(ValueError, match="recipe"):
        StageDeclaration(help="x", recipe=("masks.no_such_field",))
    with pytest.raises(ValueError, match="kind"):
        StageDeclaration(help="x", kind="research")


def test_engine_runs_the_in_engine_stages_in_an_order_their_data_flow_allows(tmp_path):
    from pipeline.stages.engine import Options, stage_plan

    recipe = resolve_recipe(ModelOptions(model="tiny_resnet", out=str(tmp_path), weights="pretrain"))
    paths = ArtifactPaths.for_model(tmp_path, recipe.name)
    names = [stage.name for stage in stage_plan(recipe, paths, Options())]
    assert names == [name for name, module in MODULES.items() if module.DECLARATION.in_engine]
    assert engine_stages() == names  # read from the sources: engine imports only the stages it runs
    written: set[Path] = set()
    producers = {
        path for name in names for path in StageRun(MODULES[name].DECLARATION, recipe, paths, None).write_paths()
    }
    for name in names:
        run = StageRun(MODULES[name].DECLARATION, recipe, paths, MODULES[name].Options())
        needed = set(run.read_paths()) | set(weight_files(recipe, paths) if run.reads_weights() else [])
        # what a stage reads and another engine stage writes is written before it
        assert (needed & producers) - set(run.write_paths()) <= written, name
        written |= set(run.write_paths())
    random = resolve_recipe(ModelOptions(model="tiny_resnet", out=str(tmp_path)))
    assert "pretrain" not in [stage.name for stage in stage_plan(random, paths, Options())]


def _pretrain_key(recipe, paths):
    from pipeline.stages.engine import Options, combine, stage_plan

    stage = next(stage for stage in stage_plan(recipe, paths, Options()) if stage.name == "pretrain")
    return combine(stage.inputs())


def test_the_split_pretraining_leaves_out_is_part_of_its_key(tmp_path):
    """issue 33: pretraining trains on the images mask training does not validate on; a new split must retrain."""
    paths = ArtifactPaths.for_model(tmp_path, "tiny_resnet")

    def key(*overrides):
        options = ModelOptions(model="tiny_resnet", out=str(tmp_path), weights="pretrain", overrides=list(overrides))
        return _pretrain_key(resolve_recipe(options), paths)

    base = key()
    for override in ("masks.seed=1", "masks.validation_images=10", "masks.train_images=64", "pretrain.lr=0.1"):
        assert key(override) != base, override
    assert key("masks.lr=0.3") == base and key("verify.latency_iters=3") == base  # what pretraining never reads


# ---- what each product stage really touches


class Trace:
    """Files opened, renamed or removed, and recipe fields read, while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.reads: set[Path] = set()
        self.writes: set[Path] = set()
        self.fields: set[str] = set()
        self.paused = 0

    def file_event(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] or 0
            writing = (
                any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
            )
            (self.writes if writing else self.reads).add(_absolute(args[0]))
        elif event in ("os.rename", "os.remove", "shutil.rmtree", "os.rmdir"):
            for path in args[:2] if event == "os.rename" else args[:1]:
                if isinstance(path, (str, bytes, os.PathLike)):
                    self.writes.add(_absolute(path))

    def field_read(self, key: str) -> None:
        if self.active and not self.paused:
            self.fields.add(key)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def _absolute(path) -> Path:
    return Path(os.fsdecode(path)).absolute()


TRACE = Trace()
sys.addaudithook(lambda event, args: TRACE.file_event(event, args))  # audit hooks stay; TRACE.active gates it


class RecordingDict(dict):
    """Recipe.to_dict() while tracing: a section taken out of it is a read of that section."""

    def __getitem__(self, key):
        TRACE.field_read(key)
        return super().__getitem__(key)


def _record_recipe_reads(monkeypatch) -> None:
    hints = typing.get_type_hints(Recipe)
    sections = {cls: name for name, cls in hints.items() if dataclasses.is_dataclass(cls)}
    top = {item.name for item in dataclasses.fields(Recipe)} - set(sections.values())

    def recipe_get(self, name):
        if name in top:
            TRACE.field_read(name)
        return object.__getattribute__(self, name)

    def section_getter(section: str, names: set[str]):
        def get(self, name):
            if name in names:
                TRACE.field_read(f"{section}.{name}")
            return object.__getattribute__(self, name)

        return get

    monkeypatch.setattr(Recipe, "__getattribute__", recipe_get)
    for cls, section in sections.items():
        monkeypatch.setattr(cls, "__getattribute__", section_getter(section, {f.name for f in dataclasses.fields(cls)}))
    to_dict, digest = Recipe.to_dict, Recipe.digest

    def recording_to_dict(self):
        with TRACE.pause():
            return RecordingDict(to_dict(self))

    def recording_digest(self, *named):
        for key in named or (ALL_FIELDS,):
            TRACE.field_read(key)
        with TRACE.pause():
            return digest(self, *named)

    monkeypatch.setattr(Recipe, "to_dict", recording_to_dict)
    monkeypatch.setattr(Recipe, "digest", recording_digest)
    import pipeline.recipe.resolve as resolve

    write_config = resolve.write_config

    def unrecorded_write_config(recipe, paths):  # config.json holds the whole recipe: that is run_stage's read
        with TRACE.pause():
            write_config(recipe, paths)

    monkeypatch.setattr(resolve, "write_config", unrecorded_write_config)
    for module in MODULES.values():
        if getattr(module, "write_config", None) is write_config:
            monkeypatch.setattr(module, "write_config", unrecorded_write_config)


PRODUCT = ["pretrain", "train-masks", "bake", "export", "build", "verify", "package", "layers"]
FAST = [
    "pretrain.epochs=1",
    "pretrain.batch_size=32",
    "masks.steps=2",
    "masks.validation_images=16",
    "verify.latency_iters=2",
    "verify.warmup_iters=0",
    "build.backend=onnxruntime",
]


def _visible(path: Path, root: Path) -> bool:
    """Under ROOT's parent (the --out folder) and no temporary, staging folder, journal or lock."""
    try:
        relative = path.relative_to(root.parent.absolute())
    except ValueError:
        return False
    return not any(part.startswith(".") for part in relative.parts)


def _covered(path: Path, declared: set[Path]) -> bool:
    return any(path == item or item in path.parents for item in declared)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    out = tmp_path_factory.mktemp("declared") / "engines"
    recipe = resolve_recipe(ModelOptions(model="tiny_resnet", out=str(out), weights="pretrain", overrides=FAST))
    paths = ArtifactPaths.for_model(out, recipe.name)
    found = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        _record_recipe_reads(monkeypatch)
        for name in PRODUCT:
            module = MODULES[name]
            options = module.Options()
            stage_recipe = copy.deepcopy(recipe)
            TRACE.__init__()
            TRACE.active = True
            try:
                code = run_stage(module, stage_recipe, paths, options)
            finally:
                TRACE.active = False
            assert code == 0, name
            found[name] = (
                StageRun(module.DECLARATION, recipe, paths, options),
                set(TRACE.reads),
                set(TRACE.writes),
                set(TRACE.fields),
            )
        module = MODULES["check-manifest"]  # no recipe: it checks a folder (its declaration resolved on it)
        options = module.Options(dir=str(paths.root))
        TRACE.__init__()
        TRACE.active = True
        try:
            assert module.run(options) == 0
        finally:
            TRACE.active = False
        found["check-manifest"] = (StageRun(module.DECLARATION, recipe, paths, options), *traced_sets())
    return paths, found


def traced_sets() -> tuple[set[Path], set[Path], set[str]]:
    """What the trace holds: files read, files written, recipe fields read."""
    return set(TRACE.reads), set(TRACE.writes), set(TRACE.fields)


@pytest.mark.parametrize("name", PRODUCT + ["check-manifest"])
def test_a_stage_touches_only_the_files_it_declares(traced, name):
    paths, found = traced
    run, reads, writes, _ = found[name]
    root = paths.root.absolute()
    declared_writes = {path.absolute() for path in run.scope()}
    declared_reads = {path.absolute() for path in run.read_paths()} | declared_writes
    if run.reads_weights():
        declared_reads |= {path.absolute() for path in weight_files(run.recipe, paths)}
    if run.reads_data() and run.recipe.data.root:
        declared_reads.add(Path(run.recipe.data.root).absolute())
    written = {path for path in writes if _visible(path, root) and path != root}
    read = {path for path in reads if _visible(path, root)}
    assert written or not run.declaration.writes, f"{name} wrote nothing the trace saw"
    assert sorted(str(p) for p in written if not _covered(p, declared_writes)) == [], f"{name} writes undeclared"
    assert sorted(str(p) for p in read if not _covered(p, declared_reads)) == [], f"{name} reads undeclared"


@pytest.mark.parametrize("name", PRODUCT)
def test_a_stage_reads_only_the_recipe_fields_it_declares(traced, name):
    _, found = traced
    run, _, _, fields = found[name]
    keys = run.recipe_keys()
    assert fields, f"{name}: no recipe read recorded"
    assert sorted(field for field in fields if not covers(keys, field)) == [], f"{name} depends on undeclared fields"


def test_the_checks_catch_an_undeclared_read_and_field(traced):
    """The comparison can fail: pretrain's declaration without the split's fields, or bake's without masks.pt."""
    paths, found = traced
    run, _, _, fields = found["pretrain"]
    narrowed = [key for key in run.recipe_keys() if not key.startswith("masks.")]
    assert [field for field in fields if not covers(narrowed, field)]
    run, reads, _, _ = found["export"]
    assert paths.masks.absolute() in reads and not _covered(paths.masks.absolute(), {paths.sparse_weights.absolute()})


def test_a_build_failing_on_its_second_engine_leaves_the_first_as_it_was(traced, monkeypatch):
    """No hand-kept rollback in build: the stage's transaction puts back the dense engine it had replaced."""
    from pipeline.backends.onnxruntime import OnnxRuntimeBackend
    from pipeline.errors import PipelineError

    paths, _ = traced
    folder = paths.root / "onnxruntime"
    before = {p.name: p.read_bytes() for p in folder.iterdir()} | {"build.json": paths.build_report.read_bytes()}
    original = OnnxRuntimeBackend.build

    def fails_on_sparse(self, onnx_path, engine_dir, variant, config, spec, sparse):
        if variant == "sparse":
            raise PipelineError("the sparse engine failed to build")
        return original(self, onnx_path, engine_dir, variant, config, spec, sparse)

    monkeypatch.setattr(OnnxRuntimeBackend, "build", fails_on_sparse)
    recipe = resolve_recipe(
        ModelOptions(model="tiny_resnet", out=str(paths.root.parent), weights="pretrain", overrides=FAST)
    )
    with pytest.raises(PipelineError, match="sparse engine"):
        run_stage(MODULES["build"], recipe, paths, MODULES["build"].Options())
    after = {p.name: p.read_bytes() for p in folder.iterdir()} | {"build.json": paths.build_report.read_bytes()}
    assert after == before
