"""Datasets: Fashion-MNIST (IDX files), ImageNet-style folders, and synthetic smoke data."""

from __future__ import annotations

import copy
import gzip
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.images import checked_loader, drop_bad_images
from pipeline.errors import PipelineError
from pipeline.io import sha256_file
from pipeline.recipe.config import Recipe
from pipeline.recipe.labels import check_same_classes

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset
    kind: str
    description: str
    accuracy_meaningful: bool  # False for synthetic data: its accuracy means nothing
    # The training images, in the same order, with the evaluation transform (no augmentation): for
    # validation splits held out of them, calibration and BatchNorm statistics. Not given: `train` itself.
    plain_train: Dataset | None = None
    skipped_images: int = 0  # damaged images left out (data.skip_bad_images); reported with the description

    def __post_init__(self) -> None:
        if self.plain_train is None:
            self.plain_train = self.train


# --------------------------------------------------------------------------- IDX / Fashion-MNIST
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise PipelineError(f"cannot read IDX file {path} ({exc}); the dataset copy is damaged, reinstall it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PipelineError(f"{path} is not an unsigned-byte IDX file; reinstall the dataset")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise PipelineError(f"{path} is truncated ({len(data) - offset} of {expected} bytes); reinstall the dataset")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _located_idx(folder: Path, stem: str) -> Path:
    """The IDX file STEM in a folder that locate_fashion_mnist returned (it holds every one of them)."""
    path = _find_idx(folder, stem)
    if path is None:
        raise RuntimeError(f"internal: locate_fashion_mnist returned {folder}, which lacks {stem}")
    return path


def fashion_mnist_candidates(root: str) -> list[Path]:
    """Folders searched for the IDX files, in order: inside ROOT only when one is given (an explicit folder is
    used or refused, never replaced by another copy), else the default places."""
    if root:
        base = Path(root)
        return [base, base / "raw", base / "FashionMNIST" / "raw"]
    places: list[Path] = []
    env_root = os.environ.get("TORCHVISION_DATASETS", "")
    if env_root:
        places.append(Path(env_root) / "FashionMNIST" / "raw")
    places += [Path("data") / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    return places


def locate_fashion_mnist(root: str) -> Path:
    for folder in fashion_mnist_candidates(root):
        if all(_find_idx(folder, stem) for pair in FASHION_MNIST_FILES.values() for stem in pair):
            return folder
    target = Path(root) if root else Path("data")
    try:  # online: torchvision's downloader fills <target>/FashionMNIST/raw
        import torchvision

        torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        return target / "FashionMNIST" / "raw"
    except Exception:
        pass
    searched = ", ".join(str(p) for p in fashion_mnist_candidates(root))
    if root:
        raise PipelineError(
            f"Fashion-MNIST not found in --data {root} (searched {searched}) and it cannot be downloaded there; "
            "pass --data DIR holding the IDX files, or leave out --data to use the installed copy "
            "(`apt-get install dataset-fashion-mnist`)"
        )
    raise PipelineError(
        f"Fashion-MNIST not found (searched {searched}) and it cannot be downloaded; "
        "install it with `apt-get install dataset-fashion-mnist` or pass --data DIR holding the IDX files"
    )


def load_fashion_mnist(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder = locate_fashion_mnist(root)
    image_stem, label_stem = FASHION_MNIST_FILES["train" if split == "train" else "test"]
    images = read_idx(_located_idx(folder, image_stem))
    labels = read_idx(_located_idx(folder, label_stem))
    if images.shape[0] != labels.shape[0]:
        raise PipelineError(f"Fashion-MNIST in {folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- in-memory datasets
class TensorImageDataset(Dataset):
    """uint8 images held in memory, normalised on the fly; `__getitems__` serves whole batches."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        self.images = images
        self.labels = labels
        channels = images.shape[1]
        self.mean = torch.tensor(list(mean) * (channels if len(mean) == 1 else 1)).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(list(std) * (channels if len(std) == 1 else 1)).view(1, -1, 1, 1) * 255.0
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def without_augmentation(self) -> TensorImageDataset:
        """The same images and labels (shared, not copied) served without augmentation."""
        plain = copy.copy(self)
        plain.augment = False
        return plain

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if self.augment:
            x = random_crop_flip(x, pad=2)
        return x

    def __getitem__(self, index: int):
        return self._prepare(self.images[index : index + 1])[0], self.labels[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices)
        return self._prepare(self.images[index]), self.labels[index]


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop after zero padding (in normalised space) and horizontal flip: two gathers over
    the batch (rows, then columns, a flipped image reading its columns backwards), no per-image loop."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2))
    flips = torch.rand(n) < 0.5
    rows = offsets[:, :1] + torch.arange(h)  # [n, h]
    cols = offsets[:, 1:] + torch.where(flips[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))  # [n, w]
    picked = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return picked.gather(3, cols[:, None, None, :].expand(n, c, h, w))


class SyntheticDataset(TensorImageDataset):
    """Random images with random labels, for smoke runs: its accuracy means nothing."""

    def __init__(self, size: int, shape: Sequence[int], num_classes: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (size, *shape), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        super().__init__(images, labels, mean=[0.5], std=[0.25])


def folder_transforms(recipe: Recipe, train: bool):
    from torchvision import transforms

    pre = recipe.preprocess
    steps = []
    if train:
        steps += [transforms.RandomResizedCrop(pre.crop), transforms.RandomHorizontalFlip()]
    else:
        steps += eval_geometry(pre)
    if pre.color == "L":
        steps.insert(0, transforms.Grayscale(1))
    steps += [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    return transforms.Compose(steps)


def eval_geometry(pre) -> list:
    """The evaluation transform's resize and centre crop (on PIL images) for a recipe's `preprocess` section."""
    from torchvision import transforms

    steps = []
    if pre.resize:
        size = (pre.resize, pre.resize) if pre.resize_shape == "square" else pre.resize
        mode = transforms.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else None
        steps.append(transforms.Resize(size, interpolation=mode or transforms.InterpolationMode.BILINEAR))
    steps.append(transforms.CenterCrop(pre.crop))
    return steps


def _split_folder(root: str, split: str) -> Path:
    folder = Path(root) / split
    if not folder.is_dir():
        raise PipelineError(f"image folder {folder} does not exist; pass --data DIR with {split}/<class>/<images>")
    return folder


def _unknown_kind(kind: str) -> PipelineError:
    return PipelineError(f"unknown data kind {kind!r}; use fashion_mnist, imagefolder (--data DIR) or synthetic")


def _image_folder(recipe: Recipe, split: str, train: bool) -> ImageFolder:
    """ImageFolder of ROOT/SPLIT whose images were all checked to decode (pipeline/data/images.py); damaged ones
    stop the run here, before any work, or are left out with data.skip_bad_images (`skipped` lists them)."""
    from torchvision.datasets import ImageFolder

    folder = _split_folder(recipe.data.root, split)
    try:
        dataset = ImageFolder(str(folder), transform=folder_transforms(recipe, train), loader=checked_loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise PipelineError(f"image folder {folder}: {exc}") from None
    if len(dataset.classes) > recipe.num_classes:
        raise PipelineError(
            f"image folder {folder} has {len(dataset.classes)} classes but the model has "
            f"{recipe.num_classes}; use a matching dataset or recipe"
        )
    dataset.skipped = drop_bad_images(dataset, folder, recipe.data.skip_bad_images)
    if dataset.skipped:
        print(
            f"warning: {len(dataset.skipped)} damaged image(s) of {folder} skipped (--skip-bad-images), e.g. "
            f"{dataset.skipped[0]}",
            file=sys.stderr,
            flush=True,
        )
    if not dataset.samples:
        raise PipelineError(f"image folder {folder} has no image that decodes; pass a folder of images")
    return dataset


def build_datasets(recipe: Recipe, augment_train: bool = False) -> DataBundle:
    data = recipe.data
    if data.kind == "fashion_mnist":
        train = TensorImageDataset(
            *load_fashion_mnist(data.root, "train"),
            recipe.preprocess.mean,
            recipe.preprocess.std,
            augment=augment_train,
        )
        test = TensorImageDataset(*load_fashion_mnist(data.root, "test"), recipe.preprocess.mean, recipe.preprocess.std)
        return DataBundle(
            train,
            _limit(test, data.eval_limit),
            "fashion_mnist",
            "Fashion-MNIST (60k train / 10k test)",
            True,
            train.without_augmentation(),
        )
    if data.kind == "imagefolder":
        if not data.root:
            raise PipelineError("data kind imagefolder needs a folder: pass --data DIR (with train/ and val/)")
        folder_train = _image_folder(recipe, data.train_split, train=augment_train)
        folder_eval = _image_folder(recipe, data.eval_split, train=False)
        check_same_classes(
            Path(data.root), data.train_split, folder_train.classes, data.eval_split, folder_eval.classes
        )
        plain = folder_train
        if augment_train:  # the same file list (no second scan of the folder) with the evaluation transform
            plain = copy.copy(folder_train)
            plain.transform = folder_eval.transform
        skipped = len(folder_train.skipped) + len(folder_eval.skipped)
        description = f"image folder {data.root}" + (f" ({skipped} damaged images skipped)" if skipped else "")
        limited = _limit(folder_eval, data.eval_limit)
        return DataBundle(folder_train, limited, "imagefolder", description, True, plain, skipped)
    if data.kind == "synthetic":
        shape = recipe.input_shape
        synthetic_train = SyntheticDataset(data.synthetic_size, shape, recipe.num_classes, seed=1)
        synthetic_eval = SyntheticDataset(max(data.synthetic_size // 4, 8), shape, recipe.num_classes, seed=2)
        return DataBundle(
            synthetic_train, synthetic_eval, "synthetic", "synthetic random images (accuracy means nothing)", False
        )
    raise _unknown_kind(data.kind)


def dataset_fingerprint(recipe: Recipe) -> str:
    """A cheap digest that changes when the dataset's contents do, for the stage records.

    Fashion-MNIST: sha256 of the IDX files' bytes. Image folders: of every file's relative path, size and
    modification time under the train and evaluation splits (reading ImageNet's bytes would take minutes).
    Synthetic data is made from the recipe alone, which the records already hold: its fingerprint is constant.
    """
    data = recipe.data
    digest = hashlib.sha256(data.kind.encode())
    if data.kind == "fashion_mnist":
        folder = locate_fashion_mnist(data.root)
        for stem in sorted(stem for pair in FASHION_MNIST_FILES.values() for stem in pair):
            path = _located_idx(folder, stem)
            digest.update(f"\0{path.name}\0".encode())
            digest.update(sha256_file(path).encode())
    elif data.kind == "imagefolder":
        root = Path(data.root)
        for split in (data.train_split, data.eval_split):
            for path in sorted(p for p in _split_folder(data.root, split).rglob("*") if p.is_file()):
                stat = path.stat()
                digest.update(f"\0{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    elif data.kind != "synthetic":
        raise _unknown_kind(data.kind)
    return digest.hexdigest()


def _limit(dataset: Dataset, limit: int) -> Dataset:
    if limit and limit < dataset_size(dataset):
        return torch.utils.data.Subset(dataset, range(limit))
    return dataset


# --------------------------------------------------------------------------- loading
class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled (seed + epoch) batches, sharded across ranks, starting at any batch index.

    Resuming after a kill continues with exactly the batches the run had not seen yet.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        per_rank = len(order) // self.world_size
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        per_rank = self.size // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for batch in range(self.start_batch, len(self)):
            yield indices[batch * self.batch_size : (batch + 1) * self.batch_size]


def dataset_size(dataset: Dataset) -> int:
    """len() of a map-style dataset (torch's Dataset type declares no __len__; every dataset here has one)."""
    return len(cast(Sized, dataset))


def _unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _batch_collate(batch):
    return batch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(dataset: Dataset, requested: int) -> int:
    """DataLoader workers for `dataset`: none when it serves whole batches from memory (Fashion-MNIST and
    synthetic tensors: a worker would only copy them between processes), else `requested` but at most one per
    core besides the training process's own (a 4-worker recipe on 2 cores gets 1)."""
    if requested <= 0 or hasattr(_unwrap(dataset), "__getitems__"):
        return 0
    return max(0, min(requested, usable_cores() - 1))


def make_loader(
    dataset: Dataset, batch_sampler: Sampler | None = None, batch_size: int = 256, workers: int = 0
) -> DataLoader:
    """DataLoader that uses a dataset's batched `__getitems__` when it has one. Its workers (`loader_workers`)
    persist across epochs: build the loader once and iterate it every epoch (the batch sampler runs in this
    process, so `set_epoch` on it takes effect at the next iteration)."""
    if batch_sampler is None:
        batch_sampler = ResumableBatchSampler(dataset_size(dataset), batch_size, shuffle=False, drop_last=False)
    # torch's Subset forwards __getitems__ to the dataset it wraps, so whole batches come back as one tuple
    batched = hasattr(_unwrap(dataset), "__getitems__")
    workers = loader_workers(dataset, workers)
    # Its own generator: creating an iterator must not consume the global RNG.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_batch_collate if batched else None,
        generator=torch.Generator(),
    )
