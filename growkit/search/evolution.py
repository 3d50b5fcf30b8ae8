"""Regularized (aging) evolution (Real et al. 2019) over growth plans.

A population of ``population`` random proposals (grown from the parent, trained briefly, evaluated)
evolves for ``cycles`` cycles: draw ``tournament`` members at random, mutate the best by one edit
(add an atom, remove an atom, or swap one atom for another; the kind is drawn among those
possible), train the child briefly, evaluate it, append it and drop the *oldest* member (aging,
not the worst). Children inherit their parent member's weights (shared atoms keep their ops,
norms, projection blocks and gate; added atoms enter with a zero block, so an added atom is
function-preserving). The best proposal ever evaluated is kept.
"""
from __future__ import annotations

import random
from collections import deque

from ..growth.methods import register_method
from .common import Child, SearchContext, SearchMethod, check_int
from .space import SearchSpace, Proposal

__all__ = ["Evolution", "mutate"]


def mutate(space: SearchSpace, proposal: Proposal, rng: random.Random,
           size: int | None = None) -> tuple[Proposal, str] | None:
    """``proposal`` changed by one edit: ``add``, ``remove`` or ``swap`` (feasible); ``None`` if none is."""
    adds = [] if size is not None and len(proposal) >= size else space.expansions(proposal)
    removes = [proposal - {a} for a in sorted(proposal)] if len(proposal) >= 2 else []
    removes = [p for p in removes if space.feasible(p)]
    swaps = []
    for a in sorted(proposal):
        rest = proposal - {a}
        swaps += [rest | {b} for b in space.atoms if b != a and b not in proposal and space.feasible(rest | {b})]
    kinds = [(k, opts) for k, opts in (("add", adds), ("remove", removes), ("swap", swaps)) if opts]
    if not kinds:
        return None
    kind, options = kinds[rng.randrange(len(kinds))]
    return options[rng.randrange(len(options))], kind


@register_method
class Evolution(SearchMethod):
    """Aging evolution over proposals (see the module docstring).

    Options: ``population``, ``tournament`` (members drawn per selection), ``cycles`` (children
    bred), ``child_steps`` (training batches per proposal; default: the search budget split over
    ``population + cycles`` proposals), plus the common ``size`` / ``steps`` / ``eval_batches``.
    """

    name = "evolution"
    defaults = {"population": 4, "tournament": 2, "cycles": 4, "child_steps": None}

    def validate(self) -> None:
        for k in ("population", "tournament"):
            check_int(k, self.opts[k])
        check_int("cycles", self.opts["cycles"], minimum=0)
        check_int("child_steps", self.opts["child_steps"], allow_none=True, minimum=0)

    def search(self, ctx: SearchContext) -> Child | None:
        o = self.opts
        steps = o["child_steps"] if o["child_steps"] is not None else ctx.child_steps(o["population"] + o["cycles"])
        population: deque[Child] = deque()
        best: Child | None = None

        def evaluate(proposal: Proposal, donor: Child | None, **info) -> Child:
            nonlocal best
            model = ctx.build(proposal, donor)
            ctx.train(model, steps)
            acc = ctx.evaluate(model)
            ctx.record(proposal, acc, **info)
            child = ctx.child(proposal, model, acc)
            if best is None or acc > best.val_accuracy:  # type: ignore[operator]
                best = child
            return child

        for _ in range(o["population"]):
            proposal = ctx.space.random_proposal(ctx.rng, ctx.size)
            if not proposal:
                return None  # nothing fits the budget
            population.append(evaluate(proposal, None, origin="initial"))
        for cycle in range(o["cycles"]):
            drawn = ctx.rng.sample(list(population), min(o["tournament"], len(population)))
            parent = max(drawn, key=lambda c: c.val_accuracy)  # first of equals: stable
            got = mutate(ctx.space, parent.proposal, ctx.rng, ctx.size)
            if got is None:
                break  # a single-atom space with nothing else that fits: no edit possible
            proposal, kind = got
            population.append(evaluate(proposal, parent, origin=kind, cycle=cycle + 1))
            population.popleft()  # aging: the oldest goes, whatever its accuracy
        return best
