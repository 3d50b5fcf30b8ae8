"""How newly grown parameters train: one rule for every path that grows.

A grown branch (its ops, norms, projection and gate ``eta``) starts at ``eta = 0``, so growth is
exact, but its parameters start from scratch and sit beside weights that are already trained. A
learning rate that is right for the trained weights can throw the new ones (eta first) off: a
multiple of the user's rate is exactly what made growth diverge at rates that train fine without
it. So every path that grows (``grow()``'s fine-tuning, the search passes, :class:`growkit.Grower`
and through it ``grow_stream`` and the Lightning / Avalanche adapters) trains new parameters under
one :class:`NewParamRule`, applied by :class:`NewParamGroups` on the optimizer itself:

* learning rate = the reference rate (the optimizer's first group that is not a new-parameter
  group, so it follows whatever schedule drives the model) x ``mult``, with the multiple lowered
  so the rate never exceeds ``max_lr`` in absolute terms;
* after each growth the new group ramps linearly from 0 over ``warmup`` of an epoch;
* its gradient norm is clipped at ``clip`` (``None``: no clipping);
* the eta guard (:meth:`NewParamGroups.check`): a gate that is non-finite or above ``max_eta``
  raises :class:`~growkit.errors.NonFiniteLoss`; callers then roll back to the state before the
  growth and retry once with the rule scaled by :data:`RETRY_LR_SCALE` (:meth:`NewParamRule.retry`),
  and grow without that growth if the retry fails too.

The defaults were chosen on benchmarks/stability.py (see benchmarks/results/stability*.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import InputError, NonFiniteLoss

__all__ = ["NewParamRule", "NewParamGroups", "RETRY_LR_SCALE", "check_finite_outputs", "DEFAULT_MAX_LR",
           "DEFAULT_WARMUP", "DEFAULT_CLIP", "DEFAULT_MAX_ETA", "watch_new_params", "growth_optimizer", "OldFrozen"]

RETRY_LR_SCALE = 0.5
"""After a rollback, the growth is retried once with the new parameters' rate times this."""
DEFAULT_MAX_LR = 0.05
DEFAULT_WARMUP = 0.25
DEFAULT_CLIP: float | None = 1.0
DEFAULT_MAX_ETA = 100.0


