"""Growth plans: the serialisable record of what was grown (data only).

A plan is a list of edits against fx node names of the *base* model. Each edit adds one grown
branch ``x_k <- x_k + eta * proj(concat(BN(op_e(z_e)) for e in edges))`` at point ``x_k``. The plan
is data only (JSON): replaying it (:func:`growkit.core.surgery.apply_plan`) never executes anything
from the file.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx

from ..errors import PlanError
from ..validate import MAX_EDGES, MAX_EDITS, check_edit_key, check_plan_inputs, check_plan_name, check_plan_size
from .dualgraph import all_nodes

__all__ = ["Edge", "Atom", "ScoredEdge", "Edit", "GrowthPlan", "graph_fingerprint", "BRANCHES"]

FORMAT = "growkit.plan"
VERSION = 1
BRANCHES = "growkit_branches"
"""Name of the ModuleDict holding grown branches inside a grown GraphModule."""


class Edge(NamedTuple):
    """One shortcut: ``op`` applied to base node ``input``.

    The one concept every layer speaks of, in three named shapes: an :class:`Edge` inside an
    :class:`Edit` (the point is the edit's); an :class:`Atom` (the edge with its point: what the
    search passes choose); a :class:`ScoredEdge` (the edge with its candidate weight alpha: what
    selection keeps and ``finalize(edges=)`` takes). All are named tuples, so ``(input, op)``
    unpacks and compares as before.
    """

    input: str
    op: str


class Atom(NamedTuple):
    """An edge placed at growth point ``point``: the unit a search pass adds to its parent."""

    point: str
    input: str
    op: str

    @property
    def edge(self) -> Edge:
        return Edge(self.input, self.op)


class ScoredEdge(NamedTuple):
    """An edge with its candidate weight ``alpha`` (the weak learner's coefficient)."""

    input: str
    op: str
    alpha: float

    @property
    def edge(self) -> Edge:
        return Edge(self.input, self.op)


@dataclass(frozen=True)
class Edit:
    """A grown branch at base point ``point``, merging ``edges`` by concat + 1x1 projection.

    ``tie`` (cell mode) is the key of the first edit of the tie group this edit belongs to:
    edits with the same ``tie`` grow the same relative edges at the blocks of one cell type and
    are kept or removed together. ``""``: untied (macro search; not written to JSON).
    """

    point: str
    edges: tuple[Edge, ...]
    key: str
    tie: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"point": self.point, "key": self.key,
                               "edges": [{"input": e.input, "op": e.op} for e in self.edges]}
        if self.tie:
            out["tie"] = self.tie
        return out

    def atoms(self) -> tuple[Atom, ...]:
        """This edit's edges placed at its point."""
        return tuple(Atom(self.point, e.input, e.op) for e in self.edges)


@dataclass
class GrowthPlan:
    """Serialisable growth record (see module docstring)."""

    base: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[list[int]] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    edits: list[Edit] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.edits)

    def tied_keys(self, key: str) -> list[str]:
        """Keys of the edits grown together with edit ``key`` (itself included, plan order)."""
        tie = next((e.tie for e in self.edits if e.key == key), "")
        return [e.key for e in self.edits if e.key == key or (tie and e.tie == tie)]

    def copy(self) -> "GrowthPlan":
        """An independent copy (a module's plan keeps changing as it grows; a record must not)."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "base": self.base,
            "input_shapes": self.input_shapes,
            "input_dtypes": self.input_dtypes,
            "fingerprint": self.fingerprint,
            "edits": [e.to_dict() for e in self.edits],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any) -> "GrowthPlan":
        """Validate and build a plan from parsed JSON; raises :class:`PlanError` on any defect."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"not a growkit plan (expected format {FORMAT!r})")
        if d.get("version") != VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this growkit reads {VERSION})")

        raw_edits = d.get("edits", [])
        if not isinstance(raw_edits, list) or len(raw_edits) > MAX_EDITS:
            raise PlanError(f"plan edits must be a list of at most {MAX_EDITS} edits")
        edits, keys = [], set()
        for i, e in enumerate(raw_edits):
            if not isinstance(e, dict) or not isinstance(e.get("edges"), list) or not e["edges"]:
                raise PlanError(f"plan edit {i} is malformed: {str(e)[:200]}")
            if len(e["edges"]) > MAX_EDGES:
                raise PlanError(f"plan edit {i} has {len(e['edges'])} edges (at most {MAX_EDGES})")
            edges = tuple(
                Edge(check_plan_name(x.get("input") if isinstance(x, dict) else None, "input"),
                     check_plan_name(x.get("op") if isinstance(x, dict) else None, "op"))
                for x in e["edges"]
            )
            key = check_edit_key(e.get("key"))
            if key in keys:
                raise PlanError(f"plan edit key {key!r} occurs twice; every edit needs its own key")
            keys.add(key)
            tie = check_edit_key(e["tie"]) if "tie" in e else ""
            if tie and tie not in keys:
                raise PlanError(f"plan edit {i} is tied to {tie!r}, which is not the key of this or an earlier edit")
            edits.append(Edit(check_plan_name(e.get("point"), "point"), edges, key, tie))
        shapes, dtypes = check_plan_inputs(d.get("input_shapes", []), d.get("input_dtypes", []))
        base = d.get("base", {})
        if not isinstance(base, dict):
            raise PlanError("plan 'base' must be an object")
        fp = d.get("fingerprint", "")
        if not isinstance(fp, str) or len(fp) > 128:
            raise PlanError("plan fingerprint must be a short string")
        return cls(base, shapes, dtypes, fp, edits)

    @classmethod
    def from_json(cls, text: str) -> "GrowthPlan":
        check_plan_size(len(text), "plan text")
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "GrowthPlan":
        p = Path(path)
        try:
            check_plan_size(p.stat().st_size, str(p))
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot read plan {p} ({exc})") from exc
        return cls.from_json(text)

    def example_input(self) -> tuple[torch.Tensor, ...]:
        """Zero tensors of the recorded input shapes (enough to re-trace the base model)."""
        if not self.input_shapes:
            raise PlanError("plan records no input shape; pass example_input explicitly")
        dts = self.input_dtypes or ["float32"] * len(self.input_shapes)
        return tuple(torch.zeros(s, dtype=getattr(torch, dt)) for s, dt in zip(self.input_shapes, dts))


def graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """Hash of the base graph's node names, ops and targets: detects a plan replayed on another model."""
    h = hashlib.sha256()
    for n in all_nodes(gm):
        if n.op == "call_module" and str(n.target).startswith(("growkit_", BRANCHES)):
            continue
        h.update(f"{n.name}|{n.op}|{n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)}\n".encode())
    return h.hexdigest()[:16]
