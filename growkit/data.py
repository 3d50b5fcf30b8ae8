"""Local data sources: sklearn's bundled digits, MNIST IDX files, KMNIST npz files, ImageFolder.

Nothing is downloaded: every loader reads local files (or data that ships inside scikit-learn).
All return ``torch.utils.data.TensorDataset``/``Dataset`` objects and deterministic splits.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from growkit.errors import InputError

__all__ = [
    "digits_dataset",
    "mnist_dataset",
    "kmnist_dataset",
    "image_folder",
    "split",
    "make_loaders",
    "default_data_root",
]


def default_data_root() -> Path:
    """``$GROWKIT_DATA`` or the ``shared/data`` folder beside the checkout."""
    env = os.environ.get("GROWKIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        for cand in (parent / "shared" / "data", parent.parent / "shared" / "data"):
            if cand.is_dir():
                return cand
    return Path("shared/data")


def _to_tensor_images(x: np.ndarray, size: int | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).float().unsqueeze(1)
    if size is not None and t.shape[-1] != size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t


def digits_dataset(size: int | None = 16) -> TensorDataset:
    """sklearn's 8x8 digits (1,797 images, 10 classes), scaled to [0, 1], normalised, optionally resized."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _to_tensor_images(d.images / 16.0, size)
    x = (x - 0.5) / 0.5
    return TensorDataset(x, torch.from_numpy(d.target).long())


def mnist_dataset(root: str | Path | None = None, size: int | None = None) -> TensorDataset:
    """The MNIST test set from ``root/mnist/t10k-*-ubyte.gz`` (10,000 images)."""
    base = Path(root) if root else default_data_root()
    img = base / "mnist" / "t10k-images-idx3-ubyte.gz"
    lab = base / "mnist" / "t10k-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise InputError(f"MNIST IDX files not found under {base / 'mnist'}; pass root= or set GROWKIT_DATA")
    x = np.frombuffer(gzip.open(img).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(lab).read(), np.uint8, offset=8)
    t = (_to_tensor_images(x / 255.0, size) - 0.1307) / 0.3081
    return TensorDataset(t, torch.from_numpy(y.astype(np.int64)))


def kmnist_dataset(root: str | Path | None = None, size: int | None = None) -> TensorDataset:
    """The KMNIST test set from ``root/kmnist/kmnist-test-*.npz`` (10,000 images, no pickle)."""
    base = Path(root) if root else default_data_root()
    img = base / "kmnist" / "kmnist-test-imgs.npz"
    lab = base / "kmnist" / "kmnist-test-labels.npz"
    if not img.is_file() or not lab.is_file():
        raise InputError(f"KMNIST npz files not found under {base / 'kmnist'}; pass root= or set GROWKIT_DATA")
    x = np.load(img, allow_pickle=False)["arr_0"]
    y = np.load(lab, allow_pickle=False)["arr_0"]
    t = (_to_tensor_images(x / 255.0, size) - 0.19) / 0.35
    return TensorDataset(t, torch.from_numpy(y.astype(np.int64)))


def image_folder(path: str | Path, size: int = 224, train: bool = True) -> Dataset:
    """A torchvision ``ImageFolder`` at a local path with standard ImageNet-style transforms."""
    from torchvision import datasets, transforms

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"ImageFolder path {p} does not exist")
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    else:
        tf = transforms.Compose([transforms.Resize(int(size * 1.14)), transforms.CenterCrop(size), transforms.ToTensor(), norm])
    return datasets.ImageFolder(str(p), transform=tf)


def split(dataset: Dataset, sizes: Sequence[int], seed: int = 0) -> list[Subset]:
    """Deterministic random split into the given sizes (stratification is not needed here)."""
    n = len(dataset)  # type: ignore[arg-type]
    if sum(sizes) > n:
        raise InputError(f"split sizes {list(sizes)} exceed the dataset size {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for s in sizes:
        out.append(Subset(dataset, perm[start:start + s]))
        start += s
    return out


def make_loader(part: Dataset, batch_size: int, *, train: bool, generator: torch.Generator | None = None,
                num_workers: int = 0) -> DataLoader:
    """A loader over ``part``: a training one shuffles (with ``generator``) and drops its last incomplete
    batch when it has at least one full batch (as timm's training loaders do: a last batch of one sample
    makes BatchNorm raise in train mode); an evaluation one keeps every sample, in order."""
    return DataLoader(part, batch_size=batch_size, shuffle=train, generator=generator if train else None,
                      num_workers=num_workers, drop_last=train and len(part) > batch_size)  # type: ignore[arg-type]


def make_loaders(
    parts: Sequence[Dataset], batch_size: int = 64, seed: int = 0, num_workers: int = 0
) -> list[DataLoader]:
    """First part for training (shuffled, seeded; see :func:`make_loader`), the rest in order."""
    g = torch.Generator().manual_seed(seed)
    return [make_loader(p, batch_size, train=i == 0, generator=g, num_workers=num_workers) for i, p in enumerate(parts)]
