"""DARTS (Liu et al. 2019, first-order) over growkit's candidate space.

Every growth point gets a mixed cell: for each eligible input ``z_i`` a softmax over the ops and
a ``zero`` op, ``x_c = sum_i sum_j softmax(alpha_i)_j * BN(op_j(z_i))`` (the zero op adds nothing
but takes its share of the softmax), and the point becomes ``x_k + eta * x_c`` with a gate ``eta``
initialised to 0: inserting the cells leaves the model's output exactly unchanged, and the cells
then train as part of the network, as in DARTS. First-order bilevel optimisation alternates an
architecture step (``alpha``, Adam, on a validation batch) with a weight step (model and cell
weights, SGD, on a training batch).

Cell mode (``tie=``): the cells of a tie group share one ``alpha`` (the architecture of the
cell), so its gradient pools every copy's validation signal, while each copy keeps its own ops,
norms and gate; derivation ranks the group's first member, and the space grows the chosen atoms
at every member.

Derivation keeps, per (point, input) edge, its strongest non-zero op(s) (``ops_per_edge``) and
takes edges by softmax weight, strongest first, while they fit ``max_ops``, ``points_per_round``
and the budget. Each grown point becomes a :class:`~growkit.core.branch.GrownBranch` warm-started from
its cell: the kept ops and BatchNorms, projection blocks ``w_ij * I`` (so the branch computes the
kept part of the mixture) and the cell's ``eta``. The derived model is the searched supernet with
the unselected (input, op) terms removed.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..growth.methods import register_method
from ..core.ops import canonical
from ..train import cosine_schedule
from .cells import AtomCell, cells_of, derive_from_cells, insert_cells
from .common import Child, SearchContext, SearchMethod, check_int, check_number
from ..core.plan import Atom

__all__ = ["Darts", "DartsCell"]

logger = logging.getLogger(__name__)


class DartsCell(AtomCell):
    """Mixed op over (inputs x (ops + zero)) at one point, gated by ``eta = 0`` (exact insertion)."""

    def __init__(self, point, inputs, ops, registry) -> None:
        super().__init__(point, inputs, ops, registry)
        # Last column: the zero op. Small random init, as DARTS (1e-3 * randn).
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self.input_names), len(self.op_names) + 1))

    def weights(self) -> torch.Tensor:
        """Softmax over ops and zero, per input: shape (inputs, ops + 1)."""
        return torch.softmax(self.alpha, dim=-1)

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        n = len(self.op_names)
        y = None
        for i, z in enumerate(zs):
            zc = canonical(z, self.layout)
            for j in range(n):
                t = w[i, j] * self.term(i * n + j, zc)
                y = t if y is None else y + t
        assert y is not None
        return self.gated(x, y)

    def block(self, e: int) -> torch.Tensor:
        i, j = divmod(e, len(self.op_names))
        w = float(self.weights()[i, j].detach())
        return w * torch.eye(self.channels, device=self.eta.device, dtype=self.eta.dtype)

    def edge_weights(self) -> dict[str, dict[str, float]]:
        """Input -> op (and ``zero``) -> softmax weight (JSON-able, for the history)."""
        w = self.weights().detach()
        names = self.op_names + ["zero"]
        return {z: {op: round(float(w[i, j]), 6) for j, op in enumerate(names)} for i, z in enumerate(self.input_names)}


def derive(cells: Sequence[DartsCell], ops_per_edge: int) -> list[Atom]:
    """Atoms ranked by softmax weight: per edge its ``ops_per_edge`` strongest non-zero ops."""
    scored: list[tuple[float, int, Atom]] = []
    for cell in cells:
        w = cell.weights().detach()
        n = len(cell.op_names)
        for i, z in enumerate(cell.input_names):
            order = torch.argsort(w[i, :n], descending=True, stable=True).tolist()
            for j in order[:ops_per_edge]:
                scored.append((float(w[i, j]), len(scored), Atom(cell.point, z, cell.op_names[j])))
    return [a for _, _, a in sorted(scored, key=lambda t: (-t[0], t[1]))]


@register_method
class Darts(SearchMethod):
    """First-order DARTS over the growth points (see the module docstring).

    Options: ``arch_lr`` (Adam learning rate of ``alpha``; DARTS uses 3e-4 over ~20k steps, a
    growth round runs a few hundred), ``arch_weight_decay`` (1e-3 as DARTS), ``ops_per_edge``
    (ops kept per (point, input) edge; DARTS keeps 1), plus the common ``size`` / ``steps`` /
    ``eval_batches``.
    """

    name = "darts"
    defaults = {"arch_lr": 1e-2, "arch_weight_decay": 1e-3, "ops_per_edge": 1}

    def search(self, ctx: SearchContext) -> Child | None:
        o = self.opts
        reg = ctx.space.registry
        supernet = insert_cells(ctx.parent_model, ctx.space, lambda p, ins, ops: DartsCell(p, ins, ops, reg)).to(ctx.dev)
        cells = cells_of(supernet)
        for g in ctx.space.ties:  # cell mode: one architecture per cell type
            for p in g.points[1:]:
                cells[p].alpha = cells[g.points[0]].alpha
        alphas = list({id(c.alpha): c.alpha for c in cells.values()}.values())
        cell_weights = [p for c in cells.values() for n, p in c.named_parameters() if n != "alpha"]
        opt_w = ctx.optimizer(supernet, extra_new=cell_weights, exclude=alphas)
        opt_a = torch.optim.Adam(alphas, lr=o["arch_lr"], betas=(0.5, 0.999), weight_decay=o["arch_weight_decay"])
        sched = cosine_schedule(opt_w, ctx.steps)
        supernet.train()
        for _ in range(ctx.steps):
            # Architecture step: first-order (the weights are taken as they are), validation batch.
            xv, yv = ctx.val_stream.next()
            loss_v, _ = ctx.loss(supernet, xv, yv)
            grads = torch.autograd.grad(loss_v, alphas)
            for a, g in zip(alphas, grads):
                a.grad = g
            opt_a.step()
            # Weight step: model and cell weights on a training batch, alphas fixed.
            x, y = ctx.train_stream.next()
            for a in alphas:
                a.requires_grad_(False)
            opt_w.zero_grad(set_to_none=True)
            loss, _ = ctx.loss(supernet, x, y)
            loss.backward()
            opt_w.step()
            sched.step()
            for a in alphas:
                a.requires_grad_(True)
        ctx.steps_used += ctx.steps
        ranked = derive(list(cells.values()), o["ops_per_edge"])
        proposal = ctx.space.greedy(ranked, ctx.size)
        info: dict[str, Any] = {
            "arch_weights": {p: c.edge_weights() for p, c in cells.items()},
            "cell_eta": {p: float(c.eta.detach()) for p, c in cells.items()},
        }
        if not proposal:
            return None
        model = derive_from_cells(supernet, ctx.space, proposal, ctx.first_key).to(ctx.dev)
        acc = ctx.evaluate(model)
        ctx.record(proposal, acc, kind="derived")
        return ctx.child(proposal, model, acc, **info)

    def validate(self) -> None:
        check_number("arch_lr", self.opts["arch_lr"])
        check_number("arch_weight_decay", self.opts["arch_weight_decay"], strict=False)
        check_int("ops_per_edge", self.opts["ops_per_edge"])
