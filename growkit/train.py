"""Training and evaluation: the one training loop, its schedule and optimizer, shared by grow(),
the search passes, pruning, streams and benchmarks."""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError, NonFiniteLoss
from .outputs import check_logits_targets

__all__ = ["BatchFn", "LossFn", "default_batch_fn", "default_loss", "iter_batches", "train_steps", "train_batches",
           "mask_logits", "evaluate", "NonFiniteLoss", "PhaseStats", "loader_length", "num_batches", "cosine_schedule",
           "forward", "forward_checked", "logits_of", "first_batch", "first_input"]

logger = logging.getLogger(__name__)

BatchFn = Callable[[Any], tuple[Any, torch.Tensor]]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

_X_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def default_batch_fn(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(x, y)`` from a tuple/list batch or a dict with common key names."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, dict):
        xk = next((k for k in _X_KEYS if k in batch), None)
        yk = next((k for k in _Y_KEYS if k in batch), None)
        if xk is None or yk is None:
            raise InputError(
                f"dict batch with keys {sorted(batch)}: growkit looks for one of {_X_KEYS} and one of "
                f"{_Y_KEYS}; pass batch_fn=lambda b: (inputs, targets) for other layouts"
            )
        x, y = batch[xk], batch[yk]
    else:
        raise InputError(
            f"loader yielded {type(batch).__name__}; expected (inputs, targets) or a dict, or pass "
            "batch_fn=lambda b: (inputs, targets)"
        )
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(
            f"loader yielded inputs of type {type(x).__name__} and targets of type {type(y).__name__}; "
            "both must be torch.Tensor (use a transform such as ToTensor, or batch_fn)"
        )
    return x, y


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def iter_batches(loader: Iterable, batch_fn: BatchFn | None, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """Yield device-placed ``(x, y)``; raises :class:`InputError` for an empty loader."""
    fn = batch_fn or default_batch_fn
    n = 0
    for batch in loader:
        x, y = fn(batch)
        n += 1
        yield _to(x, device), _to(y, device)
    if n == 0:
        raise InputError("the data loader yielded no batches; check the dataset is not empty")


@dataclass
class PhaseStats:
    """Running totals of a training phase (continued across epochs and resumes)."""

    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def train_accuracy(self) -> float | None:
        return self.correct / self.seen if self.seen else None


def forward(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(*x)`` for a tuple / list of inputs."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def logits_of(out: Any, loss_fn: Any = None) -> torch.Tensor:
    """The logits tensor of a model output: what ``loss_fn.select`` picks (``grow(output=...)``,
    :class:`growkit.outputs.OutputLoss`), else the tensor, or the first of a dict / tuple."""
    select = getattr(loss_fn, "select", None)
    if select is not None:
        return select(out)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise InputError(f"model returned {type(out).__name__}; growkit needs a tensor (or dict/tuple of them)")


def default_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy on the model's only output; several outputs need ``output=`` (no guessing)."""
    many = list(out.values()) if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else None
    if many is not None and len(many) > 1:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in many]
        raise InputError(
            f"the model returns {len(many)} outputs {shapes}{' with keys ' + str(list(out)) if isinstance(out, dict) else ''}; "
            "growkit does not guess which are the logits: pass output=KEY / INDEX / callable to grow(), or loss_fn="
        )
    logits = logits_of(out)
    check_logits_targets(logits, y)
    return F.cross_entropy(logits, y)


def _shapes(x: Any) -> list[tuple[int, ...]]:
    xs = x if isinstance(x, (tuple, list)) else [x]
    return [tuple(t.shape[1:]) for t in xs if isinstance(t, torch.Tensor)]


def forward_checked(model: nn.Module, x: Any, first: list[tuple[int, ...]] | None, n: int) -> Any:
    """Forward, after checking the batch has the first batch's shape beyond the batch axis.

    A traced and grown model is built for one input shape (growth points, resampling ops); a
    stray batch would fail deep inside a conv or, worse, silently run at another resolution.
    """
    if first is not None and _shapes(x) != first:
        raise InputError(
            f"batch {n + 1} has inputs of shape {_shapes(x)} (beyond the batch axis) where the first batch had "
            f"{first}; every batch needs the same shape (check the dataset's transforms or collate_fn)"
        )
    return forward(model, x)


def train_steps(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    *,
    epochs: int = 1,
    scheduler: Any = None,
    loss_fn: LossFn | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "train",
    after_step: Callable[[], None] | None = None,
    start_epoch: int = 0,
    stats: PhaseStats | None = None,
    on_epoch_end: Callable[[int, PhaseStats], None] | None = None,
) -> PhaseStats:
    """Train ``model`` for epochs ``start_epoch .. epochs - 1`` over ``loader``.

    The scheduler steps per batch. ``stats`` continues the totals of an interrupted phase;
    ``on_epoch_end(epoch, stats)`` runs after each epoch (checkpointing hooks in there).
    """
    device = device or next(model.parameters()).device
    model.train()
    st = stats if stats is not None else PhaseStats()
    # A bar redrawn in place turns into one long line in a log file: there, print a line per epoch.
    interactive = progress and sys.stderr.isatty()
    for ep in range(start_epoch, epochs):
        it = iter_batches(loader, batch_fn, device)
        bar = tqdm(it, desc=f"{desc} {ep + 1}/{epochs}", total=loader_length(loader), unit="batch", leave=False,
                   disable=not interactive, dynamic_ncols=True)
        t0, steps0, loss0, correct0, seen0 = time.perf_counter(), st.steps, st.loss_sum, st.correct, st.seen
        train_batches(model, bar, optimizer, scheduler=scheduler, loss_fn=loss_fn, extra_loss=extra_loss,
                      after_step=after_step, stats=st, desc=desc,
                      on_step=(lambda s: bar.set_postfix(loss=f"{s.mean_loss:.4f}")) if interactive else None)
        if progress and not interactive:
            n = st.steps - steps0
            acc = f", train acc {100 * (st.correct - correct0) / (st.seen - seen0):.2f} %" if st.seen > seen0 else ""
            print(f"{desc} {ep + 1}/{epochs}: {n} batches in {time.perf_counter() - t0:.1f} s, "
                  f"loss {(st.loss_sum - loss0) / max(n, 1):.4f}{acc}", file=sys.stderr, flush=True)
        if on_epoch_end is not None:
            on_epoch_end(ep, st)
    return st


def train_batches(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    *,
    scheduler: Any = None,
    loss_fn: LossFn | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    stats: PhaseStats | None = None,
    desc: str = "train",
    on_step: Callable[[PhaseStats], None] | None = None,
) -> PhaseStats:
    """The training loop: one optimizer step per device-placed ``(x, y)`` of ``batches``.

    Raises :class:`NonFiniteLoss` on a NaN / Inf loss (before the step), :class:`InputError` on a
    batch whose shape differs from the first one's (beyond the batch axis). :func:`train_steps`
    runs it per epoch over a loader; search passes run it over a fixed number of batches.
    """
    loss_fn = loss_fn or default_loss
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    st = stats if stats is not None else PhaseStats()
    first = None
    for i, (x, y) in enumerate(batches):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out = forward_checked(model, x, first, i)
        first = first or _shapes(x)
        loss = loss_fn(out, y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at step {st.steps} of phase '{desc}'")
        full = loss + extra_loss() if extra_loss is not None else loss
        full.backward()
        for opt in optimizers:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        st.loss_sum += float(loss.detach())
        st.steps += 1
        logits = logits_of(out, loss_fn)
        if logits.dim() == 2 and y.dim() == 1:
            st.correct += int((logits.detach().argmax(1) == y).sum())
            st.seen += int(y.numel())
        if on_step is not None:
            on_step(st)
    return st


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step cosine decay to 0 over ``steps`` (restarted for every phase).

    ``warmup_steps`` > 0 first ramps the rate linearly from ``1/warmup_steps`` of its peak to the peak
    (the re-warmed, shorter schedule LEMON trains expanded models with); the cosine then spans the
    remaining ``steps - warmup_steps``.
    """
    if warmup_steps < 0 or steps < 0:
        raise InputError(f"schedule lengths must be >= 0, got steps={steps}, warmup_steps={warmup_steps}")
    decay = max(steps - warmup_steps, 1)

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(s - warmup_steps, decay) / decay))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def num_batches(loader: Iterable) -> int:
    """``len(loader)``, or 1000 for loaders without a length (only sets the schedule's horizon)."""
    n = loader_length(loader)
    return 1000 if n is None else n


def loader_length(loader: Iterable) -> int | None:
    """Batches per epoch when the loader knows it (a ``DataLoader``), else ``None`` (a generator)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: LossFn | None = None,
    batch_fn: BatchFn | None = None,
    device: torch.device | None = None,
    classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy (eval mode; the training flag is restored).

    ``classes``: task-incremental evaluation of a single shared head: only these logits compete
    (the others are set to ``-inf`` before the argmax and the loss), as when a task id tells
    which classes the sample can be. ``None``: class-incremental, all logits compete.
    """
    device = device or next(model.parameters()).device
    loss_fn = loss_fn or default_loss
    if classes is not None:
        classes = [int(c) for c in classes]
        if not classes or min(classes) < 0:
            raise InputError(f"classes must be a non-empty list of class indices >= 0, got {classes!r}")
    was = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    # A DataLoader iterator draws its base seed from torch's global generator: without the fork, every
    # evaluation would shift the random stream of the training that follows it (a run's result would
    # depend on how often it is evaluated).
    with torch.random.fork_rng(devices=[]):
        try:
            first = None
            for i, (x, y) in enumerate(iter_batches(loader, batch_fn, device)):
                out = forward_checked(model, x, first, i)
                first = first or _shapes(x)
                b = int(y.shape[0]) if y.dim() else 1
                if classes is not None:
                    out = mask_logits(logits_of(out, loss_fn), classes)
                total += float(loss_fn(out, y)) * b
                n += b
                logits = logits_of(out, loss_fn)
                if logits.dim() == 2 and y.dim() == 1:
                    correct += int((logits.argmax(1) == y).sum())
        finally:
            model.train(was)
    loss = total / max(n, 1)
    return {"loss": loss if math.isfinite(loss) else float("inf"), "accuracy": correct / max(n, 1), "n": n}


def mask_logits(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``logits`` (batch, n_classes) with every column outside ``classes`` set to ``-inf``."""
    if logits.dim() != 2:
        raise InputError(f"task-incremental evaluation needs (batch, classes) logits, got shape {tuple(logits.shape)}")
    if max(classes) >= logits.shape[1]:
        raise InputError(f"classes {list(classes)} go beyond the model's {logits.shape[1]} outputs")
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(classes), device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def first_batch(loader: Iterable, batch_fn: BatchFn | None) -> tuple[Any, torch.Tensor]:
    """The first batch as ``(inputs, targets)`` (one read of the loader)."""
    for batch in loader:
        return (batch_fn or default_batch_fn)(batch)
    raise InputError("the data loader yielded no batches; check the dataset is not empty")


def first_input(loader: Iterable, batch_fn: BatchFn | None, batch: tuple[Any, torch.Tensor] | None = None) -> Any:
    """The first batch's inputs (or ``batch``'s), sliced to batch 1 (used as ``example_input``)."""
    x, _ = batch if batch is not None else first_batch(loader, batch_fn)
    if isinstance(x, torch.Tensor):
        return x[:1].detach().cpu()
    return tuple(t[:1].detach().cpu() for t in x)
