"""Supernet cells (DARTS, ENAS): every atom of a growth point in one module behind a zero gate,
and the way back from a supernet to a grown model in growkit's plan format."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx
from torch import nn

from ..core.branch import GrownBranch
from ..core.graph import EligibleInput, GrowthPoint
from ..core.ops import add_keep_strides, build_edge_op, decanonical, feature_norm
from ..core.surgery import apply_edit, growable, insert_at_point, remove_inserted
from ..core.plan import Atom
from .space import SearchSpace

__all__ = ["AtomCell", "insert_cells", "cells_of", "derive_from_cells", "proj_block", "set_proj_block", "SEARCH_CELLS"]

SEARCH_CELLS = "growkit_search"
"""Name of the ModuleDict holding supernet cells (DARTS / ENAS) inside a GraphModule."""


def proj_block(branch: GrownBranch, e: int) -> torch.Tensor:
    """The (c, c) block of the branch projection that maps edge ``e``."""
    w = branch.proj.weight
    c = w.shape[0]
    return (w[:, e * c:(e + 1) * c, 0, 0] if w.dim() == 4 else w[:, e * c:(e + 1) * c]).detach().clone()


@torch.no_grad()
def set_proj_block(branch: GrownBranch, e: int, block: torch.Tensor | None) -> None:
    """Set the projection block of edge ``e`` (``None``: zero)."""
    w = branch.proj.weight
    c = w.shape[0]
    view = w[:, e * c:(e + 1) * c, 0, 0] if w.dim() == 4 else w[:, e * c:(e + 1) * c]
    if block is None:
        view.zero_()
    else:
        view.copy_(block)


class AtomCell(nn.Module):
    """Every atom of one growth point in a supernet: an op and a BatchNorm (``affine=False``) per
    (input, op), and a scalar gate ``eta`` initialised to 0, so inserting the cell leaves the
    model's output exactly unchanged. Subclasses decide how atoms are combined.

    Atom ``e = i * len(ops) + j`` is op ``j`` on input ``i`` (the layout of :class:`Candidate`).
    """

    def __init__(self, point: GrowthPoint, inputs: Sequence[EligibleInput], ops: Sequence[str], registry) -> None:
        super().__init__()
        self.point = point.name
        self.layout = point.layout
        self.channels = point.channels
        self.input_names = [z.name for z in inputs]
        self.op_names = list(ops)
        self.ops = nn.ModuleList(build_edge_op(registry, op, z, point) for z in inputs for op in ops)
        self.norms = nn.ModuleList(feature_norm(point.channels, point.layout) for _ in self.ops)
        self.eta = nn.Parameter(torch.zeros(()))

    def atom_index(self, atom: Atom) -> int:
        return self.input_names.index(atom.input) * len(self.op_names) + self.op_names.index(atom.op)

    def atoms(self) -> list[Atom]:
        return [Atom(self.point, z, op) for z in self.input_names for op in self.op_names]

    def term(self, e: int, zc: torch.Tensor) -> torch.Tensor:
        return self.norms[e](self.ops[e](zc))

    def gated(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # eta = 0 at insertion: x + 0 * y == x bit for bit (y is finite), with x's strides.
        return add_keep_strides(x, self.eta * decanonical(y, self.layout))

    def init_branch(self, branch: GrownBranch, atoms: Sequence[Atom]) -> None:
        """Warm-start a finalized branch over ``atoms`` from this cell (ops, norms, projection, eta)."""
        with torch.no_grad():
            for e, a in enumerate(atoms):
                k = self.atom_index(a)
                branch.ops[e].load_state_dict(self.ops[k].state_dict())
                branch.norms[e].load_state_dict(self.norms[k].state_dict())
                set_proj_block(branch, e, self.block(k))
            branch.eta.copy_(self.eta)

    def block(self, e: int) -> torch.Tensor:
        """The (c, c) map the cell applies to atom ``e``'s normalised output."""
        raise NotImplementedError


def insert_cells(model: torch.fx.GraphModule, space: SearchSpace,
                 make: Callable[[GrowthPoint, list[EligibleInput], Sequence[str]], AtomCell]) -> torch.fx.GraphModule:
    """A copy of ``model`` with one cell per point of ``space`` (stored in ``SEARCH_CELLS``)."""
    gm = growable(model)
    for p in space.points:
        eligible = {z.name: z for z in p.inputs}
        cell = make(p, [eligible[n] for n in space.inputs[p.name]], space.ops[p.name])
        insert_at_point(gm, p.name, cell.input_names, cell, SEARCH_CELLS, p.name)
    gm.graph.lint()
    gm.recompile()
    return gm


def cells_of(model: torch.fx.GraphModule) -> dict[str, AtomCell]:
    return dict(getattr(model, SEARCH_CELLS).items())


def derive_from_cells(supernet: torch.fx.GraphModule, space: SearchSpace, proposal: Iterable[Atom],
                      first_key: int) -> torch.fx.GraphModule:
    """The supernet (not modified) with its cells replaced by grown branches over ``proposal``
    (warm-started from the cells; unselected atoms are dropped), in growkit's plan format."""
    gm = growable(supernet)
    cells = cells_of(gm)
    remove_inserted(gm, SEARCH_CELLS)
    for e in space.edits(proposal, first_key):
        branch = apply_edit(gm, e, space.registry)
        cells[e.point].init_branch(branch, e.atoms())
    gm.graph.lint()
    gm.recompile()
    return gm
