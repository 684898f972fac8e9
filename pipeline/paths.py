"""Where each artifact of a model lives: engines/<model>/..."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


def checked_name(name: str, what: str) -> str:
    """A name the user chose that becomes a file or folder name (model, recipe, --tag): one plain path
    component, so whatever it is, the files stay inside the output folder."""
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or Path(name).is_absolute()
    ):
        raise PipelineError(
            f"{what} {name!r} cannot name files: use letters, digits, '_', '-' or '.' without a "
            "path separator and not starting with '.'"
        )
    return name


def relative_to_root(path: Path, root: Path) -> str:
    """PATH as recorded in a model folder's reports: relative to ROOT (the folder can be moved or copied whole),
    absolute when it lies outside."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    @classmethod
    def for_model(cls, out: str | Path, model: str) -> ArtifactPaths:
        return cls(Path(out) / checked_name(model, "model name"))

    config = property(lambda self: self.root / "config.json")
    dense_weights = property(lambda self: self.root / "dense.pt")  # demo pretrain output
    pretrain_checkpoint = property(lambda self: self.root / "pretrain.ckpt")
    pretrain_log = property(lambda self: self.root / "pretrain.json")
    mask_checkpoint = property(lambda self: self.root / "masks.ckpt")
    mask_training = property(lambda self: self.root / "train_masks.json")
    mask_training_plot = property(lambda self: self.root / "train_masks.png")  # validation top-1 while learning

    def tagged_mask_run(self, tag: str) -> tuple[Path, Path, Path]:
        """`train-masks --tag TAG`: its checkpoint, record and plot (masks.TAG.ckpt, train_masks.TAG.json/.png)."""
        tag = checked_name(tag, "--tag")
        return (
            self.root / f"masks.{tag}.ckpt",
            self.root / f"train_masks.{tag}.json",
            self.root / f"train_masks.{tag}.png",
        )

    def mask_training_records(self) -> list[Path]:
        """Every train_masks*.json of the model (the main run and the tagged ones), as `curves` plots them."""
        return sorted(self.root.glob("train_masks*.json"))

    layers = property(lambda self: self.root / "layers.json")
    preprocess_choice = property(
        lambda self: self.root / "preprocess_choice.json"
    )  # pipeline/data/preprocess_choice.py
    masks = property(lambda self: self.root / "masks.pt")
    sparse_weights = property(lambda self: self.root / "sparse.pt")
    bake_report = property(lambda self: self.root / "bake.json")
    dense_onnx = property(lambda self: self.root / "dense.onnx")
    sparse_onnx = property(lambda self: self.root / "sparse.onnx")
    dense_onnx_fp16 = property(lambda self: self.root / "dense.fp16.onnx")
    sparse_onnx_fp16 = property(lambda self: self.root / "sparse.fp16.onnx")
    export_report = property(lambda self: self.root / "export.json")

    def int8_onnx(self, variant: str) -> Path:
        """`dense.int8.onnx` / `sparse.int8.onnx`: the Q/DQ graphs written for build.precision=int8."""
        return self.root / f"{variant}.int8.onnx"

    def engines(self, backend: str) -> Path:
        """`onnxruntime/`, `tensorrt/`: the folder of the engines (and their sidecars, logs) one backend built."""
        return self.root / checked_name(backend, "backend")

    build_report = property(lambda self: self.root / "build.json")
    report_json = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    stages = property(lambda self: self.root / "stages.json")
    triton = property(lambda self: self.root / "triton")
    manifest = property(lambda self: self.root / "manifest.json")
    compare_json = property(lambda self: self.root / "compare.json")
    compare_md = property(lambda self: self.root / "compare.md")
    compare_png = property(lambda self: self.root / "compare.png")
    compare_masks = property(lambda self: self.root / "compare")  # masks.<method>.pt of every compared method
    certify_json = property(lambda self: self.root / "certify.json")
    certify_md = property(lambda self: self.root / "certify.md")
    updated_weights = property(lambda self: self.root / "dense_updated.pt")  # the updatable-model demo
    updatable_json = property(lambda self: self.root / "updatable.json")
    updatable_md = property(lambda self: self.root / "updatable.md")
    verify_plots = property(
        lambda self: tuple(
            self.root / name for name in ("verify_latency.png", "verify_accuracy.png", "verify_coverage.png")
        )
    )
    curves = property(lambda self: self.root / "curves.png")  # `curves`: every mask-training run of the model
    bench_masks = property(lambda self: self.root / "bench_masks.json")  # this model's time-to-accuracy row
    # `bench-masks`' table across the models of one --out folder (beside the model folders, not in one)
    bench_masks_table = property(lambda self: self.root.parent / "bench-masks.json")
    bench_masks_md = property(lambda self: self.root.parent / "bench-masks.md")
    bench_masks_png = property(lambda self: self.root.parent / "bench-masks.png")
    triton_cpu = property(lambda self: self.root / "triton_cpu")  # the CPU flavour of the Triton repository
    serve_check = property(lambda self: self.root / "serve_check.json")
    serve_check_log = property(lambda self: self.root / "serve_check.log")
    serve_log = property(lambda self: self.root / "serve.log")  # `serve`: the tritonserver's output
