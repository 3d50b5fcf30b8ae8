"""Validation at the API boundary: arguments of grow(), loaders, and the bounds a plan file must keep.

Everything read from a file is data: a plan's shapes, dtypes, names and sizes are checked against
the bounds below *before* anything is allocated or built, and a bad value is a
:class:`~growkit.PlanError`. A bad argument is an :class:`~growkit.InputError` that names the
argument and what to pass instead.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from torch import nn

from .errors import InputError, PlanError

__all__ = [
    "MAX_INPUTS",
    "MAX_INPUT_DIMS",
    "MAX_INPUT_ELEMENTS",
    "MAX_EDITS",
    "MAX_EDGES",
    "check_module_path",
    "MAX_NAME_LEN",
    "PLAN_DTYPES",
    "check_number",
    "check_int",
    "check_choice",
    "check_loader",
    "check_plan_inputs",
    "check_plan_name",
    "check_edit_key",
    "check_plan_size",
]

MAX_INPUTS = 8
"""Most model inputs a plan may record."""
MAX_INPUT_DIMS = 6
MAX_INPUT_ELEMENTS = 1 << 22
"""Most elements of one recorded example input beyond the batch axis (4 Mi: 3 x 1182 x 1182)."""
MAX_DIM = 1 << 16
MAX_EDITS = 10_000
MAX_EDGES = 64
MAX_NAME_LEN = 256
MAX_PLAN_BYTES = 64 << 20
PLAN_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")
"""Input dtypes a plan may record (a zero tensor of them is what re-traces the base model)."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_KEYS = frozenset(dir(nn.ModuleDict()))


def check_number(name: str, v: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 allow_inf: bool = False) -> float:
    """``v`` as a float when it is a real, finite (or, if allowed, +inf) number within the bounds."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{name} must be a number, got {type(v).__name__} {v!r}; pass e.g. {name}=0.01")
    f = float(v)
    if math.isnan(f) or (math.isinf(f) and not (allow_inf and f > 0)):
        raise InputError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        raise InputError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and f > hi:
        raise InputError(f"{name} must be <= {hi}, got {v!r}")
    return f


def check_int(name: str, v: Any, *, lo: int = 0, hi: int | None = None, optional: bool = False) -> int | None:
    """``v`` when it is an int (not a bool) within ``[lo, hi]``; ``None`` passes when ``optional``."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{name} must be an int >= {lo}{' or None' if optional else ''}, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise InputError(f"{name} must be an int in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return v


def check_choice(name: str, v: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(v, str) or v not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def check_loader(loader: Any, name: str = "loader") -> None:
    """A loader must be re-iterable: growkit reads it once per epoch and phase."""
    if loader is None or isinstance(loader, (str, bytes, dict)) or not hasattr(loader, "__iter__"):
        raise InputError(f"{name} must be an iterable of batches (a DataLoader or a list), got {type(loader).__name__}")
    try:
        one_shot = iter(loader) is loader
    except TypeError as exc:
        raise InputError(f"{name} is not iterable ({exc})") from exc
    if one_shot:
        raise InputError(
            f"{name} is a one-shot iterator ({type(loader).__name__}): growkit reads the data once per epoch "
            "and phase, so it would be empty after the first pass; pass a list of batches or a DataLoader"
        )


# ---------------------------------------------------------------- plan bounds
def check_plan_size(n_bytes: int, what: str) -> None:
    if n_bytes > MAX_PLAN_BYTES:
        raise PlanError(f"{what} is {n_bytes:,} bytes; a growkit plan is at most {MAX_PLAN_BYTES:,}")


def check_plan_name(v: Any, what: str) -> str:
    """A node / op / key identifier of bounded length."""
    if not isinstance(v, str) or len(v) > MAX_NAME_LEN or not _NAME.match(v):
        shown = v if not isinstance(v, str) else v[:60]
        raise PlanError(f"plan {what} {shown!r} is not a node/op identifier (letters, digits, '_'; at most "
                        f"{MAX_NAME_LEN} characters)")
    return v


_PATH_PART = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)$")


