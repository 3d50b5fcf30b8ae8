"""Where to grow: rank growth points by fit per added cost and keep those within a budget.

Shared by :func:`growkit.grow` and :class:`growkit.Grower`: every candidate point is finalized
once (a dry run) to measure its branch's parameters and FLOPs; points whose weak learner fits the
negative gradient (score > 0) are ranked by score per relative added parameters and taken while
the grown model stays within the budget. A point whose ``max_ops`` edges do not fit what is left
keeps its leading edges that do (top |alpha| first; for random selection, the first drawn), so
expensive ops at one point do not shut out a point that a smaller branch would serve. The edges
that were costed are returned with the points, so the caller grows exactly them (random edge
draws included).

Cell mode: a tie group (:mod:`growkit.core.tie`) is one decision. Its score is the mean of its
members' scores (pooled evidence), its cost the sum over every copy, and a partial fit keeps the
same leading edges at every member.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx

from .candidates import CandidateModel
from .cost import Budget, Cost, count_params, flop_counter, measure
from .finalize import finalize, selected_edges
from .plan import BRANCHES, ScoredEdge
from .surgery import state_of
from .tie import units

__all__ = ["Choice", "branch_costs", "choose_points"]


class Choice(NamedTuple):
    """Result of :func:`choose_points`."""

    points: list[str]
    """points to grow, best first"""
    why: str
    """why nothing was chosen ('' when something was)"""
    edges: dict[str, list[ScoredEdge]]
    """chosen point -> the scored edges that were costed; pass to ``finalize(edges=)``"""


def branch_costs(grown: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> dict[str, tuple[int, int]]:
    """Point -> (params, FLOPs) of each grown branch, from one FlopCounterMode pass."""
    st = state_of(grown)
    assert st is not None
    branches = dict(getattr(grown, BRANCHES).items()) if hasattr(grown, BRANCHES) else {}
    counts = flop_counter(grown, example).get_flop_counts()
    out = {}
    key_of = {e.key: e.point for e in st.plan.edits}
    for key, br in branches.items():
        name = f"{BRANCHES}.{key}"
        flops = sum(v for k, d in counts.items() if k.endswith(name) for v in d.values())
        out[key_of[key]] = (count_params(br), int(flops))
    return out


def choose_points(
    cm: CandidateModel,
    example: tuple[torch.Tensor, ...],
    *,
    current: Cost,
    base: Cost,
    budget: Budget | None,
    max_ops: int,
    selection: str = "alpha",
    generator: torch.Generator | None = None,
    max_points: int | None = None,
    partial: bool = True,
) -> Choice:
    """Points to grow (best first), the edges to grow there and, when none, why.

    ``current`` is the cost of the model the candidates sit on, ``base`` the cost budgets are
    relative to. ``partial=False`` grows a point with all of its ``max_ops`` edges or not at all
    (the paper's Algorithm 2 has no budget).
    """
    edges = selected_edges(cm, max_ops, selection=selection, generator=generator)
    full = finalize(cm, edges=edges)
    point_costs = branch_costs(full, example)
    # Decision units: an untied point alone, a tie group with all its copies (cell mode).
    point_scores = cm.scores()
    scores, costs = {}, {}
    for u in units(point_scores, cm.ties):
        if not all(p in point_costs for p in u):
            continue
        vals = [point_scores[p] for p in u if point_scores[p] == point_scores[p]]
        scores[u] = sum(vals) / len(vals) if vals else float("nan")
        costs[u] = (sum(point_costs[p][0] for p in u), sum(point_costs[p][1] for p in u))
    ranked = sorted(
        (u for u in scores if scores[u] == scores[u] and scores[u] > 0),
        key=lambda u: scores[u] / (costs[u][0] / max(base.params, 1) + 1e-9),
        reverse=True,
    )
    chosen: dict[str, list[ScoredEdge]] = {}
    add_p, add_f = 0, 0

    def fits(cost: tuple[int, int]) -> bool:
        trial = Cost(current.params + add_p + cost[0], current.flops + add_f + cost[1], None)
        return budget is None or budget.allows(trial, base)

    for u in ranked:
        if max_points is not None and len(chosen) + len(u) > max_points:
            if len(u) == 1:
                break
            continue
        keep, cost = {p: edges[p] for p in u}, costs[u]
        if not fits(cost):
            keep = {}
            # Fewer edges shrink the branch (its ops and the projection's input width).
            for k in range(len(edges[u[0]]) - 1, 0, -1) if partial else ():
                trial = {p: edges[p][:k] for p in u}
                c = branch_costs(finalize(cm, edges=trial), example)
                total = (sum(c[p][0] for p in u), sum(c[p][1] for p in u))
                if fits(total):
                    keep, cost = trial, total
                    break
            if not keep:
                continue
        chosen.update(keep)
        add_p += cost[0]
        add_f += cost[1]
    why = "" if chosen else ("no candidate fits the budget" if ranked else "no candidate fits the negative gradient")
    if chosen and budget is not None and budget.needs_latency:
        chosen = _within_latency(cm, example, chosen, budget, base)
        why = "" if chosen else "no candidate fits the latency budget"
    return Choice(list(chosen), why, chosen)


def _within_latency(cm: CandidateModel, example: tuple[torch.Tensor, ...],
                    chosen: dict[str, list[ScoredEdge]], budget: Budget,
                    base: Cost) -> dict[str, list[ScoredEdge]]:
    """Drop the lowest-ranked points until the grown model's measured latency fits the budget.

    Latency is not additive over branches, so it is measured on the grown model itself, here,
    rather than after weak learning has been paid for.
    """
    order = units(chosen, cm.ties)
    while order:
        keep = {p: chosen[p] for u in order for p in u}
        if budget.allows(measure(finalize(cm, edges=keep), example, latency=True), base):
            return keep
        order.pop()
    return {}
