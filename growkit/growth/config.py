"""``GrowConfig``: every setting of a grow() run, typed, built once and passed down.

grow() builds it from its arguments; the run, the Petridish jobs (in this process or on a Ray
worker) and the search passes read its fields. Its JSON form (:meth:`GrowConfig.to_json`) is
written into every checkpoint and compared on resume, so a run continues only with the settings
it started with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..core.cost import Budget
from ..core.tie import check_tie
from ..errors import InputError
from ..newparams import DEFAULT_CLIP, DEFAULT_MAX_ETA, DEFAULT_MAX_LR, DEFAULT_WARMUP, NewParamRule
from ..outputs import output_label
from ..validate import check_grow_settings

__all__ = ["GrowConfig"]


@dataclass(frozen=True)
class GrowConfig:
    """The settings of one grow() run (see :func:`growkit.grow` for what each one does).

    ``ops`` and ``points`` given as iterables are stored as tuples. Building one validates every
    setting. The loop's data (loaders, ``loss_fn``, ``batch_fn``, device) is not configuration: it
    travels in :class:`growkit.runsetup.RunSetup`.
    """

    method: str = "petridish"
    method_options: dict[str, Any] = field(default_factory=dict)
    budget: Budget | None = None
    search_epochs: int = 1
    finetune_epochs: int = 1
    lr: float = 0.01
    new_lr_mult: float = 10.0
    new_lr_max: float = DEFAULT_MAX_LR
    new_lr_warmup: float = DEFAULT_WARMUP
    new_grad_clip: float | None = DEFAULT_CLIP
    new_only: float = 0.0
    candidate_lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    l1: float = 1e-3
    ops: tuple[str, ...] | str | None = None
    max_inputs: int | None = 1
    max_ops: int = 3
    points: tuple[str, ...] | None = None
    granularity: str = "block"
    points_per_round: int | None = None
    selection: str = "alpha"
    tie: str = "none"
    seed: int | None = None
    cost_axis: str = "params"
    eps: float = 0.025
    max_eta: float = DEFAULT_MAX_ETA
    children: int = 1
    output: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.children, int) or self.children < 1:
            raise InputError(f"children must be an int >= 1, got {self.children!r}")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise InputError(f"budget must be a growkit.Budget, got {type(self.budget).__name__}")
        # frozen: normalise through object.__setattr__ (iterables become tuples, None options {}).
        if self.ops is not None and not isinstance(self.ops, str):
            object.__setattr__(self, "ops", tuple(self.ops))
        if self.points is not None:
            object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "method_options", dict(self.method_options or {}))
        check_grow_settings(self)
        check_tie(self.tie)
        self.new_param_rule()  # validates the new-parameter settings before any work

    @property
    def wants_latency(self) -> bool:
        """Whether models must be timed: a latency cost axis or a latency budget."""
        return self.cost_axis == "latency_ms" or (self.budget is not None and self.budget.needs_latency)

    def new_param_rule(self) -> NewParamRule:
        """How newly grown parameters train (``new_lr_mult``, ``new_lr_max``, ``new_lr_warmup``,
        ``new_grad_clip``, ``max_eta``; see :mod:`growkit.newparams`); raises on a bad setting."""
        return NewParamRule(mult=self.new_lr_mult, max_lr=self.new_lr_max, warmup=self.new_lr_warmup,
                            clip=self.new_grad_clip, max_eta=self.max_eta)

    def replace(self, **changes: Any) -> "GrowConfig":
        """A copy with ``changes`` (the config itself never changes)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON form written into checkpoints (the budget as its repr)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["budget"] = None if self.budget is None else repr(self.budget)
        out["ops"] = self.ops if self.ops is None or isinstance(self.ops, str) else list(self.ops)
        out["points"] = None if self.points is None else list(self.points)
        out["output"] = output_label(self.output)
        if self.tie == "none":
            del out["tie"]  # macro search: the JSON checkpoints written before cell mode existed
        if self.new_only == 0.0:
            del out["new_only"]  # no frozen phase: the JSON checkpoints written before it existed
        return out

    @classmethod
    def field_names(cls) -> Iterable[str]:
        return (f.name for f in dataclasses.fields(cls))
