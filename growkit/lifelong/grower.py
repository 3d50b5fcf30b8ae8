"""``growkit.Grower``: Petridish growth inside an existing training loop.

The model keeps learning from whatever the loop feeds it while candidates warm up on the
boosting gradient; at a trigger (a new experience, a validation plateau, a score threshold) the
best candidates within the budget are finalized (exactly function-preserving) and fresh ones are
injected. The model is never rebuilt from scratch: every base and grown parameter keeps its
``nn.Parameter`` object, so optimizers attached with :meth:`Grower.attach` keep their state; new
parameters are added to them as new param groups. Growth is recorded in the plan.

    grower = growkit.Grower(model, example_input, budget=growkit.Budget(params=1.3))
    opt = torch.optim.SGD(grower.parameters(), lr=0.01, momentum=0.9)
    grower.attach(opt)
    for x, y in loader:
        loss = F.cross_entropy(grower.model(x), y) + grower.extra_loss()
        opt.zero_grad(); loss.backward(); opt.step()
        grower.after_step()
    grower.end_experience()          # grow at the boundary

Why over 450 lines (about 600): the Grower is one stateful object a user's loop talks to;
issue 19 added its rollback (snapshot / restore / retry of a growth) and the new-parameter groups
it keeps on the user's optimizers, which read and write the same private state as growth itself.
Splitting them out would mean a second object sharing that state; left as one class.
"""
from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Iterator

import torch
import torch.fx
from torch import nn

from ..checkpoint import full_state, load_full_state, optimizer_from_flat, optimizer_to_flat
from ..core.candidates import CANDIDATES, CandidateModel, inject
from ..core.cost import Budget, Cost, measure
from ..core.finalize import finalize
from ..core.graph import as_args
from ..core.plan import BRANCHES, GrowthPlan
from ..core.safecopy import copy_module
from ..core.selection import choose_points
from ..core.surgery import growable, remove_inserted, state_of, trace_options
from ..core.tie import check_tie
from ..errors import InputError, NonFiniteLoss
from ..newparams import (DEFAULT_CLIP, DEFAULT_MAX_ETA, DEFAULT_MAX_LR, DEFAULT_WARMUP, NewParamGroups, NewParamRule,
                         check_finite_outputs)

__all__ = ["Grower", "GrowthEvent", "adopt_parameters"]

logger = logging.getLogger(__name__)

TRIGGERS = ("experience", "epoch", "plateau", "score", "manual")


@dataclass
class GrowthEvent:
    """One growth attempt: when, why, where, and what it cost."""

    step: int
    trigger: str
    experience: int | None
    chosen: list[str]
    scores: dict[str, float]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    exact: bool | None = None
    note: str = ""
    new_params: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adopt_parameters(dst: nn.Module, src: nn.Module) -> list[str]:
    """Make ``dst`` use ``src``'s ``nn.Parameter`` objects wherever names and shapes match.

    Used after a copy-based graph rewrite: values are already equal, and keeping the objects keeps
    optimizer state keyed on them. Returns the names of ``dst``'s parameters that are new.
    """
    theirs = dict(src.named_parameters())
    new = []
    for name, p in list(dst.named_parameters()):
        q = theirs.get(name)
        if q is None or q.shape != p.shape or q.dtype != p.dtype:
            new.append(name)
            continue
        if q is p:
            continue
        owner, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(owner) if owner else dst, attr, q)
    return new


