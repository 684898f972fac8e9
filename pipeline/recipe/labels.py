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
        raise PipelineError(
            f"image folder {folder}: {exc}; put each class's images in a sub-folder named after the class"
        ) from None
    return classes


def imagefolder_labels(root: str | Path, train_split: str = "train", eval_split: str = "val") -> list[str]:
    """The class names of ROOT/<train_split>; ROOT/<eval_split>, when present, must hold the same classes."""
    root = Path(root)
    train = root / train_split
    if not train.is_dir():
        raise PipelineError(
            f"image folder {train} does not exist; pass --data DIR with "
            f"{train_split}/<class>/<images> and {eval_split}/<class>/<images>"
        )
    labels = folder_classes(train)
    evaluation = root / eval_split
    if evaluation.is_dir():
        check_same_classes(root, train_split, labels, eval_split, folder_classes(evaluation))
    bad = [label for label in labels if "\n" in label or not label.strip()]
    if bad:
        raise PipelineError(f"{train}: class folder names must be non-empty single lines, got {bad[:3]!r}")
    return labels


def check_same_classes(
    root: Path, train_split: str, train_classes: list[str], eval_split: str, eval_classes: list[str]
) -> None:
    """ImageFolder numbers classes by their sorted folder names: different folders would silently shift labels."""
    if train_classes == eval_classes:
        return
    only_train = sorted(set(train_classes) - set(eval_classes))
    only_eval = sorted(set(eval_classes) - set(train_classes))
    raise PipelineError(
        f"{root / train_split} and {root / eval_split} hold different class folders, so their labels would not "
        f"match: {train_split}/ has {_name_list(train_classes)}; {eval_split}/ has {_name_list(eval_classes)}; "
        f"only in {train_split}/: {_name_list(only_train)}; only in {eval_split}/: {_name_list(only_eval)}; "
        "give both the same class folders"
    )


def _name_list(names: list[str], shown: int = 20) -> str:
    listed = ", ".join(names[:shown]) or "none"
    return f"[{listed}, ... ({len(names)} in all)]" if len(names) > shown else f"[{listed}]"
