"""The candidate space every growth pass searches, and the cost of a proposal in it.

An *atom* (:class:`~growkit.core.plan.Atom`) is one shortcut ``(point, input, op)``: op ``op``
applied to eligible input ``input`` and added at growth point ``point``. A *proposal* (not a
growth plan: what a pass proposes to add to its parent in one round) is a set of atoms; it becomes one
:class:`~growkit.core.plan.Edit` per point (concat + projection, eta gate: a
:class:`~growkit.core.branch.GrownBranch`), so every pass ends in the same plan format Petridish writes.

The space is built the way :func:`growkit.inject` builds candidates (the same points, the nearest
``max_inputs`` eligible inputs, the same op set), so all passes search the same space. The added
cost of a proposal is computed from per-atom op costs plus the projection and gate of each branch;
it equals what :func:`growkit.core.cost.measure` reports for the grown model (tests pin this down).

Cell mode (``tie="stage"`` / ``"all"``): the points of a tie group (:mod:`growkit.core.tie`) are one
decision. Only the group's first member carries choosable atoms (:attr:`SearchSpace.atoms`); an
atom there stands for the same relative atom at every member (:meth:`SearchSpace.copies`), and
costs, constraints and edits are those of the expanded set (:meth:`SearchSpace.expand`): the
budget counts every copy, each copy becomes its own branch, and the edits carry the group's tie.
"""
from __future__ import annotations

import logging
import random
from typing import Iterable, Sequence

import torch
import torch.fx
from torch import nn

from ..core.cost import Budget, Cost, count_flops, count_params
from ..errors import PointError
from ..core.graph import GrowthPoint
from ..core.ops import DEFAULT_REGISTRY, OpRegistry, build_edge_op, canonical, resolve_ops
from ..core.plan import Atom, Edit
from ..core.surgery import state_of
from ..core.tie import TieGroup, group_of, tie_groups

__all__ = ["Proposal", "SearchSpace", "proposal_to_list", "proposal_from_list"]

logger = logging.getLogger(__name__)


Proposal = frozenset[Atom]
"""The atoms a pass proposes to add to its parent in one round (not a growth plan)."""


def proposal_to_list(proposal: Iterable[Atom]) -> list[list[str]]:
    """JSON form of a proposal: sorted ``[point, input, op]`` triples."""
    return [[a.point, a.input, a.op] for a in sorted(proposal)]


def proposal_from_list(items: Iterable[Sequence[str]]) -> Proposal:
    return frozenset(Atom(*map(str, it)) for it in items)