@dataclass(frozen=True)
class NewParamRule:
    """The learning-rate rule of newly grown parameters (see the module docstring).

    Attributes:
        mult: new parameters train at this multiple of the reference learning rate ...
        max_lr: ... but never above this absolute rate.
        warmup: after each growth the rate ramps from 0 over this fraction of an epoch (0: none).
        clip: gradient-norm clip of each new-parameter group (``None``: none).
        max_eta: the eta guard's bound on ``|eta|``.
        scale: extra factor on the rate (``retry()`` halves it after a rollback).
    """

    mult: float = 10.0
    max_lr: float = DEFAULT_MAX_LR
    warmup: float = DEFAULT_WARMUP
    clip: float | None = DEFAULT_CLIP
    max_eta: float = DEFAULT_MAX_ETA
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mult", "max_lr", "max_eta", "scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise InputError(f"new-parameter {name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup <= 100:
            raise InputError(f"new-parameter warmup must be a fraction of an epoch in [0, 100], got {self.warmup!r}")
        if self.clip is not None and (not isinstance(self.clip, (int, float)) or not math.isfinite(self.clip)
                                      or self.clip <= 0):
            raise InputError(f"new-parameter clip must be a number > 0 or None, got {self.clip!r}")

    def retry(self) -> "NewParamRule":
        """The rule for the retry after a rollback: the new parameters' rate halved."""
        return replace(self, scale=self.scale * RETRY_LR_SCALE)

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the warm-up for an epoch of ``steps_per_epoch`` batches."""
        return int(math.ceil(self.warmup * max(1, steps_per_epoch))) if self.warmup > 0 else 0

    def lr(self, ref_lr: float, peak_ref_lr: float, step: int, warmup_steps: int) -> float:
        """Rate at optimizer step ``step`` (1-based) after the growth: ``ref_lr`` x the multiple
        that keeps ``peak_ref_lr`` x it within ``max_lr``, x the warm-up ramp, x ``scale``."""
        mult = min(self.mult, self.max_lr / peak_ref_lr) if peak_ref_lr > 0 else self.mult
        ramp = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
        return ref_lr * mult * ramp * self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NewParamGroups:
    """Keeps the new-parameter groups of one optimizer under a :class:`NewParamRule`.

    A step pre-hook on ``optimizer`` sets each registered group's rate (capped, warmed up) and
    clips its gradients before every ``optimizer.step()``, so it works with any loop that steps the
    optimizer (growkit's, Lightning's, Avalanche's). :meth:`check` is the eta guard.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rule: NewParamRule, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.rule = rule
        self.warmup_steps = rule.warmup_steps(steps_per_epoch)
        self.entries: list[dict[str, Any]] = []
        self._handle = optimizer.register_step_pre_hook(self._before_step)
        # Optimizer.load_state_dict replaces every param-group dict (Lightning restores an
        # optimizer this way after the callbacks have set up): follow the groups by position.
        self._positions: list[int] = []
        self._load_hooks = (optimizer.register_load_state_dict_pre_hook(self._before_load),
                            optimizer.register_load_state_dict_post_hook(self._after_load))

    def add(self, group: Mapping[str, Any], etas: Mapping[str, nn.Parameter] | None = None,
            rule: NewParamRule | None = None) -> None:
        """Put ``group`` (already one of the optimizer's param groups) under the rule (or ``rule``);
        ``etas`` (name -> gate) are watched by :meth:`check`."""
        if not any(g is group for g in self.optimizer.param_groups):
            raise ValueError("NewParamGroups.add: the group is not one of the optimizer's param groups")
        group["lr"] = 0.0  # type: ignore[index]  # the ramp starts from 0
        self.entries.append({"group": group, "etas": dict(etas or {}), "rule": rule or self.rule, "step": 0,
                             "peak": 0.0})

    def remove(self) -> None:
        """Stop managing the optimizer (the hooks are removed; rates stay as they are)."""
        self._handle.remove()
        for h in self._load_hooks:
            h.remove()
        self.entries.clear()

    def _before_load(self, optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
        index = {id(g): i for i, g in enumerate(optimizer.param_groups)}
        self._positions = [index.get(id(e["group"]), -1) for e in self.entries]

    def _after_load(self, optimizer: torch.optim.Optimizer) -> None:
        for e, i in zip(self.entries, self._positions):
            if 0 <= i < len(optimizer.param_groups):
                e["group"] = optimizer.param_groups[i]

    def is_new(self, group: Mapping[str, Any]) -> bool:
        return self.entry_of(group) is not None

    def entry_of(self, group: Mapping[str, Any]) -> dict[str, Any] | None:
        """The entry managing ``group`` (its rule and warm-up progress), or ``None``."""
        return next((e for e in self.entries if e["group"] is group), None)

    def ref_lr(self) -> float:
        """The first param group's rate that is not a new-parameter group (0 if there is none)."""
        for g in self.optimizer.param_groups:
            if not self.is_new(g):
                return float(g["lr"])
        return 0.0

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ref = self.ref_lr()
        for e in self.entries:
            e["step"] += 1
            e["peak"] = max(e["peak"], ref)
            g = e["group"]
            g["lr"] = e["rule"].lr(ref, e["peak"], e["step"], self.warmup_steps)
            clip = e["rule"].clip
            if clip is not None:
                grads = [p for p in g["params"] if p.grad is not None]
                if grads:
                    torch.nn.utils.clip_grad_norm_(grads, clip)

    def etas(self) -> dict[str, nn.Parameter]:
        return {k: v for e in self.entries for k, v in e["etas"].items()}

    def check(self) -> None:
        """The eta guard: raise :class:`NonFiniteLoss` when a watched gate is non-finite or above
        ``max_eta`` in absolute value."""
        for e in self.entries:
            bound = e["rule"].max_eta
            for k, eta in e["etas"].items():
                v = float(eta.detach())
                if not math.isfinite(v) or abs(v) > bound:
                    raise NonFiniteLoss(f"eta of the branch grown at {k} exploded to {v:.3g} (max_eta {bound:g})")

    def state_dict(self) -> list[dict[str, Any]]:
        """Progress of each group's warm-up (JSON-able), in registration order."""
        return [{"step": e["step"], "peak": e["peak"], "scale": e["rule"].scale} for e in self.entries]

    def load_state_dict(self, state: Iterable[Mapping[str, Any]]) -> None:
        for e, s in zip(self.entries, state):
            e["step"], e["peak"] = int(s["step"]), float(s["peak"])
            e["rule"] = replace(e["rule"], scale=float(s.get("scale", e["rule"].scale)))


def check_finite_outputs(model: nn.Module, example: tuple[torch.Tensor, ...], what: str = "the model") -> None:
    """Raise :class:`NonFiniteLoss` when ``model``'s eval outputs on ``example`` (or its weights)
    are not finite: never grow a model that has already diverged."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(*example)
        finally:
            model.train(was)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if all(bool(torch.isfinite(t).all()) for t in leaves):
            return
        raise NonFiniteLoss(f"{what} gives non-finite outputs: it has diverged, so it is not grown; train it at a "
                            "lower learning rate (or from its last good checkpoint) first")
    raise NonFiniteLoss(f"{what} has non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): it "
                        "has diverged, so it is not grown; train it at a lower learning rate first")


def watch_new_params(opt: torch.optim.Optimizer, group: dict[str, Any], model: nn.Module, rule: NewParamRule,
                     steps_per_epoch: int) -> NewParamGroups:
    """Put ``group`` of ``opt`` under ``rule`` with the eta guard raising from ``opt.step()``: every
    module of ``model`` whose gate ``eta`` trains in ``group`` is watched (grown branches, search cells)."""
    mgr = NewParamGroups(opt, rule, steps_per_epoch)
    ids = {id(p) for p in group["params"]}
    etas = {name or "model": m.eta for name, m in model.named_modules()
            if isinstance(getattr(m, "eta", None), nn.Parameter) and id(m.eta) in ids}
    mgr.add(group, etas)
    opt.register_step_post_hook(lambda *_: mgr.check())
    return mgr


def growth_optimizer(model: nn.Module, new: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float,
                     rule: NewParamRule | None = None, steps_per_epoch: int = 1, exclude: Iterable[nn.Parameter] = (),
                     ) -> tuple[torch.optim.SGD, NewParamGroups | None]:
    """SGD over ``model`` as every growth path trains a grown model: the parameters but ``new`` and
    ``exclude`` at ``lr``; ``new`` (the newly grown ones) in a last group under ``rule`` with the
    eta guard (:func:`watch_new_params`). Returns the optimizer and the rule's manager (``None``
    without new parameters). The one place optimizer groups for growth are built."""
    new = list(new)
    ids = {id(p) for p in new} | {id(p) for p in exclude}
    old = [p for p in model.parameters() if id(p) not in ids]
    groups = [g for g in ({"params": old}, {"params": new}) if g["params"]]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if not new:
        return opt, None
    if rule is None:
        raise InputError("growth_optimizer: new parameters need a NewParamRule (rule=)")
    return opt, watch_new_params(opt, opt.param_groups[-1], model, rule, steps_per_epoch)


class OldFrozen:
    """The first ``steps`` optimizer steps after a growth train only the new parameters.

    The old parameters get ``requires_grad`` off for those steps: no gradient, so neither momentum
    nor weight decay moves them, while gradients still flow through them to new parameters further
    up. The old weights stay where training left them while the new ones start (LLaMA Pro trains
    its copied blocks this way); BatchNorm running statistics keep updating in train mode.
    Call :meth:`after_step` after every optimizer step and :meth:`release` when training stops
    for any reason (it is idempotent).
    """

    def __init__(self, old: Iterable[nn.Parameter], steps: int) -> None:
        self.left = max(int(steps), 0)
        self.params = [p for p in old if p.requires_grad] if self.left else []
        for p in self.params:
            p.requires_grad_(False)

    def after_step(self) -> None:
        if self.params:
            self.left -= 1
            if self.left <= 0:
                self.release()

    def release(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
        self.params = []
