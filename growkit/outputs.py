"""Which of a model's outputs are the logits, and whether the targets fit them.

growkit trains with cross entropy on ``(batch, classes)`` logits. A model that returns several
tensors (``(features, logits)``, a dict) gets no guess: :func:`grow` takes ``output=`` (a key,
an index, or a callable) and :class:`OutputLoss` applies it before the loss and the accuracy.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import InputError

__all__ = ["OutputLoss", "select_output", "check_logits_targets", "output_label"]



def _fix() -> str:
    return "pass output=KEY (dict), output=INDEX (tuple) or output=callable to grow(), or loss_fn="


def select_output(out: Any, output: Any) -> torch.Tensor:
    """The logits chosen by ``output`` from a model output; raises :class:`InputError` when they
    are not a ``(batch, classes)`` tensor."""
    try:
        if callable(output):
            got = output(out)
        elif isinstance(output, str):
            got = out[output] if isinstance(out, dict) else getattr(out, output)
        else:
            got = out[output]
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        keys = list(out) if isinstance(out, dict) else f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise InputError(f"output={output!r} selects nothing from the model's output ({keys}): {exc}") from exc
    if not isinstance(got, torch.Tensor) or got.dim() != 2:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise InputError(f"output={output!r} selects {shape}, not (batch, classes) logits; {_fix()}")
    return got


def output_label(output: Any) -> Any:
    """JSON-able record of a selector (for the run's settings)."""
    return output if output is None or isinstance(output, (str, int)) else f"callable {getattr(output, '__name__', '?')}"


def check_logits_targets(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Targets cross entropy accepts: int class labels in range, or soft targets of the logits' shape."""
    if logits.dim() != 2:
        raise InputError(f"the model's output has shape {tuple(logits.shape)}; cross entropy needs (batch, classes) "
                         f"logits: {_fix()}")
    if y.shape[:1] != logits.shape[:1]:
        raise InputError(f"{tuple(y.shape)} targets for {logits.shape[0]} outputs: the loader's targets do not match "
                         "its batch (check batch_fn / the dataset's target transform)")
    if y.dim() == 2 and y.shape == logits.shape and y.is_floating_point():
        return  # class probabilities
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"targets of dtype {y.dtype} and shape {tuple(y.shape)}: cross entropy needs class indices "
                         "(1-D torch.long, e.g. y.long()) or (batch, classes) probabilities; or pass loss_fn=")
    if y.numel():
        ok = (y == -100) | ((y >= 0) & (y < logits.shape[1]))  # -100: cross entropy's ignore_index
        if not bool(ok.all()):
            bad = y[~ok]
            raise InputError(f"labels {sorted(set(bad[:5].tolist()))} are outside [0, {logits.shape[1] - 1}] (the model "
                             f"has {logits.shape[1]} classes); remap the labels or give the model a head with more classes")


class OutputLoss:
    """``loss_fn(select_output(out, output), y)`` (cross entropy by default); ``select`` is what
    the training loops use for accuracy."""

    def __init__(self, output: Any, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> None:
        if not (callable(output) or isinstance(output, str) or (isinstance(output, int) and not isinstance(output, bool))):
            raise InputError(f"output must be a key (str), an index (int) or a callable, got {type(output).__name__}")
        self.output, self.loss_fn = output, loss_fn

    def select(self, out: Any) -> torch.Tensor:
        return select_output(out, self.output)

    def __call__(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        logits = self.select(out)
        if self.loss_fn is not None:
            return self.loss_fn(logits, y)
        check_logits_targets(logits, y)
        return torch.nn.functional.cross_entropy(logits, y)
