"""What the search passes share: the round driver, the search context, children (supernet cells
are in :mod:`growkit.search.cells`).

A pass subclasses :class:`SearchMethod` and implements :meth:`SearchMethod.search`, which gets a
:class:`SearchContext` (the parent, the :class:`~growkit.search.space.SearchSpace`, the training
step budget, helpers that build / train / evaluate children) and returns the :class:`Child` to
keep. The driver does the rest the same way for every pass: parent sampling from the gallery,
the budget check, rebuilding the child from its growth plan, fine-tuning with ``run.finetune`` (a fresh
schedule, new parameters under the rule of :mod:`growkit.newparams`, rolled back and retried once
when it diverges), the gallery entry and checkpoints. So passes
differ only in how they search, and compare on equal terms::

    @register_method
    class FirstFit(SearchMethod):
        name = "first-fit"

        def search(self, ctx):
            proposal = ctx.space.greedy(ctx.space.atoms)        # any feasible set of atoms
            child = ctx.build(proposal)                         # exact: eta = 0
            ctx.train(child, ctx.steps)
            return ctx.child(proposal, child)

Training budget: every pass spends at most ``steps`` training batches in its search (default
``search_epochs`` x batches per epoch, as Petridish's weak learning); how it splits them (one
supernet, many briefly trained children) is its business, and :meth:`SearchContext.train` refuses
to go beyond it. Validation batches used for decisions (rewards, architecture weights, child
selection) are counted separately in the round's history.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.fx
from torch import nn

from ..core.branch import GrownBranch
from ..core.cost import measure
from ..core.plan import BRANCHES, GrowthPlan
from ..core.surgery import apply_edit, growable, state_of
from ..errors import InputError, NonFiniteLoss, ResourceError
from ..growth.gallery import Entry
from ..growth.methods import GrowthMethod
from ..growth.run import GrowRun, Saved
from ..newparams import growth_optimizer
from ..train import PhaseStats, cosine_schedule, default_loss, evaluate, forward, iter_batches, num_batches, train_batches
from .cells import proj_block, set_proj_block
from ..core.plan import Atom
from .space import SearchSpace, proposal_to_list

__all__ = [
    "SearchMethod", "SearchContext", "Child", "BatchStream", "grow_proposal", "new_branches", "inherit_branch",
    "check_int", "check_number", "COMMON_OPTIONS",
]

logger = logging.getLogger(__name__)

COMMON_OPTIONS: dict[str, Any] = {"size": None, "steps": None, "eval_batches": None}
"""Options every search pass takes: ``size`` (most atoms a proposal adds per round; ``None``: as
many as the budget and ``max_ops`` allow), ``steps`` (training batches of the search; ``None``:
``search_epochs`` epochs), ``eval_batches`` (validation batches per child evaluation; ``None``: all)."""


@dataclass
class Child:
    """A candidate proposal for this round and its (briefly trained) model."""

    proposal: frozenset
    model: torch.fx.GraphModule
    val_accuracy: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class BatchStream:
    """Endless device-placed ``(x, y)`` batches: the loader is re-iterated when exhausted."""

    def __init__(self, loader: Iterable, batch_fn: Any, device: torch.device) -> None:
        self.loader, self.batch_fn, self.device = loader, batch_fn, device
        self._it: Iterator | None = None
        self.taken = 0

    def next(self) -> tuple[Any, torch.Tensor]:
        if self._it is None:
            self._it = iter_batches(self.loader, self.batch_fn, self.device)
        try:
            out = next(self._it)
        except StopIteration:
            self._it = iter_batches(self.loader, self.batch_fn, self.device)
            out = next(self._it)
        self.taken += 1
        return out


class _Take:
    """The first ``n`` batches of a loader, re-iterable (for capped evaluations)."""

    def __init__(self, loader: Iterable, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.n)


# ---------------------------------------------------------------------------------------- context
class SearchContext:
    """What a pass works with in one round (see the module docstring).

    Attributes:
        run: the :class:`growkit.growth.run.GrowRun`.
        parent: the gallery entry grown from; ``parent_model`` its model.
        space: the :class:`SearchSpace` of the parent within the run's budget.
        steps: training batches this search may spend.
        rng: the run's seeded ``random.Random`` (checkpointed with the run).
        rec: the round's history record (JSON-able; add what is worth reporting).
        opts: the pass's options (defaults merged).
    """

    def __init__(self, run: GrowRun, parent: Entry, rec: dict[str, Any], opts: dict[str, Any]) -> None:
        cfg = run.cfg
        setup = run.setup
        self.run, self.parent, self.rec, self.opts = run, parent, rec, opts
        self.rng: random.Random = run.rng
        self.dev = run.dev
        self.parent_model = run.materialize(parent)
        self.first_key = len(parent.plan)
        self.space = SearchSpace(
            self.parent_model, points=cfg.points, ops=cfg.ops, max_inputs=cfg.max_inputs,
            max_ops=cfg.max_ops, points_per_round=cfg.points_per_round, budget=run.budget,
            base_cost=run.base_cost, parent_cost=parent.cost, tie=cfg.tie,
        )
        self.steps = int(opts["steps"]) if opts["steps"] is not None else cfg.search_epochs * num_batches(setup.loader)
        self.size: int | None = opts["size"]
        self.train_stream = BatchStream(setup.loader, setup.batch_fn, run.dev)
        self.val_stream = BatchStream(setup.val_loader, setup.batch_fn, run.dev)
        self.steps_used = 0
        self.evaluations = 0
        self.children: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ randomness
    def generator(self) -> torch.Generator:
        """A torch generator seeded from the run's RNG (reproducible, checkpoint-safe)."""
        g = torch.Generator()
        g.manual_seed(self.rng.getrandbits(63))
        return g

    # ------------------------------------------------------------------ children
    def new_keys(self, model: torch.fx.GraphModule) -> list[str]:
        st = state_of(model)
        assert st is not None
        return [e.key for e in st.plan.edits[self.first_key:]]

    def branches(self, model: torch.fx.GraphModule) -> dict[str, GrownBranch]:
        """Point -> the branch this round grew there."""
        return new_branches(model, self.first_key)

    def build(self, proposal: Iterable[Atom], donor: Child | None = None) -> torch.fx.GraphModule:
        """The parent grown by ``proposal`` (see :func:`grow_proposal`), on the run's device, in train mode."""
        return grow_proposal(self.parent_model, self.space, proposal, self.first_key,
                         donor.model if donor is not None else None).to(self.dev).train()

    def child(self, proposal: Iterable[Atom], model: torch.fx.GraphModule, val_accuracy: float | None = None,
              **info: Any) -> Child:
        return Child(frozenset(proposal), model, val_accuracy, info)

    # ------------------------------------------------------------------ training and evaluation
    def loss(self, model: nn.Module, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Loss of one batch (raises ``NonFiniteLoss`` like grow's phases)."""
        out = forward(model, x)
        loss = (self.run.setup.loss_fn or default_loss)(out, y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} during the {self.rec.get('method')} search")
        return loss, out

    def optimizer(self, model: torch.fx.GraphModule, extra_new: Sequence[nn.Parameter] = (),
                  exclude: Sequence[nn.Parameter] = ()) -> torch.optim.SGD:
        """SGD as grow() fine-tunes: this round's branches (and ``extra_new``) under the new-parameter
        rule (:mod:`growkit.newparams`: capped, warmed-up rate, eta guard raising
        ``NonFiniteLoss`` from ``step()``), the rest of ``model`` but ``exclude`` at ``lr``."""
        cfg = self.run.cfg
        new = [p for k in self.new_keys(model) for p in getattr(model, BRANCHES)[k].parameters()] + list(extra_new)
        opt, _ = growth_optimizer(model, new, exclude=exclude, rule=cfg.new_param_rule(), lr=cfg.lr,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  steps_per_epoch=num_batches(self.run.setup.loader))
        return opt

    def train(self, model: torch.fx.GraphModule, steps: int) -> PhaseStats:
        """Train ``model`` for ``steps`` batches (cosine schedule over them), counted against the
        search budget: never beyond it (a child asked for after the budget is spent stays untrained)."""
        steps = min(steps, self.steps - self.steps_used)
        if steps <= 0:
            return PhaseStats()
        opt = self.optimizer(model)
        sched = cosine_schedule(opt, steps)  # grow()'s phase schedule
        model.train()
        stats = train_batches(model, (self.train_stream.next() for _ in range(steps)), opt, scheduler=sched,
                              loss_fn=self.run.setup.loss_fn, desc=f"{self.rec.get('method')} search")
        self.steps_used += steps
        return stats

    def evaluate(self, model: nn.Module) -> float:
        """Validation accuracy (on ``eval_batches`` batches when that option is set)."""
        n = self.opts["eval_batches"]
        setup = self.run.setup
        loader = setup.val_loader if n is None else _Take(setup.val_loader, int(n))
        self.evaluations += 1
        return evaluate(model, loader, loss_fn=setup.loss_fn, batch_fn=setup.batch_fn, device=self.dev)["accuracy"]

    def record(self, proposal: Iterable[Atom], val_accuracy: float, **info: Any) -> None:
        """Note one evaluated child in the round's history."""
        self.children.append({"atoms": proposal_to_list(proposal), "val_accuracy": val_accuracy, **info})

    def child_steps(self, n_children: int) -> int:
        """Steps per child when ``n_children`` share the search budget (at least 1 while any is
        left; with fewer batches than children the last children stay untrained)."""
        if self.steps <= 0:
            return 0
        return max(1, self.steps // max(1, n_children))


def new_branches(model: torch.fx.GraphModule, first_key: int) -> dict[str, GrownBranch]:
    """Point -> the branch grown there after the first ``first_key`` edits of its growth plan."""
    st = state_of(model)
    assert st is not None
    mods = getattr(model, BRANCHES, {})
    return {e.point: mods[e.key] for e in st.plan.edits[first_key:]}


def grow_proposal(parent: torch.fx.GraphModule, space: SearchSpace, proposal: Iterable[Atom], first_key: int,
              donor: torch.fx.GraphModule | None = None) -> torch.fx.GraphModule:
    """``parent`` (not modified) grown by ``proposal``: one branch per point; function-preserving.

    Without ``donor``: the parent's weights and fresh branches with ``eta = 0``, so the output is
    exactly the parent's. With ``donor`` (another proposal grown on the same parent, e.g. a trained
    child), the new model inherits the donor's weights: base weights, and per point the ops,
    norms and projection blocks of the atoms they share, its gate ``eta``, and zero projection
    blocks for the atoms it adds, so a proposal that only adds atoms to the donor's computes the
    donor's function. A point that shares no atom with the donor gets a fresh branch (``eta = 0``).
    """
    proposal = frozenset(proposal)
    if not space.structurally_valid(proposal):
        raise InputError(f"proposal {proposal_to_list(proposal)} is not in this search space")
    gm = growable(parent)
    edits = space.edits(proposal, first_key)
    for e in edits:
        apply_edit(gm, e, space.registry)
    gm.graph.lint()
    gm.recompile()
    if donor is not None:
        theirs = new_branches(donor, first_key)
        skip = tuple(f"{BRANCHES}.{k}." for k in [e.key for e in state_of(donor).plan.edits[first_key:]])  # type: ignore[union-attr]
        new = tuple(f"{BRANCHES}.{e.key}." for e in edits)
        missing, unexpected = gm.load_state_dict(
            {k: v for k, v in donor.state_dict().items() if not k.startswith(skip)}, strict=False)
        if unexpected or not all(k.startswith(new) for k in missing):
            raise InputError("donor was not grown from the same parent: "
                             f"unexpected {unexpected[:3]}, missing {[k for k in missing if not k.startswith(new)][:3]}")
        for point, br in new_branches(gm, first_key).items():
            if point in theirs:
                inherit_branch(br, theirs[point])
    return gm


def inherit_branch(dst: GrownBranch, src: GrownBranch) -> None:
    """Copy into ``dst`` what it shares with ``src`` (same point): see :meth:`SearchContext.build`."""
    src_edges = list(zip(src.input_names, src.op_names))
    shared = [(e, src_edges.index(edge)) for e, edge in enumerate(zip(dst.input_names, dst.op_names)) if edge in src_edges]
    if not shared:
        return  # nothing to inherit: a fresh branch, eta = 0
    with torch.no_grad():
        for e in range(len(dst.op_names)):
            set_proj_block(dst, e, None)
        for e, j in shared:
            dst.ops[e].load_state_dict(src.ops[j].state_dict())
            dst.norms[e].load_state_dict(src.norms[j].state_dict())
            set_proj_block(dst, e, proj_block(src, j))
        dst.eta.copy_(src.eta)


# ------------------------------------------------------------------------------------ the driver
def check_int(name: str, v: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"option {name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {v!r}")


def check_number(name: str, v: Any, minimum: float = 0.0, strict: bool = True) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > minimum if strict else v >= minimum):
        raise InputError(f"option {name} must be a number {'>' if strict else '>='} {minimum}, got {v!r}")


class SearchMethod(GrowthMethod):
    """Base class of search passes over growkit's candidate space (see the module docstring).

    Subclasses set ``name`` and ``defaults`` (their options) and implement :meth:`search`.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        known = {**COMMON_OPTIONS, **self.defaults}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(f"{self.name}: unknown method_options {unknown}; valid options: {', '.join(sorted(known))}")
        super().__init__(**options)
        self.opts: dict[str, Any] = {**known, **options}
        check_int("size", self.opts["size"], allow_none=True)
        check_int("steps", self.opts["steps"], allow_none=True, minimum=0)
        check_int("eval_batches", self.opts["eval_batches"], allow_none=True)
        self.validate()

    def validate(self) -> None:
        """Check the pass's own options (``self.opts``); raise :class:`InputError` on a bad one."""

    def search(self, ctx: SearchContext) -> Child | None:
        """Search this round's space; return the child to fine-tune, or ``None`` (nothing grown)."""
        raise NotImplementedError

    def round(self, run: GrowRun, rnd: int, saved: Saved | None) -> None:
        prog = saved[0]["progress"] if saved is not None else None
        try:
            if prog is not None and prog["phase"] == "finetune":
                # Resumed mid fine-tune: the checkpoint holds the plan and the weights.
                parent = run.gallery[prog["parent"]]
                grown = run.model_from(GrowthPlan.from_dict(prog["plan"]), None)
                run.finetune(rnd, grown, parent, run.history[-1], saved)
                return
            self._search_and_grow(run, rnd)
        except NonFiniteLoss as exc:
            logger.warning("round %d stopped: %s; rolled back to the last good model", rnd, exc)
            run.history[-1]["note"] = f"stopped and rolled back: {exc}"
            run.save({"round": rnd, "phase": "round_end"})

    def _search_and_grow(self, run: GrowRun, rnd: int) -> None:
        parent = run.gallery.sample_parent(run.rng, run.budget, run.base_cost)
        rec: dict[str, Any] = {"round": rnd, "parent": parent.id, "method": self.name}
        run.history.append(rec)
        t = time.perf_counter()
        ctx = SearchContext(run, parent, rec, self.opts)
        try:
            child = self.search(ctx)
        except torch.OutOfMemoryError as exc:
            raise ResourceError(
                f"out of memory in the {self.name} search (round {rnd}, {len(ctx.space)} candidate atoms) on "
                f"{run.dev}: pass points=[...] to search fewer points, max_inputs=1 or fewer ops, or use a smaller batch"
            ) from exc
        rec["search_s"] = time.perf_counter() - t
        rec["search_steps"] = ctx.steps_used
        rec["search_evaluations"] = ctx.evaluations
        rec["search_val_batches"] = ctx.val_stream.taken
        rec["space_atoms"] = len(ctx.space)
        if ctx.children:
            rec["children"] = ctx.children
        if child is None or not child.proposal:
            why = "no shortcut fits the budget" if not ctx.space.feasible(ctx.space.greedy(ctx.space.atoms, 1)) \
                else "the search kept no atom"
            logger.warning("round %d: %s; nothing grown", rnd, why)
            rec["note"] = why
            run.save({"round": rnd, "phase": "round_end"})
            return
        if not ctx.space.feasible(child.proposal):
            raise InputError(f"method {self.name!r} returned proposal {proposal_to_list(child.proposal)}, which breaks the "
                             "budget or the max_ops / points_per_round limits")
        rec["atoms"] = proposal_to_list(child.proposal)
        rec["chosen"] = list(ctx.space.by_point(child.proposal))
        rec["search_val_accuracy"] = child.val_accuracy
        rec.update({k: v for k, v in child.info.items() if k not in rec})
        grown = child.model
        if run.budget is not None and run.budget.needs_latency:
            if not run.budget.allows(measure(grown, run.example, latency=True), run.base_cost):
                logger.warning("round %d: grown model exceeds the latency budget; discarded", rnd)
                rec["note"] = "latency over budget"
                run.save({"round": rnd, "phase": "round_end"})
                return
        # Rebuilt from its plan, as a resumed run does, so both fine-tune the very same module.
        plan = state_of(grown).plan.copy()  # type: ignore[union-attr]
        grown = run.model_from(plan, grown.state_dict())
        run.save({"round": rnd, "phase": "finetune", "epoch": 0, "parent": parent.id, "plan": plan.to_dict(), "stats": {}},
                 work=grown)
        run.finetune(rnd, grown, parent, rec, None)

