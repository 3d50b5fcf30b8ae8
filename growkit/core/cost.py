"""Cost of a model: parameter count, FLOPs (torch.utils.flop_counter), measured latency."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import BudgetError
from .graph import as_args

__all__ = ["Cost", "Budget", "count_params", "count_flops", "flop_counter", "measure_latency_ms", "measure"]


@dataclass(frozen=True)
class Cost:
    """Serving cost of one model (per example for FLOPs and latency at batch 1)."""

    params: int
    flops: int
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flop_counter(model: nn.Module, example_input: Any) -> FlopCounterMode:
    """The ``FlopCounterMode`` of one eval forward pass of ``model`` on ``example_input`` (the
    training flag is restored): totals and per-module counts, growkit's one FLOP count."""
    args = as_args(example_input)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was)
    return counter


def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs of one forward pass on ``example_input`` (eval mode), via ``FlopCounterMode``."""
    return int(flop_counter(model, example_input).get_total_flops())


def measure_latency_ms(model: nn.Module, example_input: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of an eval forward pass in milliseconds, on the model's device."""
    args = as_args(example_input)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    args = tuple(a.to(dev) for a in args)
    was = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                model(*args)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= warmup:
                    times.append(1e3 * (time.perf_counter() - t0))
    finally:
        model.train(was)
    return statistics.median(times)


def measure(model: nn.Module, example_input: Any, latency: bool = False) -> Cost:
    """Params, FLOPs and (optionally) latency of ``model``; ``example_input`` should be batch 1."""
    cpu_input = tuple(a.to(next((p.device for p in model.parameters()), torch.device("cpu"))) for a in as_args(example_input))
    return Cost(
        count_params(model),
        count_flops(model, cpu_input),
        measure_latency_ms(model, cpu_input) if latency else None,
    )


@dataclass(frozen=True)
class Budget:
    """Limits on the grown model's cost.

    With ``relative=True`` (default) each limit is a ratio to the base model's cost
    (``Budget(params=1.2)`` = at most +20 % parameters); with ``relative=False`` they are
    absolute (parameters, FLOPs, milliseconds). ``None`` = no limit on that axis.
    """

    params: float | None = None
    flops: float | None = None
    latency_ms: float | None = None
    relative: bool = True

    def __post_init__(self) -> None:
        for k in ("params", "flops", "latency_ms"):
            v = getattr(self, k)
            if v is None:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise BudgetError(f"Budget.{k} must be finite, got {v!r}; leave it None for no limit on {k}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise BudgetError(f"Budget.{k} must be a positive number or None, got {v!r}")
            if self.relative and v < 1.0:
                raise BudgetError(
                    f"Budget.{k}={v} is a ratio below 1: growth can only add cost. Use e.g. 1.2 for "
                    "+20 %, or relative=False for an absolute limit",
                    cli=f"--budget {k}={v:g} is a ratio below 1: growth can only add cost. Use e.g. "
                        f"{k}=1.2 for +20 %, or abs:{k}=N for an absolute limit",
                )

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """Parse ``"params=1.2,flops=1.5"`` (ratios) or ``"abs:params=2e6"`` (absolute)."""
        relative = True
        if text.startswith("abs:"):
            relative, text = False, text[4:]
        kw: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise BudgetError(f"budget item {part!r} must look like params=1.2")
            k, v = part.split("=", 1)
            if k not in ("params", "flops", "latency_ms"):
                raise BudgetError(f"unknown budget axis {k!r}; use params, flops or latency_ms")
            try:
                kw[k] = float(v)
            except ValueError as exc:
                raise BudgetError(f"budget value {v!r} is not a number") from exc
        return cls(**kw, relative=relative)

    def limits(self, base: Cost) -> dict[str, float]:
        """Absolute limits given the base model's cost."""
        out = {}
        for k in ("params", "flops", "latency_ms"):
            v = getattr(self, k)
            if v is None:
                continue
            if self.relative:
                ref = getattr(base, k)
                if ref is None:
                    raise BudgetError(f"a relative {k} budget needs the base model's {k}")
                v = v * ref
            out[k] = float(v)
        return out

    def describe(self, base: Cost) -> str:
        """The limits as a person reads them, e.g. ``params <= 30,634 (1.5x base)``."""
        units = {"params": "{:,.0f}", "flops": "{:,.0f}", "latency_ms": "{:.2f} ms"}
        parts = []
        for k, lim in self.limits(base).items():
            ratio = f" ({getattr(self, k):g}x base)" if self.relative else ""
            parts.append(f"{k} <= {units[k].format(lim)}{ratio}")
        return ", ".join(parts) or "none"

    def allows(self, cost: Cost, base: Cost) -> bool:
        for k, lim in self.limits(base).items():
            v = getattr(cost, k)
            if v is not None and v > lim * (1 + 1e-9):
                return False
        return True

    @property
    def needs_latency(self) -> bool:
        return self.latency_ms is not None
