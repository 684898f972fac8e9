"""What a stage reads, writes and depends on, declared once at the top of its module as `DECLARATION`.

Everything that used to be kept by hand beside the stages is computed from these declarations:
  * `engine`'s plan (the stages with `in_engine`, in the registry's order, where `applies(recipe)`) and each
    stage's cache key: the recipe fields it names, the sha256 of every file it reads, where the dense weights
    come from, the dataset's fingerprint, the options it names (pipeline/stages/engine.py);
  * the transaction's scope: a stage may write only the paths its `writes` resolve to (pipeline/transaction.py
    refuses any other write and rolls the stage back), and `config.json` is recorded exactly by the stages that
    declare the `config` artifact;
  * the read inventory's "which stages read this file" (pipeline/artifacts.py);
  * the stage list of `--help`, product stages apart from lab stages (pipeline/cli.py).
tests/test_declarations.py runs every product stage on tiny_resnet and fails when a stage opens a file, or reads
a recipe field, that its declaration does not name.

Artifacts are named as `ArtifactPaths` attributes ("masks", "dense_onnx"); an entry may also be a function
`(recipe, paths, options) -> paths` (files whose names depend on the run, e.g. the engines build.json lists), or
`when(predicate, *entries)`: entries that apply only when `predicate(recipe, options)` holds. A path that is a
folder in `writes` covers everything under it. Recipe keys are top-level fields (`weights`), whole sections
(`export`) or single fields (`masks.seed`), so a stage that reads three fields of a section depends on those
three only; `"*"` is the whole recipe. Declarations are checked when their module is imported (each field
carries its description and its validator, as the recipe's fields and ModelOpt's configs do).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("product", "lab")
ALL_FIELDS = "*"
# The model fields every stage of a recipe depends on (they shape the network): a shorthand for declarations.
MODEL = ("name", "arch", "num_classes", "input_shape", "classifier")

Resolver = Callable[[Any, Any, Any], Iterable[Path]]


@dataclass(frozen=True)
class When:
    """ENTRIES apply only when PREDICATE(recipe, options) holds."""

    predicate: Callable[[Any, Any], bool]
    entries: tuple[Any, ...]
    keyed: bool = True  # False: read, but not part of engine's cache key (see `record`)


def when(predicate: Callable[[Any, Any], bool], *entries: Any) -> When:
    return When(predicate, entries)


def record(*entries: Any) -> When:
    """A stage report read to check the files it lists (their sha256): those files are the inputs, so the report
    itself (its timings change with every run) stays out of engine's cache key."""
    return When(lambda recipe, options: True, entries, keyed=False)


def _artifact_names() -> set[str]:
    from pipeline.paths import ArtifactPaths

    return {name for name, value in vars(ArtifactPaths).items() if isinstance(value, property)} | set(
        _method_arguments()
    )


def _entries_ok(entries: Any) -> bool:
    if not isinstance(entries, tuple):
        return False
    names = _artifact_names()
    for entry in entries:
        if isinstance(entry, When):
            if not (callable(entry.predicate) and _entries_ok(entry.entries)):
                return False
        elif isinstance(entry, str):
            if entry not in names:
                return False
        elif not callable(entry):
            return False
    return True


def _recipe_keys_ok(keys: Any) -> bool:
    from pipeline.recipe.config import Recipe

    if not isinstance(keys, tuple):
        return False
    sections = typing.get_type_hints(Recipe)
    for key in _flat(keys, None, None, evaluate=False):
        if key == ALL_FIELDS:
            continue
        section, _, name = key.partition(".")
        if section not in sections:
            return False
        if name and not (
            dataclasses.is_dataclass(sections[section])
            and name in {item.name for item in dataclasses.fields(sections[section])}
        ):
            return False
    return True


def spec(default: Any = dataclasses.MISSING, *, doc: str, check: Callable[[Any], bool] | None = None) -> Any:
    """A declaration field with its description (DOC) and validator (CHECK(value) -> valid)."""
    return field(default=default, metadata={"doc": doc, "check": check})


