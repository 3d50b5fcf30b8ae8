"""Random search: the baseline every pass must beat, on the same space, budget and training.

Each round draws ``samples`` random proposals (atoms added in random order while they fit the budget,
``max_ops`` and ``points_per_round``, up to ``size`` atoms: the same proposal sizes the other passes
may reach), grows each from the parent (fresh branches, ``eta = 0``: exact), trains each for an
equal share of the search's training batches, evaluates it on the validation data and keeps the
best.
"""
from __future__ import annotations

from ..growth.methods import register_method
from .common import Child, SearchContext, SearchMethod, check_int

__all__ = ["RandomSearch"]


@register_method
class RandomSearch(SearchMethod):
    """Random proposals with the same training budget (see the module docstring).

    Options: ``samples`` (proposals per round), ``child_steps`` (training batches per proposal; default:
    the search budget split evenly), plus the common ``size`` / ``steps`` / ``eval_batches``.
    """

    name = "random"
    defaults = {"samples": 4, "child_steps": None}

    def validate(self) -> None:
        check_int("samples", self.opts["samples"])
        check_int("child_steps", self.opts["child_steps"], allow_none=True, minimum=0)

    def search(self, ctx: SearchContext) -> Child | None:
        n = self.opts["samples"]
        steps = self.opts["child_steps"] if self.opts["child_steps"] is not None else ctx.child_steps(n)
        best: Child | None = None
        for _ in range(n):
            proposal = ctx.space.random_proposal(ctx.rng, ctx.size)
            if not proposal:
                break  # nothing fits the budget
            model = ctx.build(proposal)
            ctx.train(model, steps)
            acc = ctx.evaluate(model)
            ctx.record(proposal, acc)
            if best is None or acc > best.val_accuracy:  # type: ignore[operator]
                best = ctx.child(proposal, model, acc)
        return best
