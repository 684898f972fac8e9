"""Class names of an ImageFolder dataset, in the order torchvision's ImageFolder numbers them."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError


def folder_classes(folder: Path) -> list[str]:
    """Sorted sub-folder names: the label order ImageFolder gives the network."""
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError as exc:
        raise PipelineError(f"image folder {folder}: {exc}; put each class's images in a sub-folder "
                            "named after the class") from None
    return classes


def imagefolder_labels(root: str | Path, train_split: str = "train", eval_split: str = "val") -> list[str]:
    """The class names of ROOT/<train_split>; ROOT/<eval_split>, when present, must hold the same classes."""
    root = Path(root)
    train = root / train_split
    if not train.is_dir():
        raise PipelineError(f"image folder {train} does not exist; pass --data DIR with "
                            f"{train_split}/<class>/<images> and {eval_split}/<class>/<images>")
    labels = folder_classes(train)
    evaluation = root / eval_split
    if evaluation.is_dir():
        other = folder_classes(evaluation)
        if other != labels:
            only_train = sorted(set(labels) - set(other))
            only_eval = sorted(set(other) - set(labels))
            raise PipelineError(f"{train} and {evaluation} hold different classes (only in {train_split}: "
                                f"{only_train[:5]}, only in {eval_split}: {only_eval[:5]}); the label numbers "
                                "would not match, give both splits the same class folders")
    bad = [label for label in labels if "\n" in label or not label.strip()]
    if bad:
        raise PipelineError(f"{train}: class folder names must be non-empty single lines, got {bad[:3]!r}")
    return labels