class SearchSpace:
    """Growth points x eligible inputs x ops of a growable parent, with costs and constraints.

    Args:
        model: the parent (a growable GraphModule: traced or grown by growkit).
        points: growth points to search (``None``: every point with eligible inputs).
        ops: op names, ``"paper"`` or ``None`` (as :func:`growkit.inject`).
        max_inputs: the nearest this many eligible inputs per point (``None``: all).
        max_ops: most atoms per point (Imax).
        points_per_round: most points grown in one proposal (``None``: no limit).
        budget / base_cost / parent_cost: a proposal is feasible when parent cost + added cost is
            within ``budget`` relative to ``base_cost`` (params and FLOPs axes).
        tie: ``"none"`` (every point its own decision), ``"stage"`` or ``"all"`` (cell mode: see
            the module docstring).
    """

    def __init__(
        self,
        model: torch.fx.GraphModule,
        *,
        points: Iterable[str] | None = None,
        ops: Iterable[str] | str | None = None,
        max_inputs: int | None = 2,
        max_ops: int = 3,
        points_per_round: int | None = None,
        budget: Budget | None = None,
        base_cost: Cost | None = None,
        parent_cost: Cost | None = None,
        registry: OpRegistry | None = None,
        tie: str = "none",
    ) -> None:
        st = state_of(model)
        if st is None:
            raise PointError("SearchSpace needs a growable model (traced or grown by growkit)")
        self.registry = registry or DEFAULT_REGISTRY
        self.max_ops = max_ops
        self.points_per_round = points_per_round
        self.budget = budget
        self.base_cost = base_cost
        self.parent_cost = parent_cost or Cost(0, 0)
        if points is None:
            chosen = [p for p in st.points if p.inputs]
        else:
            names = [points] if isinstance(points, str) else list(points)
            chosen = [st.point(n) for n in names]  # PointError names the available points
            order = {p.name: i for i, p in enumerate(st.points)}
            chosen = sorted({p.name: p for p in chosen if p.inputs}.values(), key=lambda p: order[p.name])
        if not chosen:
            raise PointError("no growth point with eligible inputs to search")
        self.points: list[GrowthPoint] = chosen
        self.inputs: dict[str, list[str]] = {}
        self.ops: dict[str, tuple[str, ...]] = {}
        self.atoms: list[Atom] = []
        self._atom_cost: dict[Atom, tuple[int, int]] = {}
        self._proj_cost: dict[str, tuple[int, int]] = {}
        eligible = {p.name: list(p.inputs)[-max_inputs:] if max_inputs is not None else list(p.inputs) for p in chosen}
        self.ties: list[TieGroup] = tie_groups(st.points, chosen, eligible, tie)
        tied = group_of(self.ties)
        for p in chosen:
            ins = eligible[p.name]
            self.inputs[p.name] = [z.name for z in ins]
            self.ops[p.name] = resolve_ops(ops, p.layout)
            for z in ins:
                for op in self.ops[p.name]:
                    a = Atom(p.name, z.name, op)
                    if p.name not in tied or tied[p.name].points[0] == p.name:
                        self.atoms.append(a)  # a tied group's later members follow its first
                    self._atom_cost[a] = self._measure_op(op, z, p)
            self._proj_cost[p.name] = self._measure_proj(p)
        self.index = {a: i for i, a in enumerate(self.atoms)}
        self._copies: dict[Atom, tuple[Atom, ...]] = {}
        for a in self.atoms:
            g = tied.get(a.point)
            self._copies[a] = (a,) if g is None else tuple(
                Atom(p, z, a.op) for p, ((z, _),) in g.translate(a.point, [a.edge]).items())
        # every concrete atom (copies too) sorts where the atom it copies does
        self._rank = {c: self.index[a] for a in self.atoms for c in self._copies[a]}
        self._point_order = {p.name: i for i, p in enumerate(chosen)}
        self.point_of = {p.name: p for p in chosen}
        self.decision_points: list[GrowthPoint] = [p for p in chosen if p.name not in tied or tied[p.name].points[0] == p.name]
        """The points whose atoms a pass chooses (a tie group's first member decides for the group)."""

    # ------------------------------------------------------------------ costs
    def _measure_op(self, op: str, z, p: GrowthPoint) -> tuple[int, int]:
        module = build_edge_op(self.registry, op, z, p)
        x = torch.zeros(canonical(torch.empty(z.shape, device="meta"), p.layout).shape)[:1]
        return count_params(module), count_flops(module, x)

    def _measure_proj(self, p: GrowthPoint) -> tuple[int, int]:
        """Params and FLOPs that each edge adds to a branch's projection (linear in edges)."""
        c = p.channels
        proj: nn.Module = nn.Linear(c, c, bias=False) if p.layout == "tokens" else nn.Conv2d(c, c, 1, bias=False)
        shape = list(canonical(torch.empty(p.shape, device="meta"), p.layout).shape)
        shape[0] = 1
        return count_params(proj), count_flops(proj, torch.zeros(shape))

    # ------------------------------------------------------------------ cell mode
    def copies(self, atom: Atom) -> tuple[Atom, ...]:
        """The concrete atoms a choosable ``atom`` stands for: itself, or its copy at every member
        of its tie group."""
        return self._copies[atom]

    def expand(self, proposal: Iterable[Atom]) -> Proposal:
        """The concrete atoms of ``proposal``: every tied atom at every member of its group."""
        return frozenset(c for a in proposal for c in self._copies.get(a, (a,)))

    def added_cost(self, proposal: Iterable[Atom]) -> tuple[int, int]:
        """(params, FLOPs) the proposal adds: ops, projections, and one gate ``eta`` per grown point;
        in cell mode every copy counts."""
        params = flops = 0
        pts = set()
        for a in self.expand(proposal):
            ap, af = self._atom_cost[a]
            pp, pf = self._proj_cost[a.point]
            params += ap + pp
            flops += af + pf
            pts.add(a.point)
        return params + len(pts), flops

    def cost(self, proposal: Iterable[Atom]) -> Cost:
        """Serving cost of parent + proposal (params and FLOPs)."""
        p, f = self.added_cost(proposal)
        return Cost(self.parent_cost.params + p, self.parent_cost.flops + f)

    # ------------------------------------------------------------------ constraints
    def within_budget(self, proposal: Iterable[Atom]) -> bool:
        if self.budget is None or self.base_cost is None:
            return True
        return self.budget.allows(self.cost(proposal), self.base_cost)

    def structurally_valid(self, proposal: Iterable[Atom]) -> bool:
        """Atoms of this space, at most ``max_ops`` per point, at most ``points_per_round`` points
        (every copy of a tied point counts, as in Petridish's selection)."""
        per: dict[str, int] = {}
        for a in proposal:
            if a not in self.index:
                return False
            per[a.point] = per.get(a.point, 0) + 1
        if any(n > self.max_ops for n in per.values()):
            return False
        return self.points_per_round is None or len({a.point for a in self.expand(proposal)}) <= self.points_per_round

    def feasible(self, proposal: Iterable[Atom]) -> bool:
        proposal = frozenset(proposal)
        return bool(proposal) and self.structurally_valid(proposal) and self.within_budget(proposal)

    def can_add(self, proposal: Proposal, atom: Atom) -> bool:
        return atom not in proposal and self.feasible(proposal | {atom})

    def expansions(self, proposal: Proposal) -> list[Proposal]:
        """Every feasible proposal with exactly one more atom."""
        return [proposal | {a} for a in self.atoms if self.can_add(proposal, a)]

    def random_proposal(self, rng: random.Random, size: int | None = None,
                    start: Proposal = frozenset()) -> Proposal:
        """Add atoms in random order while feasible, up to ``size`` atoms (``None``: until full)."""
        proposal = frozenset(start)
        order = list(self.atoms)
        rng.shuffle(order)
        for a in order:
            if size is not None and len(proposal) >= size:
                break
            if self.can_add(proposal, a):
                proposal = proposal | {a}
        return proposal

    def greedy(self, ranked: Iterable[Atom], size: int | None = None) -> Proposal:
        """Take atoms in the given order, skipping those that break a constraint."""
        proposal: Proposal = frozenset()
        for a in ranked:
            if size is not None and len(proposal) >= size:
                break
            if self.can_add(proposal, a):
                proposal = proposal | {a}
        return proposal

    # ------------------------------------------------------------------ encodings
    def encode(self, proposal: Iterable[Atom]) -> list[float]:
        """Fixed-length 0/1 vector over the atoms (for surrogates)."""
        v = [0.0] * len(self.atoms)
        for a in proposal:
            v[self.index[a]] = 1.0
        return v

    def by_point(self, proposal: Iterable[Atom]) -> dict[str, list[Atom]]:
        """Point -> its atoms (tied atoms expanded to every copy), both in the space's order
        (topological points, input, op)."""
        out: dict[str, list[Atom]] = {}
        for a in sorted(self.expand(proposal), key=self._rank.__getitem__):
            out.setdefault(a.point, []).append(a)
        return dict(sorted(out.items(), key=lambda kv: self._point_order[kv[0]]))

    def edits(self, proposal: Iterable[Atom], first_key: int) -> list[Edit]:
        """One edit per grown point, keyed ``g<n>`` after the parent's edits (as finalize keys them);
        the edits of a tie group carry the key of its first edit as ``tie``."""
        tied = group_of(self.ties)
        out: list[Edit] = []
        tie_id: dict[str, str] = {}
        for i, (p, atoms) in enumerate(self.by_point(proposal).items()):
            key = f"g{first_key + i}"
            tie = tie_id.setdefault(tied[p].points[0], key) if p in tied else ""
            out.append(Edit(p, tuple(a.edge for a in atoms), key, tie))
        return out

    def __len__(self) -> int:
        return len(self.atoms)
