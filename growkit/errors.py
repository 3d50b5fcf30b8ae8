"""Exception types raised by growkit.

Every error a user can trigger derives from :class:`GrowkitError`, so callers can catch one
type; the subclasses also derive from the matching builtin (``ValueError``, ``RuntimeError``)
so existing ``except ValueError`` code keeps working.
"""
from __future__ import annotations

__all__ = [
    "GrowkitError",
    "TraceError",
    "InputError",
    "PointError",
    "OpError",
    "PlanError",
    "BudgetError",
    "ExportError",
    "ResourceError",
    "LockError",
    "NonFiniteLoss",
]


class GrowkitError(Exception):
    """Base class of all growkit errors.

    ``cli=`` is the same message worded for the command line (``--resume`` rather than
    ``resume=True``); the ``growkit`` command prints it instead of the Python wording.
    """

    def __init__(self, *args: object, cli: str | None = None) -> None:
        super().__init__(*args)
        self.cli = cli

    def cli_message(self) -> str:
        """The message a command-line user should read."""
        return self.cli or str(self)


class TraceError(GrowkitError, RuntimeError):
    """The model could not be traced with torch.fx, or the trace is not exact."""


class InputError(GrowkitError, ValueError):
    """An argument (example input, loader, option) is not usable."""


class PointError(GrowkitError, ValueError):
    """A growth point or eligible input that does not exist or does not fit."""


class OpError(GrowkitError, ValueError):
    """An unknown op, or an op that cannot map an input onto a growth point."""


class PlanError(GrowkitError, ValueError):
    """A growth plan that is malformed or does not match the base model or weights."""


class BudgetError(GrowkitError, ValueError):
    """A budget that is malformed."""


class ExportError(GrowkitError, RuntimeError):
    """ONNX export failed or its output does not match PyTorch."""


class ResourceError(GrowkitError, RuntimeError):
    """The device ran out of memory (the message says what was being trained and what to reduce)."""


class LockError(GrowkitError, RuntimeError):
    """Another live process holds the checkpoint directory (the message names it)."""


class NonFiniteLoss(GrowkitError, RuntimeError):
    """Training diverged: the loss, a model output or a grown gate ``eta`` became NaN / Inf (or
    ``|eta|`` passed ``max_eta``). Growth rolls back on its own; this reaches the caller when the
    run diverges without growth (lower the learning rate)."""