@dataclass(frozen=True)
class StageDeclaration:
    help: str = spec(doc="the one line `--help` shows for the stage", check=lambda v: isinstance(v, str) and bool(v))
    kind: str = spec(
        "product",
        doc="product: a stage of the pipeline that ships models; lab: a research or benchmark stage",
        check=lambda v: v in KINDS,
    )
    reads: tuple[Any, ...] = spec(
        (), doc="artifacts it reads (ArtifactPaths names, resolver functions, when(...))", check=_entries_ok
    )
    writes: tuple[Any, ...] = spec(
        (), doc="artifacts it writes: its transaction refuses any other write", check=_entries_ok
    )
    recipe: tuple[Any, ...] = spec(
        (), doc="recipe fields its result depends on: field, section, section.field, or * (all)", check=_recipe_keys_ok
    )
    options: tuple[str, ...] = spec(
        (),
        doc="its Options fields that change its result (part of engine's cache key; engine passes its own "
        "value of a field of the same name)",
        check=lambda v: isinstance(v, tuple),
    )
    data: Any = spec(
        False,
        doc="reads the recipe's dataset (bool, or when(predicate)): its fingerprint joins the cache key",
        check=lambda v: isinstance(v, (bool, When)),
    )
    weights: Any = spec(
        False,
        doc="reads the dense weights recipe.weights names (dense.pt, a file, a download)",
        check=lambda v: isinstance(v, (bool, When)),
    )
    checkpoint: str = spec(
        "",
        doc="ArtifactPaths name of its resumable checkpoint (kept whatever happens, never in the cache key)",
        check=lambda v: v == "" or v in _artifact_names(),
    )
    cached: bool = spec(
        False,
        doc="keeps its output unless --force: engine passes force=True when it reruns the stage",
        check=lambda v: isinstance(v, bool),
    )
    in_engine: bool = spec(False, doc="one of the stages `engine` runs", check=lambda v: isinstance(v, bool))
    applies: Callable[[Any], bool] | None = spec(
        None,
        doc="engine runs the stage only for recipes where applies(recipe) holds (None: always)",
        check=lambda v: v is None or callable(v),
    )
    needs_recipe: bool = spec(
        True, doc="run(recipe, paths, options), else run(options)", check=lambda v: isinstance(v, bool)
    )
    groups_writes: bool = spec(
        True,
        doc="its writes are one transaction (engine: each of its stages is one of its own)",
        check=lambda v: isinstance(v, bool),
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            check = item.metadata.get("check")
            if check is not None and not check(getattr(self, item.name)):
                raise ValueError(
                    f"stage declaration: {item.name} = {getattr(self, item.name)!r} is not valid "
                    f"({item.metadata['doc']})"
                )

    @property
    def records_config(self) -> bool:
        """config.json is written by exactly the stages that declare it."""
        return "config" in self.writes

    def read_paths(self, recipe: Any, paths: Any, options: Any, keyed_only: bool = False) -> list[Path]:
        return list(dict.fromkeys(_paths(self.reads, recipe, paths, options, keyed_only)))

    def write_paths(self, recipe: Any, paths: Any, options: Any) -> list[Path]:
        return list(dict.fromkeys(_paths(self.writes, recipe, paths, options)))

    def recipe_keys(self, recipe: Any, options: Any = None) -> list[str]:
        return list(dict.fromkeys(_flat(self.recipe, recipe, options)))

    def reads_data(self, recipe: Any, options: Any = None) -> bool:
        return _holds(self.data, recipe, options)

    def reads_weights(self, recipe: Any, options: Any = None) -> bool:
        return _holds(self.weights, recipe, options)

    def artifact_names(self, which: str = "reads") -> set[str]:
        """Every ArtifactPaths name in READS or WRITES, conditional ones included (for the inventory)."""
        return {entry for entry in _flat(getattr(self, which), None, None, evaluate=False) if isinstance(entry, str)}


def _holds(value: Any, recipe: Any, options: Any) -> bool:
    if isinstance(value, When):
        return bool(value.predicate(recipe, options))
    return bool(value)


def _flat(
    entries: Iterable[Any], recipe: Any, options: Any, evaluate: bool = True, keyed_only: bool = False
) -> Iterator[Any]:
    for entry in entries:
        if isinstance(entry, When):
            if (not evaluate or entry.predicate(recipe, options)) and (entry.keyed or not keyed_only):
                yield from _flat(entry.entries, recipe, options, evaluate, keyed_only)
        else:
            yield entry


def _method_arguments() -> dict[str, tuple[str, ...]]:
    """The ArtifactPaths methods a declaration may name, with every argument they take (each one a path)."""
    from pipeline.recipe.config import BACKENDS

    return {"int8_onnx": ("dense", "sparse"), "engines": tuple(name for name in BACKENDS if name != "auto")}


def _paths(entries: Iterable[Any], recipe: Any, paths: Any, options: Any, keyed_only: bool = False) -> Iterator[Path]:
    for entry in _flat(entries, recipe, options, keyed_only=keyed_only):
        if isinstance(entry, str):
            value = getattr(paths, entry)
            if callable(value):  # int8_onnx(variant), engines(backend): every one
                yield from (Path(value(argument)) for argument in _method_arguments()[entry])
            elif isinstance(value, tuple):
                yield from (Path(item) for item in value)
            else:
                yield Path(value)
        else:
            yield from (Path(path) for path in entry(recipe, paths, options))


def recipe_values(recipe: Any, keys: Iterable[str]) -> dict[str, Any]:
    """KEY -> value of each declared recipe key (`*`: the whole recipe), as plain data for a hash."""
    values: dict[str, Any] = {}
    for key in keys:
        if key == ALL_FIELDS:
            values[key] = recipe.to_dict()
            continue
        section, _, name = key.partition(".")
        value = getattr(getattr(recipe, section), name) if name else getattr(recipe, section)
        is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
        values[key] = dataclasses.asdict(value) if is_section else copy.deepcopy(value)  # type: ignore[arg-type]
    return values


def covers(keys: Iterable[str], read: str) -> bool:
    """Whether the declared recipe KEYS name READ (a field `x` or `section.field`)."""
    keys = set(keys)
    return ALL_FIELDS in keys or read in keys or read.partition(".")[0] in keys


def file_digest(path: Path) -> str:
    from pipeline.io import sha256_file

    return sha256_file(path) if Path(path).is_file() else "missing"  # no path: the records survive a move


def weight_files(recipe: Any, paths: Any) -> list[Path]:
    """The file the dense weights are read from: dense.pt for `pretrain`, the weights file; none for random
    weights or a download."""
    if recipe.weights == "pretrain":
        return [Path(paths.dense_weights)]
    if recipe.weights in ("random", "torchvision", "hub"):
        return []
    return [Path(recipe.weights)]


def weights_identity(recipe: Any, paths: Any) -> str:
    """Where the dense weights come from, as a value that changes when they change."""
    files = weight_files(recipe, paths)
    if not files:
        return f"{recipe.weights}:{recipe.arch}"
    return ("pretrain:" if recipe.weights == "pretrain" else "file:") + file_digest(files[0])


def expand(path: Path) -> list[Path]:
    """PATH, or every visible file under it when it is a folder (hidden staging files and temporaries aside)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(
        item
        for item in path.rglob("*")
        if item.is_file() and not any(part.startswith(".") for part in item.relative_to(path).parts)
    )


@dataclass
class StageRun:
    """A declaration resolved for one run of its stage: the recipe, the model folder and the options."""

    declaration: StageDeclaration
    recipe: Any
    paths: Any
    options: Any

    def recipe_keys(self) -> list[str]:
        return self.declaration.recipe_keys(self.recipe, self.options)

    def reads_weights(self) -> bool:
        return self.declaration.reads_weights(self.recipe, self.options)

    def reads_data(self) -> bool:
        return self.declaration.reads_data(self.recipe, self.options)

    def read_paths(self) -> list[Path]:
        return self.declaration.read_paths(self.recipe, self.paths, self.options)

    def write_paths(self) -> list[Path]:
        return self.declaration.write_paths(self.recipe, self.paths, self.options)

    def checkpoint(self) -> Path | None:
        return Path(getattr(self.paths, self.declaration.checkpoint)) if self.declaration.checkpoint else None

    def input_files(self) -> list[Path]:
        """The files its result depends on: what it reads, less what it writes itself and its checkpoint."""
        own = {path.absolute() for path in self.write_paths()}
        checkpoint = self.checkpoint()
        if checkpoint is not None:
            own.add(checkpoint.absolute())
        keyed = self.declaration.read_paths(self.recipe, self.paths, self.options, keyed_only=True)
        return [file for path in keyed if path.absolute() not in own for file in expand(path)]

    def output_files(self) -> list[Path]:
        """The files it wrote, as they are now (folders expanded); config.json aside, which every stage rewrites."""
        config = Path(self.paths.config)
        return [file for path in self.write_paths() if path != config for file in expand(path) if file.is_file()]

    def scope(self) -> list[Path]:
        """Every path it may write (a folder: anything under it), for its transaction."""
        checkpoint = self.checkpoint()
        return self.write_paths() + ([checkpoint] if checkpoint is not None else [])


def measured_preprocessing(recipe: Any, options: Any = None) -> bool:
    """Whether the recipe's evaluation transform is chosen by measurement and recorded in preprocess_choice.json
    (pipeline/data/preprocess_choice.py: own weights on an image folder)."""
    from pipeline.data.preprocess_choice import applies

    return bool(applies(recipe))


# preprocess_choice.json, where it applies: an entry for `reads` (and `writes` of the stages that may measure it)
PREPROCESS_CHOICE = when(measured_preprocessing, "preprocess_choice")
# the fields the measurement's baseline check reads (pipeline/data/preprocess_choice.py check_baseline)
BASELINE_CHECK = when(measured_preprocessing, "verify.min_dense_top1", "verify.refuse_chance_baseline")


def int8(recipe: Any, options: Any = None) -> bool:
    """build.precision = int8: export writes the Q/DQ graphs, build and verify read them."""
    return recipe.build.precision == "int8"


def fp16_exported(recipe: Any, options: Any = None) -> bool:
    """export.fp16 (less `export --no-fp16`): the FP16 graphs are written."""
    return bool(recipe.export.fp16) and not getattr(options, "no_fp16", False)


def option_files(*names: str) -> Resolver:
    """A resolver: the files the named options give (unset options give none)."""

    def files(recipe: Any, paths: Any, options: Any) -> list[Path]:
        return [Path(getattr(options, name)) for name in names if options is not None and getattr(options, name)]

    files.__name__ = f"files of --{', --'.join(name.replace('_', '-') for name in names)}"
    return files


def backend_folders(recipe: Any, paths: Any, options: Any) -> list[Path]:
    """The engine folder of every backend (build writes the one it picked; verify and package read it)."""
    return list(_paths(("engines",), recipe, paths, options))


def manifest_files(recipe: Any, paths: Any, options: Any) -> list[Path]:
    """Every file manifest.json lists (package hashes them all, check-manifest checks them all)."""
    from pipeline.package.manifest import artifact_files

    return [Path(paths.root) / relative for relative in artifact_files(paths.root)] if Path(paths.root).is_dir() else []
