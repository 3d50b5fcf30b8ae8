"""The set-up every run over a user's model shares (grow, prune, grow_stream).

Seed, device, the validation loader's default and the example input are settled here, once, in
the same order for every entry point: the seed first (the first batch may shuffle with torch's
global generator), then the example input sliced from the first batch and checked against it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .core.graph import as_args
from .errors import InputError
from .train import BatchFn, LossFn, first_batch, first_input

__all__ = ["RunSetup", "set_up_run", "check_example"]

logger = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """The data side of a run: loaders, how batches become ``(x, y)``, loss, device, example input.

    ``example`` is on the CPU (batch 1), as tracing wants it; ``val_loader`` is ``None`` only for
    runs that select nothing on validation data (streams).
    """

    loader: Iterable
    val_loader: Iterable | None
    example: tuple[torch.Tensor, ...]
    device: torch.device
    loss_fn: LossFn | None = None
    batch_fn: BatchFn | None = None
    progress: bool = False
    first_batch: tuple[Any, torch.Tensor] | None = None
    """The training loader's first batch as read for the example (``None`` if it was not read)."""

    def example_on_device(self) -> tuple[torch.Tensor, ...]:
        return tuple(a.to(self.device) for a in self.example)


def check_example(example: tuple[torch.Tensor, ...], loader_x: Any) -> None:
    """Raise :class:`InputError` when ``example`` does not match the loader's inputs (beyond batch)."""
    xs = as_args(loader_x)
    if len(xs) != len(example) or any(tuple(a.shape[1:]) != tuple(b.shape[1:]) for a, b in zip(example, xs)):
        raise InputError(
            f"example_input shapes {[tuple(a.shape) for a in example]} do not match the loader's "
            f"inputs {[tuple(b.shape) for b in xs]} (beyond the batch axis); pass a batch-1 slice of "
            "a real batch, or leave example_input=None"
        )


def set_up_run(model: nn.Module, loader: Iterable, val_loader: Iterable | None = None, *, example_input: Any = None,
               loss_fn: LossFn | None = None, batch_fn: BatchFn | None = None, device: str | torch.device | None = None,
               seed: int | None = None, progress: bool = False, selects: str | None = "models",
               check: bool = True, per_example: bool = False) -> RunSetup:
    """Seed torch, pick the device (default: the model's), default the validation loader and take
    the example input.

    ``selects`` names what is chosen on validation data, for the warning when ``val_loader`` is
    ``None`` (then the training loader is used); ``selects=None`` leaves ``val_loader`` as given.
    ``check=False`` takes a given ``example_input`` without reading a batch to check it against
    (streams: reading a shuffled loader once more would draw from torch's generator).
    ``per_example=True`` cuts a given example input to batch 1 (grow: costs and plans are per example).
    """
    if seed is not None:
        torch.manual_seed(seed)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if val_loader is None and selects is not None:
        logger.warning("no val_loader given: %s are selected on the training data", selects)
        val_loader = loader
    batch = None
    if example_input is not None and not check:
        example = as_args(example_input)
    else:
        batch = first_batch(loader, batch_fn)  # one read of the loader
        loader_x = first_input(loader, batch_fn, batch)
        example = as_args(example_input if example_input is not None else loader_x)
        check_example(example, loader_x)
    if per_example:
        example = tuple(a[:1] if a.dim() else a for a in example)
    return RunSetup(loader, val_loader, example, dev, loss_fn, batch_fn, progress, batch)
