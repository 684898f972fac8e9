"""The inventory of every file the pipeline reads: one table, in code.

Each `Reader` is a file a user or an earlier stage can hand the pipeline: its owner (the one function that loads
it; the owner's module also writes it, where the pipeline writes it) and the faults that apply to it. Which stages
read it is not kept here: `stages_reading` computes it from the stages' declarations (pipeline/declaration.py),
so a stage that starts reading a file says so in one place. tests/test_faults.py breaks each file in each of its
ways and runs it through its stages; tests/test_inventory.py fails when a function under pipeline/ reads a file
(json.load, torch.load, onnx.load, Image.open, tomllib, open(..., 'r'), read_text/read_bytes, ...) without being
named here, as an owner, a `site` of an entry, a primitive helper or a read of something that is not a handed-in
file.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ways a file can be broken (tests/test_faults.py applies each).
FILE_FAULTS = ("missing", "empty", "truncated", "random_bytes", "directory", "unreadable")
JSON_FAULTS = FILE_FAULTS + ("json_null", "json_list", "json_number", "key_missing", "wrong_type")
TENSOR_FAULTS = FILE_FAULTS + ("nan", "inf", "wrong_shape", "wrong_dtype")
IMAGE_FAULTS = ("not_an_image", "truncated_image", "empty", "random_bytes")


@dataclass(frozen=True)
class Reader:
    file: str  # the file (its name in the model folder, or what the user hands in)
    kind: str  # json | torch | onnx | toml | image | idx | plan | pbtxt | text
    owner: str  # module:function that loads it (its module owns the format)
    writer: str  # who writes it: a stage, or "user"
    stages: tuple[str, ...]  # readers no stage declaration names (a tool, tritonserver, --resume); see stages_reading
    faults: tuple[str, ...]  # the ways tests/test_faults.py breaks it (empty: not tested, see `note`)
    paths: tuple[str, ...] = ()  # the ArtifactPaths attributes naming it
    required: tuple[tuple[str, str], ...] = ()  # JSON: required key -> a wrong value for wrong_type
    sites: tuple[str, ...] = ()  # other functions reading it (helpers of the owner; readers being moved)
    note: str = ""
    declared_as: str = ""  # "weights" or "data": the input a declaration's `weights` / `data` flag names


INVENTORY: tuple[Reader, ...] = (
    # ---- what the user hands in
    Reader(
        "recipe TOML (models/<name>.toml, --model FILE.toml)",
        "toml",
        "pipeline.recipe.registry:_read_with_bases",
        "user / init-recipe",
        ("every recipe stage", "init-recipe"),
        FILE_FAULTS + ("toml_syntax", "wrong_type", "unknown_key"),
        sites=("pipeline.recipe.init_recipe:write_recipe",),
        note="init-recipe reads its own TOML back before the rename",
    ),
    Reader(
        "weights file (--weights PATH: state_dict plain/wrapped/EMA/prefixed, safetensors)",
        "torch",
        "pipeline.recipe.weight_files:_load_payload",
        "user",
        ("every recipe stage (head size)", "init-recipe"),
        TENSOR_FAULTS + ("pickled_module", "text_file"),
        sites=(
            "pipeline.recipe.weight_files:_is_zip_header",
            "pipeline.recipe.weight_files:_pickled_objects",
            "pipeline.recipe.weight_files:_restricted_load",
        ),
        declared_as="weights",
    ),
    Reader(
        "image folder and its images (--data DIR: train/<class>/, val/<class>/)",
        "image",
        "pipeline.data.images:decode_error",
        "user",
        (),
        IMAGE_FAULTS,
        sites=(
            "pipeline.data.datasets:_image_folder",
            "pipeline.data.images:checked_loader",
            "pipeline.data.preprocess_choice:check_training_images",
            "pipeline.recipe.preprocessing:probe_sizes",
            "pipeline.serve.serve_check:evaluation_images",
        ),
        note="header probe for the preprocessing; full scan before work (pipeline/data/images.py), the training "
        "split's before the preprocessing measurement",
        declared_as="data",
    ),
    Reader(
        "Fashion-MNIST IDX files (train/t10k images and labels, optionally .gz)",
        "idx",
        "pipeline.data.datasets:read_idx",
        "user (dataset-fashion-mnist)",
        (),
        ("empty", "truncated", "random_bytes", "directory"),
        declared_as="data",
    ),
    # ---- records (JSON) the stages write and read
    Reader(
        "config.json",
        "json",
        "pipeline.recipe.resolve:write_config",
        "every stage",
        (),
        (),
        paths=("config",),
        note="written for people and tools; no stage reads it",
    ),
    Reader(
        "stages.json",
        "json",
        "pipeline.records:StageRecords.load",
        "engine",
        (),
        JSON_FAULTS[1:],
        paths=("stages",),
        required=(("stages", "[]"), ("in_progress", "7")),
        sites=("pipeline.stages.engine:run_planned_stage",),
        note="a cache: damaged means rebuilt with one warning line, never refused (missing: no record, every "
        "stage runs); run_planned_stage puts its bytes back when a stage refuses its input",
    ),
    Reader(
        "layers.json",
        "json",
        "pipeline.records:load_layer_table",
        "train-masks",
        (),
        JSON_FAULTS[1:],
        paths=("layers",),
        required=(("masked", "7"), ("skipped", '"x"')),
        note="missing: verify recomputes the table from the network",
    ),
    Reader(
        "train_masks.json",
        "json",
        "pipeline.records:StageReport.load",
        "train-masks (masks.checkpoint.TrainingRecord)",
        (),
        JSON_FAULTS,
        paths=("mask_training",),
        required=(("files", "[]"), ("model", "1")),
    ),
    Reader(
        "bake.json",
        "json",
        "pipeline.records:StageReport.load",
        "bake (BakeReport)",
        (),
        JSON_FAULTS,
        paths=("bake_report",),
        required=(("files", '"x"'), ("model", "null")),
    ),
    Reader(
        "export.json",
        "json",
        "pipeline.records:StageReport.load",
        "export (ExportReport)",
        (),
        JSON_FAULTS,
        paths=("export_report",),
        required=(("files", "[]"),),
    ),
    Reader(
        "build.json",
        "json",
        "pipeline.backends.build_report:BuildReport.load",
        "build",
        (),
        JSON_FAULTS,
        paths=("build_report",),
        required=(("engines", "[]"), ("backend", "3"), ("has_sparse_kernels", '"yes"')),
        note="the Triton packaging of plans (pipeline/package/plans.py) reads it through BuildReport too",
    ),
    Reader(
        "report.json",
        "json",
        "pipeline.verify.report:VerificationReport.load",
        "verify",
        (),
        JSON_FAULTS[1:],
        paths=("report_json",),
        required=(("gates", "[]"), ("engine_sha256", "1")),
        note="missing: verify did not run, the package says `not verified` (--require-verified refuses it)",
    ),
    Reader(
        "manifest.json",
        "json",
        "pipeline.package.manifest:check_manifest",
        "package",
        (),
        JSON_FAULTS,
        paths=("manifest",),
        required=(("files", "{}"),),
    ),
    Reader(
        "serve_check.json",
        "json",
        "pipeline.serve.serve_check:run_serve_check",
        "serve-check",
        (),
        (),
        paths=("serve_check",),
        note="the serve-check report; no stage reads it",
    ),
    Reader(
        "train_masks*.json as learning curves",
        "json",
        "pipeline.stages.curves:run",
        "train-masks",
        ("curves",),  # ArtifactPaths.mask_training_records: a glob, not one name
        JSON_FAULTS,
        required=(("history", "7"), ("test", "[]")),
        note="curves plots every train_masks*.json it finds (tagged runs too)",
    ),
    Reader(
        ".transaction.json (the journal of a stage killed mid-run)",
        "json",
        "pipeline.transaction:_read_journal",
        "every stage (pipeline.stages.run_stage)",
        ("every model-level stage",),
        (),
        note="a damaged journal rolls back nothing (no file of that run was renamed yet); tests/test_transaction.py",
    ),
    Reader(
        "pretrain.json",
        "json",
        "pipeline.stages.pretrain:trained_with",
        "pretrain",
        (),
        (),
        paths=("pretrain_log",),
        note="the pretrain summary; pretrain reads back the recipe fields dense.pt was trained with (a damaged or "
        "different record retrains, a missing one keeps dense.pt)",
    ),
    Reader(
        "preprocess_choice.json (the measured evaluation transform of own weights on an image folder)",
        "json",
        "pipeline.data.preprocess_choice:Choice.load",
        "the first stage that needs it (train-masks)",
        (),
        (),
        paths=("preprocess_choice",),
        note="a record keyed on the weights, the folder and the settings: another key measures again",
    ),
    # ---- tensors
    Reader(
        "masks.ckpt",
        "torch",
        "pipeline.masks.checkpoint:MaskCheckpoint.load",
        "train-masks",
        ("train-masks --resume",),
        TENSOR_FAULTS,
        paths=("mask_checkpoint",),
    ),
    Reader(
        "masks.pt",
        "torch",
        "pipeline.masks.artifact:MaskArtifact.load",
        "bake",
        ("train-masks --masks-from",),
        TENSOR_FAULTS,
        paths=("masks",),
    ),
    Reader(
        "sparse.pt",
        "torch",
        "pipeline.recipe.weight_files:_load_payload",
        "bake",
        (),
        TENSOR_FAULTS,
        paths=("sparse_weights",),
    ),
    Reader(
        "dense.pt",
        "torch",
        "pipeline.pretrain.artifacts:DenseWeights.load",
        "pretrain",
        (),
        TENSOR_FAULTS,
        paths=("dense_weights",),
        declared_as="weights",
        note="the demo's pretrained weights (the updatable demo's dense_updated.pt too); every load goes on "
        "through recipe.weights.load_state_dict_strict: shapes, dtypes, NaN/Inf refused before any work",
    ),
    Reader(
        "pretrain.ckpt",
        "torch",
        "pipeline.pretrain.artifacts:PretrainCheckpoint.load",
        "pretrain",
        ("pretrain --resume",),
        FILE_FAULTS,
        paths=("pretrain_checkpoint",),
        note="format and version keys checked; a damaged one says to delete it or drop --resume",
    ),
    Reader(
        "bench-masks.json (the time-to-accuracy table across models)",
        "json",
        "pipeline.stages.bench_masks:record",
        "bench-masks",
        (),
        (),
        paths=("bench_masks_table",),
        note="each run adds its model's row; a damaged table is refused in one line naming it",
    ),
    # ---- graphs, engines, serving
    Reader(
        "ONNX graphs (dense/sparse .onnx, .fp16.onnx, .int8.onnx Q/DQ)",
        "onnx",
        "pipeline.package.tensors:specs_from_onnx",
        "export",
        (),
        FILE_FAULTS,
        paths=("dense_onnx", "sparse_onnx", "dense_onnx_fp16", "sparse_onnx_fp16"),
        sites=(
            "pipeline.package.tensors:onnx_external_files",
            "pipeline.backends.onnxruntime:_graph_precision",
            "pipeline.backends.tensorrt.engine:onnx_input",
            "pipeline.backends.tensorrt.engine:onnx_output",
            "pipeline.backends.tensorrt.parser_support:graph_opset_and_ops",
            "pipeline.backends.tensorrt.sparsity:OnnxNameMap.from_onnx",
            "pipeline.export.int8:quantize_qdq",
            "pipeline.stages.export:export_int8",
        ),
        note="every reader checks the sha256 export.json records first (ExportReport.checked)",
    ),
    Reader(
        "ONNX pair handed to verify (--dense DENSE.onnx --sparse SPARSE.onnx)",
        "onnx",
        "pipeline.verify.onnx_files:load_onnx",
        "user (any tool)",
        ("verify",),
        (),
        note="faults (missing, empty, truncated, not ONNX, a folder, external data missing, mismatched pair) "
        "are tested through the CLI in tests/test_verify_onnx.py",
    ),
    Reader(
        "TensorRT plans (*.plan)",
        "plan",
        "pipeline.backends.tensorrt.engine:TensorRTBackend.load",
        "build",
        ("verify", "package"),
        (),
        note="needs TensorRT and a GPU; the sha256 in build.json is checked first (BuildReport.checked_engine)",
    ),
    Reader(
        "TensorRT plan metadata (*.plan.json)",
        "json",
        "pipeline.backends.tensorrt.info:EngineInfo.load",
        "build",
        ("verify", "package", "serve-check"),
        (),
        sites=("pipeline.package.model_config:model_file_specs",),
        note="the engine sidecar (model_file_specs cross-checks the copy package stages beside each plan); needs TensorRT plans (EngineInfo.from_dict checks every field's type)",
    ),
    Reader(
        "Triton configs (config.pbtxt)",
        "pbtxt",
        "pipeline.package.model_config:parse_config",
        "package",
        ("package", "serve-check"),
        ("missing", "empty", "truncated", "random_bytes", "directory", "unreadable"),
        paths=("triton", "triton_cpu"),  # the repositories: serve and serve-check read them through their configs
        note="package writes and re-reads them in its staging folder; faults tested on the owner",
    ),
    Reader(
        "labels files (labels.txt)",
        "text",
        "pipeline.package.model_config:check_model_dir",
        "package",
        ("package", "serve-check"),
        (),
        sites=("pipeline.serve.serve_check:read_labels",),
        note="written by package from the recipe's labels and checked against the head there (line count)",
    ),
    Reader(
        "preprocessing.json (Triton preprocess model)",
        "json",
        "pipeline.package.python_models.preprocess:TritonPythonModel.initialize",
        "package",
        ("tritonserver",),
        (),
        note="read inside tritonserver's Python backend (serve-check runs it)",
    ),
)

# ArtifactPaths entries no stage reads back (their writer is their one owner module).
WRITTEN_ONLY = {
    "report_md": "pipeline.verify.report",
    "compare_json": "pipeline.compare.methods_table",
    "compare_md": "pipeline.compare.methods_table",
    "compare_png": "pipeline.compare.methods_table",
    "compare_masks": "pipeline.compare.methods_table",
    "certify_json": "pipeline.stages.certify",
    "certify_md": "pipeline.stages.certify",
    "updatable_json": "pipeline.updatable.demo",
    "updatable_md": "pipeline.updatable.demo",
    "updated_weights": "pipeline.updatable.demo (a DenseWeights file; certify --updated-weights reads it as a "
    "weights file)",
    "mask_training_plot": "pipeline.stages.train_masks (pipeline.plots)",
    "verify_plots": "pipeline.verify.output",
    "curves": "pipeline.stages.curves",
    "bench_masks": "pipeline.stages.bench_masks",
    "bench_masks_md": "pipeline.stages.bench_masks",
    "bench_masks_png": "pipeline.stages.bench_masks",
    "serve_check_log": "pipeline.serve.serve_check",
    "serve_log": "pipeline.serve.server",
}

# Helpers that read for an owner: their callers must be owners or sites.
PRIMITIVES = {
    "pipeline.io:read_json": "JSON with one-line errors",
    "pipeline.io:torch_load": "torch.load(weights_only=True) with one-line errors",
    "pipeline.io:load_versioned": "a versioned dataclass file through torch_load",
    "pipeline.io:sha256_file": "hashes, does not parse",
    "pipeline.io:_normal_mode": "/proc/self/status (the umask)",
    "pipeline.records:load_report": "a stage report's JSON object",
}
# Reads of things no user or stage hands in: subprocess output, logs, temporary files, Triton's arguments.
NOT_HANDED_IN = {
    "pipeline.backends.onnxruntime:OrtRunner.layer_times": "ONNX Runtime's own profile file",
    "pipeline.backends.tensorrt.sparsity:parse_inspector_json": "TensorRT's engine inspector output (a string)",
    "pipeline.serve.perf:_perf_once": "perf_analyzer's CSV output",
    "pipeline.package.python_models.onnx_model:TritonPythonModel.initialize": "Triton's model_config argument",
    "pipeline.package.python_models.preprocess:preprocess_image": "a request's image bytes (bad ones: error response)",
    "pipeline.serve.serve_check:_ServerSession.close": "the server's own log",
    "pipeline.serve.server:TritonServer.log_tail": "the server's own log",
    "pipeline.serve.triton_runtime:find_environment": "a probe subprocess's stdout",
    "pipeline.backends.tensorrt.parser_support:_table": "onnx-tensorrt's operator table shipped in the package",
    "pipeline.artifacts:unregistered_reads": "the pipeline's own source (this scan)",
    "pipeline.stages:_declared_literals": "the stage modules' own source (their declarations' help, kind, in_engine)",
    "pipeline.training:cpu_has_bf16_units": "/proc/cpuinfo's flags (unreadable or odd: float32 training)",
    "pipeline.masks.fused:_cpu_flags": "/proc/cpuinfo's flags, hashed into the compiled kernel's cache key",
    "pipeline.masks.fused:_build": "the fused kernel's C source shipped in the package (hashed, then compiled)",
}

# Parsers of text that is not a file at all (a command-line value), caught by the scan because they call json.loads.
NOT_FILES = {
    "pipeline.recipe.config:_list_from_text": "a --set value written as a JSON list (bad text: one error line)",
}

# Calls that read a file. Calls of PRIMITIVES count too; calls of an owner (e.g. read_state_dict) do not.
READ_CALLS = {
    "json.load",
    "json.loads",
    "torch.load",
    "onnx.load",
    "Image.open",
    "tomllib.load",
    "tomllib.loads",
    "np.load",
    "numpy.load",
    "np.fromfile",
    "text_format.Parse",
    "pickle.load",
    "pickle.loads",
    "ImageFolder",
    "default_loader",
    "read_image",
    "decode_image",
}
READ_METHODS = {"read_text", "read_bytes", "deserialize_cuda_engine"}
OPENERS = {"open", "gzip.open", "opener", "io.open"}


def declarations() -> dict[str, Any]:
    """Stage name -> its module's DECLARATION (imports every stage module)."""
    from pipeline.stages import STAGES

    return {name: importlib.import_module(module).DECLARATION for name, module in STAGES.items()}


