"""Cell mode: which growth points share one growth pattern (tie groups).

Petridish's cell search (seed 000) grows a *cell*: every block of that cell type gets the same
change, each with its own weights. Here a cell type is a **tie group**: growth points whose blocks
have the same module class, layout and *relative* structure. A candidate input is described
relative to its point, not by node name: how many growth points back along the model's point
sequence it sits (``back``; 0 is the block's own input when that is no growth point), its relation
(``same`` / ``down`` by ``factor``) and its channel count as a ratio of the point's. Two points are
tied when these descriptions agree slot by slot, so slot ``i`` of one member means the same thing
("the previous block's output", "the output two blocks back") at every member, and one pattern of
(slot, op) edges maps onto all of them.

``tie="none"`` ties nothing (macro search). ``"stage"`` ties points of one stage with the same
absolute shape. ``"all"`` ties across stages too (the paper's normal vs reduction cells: a block
whose first input is downsampled has another relative structure than one whose input is not, so
they are different cell types). Points that fit no group of two or more stay untied.

Weak learning in cell mode shares **one alpha per relative edge** over a tie group (rather than
pooling per-copy scores after training). The L1 selection on alpha happens *during* training, so
it must see the pooled evidence: with a shared alpha its gradient is the sum of every copy's
``<dL/dx_k, x_c>`` gradient (``tests/test_tie.py`` pins this), and a relative edge survives the L1
penalty when it helps across the cell's copies, not when one block's noisy signal favours it.
Pooling scores afterwards would run L1 on each copy's thin signal first, which is the problem
cell search is meant to fix. It is also the paper's cell: one architecture (alpha) per cell type,
weights per copy. The L1 term counts the shared alpha once per copy, as its data gradient does, so
``l1`` means the same as in macro mode. The per-point fit scores (cosine with the negative
gradient) stay per copy and are pooled by their mean when selection ranks a group.

This module is the one place the grouping is derived; inject, finalize, selection, the search
space and pruning consume :func:`tie_groups` / :class:`TieGroup`.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Iterable, Mapping, Sequence

from ..errors import InputError
from .graph import EligibleInput, GrowthPoint

__all__ = ["TIES", "check_tie", "RelInput", "TieGroup", "relative_inputs", "tie_groups", "group_of", "units"]

TIES = ("none", "stage", "all")
"""Tie modes: macro search, one pattern per stage's cell type, one pattern per cell type."""

EdgePair = tuple[str, str]


def check_tie(tie: object) -> str:
    """``tie`` if it is one of :data:`TIES`; else an :class:`InputError` saying what to pass."""
    if not isinstance(tie, str) or tie not in TIES:
        raise InputError(f"tie must be one of {', '.join(repr(t) for t in TIES)} "
                         f"('none': grow each point on its own; 'stage' / 'all': one pattern per cell type), got {tie!r}")
    return tie


@dataclass(frozen=True)
class RelInput:
    """A candidate input described relative to its point (see module docstring)."""

    back: int
    relation: str
    factor: int
    channels: tuple[int, int]


@dataclass(frozen=True)
class TieGroup:
    """Points that grow one pattern. ``inputs[m][i]`` is slot ``i``'s base node at member ``m``."""

    points: tuple[str, ...]
    inputs: tuple[tuple[str, ...], ...]
    pattern: tuple[RelInput, ...]

    def slot(self, point: str, node: str) -> int:
        """Slot of input ``node`` at member ``point``."""
        return self.inputs[self.points.index(point)].index(node)

    def translate(self, point: str, edges: Sequence[EdgePair]) -> dict[str, list[EdgePair]]:
        """``(input, op)`` edges at member ``point`` -> the same relative edges at every member."""
        slots = [(self.slot(point, z), op) for z, op in edges]
        return {p: [(ins[i], op) for i, op in slots] for p, ins in zip(self.points, self.inputs)}


def relative_inputs(points: Sequence[GrowthPoint], point: GrowthPoint,
                    inputs: Sequence[EligibleInput]) -> tuple[RelInput, ...]:
    """``inputs`` of ``point`` described relative to it; ``points`` is the model's point sequence."""
    index = {p.name: i for i, p in enumerate(points)}
    k = index[point.name]
    out = []
    for z in inputs:
        g = gcd(z.channels, point.channels) or 1
        back = k - index[z.name] if z.name in index else 0
        out.append(RelInput(back, z.relation, z.factor, (z.channels // g, point.channels // g)))
    return tuple(out)


def tie_groups(points: Sequence[GrowthPoint], chosen: Sequence[GrowthPoint],
               inputs: Mapping[str, Sequence[EligibleInput]], tie: str) -> list[TieGroup]:
    """Tie groups (two or more members, topological order) among ``chosen`` with their ``inputs``.

    ``points`` is the model's whole point sequence (relative offsets count every point);
    ``inputs`` gives each chosen point's candidate inputs in candidate order.
    """
    if check_tie(tie) == "none":
        return []
    by_key: dict[tuple, list[GrowthPoint]] = {}
    for p in chosen:
        pattern = relative_inputs(points, p, inputs[p.name])
        if not pattern:
            continue
        key: tuple = (p.kind, p.layout, pattern)
        if tie == "stage":
            key = (p.stage, p.shape[1:], *key)
        by_key.setdefault(key, []).append(p)
    groups = [
        TieGroup(tuple(p.name for p in ms), tuple(tuple(z.name for z in inputs[p.name]) for p in ms), key[-1])
        for key, ms in by_key.items() if len(ms) > 1
    ]
    return sorted(groups, key=lambda g: [p.name for p in chosen].index(g.points[0]))


def group_of(groups: Iterable[TieGroup]) -> dict[str, TieGroup]:
    """Member point -> its group."""
    return {p: g for g in groups for p in g.points}


def units(names: Iterable[str], groups: Iterable[TieGroup]) -> list[tuple[str, ...]]:
    """``names`` as decision units in first-seen order: a tie group's members together, others alone."""
    of = group_of(groups)
    out: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for n in names:
        if n in seen:
            continue
        unit = of[n].points if n in of else (n,)
        seen.update(unit)
        out.append(unit)
    return out
