"""PNAS (Liu et al. 2018) over growkit's candidate space: progressive expansion with a surrogate.

Level ``l`` proposals add ``l`` atoms to the parent. Level 1: ``k`` single atoms (PNAS trains every
one-block cell; growkit's space is points x inputs x ops, too many to train at the same budget, so
``k`` are drawn at random). Each later level expands each of the ``k`` best proposals of the previous
level by every feasible single atom, ranks all expansions with an ensemble of MLPs over the fixed
length 0/1 encoding of the proposal (:meth:`SearchSpace.encode`), and trains only the top ``k``:
briefly, warm-started from the proposal they expand (the new atom enters with a zero projection block,
or as a fresh branch with ``eta = 0``: function-preserving), then evaluates them on the validation
data. The surrogate is refit on every evaluated proposal after each level. The best proposal evaluated
at any level is kept. The history records, per level, the rank correlation between the
surrogate's predictions and the measured accuracies.

Cell mode (``tie=``): the space's atoms are those of each tie group's first member, so a level
adds one atom to a cell; the space grows it at every member of the group (each copy its own
weights) and counts every copy against the budget.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..growth.methods import register_method
from .common import Child, SearchContext, SearchMethod, check_number, check_int
from .space import proposal_to_list, Proposal

__all__ = ["Pnas", "MLPEnsemble", "spearman"]

logger = logging.getLogger(__name__)


class MLPEnsemble:
    """``n_models`` two-hidden-layer MLPs regressing accuracy on a proposal encoding.

    With at least ``n_models`` points each member trains on all data but one fold (PNAS's
    ensemble); with fewer, on all of it. Targets are standardised; prediction is the members' mean.
    """

    def __init__(self, n_in: int, n_models: int = 5, hidden: int = 64, epochs: int = 300, lr: float = 1e-2,
                 generator: torch.Generator | None = None) -> None:
        self.n_in, self.n_models, self.hidden, self.epochs, self.lr = n_in, n_models, hidden, epochs, lr
        self.gen = generator
        self.members: list[nn.Module] = []
        self.mu, self.sd = 0.0, 1.0

    def _mlp(self) -> nn.Module:
        net = nn.Sequential(nn.Linear(self.n_in, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden),
                            nn.ReLU(), nn.Linear(self.hidden, 1))
        with torch.no_grad():  # init from the ensemble's generator: reproducible, leaves torch's RNG alone
            for m in net:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features ** 0.5
                    m.weight.uniform_(-bound, bound, generator=self.gen)
                    m.bias.uniform_(-bound, bound, generator=self.gen)
        return net

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> "MLPEnsemble":
        n = x.shape[0]
        self.mu = float(y.mean())
        self.sd = float(y.std()) if n > 1 and float(y.std()) > 1e-8 else 1.0
        t = (y - self.mu) / self.sd
        perm = torch.randperm(n, generator=self.gen)
        folds = torch.tensor_split(perm, self.n_models) if n >= self.n_models else [torch.empty(0, dtype=torch.long)] * self.n_models
        self.members = []
        for m in range(self.n_models):
            keep = torch.ones(n, dtype=torch.bool)
            keep[folds[m]] = False
            net = self._mlp()
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=1e-4)
            xs, ts = x[keep], t[keep]
            for _ in range(self.epochs):
                opt.zero_grad()
                loss = ((net(xs).squeeze(-1) - ts) ** 2).mean()
                loss.backward()
                opt.step()
            self.members.append(net.eval())
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and spread (std over members) of the predicted accuracy."""
        preds = torch.stack([m(x).squeeze(-1) for m in self.members]) * self.sd + self.mu
        return preds.mean(0), preds.std(0) if len(self.members) > 1 else torch.zeros(x.shape[0])


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (ties averaged); ``None`` when undefined."""
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return None if va == 0 or vb == 0 else cov / (va * vb)


@register_method
class Pnas(SearchMethod):
    """Progressive search with an MLP-ensemble surrogate (see the module docstring).

    Options: ``k`` (proposals trained per level, and the beam), ``levels`` (most atoms added),
    ``child_steps`` (training batches per trained proposal; default: the search budget split over
    ``k * levels`` proposals), ``ensemble`` / ``hidden`` / ``surrogate_epochs`` / ``surrogate_lr``
    (the surrogate), plus the common ``size`` / ``steps`` / ``eval_batches``.
    """

    name = "pnas"
    defaults = {"k": 4, "levels": 3, "child_steps": None, "ensemble": 5, "hidden": 64, "surrogate_epochs": 300,
                "surrogate_lr": 1e-2}

    def validate(self) -> None:
        o = self.opts
        for k in ("k", "levels", "ensemble", "hidden", "surrogate_epochs"):
            check_int(k, o[k])
        check_int("child_steps", o["child_steps"], allow_none=True, minimum=0)
        check_number("surrogate_lr", o["surrogate_lr"])

    def search(self, ctx: SearchContext) -> Child | None:
        o = self.opts
        space = ctx.space
        k = o["k"]
        levels = o["levels"] if ctx.size is None else min(o["levels"], ctx.size)
        steps = o["child_steps"] if o["child_steps"] is not None else ctx.child_steps(k * levels)
        gen = ctx.generator()
        xs: list[list[float]] = []
        ys: list[float] = []
        surrogate: MLPEnsemble | None = None
        best: Child | None = None
        beam: list[Child] = []
        seen: set[Proposal] = set()
        report: list[dict[str, Any]] = []
        for level in range(1, levels + 1):
            # All feasible one-atom expansions of the beam (level 1: of the parent), deduplicated.
            cands: dict[Proposal, Child | None] = {}
            for donor in (beam if level > 1 else [None]):
                base = donor.proposal if donor is not None else frozenset()
                for proposal in space.expansions(base):
                    if proposal not in seen and proposal not in cands:
                        cands[proposal] = donor
            if not cands:
                break
            proposals = list(cands)
            if surrogate is None:
                picked = ctx.rng.sample(proposals, min(k, len(proposals)))
                predicted: list[float] | None = None
            else:
                mean, _ = surrogate.predict(torch.tensor([space.encode(p) for p in proposals]))
                order = sorted(range(len(proposals)), key=lambda i: (-float(mean[i]), i))[:k]
                picked = [proposals[i] for i in order]
                predicted = [float(mean[i]) for i in order]
            trained: list[Child] = []
            for proposal in picked:
                model = ctx.build(proposal, cands[proposal])
                ctx.train(model, steps)
                acc = ctx.evaluate(model)
                ctx.record(proposal, acc, level=level)
                child = ctx.child(proposal, model, acc)
                trained.append(child)
                seen.add(proposal)
                xs.append(space.encode(proposal))
                ys.append(acc)
                if best is None or acc > best.val_accuracy:  # type: ignore[operator]
                    best = child
            corr = spearman(predicted, [c.val_accuracy for c in trained]) if predicted else None  # type: ignore[misc]
            report.append({"level": level, "expansions": len(proposals), "trained": len(trained),
                           "best_val_accuracy": max(c.val_accuracy for c in trained),  # type: ignore[type-var]
                           "surrogate_rank_corr": corr, "predicted": predicted})
            # Refit the surrogate on everything evaluated so far; the beam is this level's best k.
            surrogate = MLPEnsemble(len(space), o["ensemble"], o["hidden"], o["surrogate_epochs"], o["surrogate_lr"],
                                    gen).fit(torch.tensor(xs), torch.tensor(ys))
            beam = sorted(trained, key=lambda c: -c.val_accuracy)[:k]  # type: ignore[operator]
            logger.info("pnas level %d: %d expansions, trained %s", level, len(proposals),
                        [(proposal_to_list(c.proposal), round(c.val_accuracy or 0, 4)) for c in trained])
        if best is None:
            return None
        best.info["levels"] = report
        return best