class Grower:
    """Continual Petridish growth for a training loop you own (see the module docstring).

    Args:
        model: the trained model to grow (not modified; ``grower.model`` is a growable copy).
        example_input: a batch-1 input for tracing.
        budget: growth limits relative to the model at construction (see :func:`growkit.grow` for
            how points and edges are fitted into it).
        ops, max_inputs, max_ops, l1, points: candidate settings (see :func:`growkit.inject`);
            ``points`` may name module paths or fx nodes the heuristic did not pick.
        granularity: ``"block"`` or ``"layer"`` growth points (see :func:`growkit.trace`; a model
            without multi-layer blocks falls back to layers on its own).
        candidate_lr: Adam learning rate of the candidates (stepped in :meth:`after_step`).
        new_lr_mult, new_lr_max, new_lr_warmup, new_grad_clip, max_eta: the new-parameter rule
            (:mod:`growkit.newparams`): attached optimizers train grown parameters at
            ``new_lr_mult`` x the rate of their first param group, never above ``new_lr_max``,
            ramped from 0 over ``new_lr_warmup`` of an epoch after each growth, gradient norm
            clipped at ``new_grad_clip``; a grown gate above ``max_eta`` counts as a divergence.
        steps_per_epoch: optimizer steps per epoch (sets the warm-up length; default ``min_steps``).
        on_divergence: what :meth:`after_step` does when a grown gate explodes (or a reported loss
            is non-finite) after a growth: ``"rollback"`` restores the state from before the growth
            and retries it once with the new parameters' rate halved, then continues without it
            (see :meth:`rollback`); ``"raise"`` raises :class:`growkit.NonFiniteLoss` (the caller
            calls :meth:`rollback`, as ``grow_stream`` does). Without a growth to undo it raises.
        warmup_steps: candidate steps after (re)injection before scoring starts (early fits are
            from a random start); growth needs at least ``min_steps`` candidate steps.
        score_threshold: grow from :meth:`after_step` once the best point score exceeds it.
        plateau_patience: grow from :meth:`report_validation` after this many reports without
            improvement.
        points_per_growth: most points grown at once (default: all that fit).
        selection: ``"alpha"`` or ``"random"`` (ablation) edge selection.
        tie: ``"none"`` (each point on its own), ``"stage"`` or ``"all"``: cell mode, tied blocks
            grow one pattern (see :func:`growkit.inject` and :mod:`growkit.core.tie`).
        seed: seeds random edge selection.
        freeze_grown: DER-like isolation of experiences: at each growth, the branches grown by
            earlier growths are frozen (``requires_grad=False``, removed from attached optimizers,
            their BatchNorm statistics fixed with ``momentum=0``), so the next experience trains
            only the branches just grown (and whatever else is not frozen). Growth stays exact:
            freezing changes what trains, not the function.
        freeze_base: also freeze the model's own (pre-growth) parameters at the first growth that
            grows something, so after it only fresh branches (and ``keep_trainable``) learn.
        keep_trainable: module paths of the original model (e.g. ``["fc"]``, the classifier head
            of a single-head class-incremental stream) that ``freeze_base`` leaves trainable.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any = None,
        *,
        budget: Budget | None = None,
        ops: Iterable[str] | str | None = None,
        max_inputs: int | None = 2,
        max_ops: int = 3,
        l1: float = 1e-3,
        points: Iterable[str] | None = None,
        granularity: str = "block",
        candidate_lr: float = 3e-3,
        new_lr_mult: float = 2.0,
        new_lr_max: float = DEFAULT_MAX_LR,
        new_lr_warmup: float = DEFAULT_WARMUP,
        new_grad_clip: float | None = DEFAULT_CLIP,
        max_eta: float = DEFAULT_MAX_ETA,
        steps_per_epoch: int | None = None,
        on_divergence: str = "rollback",
        warmup_steps: int = 20,
        min_steps: int = 40,
        score_threshold: float | None = None,
        plateau_patience: int | None = None,
        points_per_growth: int | None = None,
        selection: str = "alpha",
        tie: str = "none",
        seed: int | None = None,
        freeze_grown: bool = False,
        freeze_base: bool = False,
        keep_trainable: Iterable[str] = (),
    ) -> None:
        if isinstance(model, CandidateModel):
            raise InputError("model already carries candidates; pass the plain (or grown) model")
        if budget is not None and not isinstance(budget, Budget):
            raise InputError(f"budget must be a growkit.Budget, got {type(budget).__name__}")
        if min_steps < 1 or warmup_steps < 0 or warmup_steps >= min_steps:
            raise InputError(f"need 0 <= warmup_steps < min_steps, got {warmup_steps}, {min_steps}")
        for name, v in (("freeze_grown", freeze_grown), ("freeze_base", freeze_base)):
            if not isinstance(v, bool):
                raise InputError(f"{name} must be True or False, got {v!r}")
        if isinstance(keep_trainable, str) or not all(isinstance(k, str) and k for k in keep_trainable):
            raise InputError(f"keep_trainable must be a list of module paths (non-empty strings), got {keep_trainable!r}")
        self.freeze_grown, self.freeze_base = freeze_grown, freeze_base
        self.keep_trainable = [k.rstrip(".") for k in keep_trainable]
        # What is frozen, as regions of the module tree (kept by name: parameter objects change
        # only for new branches, and a rollback restores these sets with the rest of the state).
        self.frozen_branches: set[str] = set()
        self.base_frozen = False
        self.budget = budget
        self.ops = ops
        self.max_inputs, self.max_ops, self.l1 = max_inputs, max_ops, l1
        self.points = None if points is None else list(points)
        self.candidate_lr = candidate_lr
        self.new_lr_mult = new_lr_mult
        self.rule = NewParamRule(mult=new_lr_mult, max_lr=new_lr_max, warmup=new_lr_warmup, clip=new_grad_clip,
                                 max_eta=max_eta)
        if on_divergence not in ("rollback", "raise"):
            raise InputError(f"on_divergence must be 'rollback' or 'raise', got {on_divergence!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise InputError(f"steps_per_epoch must be an int >= 1 or None, got {steps_per_epoch!r}")
        self.on_divergence = on_divergence
        self.steps_per_epoch = steps_per_epoch
        self._newparams: dict[int, NewParamGroups] = {}
        self._snap: _Snapshot | None = None
        self._pending: tuple[NewParamRule, dict[str, nn.Parameter]] | None = None
        self.warmup_steps, self.min_steps = warmup_steps, min_steps
        self.score_threshold = score_threshold
        self.plateau_patience = plateau_patience
        self.points_per_growth = points_per_growth
        self.selection = selection
        self.tie = check_tie(tie)
        self.rng = random.Random(seed)
        if self.keep_trainable:
            names = {n for n, _ in model.named_modules()}
            unknown = [k for k in self.keep_trainable if k not in names]
            if unknown:
                raise InputError(f"keep_trainable names {unknown} are not modules of the model; use module paths "
                                 "from model.named_modules()")
        if example_input is not None:
            mdev = next(model.parameters()).device
            check_finite_outputs(model, tuple(a.to(mdev) for a in as_args(example_input)), "the model passed to Grower")
        gm = growable(model, example_input, **trace_options(granularity, self.points))
        st = state_of(gm)
        assert st is not None
        dev = next(gm.parameters()).device
        self.example = tuple(a.to(dev) for a in (as_args(example_input) if example_input is not None else st.plan.example_input()))
        self.base_cost = measure(gm, self.example)
        self.cost: Cost = self.base_cost
        self.model: CandidateModel = self._inject(gm)
        self._cand_opt = torch.optim.Adam(self.model.candidate_parameters(), lr=candidate_lr)
        self._optimizers: list[tuple[torch.optim.Optimizer, list[Any]]] = []
        self.steps = 0
        self._since_inject = 0
        self._l1_in_loss = False
        self._best_val: float | None = None
        self._bad_vals = 0
        self.experience: int | None = None
        self.events: list[GrowthEvent] = []

    # ------------------------------------------------------------------ model access
    def _inject(self, gm: torch.fx.GraphModule) -> CandidateModel:
        cm = inject(gm, points=self.points, ops=self.ops, max_inputs=self.max_inputs, l1=self.l1, normalize_grad=True,
                    tie=self.tie)
        adopt_parameters(cm.module, gm)
        return cm

    def parameters(self) -> Iterator[nn.Parameter]:
        """Base and grown parameters (what your optimizer should train); candidates and what
        ``freeze_grown`` / ``freeze_base`` froze are excluded."""
        frozen = {id(p) for p in self.frozen_parameters()}
        return (p for p in self.model.base_parameters() if id(p) not in frozen)

    def is_frozen(self, name: str) -> bool:
        """Whether the parameter or module ``name`` (a path in ``grower.model.module``) is frozen."""
        if name.startswith(CANDIDATES + ".") or name == CANDIDATES:
            return False
        if any(name == k or name.startswith(k + ".") for k in self.keep_trainable):
            return False
        if name.startswith(BRANCHES + "."):
            return name.split(".")[1] in self.frozen_branches
        return self.base_frozen and name != BRANCHES

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen by ``freeze_grown`` / ``freeze_base`` (see the class docstring)."""
        if not self.frozen_branches and not self.base_frozen:
            return []
        return [p for n, p in self.model.module.named_parameters() if self.is_frozen(n)]

    def trainable_count(self) -> int:
        """Number of scalars in :meth:`parameters` (what the next experience trains)."""
        return sum(p.numel() for p in self.parameters())

    def _apply_freeze(self) -> None:
        for n, p in self.model.module.named_parameters():
            if self.is_frozen(n):
                p.requires_grad_(False)
        for n, m in self.model.module.named_modules():
            # A frozen region's BatchNorm keeps its running statistics (momentum 0): in train mode
            # they would otherwise drift with the new experience's batches and change its outputs.
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and self.is_frozen(n):
                m.momentum = 0.0

    def candidate_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.candidate_parameters()

    @property
    def plan(self) -> GrowthPlan:
        st = state_of(self.model.module)
        assert st is not None
        return st.plan

    def grown_model(self) -> torch.fx.GraphModule:
        """A copy of the current model without candidates (same function): for save / export."""
        gm = copy_module(self.model.module)
        remove_inserted(gm, CANDIDATES)
        return gm

    def to(self, device: torch.device | str) -> "Grower":
        """Move the model, the example input and the candidates' optimizer state to ``device``.

        Use it when something else moved ``grower.model`` (e.g. a trainer): growth checks run the
        example input through the model, and Adam's state must sit beside its parameters.
        """
        self.model.to(device)
        self.example = tuple(a.to(device) for a in self.example)
        for st in self._cand_opt.state.values():
            for k, v in st.items():
                # Adam keeps a scalar "step" on the CPU unless capturable/fused; leave those be.
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    st[k] = v.to(device)
        return self

    # ------------------------------------------------------------------ optimizer hand-over
    def attach(self, optimizer: torch.optim.Optimizer, schedulers: Iterable[Any] = ()) -> None:
        """Keep ``optimizer`` (and its LR schedulers) in step with growth.

        Candidate parameters are removed from it (the grower trains them); parameters that are not
        the grower's (e.g. a head outside the grown module) are left alone. At every growth the new
        branch parameters are added as a param group at ``new_lr_mult`` x the first group's lr, and
        the schedulers learn the new group; the new-parameter rule then sets that group's rate.
        """
        self._optimizers.append((optimizer, list(schedulers)))
        self._sync(optimizer, list(schedulers), [])

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop keeping ``optimizer`` (every attached one when ``None``) in step with growth."""
        self._optimizers = [(o, s) for o, s in self._optimizers if optimizer is not None and o is not optimizer]

    def add_param_group(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                        schedulers: Iterable[Any] = ()) -> None:
        """Add ``params`` to ``optimizer`` as one new group, exactly as growth adds grown parameters.

        The group trains under the new-parameter rule (at most ``new_lr_mult`` x the first group's
        lr and ``new_lr_max``, warmed up from 0) and every scheduler gets an entry for it (e.g. to
        rebuild an optimizer's layout before loading a checkpointed state).
        """
        g0 = optimizer.param_groups[0]
        group: dict[str, Any] = {"params": list(params), "lr": g0["lr"] * self.new_lr_mult}
        if "initial_lr" in g0:
            group["initial_lr"] = g0["initial_lr"] * self.new_lr_mult
        optimizer.add_param_group(group)
        rule, etas = self._pending if self._pending is not None else (self.rule, {})
        self._manage(optimizer, optimizer.param_groups[-1], rule, etas)
        for s in schedulers:
            # LR schedulers keep one entry per param group; extend them for the new group so it
            # follows the same schedule at new_lr_mult x the first group's rate.
            if hasattr(s, "base_lrs"):
                s.base_lrs.append(s.base_lrs[0] * self.new_lr_mult)
            if hasattr(s, "lr_lambdas"):
                s.lr_lambdas.append(s.lr_lambdas[0])
            if isinstance(getattr(s, "_last_lr", None), list):
                s._last_lr.append(group["lr"])

    def _manage(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], rule: NewParamRule,
                etas: dict[str, nn.Parameter]) -> dict[str, Any]:
        """Put ``group`` under ``rule`` (one :class:`NewParamGroups` per optimizer); returns its entry."""
        mgr = self._newparams.get(id(optimizer))
        if mgr is None or mgr.optimizer is not optimizer:
            mgr = self._newparams[id(optimizer)] = NewParamGroups(optimizer, self.rule,
                                                                  self.steps_per_epoch or self.min_steps)
        mgr.warmup_steps = self.rule.warmup_steps(self.steps_per_epoch or self.min_steps)
        ids = {id(p) for p in group["params"]}
        mgr.add(group, {k: e for k, e in etas.items() if id(e) in ids}, rule)
        return mgr.entries[-1]

    def new_group_state(self, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
        """JSON-able state of ``optimizer``'s new-parameter groups (index, warm-up progress, rate
        scale), for checkpoints; :meth:`load_new_group_state` re-applies it."""
        mgr = self._newparams.get(id(optimizer))
        if mgr is None:
            return []
        index = {id(g): i for i, g in enumerate(optimizer.param_groups)}
        return [{"group": index[id(e["group"])], "step": e["step"], "peak": e["peak"], "scale": e["rule"].scale}
                for e in mgr.entries if id(e["group"]) in index]

    def load_new_group_state(self, optimizer: torch.optim.Optimizer, state: list[dict[str, Any]]) -> None:
        """Put the groups saved by :meth:`new_group_state` back under the new-parameter rule with
        their warm-up progress (an optimizer rebuilt from a checkpoint). A group already managed
        (re-added by :meth:`add_param_group`) keeps its entry and takes the saved progress, so a
        resumed run continues the warm-up instead of restarting it."""
        branches = getattr(self.model.module, BRANCHES, {})
        etas = {e.point: branches[e.key].eta for e in self.plan.edits if e.key in branches}
        mgr = self._newparams.get(id(optimizer))
        for st in state:
            group = optimizer.param_groups[int(st["group"])]
            rule = replace(self.rule, scale=float(st["scale"]))
            entry = mgr.entry_of(group) if mgr is not None and mgr.optimizer is optimizer else None
            if entry is None:
                entry = self._manage(optimizer, group, rule, etas)
            entry["rule"], entry["step"], entry["peak"] = rule, int(st["step"]), float(st["peak"])

    def _sync(self, opt: torch.optim.Optimizer, schedulers: list[Any], new: list[nn.Parameter],
              retired: Iterable[nn.Parameter] = ()) -> None:
        drop = ({id(p) for p in self.model.candidate_parameters()} | {id(p) for p in retired}
                | {id(p) for p in self.frozen_parameters()})
        for g in opt.param_groups:
            for p in g["params"]:
                if id(p) in drop:
                    opt.state.pop(p, None)
            g["params"] = [p for p in g["params"] if id(p) not in drop]
        have = {id(p) for g in opt.param_groups for p in g["params"]}
        add = [p for p in new if id(p) not in have]
        if add:
            self.add_param_group(opt, add, schedulers)

    # ------------------------------------------------------------------ per step
    def extra_loss(self) -> torch.Tensor:
        """The candidates' L1 penalty; add it to your loss (else :meth:`after_step` applies it)."""
        self._l1_in_loss = True
        return self.model.extra_loss()

    def after_step(self, loss: torch.Tensor | float | None = None) -> GrowthEvent | None:
        """Call after each optimizer step: trains the candidates, tracks scores, checks triggers.

        Also the eta guard (and, given ``loss``, a non-finite loss check): a divergence after a
        growth is rolled back (see ``on_divergence``; the returned event says so); one without a
        growth to undo raises :class:`growkit.NonFiniteLoss`.
        """
        cands = self.model.candidates
        if not self._l1_in_loss:
            l1 = self.l1
            for c in cands.values():
                if c.alpha.grad is not None:
                    c.alpha.grad.add_(l1 * torch.sign(c.alpha.detach()))
        self._l1_in_loss = False
        try:
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
            if value is not None and not math.isfinite(value):
                raise NonFiniteLoss(f"loss became {value} at step {self.steps}")
            for mgr in self._newparams.values():
                mgr.check()
        except NonFiniteLoss as exc:
            if self.on_divergence == "raise" or not self.rollback(str(exc)):
                raise
            return self.events[-1]
        self._cand_opt.step()
        self._cand_opt.zero_grad(set_to_none=True)
        self.steps += 1
        self._since_inject += 1
        if self._since_inject == self.warmup_steps:
            self.model.reset_scores()
        if self.score_threshold is not None and self._since_inject >= self.min_steps:
            scores = [v for v in self.model.scores().values() if v == v]
            if scores and max(scores) > self.score_threshold:
                return self.grow_now("score")
        return None

    # ------------------------------------------------------------------ triggers
    def end_experience(self, experience: int | None = None) -> GrowthEvent | None:
        """Experience boundary: grow now (the next experience trains the new branches)."""
        self.experience = experience
        return self.grow_now("experience")

    def report_validation(self, metric: float, higher_is_better: bool = True) -> GrowthEvent | None:
        """Feed a validation metric; grows after ``plateau_patience`` reports without improvement."""
        if self.plateau_patience is None:
            return None
        v = metric if higher_is_better else -metric
        if self._best_val is None or v > self._best_val:
            self._best_val, self._bad_vals = v, 0
            return None
        self._bad_vals += 1
        if self._bad_vals >= self.plateau_patience:
            self._bad_vals = 0
            self._best_val = None
            return self.grow_now("plateau")
        return None

    # ------------------------------------------------------------------ growth
    def grow_now(self, trigger: str = "manual") -> GrowthEvent:
        """Finalize the best candidates within budget and inject fresh ones (exactly).

        The state before the growth is kept (model, attached optimizers and schedulers, the
        grower, torch's RNG) until the next growth, for :meth:`rollback`. A model whose outputs
        are already non-finite is not grown (the event says so).
        """
        if trigger not in TRIGGERS:
            raise InputError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
        return self._grow(trigger, self.rule, "")

    def _grow(self, trigger: str, rule: NewParamRule, note: str) -> GrowthEvent:
        cm = self.model
        scores = cm.scores()
        ev = GrowthEvent(self.steps, trigger, self.experience, [], scores, self.cost.params, self.cost.params,
                         self.cost.flops, self.cost.flops)
        self._snap = None  # a rollback undoes the latest growth attempt only
        if self._since_inject < self.min_steps:
            ev.note = f"candidates trained {self._since_inject} steps (< min_steps {self.min_steps}); not grown"
            logger.info("growth at step %d skipped: %s", self.steps, ev.note)
            self.events.append(ev)
            return ev
        try:
            check_finite_outputs(cm, self.example)
        except NonFiniteLoss as exc:
            ev.note = f"not grown: {exc}"
            logger.warning("growth at step %d skipped: %s", self.steps, exc)
            self.events.append(ev)
            return ev
        rng_before = self.rng.getstate()
        gen = torch.Generator().manual_seed(self.rng.getrandbits(63))
        chosen, why, edges = choose_points(cm, self.example, current=self.cost, base=self.base_cost,
                                           budget=self.budget, max_ops=self.max_ops, selection=self.selection,
                                           generator=gen, max_points=self.points_per_growth)
        if not chosen:
            ev.note = why
            logger.info("growth at step %d (%s): %s", self.steps, trigger, why)
            self.events.append(ev)
            return ev
        snap = self._snapshot(trigger)
        snap.rng = rng_before
        was = cm.training
        check = self._outputs(cm)
        retired = list(cm.candidate_parameters())
        grown = finalize(cm, edges=edges)
        new_names = adopt_parameters(grown, cm.module)
        fresh = self._inject(grown)
        after_cost = measure(grown, self.example)
        # Swap the graph inside the same wrapper: references to grower.model stay valid.
        cm.module = fresh.module
        cm.train(was)
        ev.exact = bool(torch.equal(check, self._outputs(cm)))
        if not ev.exact:
            logger.warning("growth at step %d changed the model output on the example input", self.steps)
        ev.chosen = chosen
        ev.params_after, ev.flops_after = after_cost.params, after_cost.flops
        ev.new_params = new_names
        ev.note = note
        self.cost = after_cost
        if self.freeze_grown or self.freeze_base:
            fresh_keys = {n.split(".")[1] for n in new_names if n.startswith(BRANCHES + ".")}
            if self.freeze_grown:
                self.frozen_branches |= set(getattr(cm.module, BRANCHES).keys()) - fresh_keys
            self.base_frozen = self.base_frozen or self.freeze_base
            self._apply_freeze()
        named = dict(cm.module.named_parameters())
        new_params = [named[n] for n in new_names if n in named and n.startswith(BRANCHES)]
        branches = getattr(cm.module, BRANCHES)
        etas = {e.point: branches[e.key].eta for e in self.plan.edits if e.key in branches and
                any(p is branches[e.key].eta for p in new_params)}
        self._pending = (rule, etas)
        try:
            for opt, scheds in self._optimizers:
                self._sync(opt, scheds, new_params, retired)
        finally:
            self._pending = None
        self._snap = snap
        self._cand_opt = torch.optim.Adam(cm.candidate_parameters(), lr=self.candidate_lr)
        self._since_inject = 0
        self.events.append(ev)
        logger.info("grew %s at step %d (%s): params %d -> %d", chosen, self.steps, trigger, ev.params_before,
                    ev.params_after)
        return ev

    # ------------------------------------------------------------------ rollback
    def _snapshot(self, trigger: str) -> "_Snapshot":
        cm = self.model
        opts = []
        for opt, scheds in self._optimizers:
            groups = [(g, {**g, "params": list(g["params"])}) for g in opt.param_groups]
            state = {p: {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                         for k, v in st.items()} for p, st in opt.state.items()}
            sch = [(s, {k: copy.copy(v) for k, v in vars(s).items() if k != "optimizer"}) for s in scheds]
            mgr = self._newparams.get(id(opt))
            mgrs = None if mgr is None else (mgr, list(mgr.entries), [dict(e) for e in mgr.entries])
            opts.append((opt, groups, state, sch, mgrs))
        return _Snapshot(
            trigger=trigger, module=cm.module,
            values={k: v.detach().clone() for k, v in cm.module.state_dict().items()},
            cand_opt=self._cand_opt, cand_state=copy.deepcopy(self._cand_opt.state_dict()), optimizers=opts,
            scalars={k: copy.copy(getattr(self, k)) for k in ("steps", "_since_inject", "cost", "_best_val",
                                                             "_bad_vals", "experience", "_l1_in_loss",
                                                             "frozen_branches", "base_frozen")},
            # freezing flips flags on parameter / module objects the restored model shares
            flags=[(p, p.requires_grad) for p in cm.module.parameters()],
            momenta=[(m, m.momentum) for m in cm.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
            n_events=len(self.events), rng=self.rng.getstate(), torch_rng=torch.get_rng_state(),
        )

    def _restore(self, snap: "_Snapshot") -> None:
        cm = self.model
        was = cm.training
        cm.module = snap.module
        cm.module.load_state_dict(snap.values)
        cm.train(was)
        for p in cm.parameters():
            p.grad = None  # the diverged step's gradients
        self._cand_opt = snap.cand_opt
        self._cand_opt.load_state_dict(copy.deepcopy(snap.cand_state))
        for opt, groups, state, sch, mgrs in snap.optimizers:
            for g, content in groups:
                g.clear()
                g.update({**content, "params": list(content["params"])})
            opt.param_groups[:] = [g for g, _ in groups]
            opt.state.clear()
            for p, st in state.items():
                opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                for k, v in st.items()}
            for sc, attrs in sch:
                vars(sc).update({k: copy.copy(v) for k, v in attrs.items()})
            if mgrs is not None:
                mgr, entries, values = mgrs
                mgr.entries[:] = entries
                for e, v in zip(entries, values):
                    e.update(v)
        for mgr in self._newparams.values():  # groups added by the undone growth are gone
            mgr.entries[:] = [e for e in mgr.entries if any(g is e["group"] for g in mgr.optimizer.param_groups)]
        for k, v in snap.scalars.items():
            setattr(self, k, copy.copy(v))
        for p, flag in snap.flags:
            p.requires_grad_(flag)
        for m, mom in snap.momenta:
            m.momentum = mom
        del self.events[snap.n_events:]
        self.rng.setstate(snap.rng)
        torch.set_rng_state(snap.torch_rng)

    def rollback(self, reason: str) -> bool:
        """Undo the last growth after training diverged (``reason``): restore the state from before
        it (model, candidates, attached optimizers and schedulers, the grower, torch's RNG), then
        grow again with the new parameters' learning rate halved; after a second divergence,
        restore and continue without that growth. Returns ``False`` when there is no growth to undo
        (the divergence is not growth's doing). The growth's event records what happened."""
        snap = self._snap
        if snap is None:
            return False
        self._restore(snap)
        if not snap.retried:
            note = (f"rolled back after training diverged ({reason}); grown again with the new parameters' "
                    "learning rate halved")
            logger.warning("step %d: %s", self.steps, note)
            self._grow(snap.trigger, self.rule.retry(), note)
            if self._snap is not None:
                self._snap.retried = True
            return True
        self._snap = None
        cost = self.cost
        ev = GrowthEvent(self.steps, snap.trigger, self.experience, [], {}, cost.params, cost.params, cost.flops,
                         cost.flops, note=f"rolled back twice: training diverged after this growth with the new "
                                          f"parameters' learning rate halved too ({reason}); continued without it")
        logger.warning("step %d: %s", self.steps, ev.note)
        self.events.append(ev)
        return True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-able progress and named tensors (model incl. candidates, candidate optimizer)."""
        meta, tensors = optimizer_to_flat(self._cand_opt, "grower.cand_opt")
        tensors.update(full_state(self.model, "grower.model."))
        r = self.rng.getstate()
        return {
            "plan": self.plan.to_dict(), "base_cost": self.base_cost.to_dict(), "cost": self.cost.to_dict(),
            "steps": self.steps, "since_inject": self._since_inject, "best_val": self._best_val,
            "bad_vals": self._bad_vals, "experience": self.experience, "events": [e.to_dict() for e in self.events],
            "rng": [r[0], list(r[1]), r[2]], "cand_opt": meta,
            "frozen_branches": sorted(self.frozen_branches), "base_frozen": self.base_frozen,
        }, tensors

    @classmethod
    def from_state(cls, model: nn.Module, example_input: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   **options: Any) -> "Grower":
        """Re-create a grower saved with :meth:`state_dict` from the original base ``model``."""
        from ..core.surgery import apply_plan

        plan = GrowthPlan.from_dict(meta["plan"])
        start = apply_plan(model, plan, example_input) if plan.grown else model
        g = cls(start, example_input, **options)
        g.base_cost, g.cost = Cost(**meta["base_cost"]), Cost(**meta["cost"])
        g.steps, g._since_inject = int(meta["steps"]), int(meta["since_inject"])
        g._best_val, g._bad_vals, g.experience = meta["best_val"], int(meta["bad_vals"]), meta["experience"]
        g.events = [GrowthEvent(**e) for e in meta["events"]]
        r = meta["rng"]
        g.rng.setstate((r[0], tuple(r[1]), r[2]))
        load_full_state(g.model, tensors, "grower.model.")
        g.frozen_branches = {str(k) for k in meta.get("frozen_branches", [])}
        g.base_frozen = bool(meta.get("base_frozen", False))
        g._apply_freeze()
        optimizer_from_flat(g._cand_opt, meta["cand_opt"], tensors)
        return g

    def _outputs(self, m: nn.Module) -> torch.Tensor:
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                out = m(*self.example)
        finally:
            m.train(was)
        leaves = torch.utils._pytree.tree_leaves(out)
        return torch.cat([t.detach().flatten() for t in leaves if isinstance(t, torch.Tensor)])


@dataclass
class _Snapshot:
    """What :meth:`Grower.rollback` restores: the state just before a growth."""

    trigger: str
    module: torch.fx.GraphModule
    values: dict[str, torch.Tensor]
    cand_opt: torch.optim.Optimizer
    cand_state: dict[str, Any]
    optimizers: list[Any]
    scalars: dict[str, Any]
    n_events: int
    rng: Any
    torch_rng: torch.Tensor
    flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    momenta: list[tuple[nn.Module, float | None]] = field(default_factory=list)
    retried: bool = False
