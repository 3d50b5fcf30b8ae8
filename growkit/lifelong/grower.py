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
"""
from __future__ import annotations

import copy
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx
from torch import nn

from ..core.candidates import CANDIDATES, CandidateModel, inject
from ..checkpoint import full_state, load_full_state, optimizer_from_flat, optimizer_to_flat
from ..core.cost import Budget, Cost, measure
from ..errors import InputError
from ..core.finalize import finalize
from ..core.graph import as_args
from ..core.plan import BRANCHES, GrowthPlan
from ..core.selection import choose_points
from ..core.surgery import growable, remove_inserted, state_of

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
        ops, max_inputs, max_ops, l1, points: candidate settings (see :func:`growkit.inject`).
        candidate_lr: Adam learning rate of the candidates (stepped in :meth:`after_step`).
        new_lr_mult: attached optimizers train grown parameters at this multiple of the lr of
            their first param group.
        warmup_steps: candidate steps after (re)injection before scoring starts (early fits are
            from a random start); growth needs at least ``min_steps`` candidate steps.
        score_threshold: grow from :meth:`after_step` once the best point score exceeds it.
        plateau_patience: grow from :meth:`report_validation` after this many reports without
            improvement.
        points_per_growth: most points grown at once (default: all that fit).
        selection: ``"alpha"`` or ``"random"`` (ablation) edge selection.
        seed: seeds random edge selection.
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
        candidate_lr: float = 3e-3,
        new_lr_mult: float = 2.0,
        warmup_steps: int = 20,
        min_steps: int = 40,
        score_threshold: float | None = None,
        plateau_patience: int | None = None,
        points_per_growth: int | None = None,
        selection: str = "alpha",
        seed: int | None = None,
    ) -> None:
        if isinstance(model, CandidateModel):
            raise InputError("model already carries candidates; pass the plain (or grown) model")
        if budget is not None and not isinstance(budget, Budget):
            raise InputError(f"budget must be a growkit.Budget, got {type(budget).__name__}")
        if min_steps < 1 or warmup_steps < 0 or warmup_steps >= min_steps:
            raise InputError(f"need 0 <= warmup_steps < min_steps, got {warmup_steps}, {min_steps}")
        self.budget = budget
        self.ops = ops
        self.max_inputs, self.max_ops, self.l1 = max_inputs, max_ops, l1
        self.points = None if points is None else list(points)
        self.candidate_lr = candidate_lr
        self.new_lr_mult = new_lr_mult
        self.warmup_steps, self.min_steps = warmup_steps, min_steps
        self.score_threshold = score_threshold
        self.plateau_patience = plateau_patience
        self.points_per_growth = points_per_growth
        self.selection = selection
        self.rng = random.Random(seed)
        gm = growable(model, example_input)
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
        cm = inject(gm, points=self.points, ops=self.ops, max_inputs=self.max_inputs, l1=self.l1, normalize_grad=True)
        adopt_parameters(cm.module, gm)
        return cm

    def parameters(self) -> Iterator[nn.Parameter]:
        """Base and grown parameters (what your optimizer should train); candidates excluded."""
        return self.model.base_parameters()

    def candidate_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.candidate_parameters()

    @property
    def plan(self) -> GrowthPlan:
        st = state_of(self.model.module)
        assert st is not None
        return st.plan

    def grown_model(self) -> torch.fx.GraphModule:
        """A copy of the current model without candidates (same function): for save / export."""
        gm = copy.deepcopy(self.model.module)
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
        the schedulers learn the new group.
        """
        self._optimizers.append((optimizer, list(schedulers)))
        self._sync(optimizer, list(schedulers), [])

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop keeping ``optimizer`` (every attached one when ``None``) in step with growth."""
        self._optimizers = [(o, s) for o, s in self._optimizers if optimizer is not None and o is not optimizer]

    def add_param_group(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                        schedulers: Iterable[Any] = ()) -> None:
        """Add ``params`` to ``optimizer`` as one new group, exactly as growth adds grown parameters.

        The group trains at ``new_lr_mult`` x the first group's lr and every scheduler gets an entry
        for it (e.g. to rebuild an optimizer's layout before loading a checkpointed state).
        """
        g0 = optimizer.param_groups[0]
        group: dict[str, Any] = {"params": list(params), "lr": g0["lr"] * self.new_lr_mult}
        if "initial_lr" in g0:
            group["initial_lr"] = g0["initial_lr"] * self.new_lr_mult
        optimizer.add_param_group(group)
        for s in schedulers:
            # LR schedulers keep one entry per param group; extend them for the new group so it
            # follows the same schedule at new_lr_mult x the first group's rate.
            if hasattr(s, "base_lrs"):
                s.base_lrs.append(s.base_lrs[0] * self.new_lr_mult)
            if hasattr(s, "lr_lambdas"):
                s.lr_lambdas.append(s.lr_lambdas[0])
            if isinstance(getattr(s, "_last_lr", None), list):
                s._last_lr.append(group["lr"])

    def _sync(self, opt: torch.optim.Optimizer, schedulers: list[Any], new: list[nn.Parameter],
              retired: Iterable[nn.Parameter] = ()) -> None:
        drop = {id(p) for p in self.model.candidate_parameters()} | {id(p) for p in retired}
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

    def after_step(self) -> GrowthEvent | None:
        """Call after each optimizer step: trains the candidates, tracks scores, checks triggers."""
        cands = self.model.candidates
        if not self._l1_in_loss:
            l1 = self.l1
            for c in cands.values():
                if c.alpha.grad is not None:
                    c.alpha.grad.add_(l1 * torch.sign(c.alpha.detach()))
        self._l1_in_loss = False
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
        """Finalize the best candidates within budget and inject fresh ones (exactly)."""
        if trigger not in TRIGGERS:
            raise InputError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
        cm = self.model
        scores = cm.scores()
        ev = GrowthEvent(self.steps, trigger, self.experience, [], scores, self.cost.params, self.cost.params,
                         self.cost.flops, self.cost.flops)
        if self._since_inject < self.min_steps:
            ev.note = f"candidates trained {self._since_inject} steps (< min_steps {self.min_steps}); not grown"
            logger.info("growth at step %d skipped: %s", self.steps, ev.note)
            self.events.append(ev)
            return ev
        gen = torch.Generator().manual_seed(self.rng.getrandbits(63))
        chosen, why, edges = choose_points(cm, self.example, current=self.cost, base=self.base_cost,
                                           budget=self.budget, max_ops=self.max_ops, selection=self.selection,
                                           generator=gen, max_points=self.points_per_growth)
        if not chosen:
            ev.note = why
            logger.info("growth at step %d (%s): %s", self.steps, trigger, why)
            self.events.append(ev)
            return ev
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
        self.cost = after_cost
        named = dict(cm.module.named_parameters())
        new_params = [named[n] for n in new_names if n in named and n.startswith(BRANCHES)]
        for opt, scheds in self._optimizers:
            self._sync(opt, scheds, new_params, retired)
        self._cand_opt = torch.optim.Adam(cm.candidate_parameters(), lr=self.candidate_lr)
        self._since_inject = 0
        self.events.append(ev)
        logger.info("grew %s at step %d (%s): params %d -> %d", chosen, self.steps, trigger, ev.params_before,
                    ev.params_after)
        return ev

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
        }, tensors

    @classmethod
    def from_state(cls, model: nn.Module, example_input: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   **options: Any) -> "Grower":
        """Re-create a grower saved with :meth:`state_dict` from the original base ``model``."""
        from ..core.surgery import apply_plan

        plan = GrowthPlan.from_dict(meta["plan"])
        start = apply_plan(model, plan, example_input) if plan.edits else model
        g = cls(start, example_input, **options)
        g.base_cost, g.cost = Cost(**meta["base_cost"]), Cost(**meta["cost"])
        g.steps, g._since_inject = int(meta["steps"]), int(meta["since_inject"])
        g._best_val, g._bad_vals, g.experience = meta["best_val"], int(meta["bad_vals"]), meta["experience"]
        g.events = [GrowthEvent(**e) for e in meta["events"]]
        r = meta["rng"]
        g.rng.setstate((r[0], tuple(r[1]), r[2]))
        load_full_state(g.model, tensors, "grower.model.")
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