def check_module_path(v: Any, what: str) -> str:
    """A dotted module path (``layer1.0.conv1``) of bounded length: data, never resolved by getattr."""
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_LEN or not all(_PATH_PART.match(p) for p in v.split(".")):
        shown = v if not isinstance(v, str) else v[:60]
        raise PlanError(f"plan {what} {shown!r} is not a module path (names or indices joined by '.'; at most "
                        f"{MAX_NAME_LEN} characters)")
    return v


def check_edit_key(v: Any) -> str:
    """An edit key names a module in a ModuleDict: no dunder names or ModuleDict attributes."""
    check_plan_name(v, "edit key")
    if v.startswith("_") or v in _RESERVED_KEYS:
        raise PlanError(f"plan edit key {v!r} is reserved (an attribute of nn.ModuleDict); keys look like 'g0', 'g1'")
    return v


def check_plan_inputs(shapes: Any, dtypes: Any) -> tuple[list[list[int]], list[str]]:
    """Recorded example-input shapes and dtypes, bounded so that re-tracing allocates little.

    The batch axis is normalised to 1 (older plans recorded the batch they were traced with).
    """
    if not isinstance(shapes, list) or len(shapes) > MAX_INPUTS:
        raise PlanError(f"plan input_shapes must be a list of at most {MAX_INPUTS} shapes")
    out = []
    for s in shapes:
        if not (isinstance(s, list) and len(s) <= MAX_INPUT_DIMS
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_DIM for v in s)):
            raise PlanError(f"plan input shape {str(s)[:80]} must be a list of at most {MAX_INPUT_DIMS} positive ints "
                            f"(each <= {MAX_DIM})")
        n = math.prod(s[1:])
        if n > MAX_INPUT_ELEMENTS:
            raise PlanError(
                f"plan input shape {s} has {n:,} elements per example (limit {MAX_INPUT_ELEMENTS:,}); "
                "pass example_input= to growkit.load to re-trace with an input of your own"
            )
        out.append([1, *s[1:]] if s else [])
    if not isinstance(dtypes, list) or len(dtypes) > MAX_INPUTS or (dtypes and len(dtypes) != len(out)):
        raise PlanError("plan input_dtypes must be a list with one dtype per input shape")
    for dt in dtypes:
        if dt not in PLAN_DTYPES:
            raise PlanError(f"plan input dtype {str(dt)[:40]!r} is not one of {', '.join(PLAN_DTYPES)}")
    return out, list(dtypes)


COST_AXES = ("params", "flops", "latency_ms")
SELECTIONS = ("alpha", "random")


def check_grow_settings(cfg: Any) -> None:
    """The numeric and named settings of :func:`growkit.grow`: ``cfg`` is its
    :class:`growkit.GrowConfig` (read by attribute; this module imports nothing above it)."""
    check_number("lr", cfg.lr, lo=0.0, lo_open=True)
    check_number("candidate_lr", cfg.candidate_lr, lo=0.0, lo_open=True)
    check_number("new_lr_mult", cfg.new_lr_mult, lo=0.0, lo_open=True)
    check_number("momentum", cfg.momentum, lo=0.0, hi=1.0)
    check_number("weight_decay", cfg.weight_decay, lo=0.0)
    check_number("l1", cfg.l1, lo=0.0)
    check_number("new_only", cfg.new_only, lo=0.0, hi=1.0)
    check_number("eps", cfg.eps, lo=0.0)
    check_number("max_eta", cfg.max_eta, lo=0.0, lo_open=True, allow_inf=True)
    check_int("search_epochs", cfg.search_epochs, lo=0)
    check_int("finetune_epochs", cfg.finetune_epochs, lo=0)
    check_int("max_ops", cfg.max_ops, lo=1)
    check_int("max_inputs", cfg.max_inputs, lo=1, optional=True)
    check_int("points_per_round", cfg.points_per_round, lo=1, optional=True)
    check_int("seed", cfg.seed, lo=-(2 ** 63), optional=True)
    check_choice("cost_axis", cfg.cost_axis, COST_AXES)
    check_choice("selection", cfg.selection, SELECTIONS)