def stages_reading(reader: Reader) -> tuple[str, ...]:
    """The stages that read READER's file, from their declarations, then the readers no declaration names."""
    found = []
    for name, declaration in declarations().items():
        named = bool(set(reader.paths) & declaration.artifact_names("reads"))
        flag = getattr(declaration, reader.declared_as) if reader.declared_as else False
        if named or flag is not False:
            found.append(name)
    return tuple(found) + tuple(reader.stages)


def allowed_sites() -> set[str]:
    """Every function allowed to read a file directly."""
    allowed = set(PRIMITIVES) | set(NOT_HANDED_IN) | set(NOT_FILES)
    for reader in INVENTORY:
        allowed.add(reader.owner)
        allowed.update(reader.sites)
    return allowed


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _reads(call: ast.Call) -> str:
    """What CALL reads with ('' when it reads nothing)."""
    name = _dotted(call.func)
    short = name.rsplit(".", 1)[-1]
    if name in READ_CALLS or short in {"ImageFolder", "default_loader"}:
        return name
    if f"pipeline.io:{short}" in PRIMITIVES or short == "load_report":
        return short if short in ("read_json", "torch_load", "load_report", "load_versioned") else ""
    if isinstance(call.func, ast.Attribute) and call.func.attr in READ_METHODS:
        return call.func.attr
    if name in OPENERS:
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        text = mode.value if isinstance(mode, ast.Constant) else ("r" if mode is None else "?")
        return name if ("r" in str(text) or text == "?") else ""
    return ""


def read_sites(source: str, module: str) -> list[tuple[str, str, int]]:
    """(module:function, what it calls, line) of every call in SOURCE that reads a file."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call) and _reads(child):
                found.append((f"{module}:{'.'.join(scope) or '<module>'}", _reads(child), child.lineno))
            visit(child, scope)

    visit(ast.parse(source), [])
    return found


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unregistered_reads(root: Path) -> list[str]:
    """Read sites under ROOT/pipeline in no registered function: 'module:function (call, line N)'."""
    allowed = allowed_sites()
    problems = []
    for path in sorted((Path(root) / "pipeline").rglob("*.py")):
        for site, call, line in read_sites(path.read_text(), module_name(path, Path(root))):
            if site not in allowed:
                problems.append(f"{site} ({call}, line {line})")
    return problems
