"""Lifelong data streams: a sequence of experiences, and builders for the standard protocols.

An :class:`Experience` carries a train loader, optional validation / test loaders, an id and the
classes it brings. :func:`class_incremental` splits any labelled dataset by classes (Split-MNIST
style); :func:`domain_incremental` applies a fixed random pixel permutation or rotation per
experience to the same classes (Permuted- / Rotated-MNIST style).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..data import make_loader
from ..errors import InputError

__all__ = ["Experience", "Stream", "class_incremental", "domain_incremental", "dataset_targets"]


@dataclass
class Experience:
    """One step of a stream: what the model learns from next."""

    id: int
    train: Iterable
    val: Iterable | None = None
    test: Iterable | None = None
    classes: list[int] = field(default_factory=list)
    name: str = ""


class Stream(Sequence[Experience]):
    """An ordered list of experiences (``len``, indexing, iteration)."""

    def __init__(self, experiences: Sequence[Experience], name: str = "stream") -> None:
        if not experiences:
            raise InputError("a stream needs at least one experience")
        ids = [e.id for e in experiences]
        if len(set(ids)) != len(ids):
            raise InputError(f"experience ids must be unique, got {ids}")
        self.experiences = list(experiences)
        self.name = name

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i):  # type: ignore[override]
        return self.experiences[i]

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __repr__(self) -> str:
        return f"Stream({self.name!r}, {len(self)} experiences, classes {[e.classes for e in self]})"


def dataset_targets(ds: Dataset) -> torch.Tensor:
    """Integer labels of every sample of ``ds`` (TensorDataset, ``.targets``, Subset, or by iterating)."""
    if isinstance(ds, TensorDataset):
        return torch.as_tensor(ds.tensors[1]).long()
    if isinstance(ds, Subset):
        return dataset_targets(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    t = getattr(ds, "targets", None)
    if t is not None:
        return torch.as_tensor(t).long()
    try:
        return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any failure means: labels are not reachable
        raise InputError(
            f"cannot read integer labels from {type(ds).__name__}: give it a .targets attribute or "
            "make ds[i] return (input, label)"
        ) from exc


def _split_indices(n: int, fractions: Sequence[float], gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    out, start = [], 0
    for i, f in enumerate(fractions):
        size = n - start if i == len(fractions) - 1 else int(round(f * n))
        out.append(perm[start:start + size])
        start += size
    return out


def _loaders(parts: list[Dataset], batch_size: int, gen: torch.Generator, num_workers: int) -> list[DataLoader | None]:
    out: list[DataLoader | None] = []
    for i, p in enumerate(parts):
        if len(p) == 0:  # type: ignore[arg-type]
            out.append(None)
            continue
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        out.append(make_loader(p, batch_size, train=i == 0, generator=g, num_workers=num_workers))
    return out


def class_incremental(
    dataset: Dataset,
    n_experiences: int = 5,
    *,
    class_order: Sequence[int] | None = None,
    test_dataset: Dataset | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    batch_size: int = 64,
    seed: int = 0,
    num_workers: int = 0,
) -> Stream:
    """Split a labelled dataset by classes into ``n_experiences`` (Split-MNIST protocol).

    Classes are assigned in ``class_order`` (default: a seeded random order) in equal consecutive
    groups. Without ``test_dataset`` each experience's samples are split train / val / test by the
    given fractions; with it, ``test_fraction`` is ignored and the test set is split by class.
    """
    targets = dataset_targets(dataset)
    classes = sorted(int(c) for c in targets.unique())
    if not 1 <= n_experiences <= len(classes):
        raise InputError(f"n_experiences must be in 1..{len(classes)} (the number of classes), got {n_experiences}")
    gen = torch.Generator().manual_seed(seed)
    if class_order is None:
        order = [classes[i] for i in torch.randperm(len(classes), generator=gen).tolist()]
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != classes:
            raise InputError(f"class_order must be a permutation of the dataset's classes {classes}, got {order}")
    per = math.ceil(len(order) / n_experiences)
    groups = [order[i * per:(i + 1) * per] for i in range(n_experiences)]
    test_targets = dataset_targets(test_dataset) if test_dataset is not None else None
    exps = []
    for k, group in enumerate(groups):
        idx = torch.nonzero(torch.isin(targets, torch.tensor(group)), as_tuple=True)[0]
        if test_dataset is None:
            tr, va, te = _split_indices(len(idx), [1 - val_fraction - test_fraction, val_fraction, test_fraction], gen)
            parts: list[Dataset] = [Subset(dataset, idx[tr].tolist()), Subset(dataset, idx[va].tolist()),
                                    Subset(dataset, idx[te].tolist())]
        else:
            tr, va = _split_indices(len(idx), [1 - val_fraction, val_fraction], gen)
            assert test_targets is not None
            tidx = torch.nonzero(torch.isin(test_targets, torch.tensor(group)), as_tuple=True)[0]
            parts = [Subset(dataset, idx[tr].tolist()), Subset(dataset, idx[va].tolist()),
                     Subset(test_dataset, tidx.tolist())]
        train, val, test = _loaders(parts, batch_size, gen, num_workers)
        if train is None:
            raise InputError(f"experience {k} (classes {group}) has no training samples")
        exps.append(Experience(k, train, val, test, sorted(group), f"classes {sorted(group)}"))
    return Stream(exps, "class-incremental")


class _Transformed(Dataset):
    """A dataset whose inputs go through a fixed per-experience transform."""

    def __init__(self, base: Dataset, fn) -> None:
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.base[i][:2]
        return self.fn(x), y


def _permutation(shape: torch.Size, gen: torch.Generator):
    n = int(torch.tensor(shape[-2:]).prod())
    perm = torch.randperm(n, generator=gen)

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], n)
        return flat[..., perm].reshape(x.shape)

    return fn


def _rotation(degrees: float):
    theta = math.radians(degrees)
    rot = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])

    def fn(x: torch.Tensor) -> torch.Tensor:
        img = x.unsqueeze(0) if x.dim() == 3 else x
        grid = torch.nn.functional.affine_grid(rot.unsqueeze(0).to(img.dtype), list(img.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(img, grid, align_corners=False)
        return out.squeeze(0) if x.dim() == 3 else out

    return fn


def domain_incremental(
    dataset: Dataset,
    n_experiences: int = 5,
    *,
    kind: str = "permuted",
    test_dataset: Dataset | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    batch_size: int = 64,
    seed: int = 0,
    first_identity: bool = True,
    num_workers: int = 0,
) -> Stream:
    """The same classes under a new input distribution per experience.

    ``kind="permuted"``: a fixed random pixel permutation per experience; ``"rotated"``: a
    rotation by ``k * 180 / n_experiences`` degrees. Experience 0 is the untransformed data when
    ``first_identity`` (so a model pretrained on the plain data starts the stream). Every
    experience sees a disjoint subset of ``dataset`` (and of ``test_dataset``).
    """
    if kind not in ("permuted", "rotated"):
        raise InputError(f"kind must be 'permuted' or 'rotated', got {kind!r}")
    if n_experiences < 1:
        raise InputError(f"n_experiences must be >= 1, got {n_experiences}")
    x0 = dataset[0][0]
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2:
        raise InputError("domain_incremental needs image tensors (..., H, W) as inputs")
    gen = torch.Generator().manual_seed(seed)
    n = len(dataset)  # type: ignore[arg-type]
    shards = _split_indices(n, [1 / n_experiences] * n_experiences, gen)
    tshards = (_split_indices(len(test_dataset), [1 / n_experiences] * n_experiences, gen)  # type: ignore[arg-type]
               if test_dataset is not None else None)
    exps = []
    for k in range(n_experiences):
        if k == 0 and first_identity:
            fn = None
        elif kind == "permuted":
            fn = _permutation(x0.shape, gen)
        else:
            fn = _rotation(k * 180.0 / n_experiences)
        idx = shards[k]
        if test_dataset is None:
            tr, va, te = _split_indices(len(idx), [1 - val_fraction - test_fraction, val_fraction, test_fraction], gen)
            parts: list[Dataset] = [Subset(dataset, idx[i].tolist()) for i in (tr, va, te)]
        else:
            tr, va = _split_indices(len(idx), [1 - val_fraction, val_fraction], gen)
            assert tshards is not None
            parts = [Subset(dataset, idx[tr].tolist()), Subset(dataset, idx[va].tolist()),
                     Subset(test_dataset, tshards[k].tolist())]
        if fn is not None:
            parts = [_Transformed(p, fn) for p in parts]
        train, val, test = _loaders(parts, batch_size, gen, num_workers)
        if train is None:
            raise InputError(f"experience {k} has no training samples")
        classes = sorted(int(c) for c in dataset_targets(dataset)[idx].unique())
        exps.append(Experience(k, train, val, test, classes, f"{kind} {k}" if fn is not None else "original"))
    return Stream(exps, f"{kind} domain-incremental")
