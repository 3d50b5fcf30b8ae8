"""Fine-tuning for the same wall-clock: the baseline a growth run has to beat.

``grow(compare_finetune=True)`` hands the base model, after the growth, to :func:`finetune_for`
with the wall-clock the growth took: plain SGD (the run's ``lr``, ``momentum``,
``weight_decay``) over the same training loader, its rate annealed by a cosine over *time*
rather than steps (the number of steps that fit is not known in advance), stopped at the
deadline, then evaluated on the same validation loader. ``GrowResult.report()`` puts the two side
by side, so a user sees on the first try whether growing paid for its compute.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..core.safecopy import copy_module
from ..runsetup import RunSetup
from ..train import evaluate, iter_batches, train_batches
from .config import GrowConfig

__all__ = ["FinetuneBaseline", "finetune_for", "train_for"]


@dataclass
class FinetuneBaseline:
    """The base model fine-tuned for ``seconds`` of wall-clock (the growth's)."""

    model: nn.Module = field(repr=False)
    seconds: float
    """the time budget: the wall-clock of the growth it is compared with"""
    steps: int
    val_accuracy: float
    val_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "steps": self.steps, "val_accuracy": self.val_accuracy,
                "val_loss": self.val_loss}


def train_for(model: nn.Module, setup: RunSetup, optimizer: torch.optim.Optimizer, seconds: float, *,
              desc: str = "train (timed)") -> int:
    """Train ``model`` in place over ``setup.loader`` (epoch after epoch) until ``seconds`` of
    wall-clock have passed, every group's rate annealed by a cosine over that *time* (the number of
    steps that fit is not known in advance); returns the number of steps taken. The model trains in
    train mode (a base handed over in eval mode would otherwise fine-tune with frozen norm statistics)."""
    model.train()
    start = time.perf_counter()
    deadline = start + max(0.0, seconds)

    def factor(_: int) -> float:
        done = min(1.0, (time.perf_counter() - start) / seconds) if seconds > 0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def batches() -> Iterator[tuple[Any, torch.Tensor]]:
        while time.perf_counter() < deadline:
            seen = 0
            for b in iter_batches(setup.loader, setup.batch_fn, setup.device):
                if time.perf_counter() >= deadline:
                    return
                seen += 1
                yield b
            if not seen:
                return

    return train_batches(model, batches(), optimizer, scheduler=sched, loss_fn=setup.loss_fn, desc=desc).steps


def finetune_for(model: nn.Module, setup: RunSetup, cfg: GrowConfig, seconds: float) -> FinetuneBaseline:
    """A copy of ``model`` (not modified) fine-tuned for ``seconds`` of wall-clock, and its metrics."""
    m = copy_module(model).to(setup.device)
    opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = train_for(m, setup, opt, seconds, desc="fine-tune (same time)")
    metrics = evaluate(m, setup.val_loader, loss_fn=setup.loss_fn, batch_fn=setup.batch_fn, device=setup.device)
    return FinetuneBaseline(m, float(seconds), steps, float(metrics["accuracy"]), metrics.get("loss"))
