"""Growth plans: the serialisable record of what was grown (data only).

A plan is a list of edits against fx node names of the *base* model. Each edit adds one grown
branch ``x_k <- x_k + eta * proj(concat(BN(op_e(z_e)) for e in edges))`` at point ``x_k``. Width and
depth growth (:mod:`growkit.core.widen`, :mod:`growkit.core.deepen`) are :class:`Resize` records
beside the edits, each placed by ``after`` (how many edits came before it), so a replay applies
edits and resizes in the order they were grown. The plan is data only (JSON): replaying it
(:func:`growkit.core.surgery.apply_plan`) never executes anything from the file.
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
from ..validate import (MAX_EDGES, MAX_EDITS, check_edit_key, check_module_path, check_plan_inputs, check_plan_name,
                        check_plan_size)
from .dualgraph import all_nodes

__all__ = ["Edge", "Atom", "ScoredEdge", "Edit", "Resize", "GrowthPlan", "graph_fingerprint", "BRANCHES",
           "RESIZE_KINDS", "WIDEN_INITS", "DEEPEN_BLOCKS", "MAX_WIDEN_CHANNELS"]

FORMAT = "growkit.plan"
VERSION = 1
RESIZE_VERSION = 2
"""Plans with width / depth growth are written as version 2, so a growkit that cannot replay them
refuses them instead of silently building the narrower model; plans without stay version 1."""
RESIZE_KINDS = ("widen", "deepen")
WIDEN_INITS = ("split", "zero")
DEEPEN_BLOCKS = ("copy", "identity")
MAX_WIDEN_CHANNELS = 1 << 20
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


@dataclass(frozen=True)
class Resize:
    """Width or depth growth recorded as data (see :mod:`growkit.core.widen` / :mod:`growkit.core.deepen`).

    ``kind="widen"``: ``layers`` pairs a module path (a layer whose output channels root a coupled
    channel group in the model as it was before this resize) with the number of channels added to
    that group; ``init`` is how new units were initialised (weights come from the state dict on
    load). ``kind="deepen"``: a new block at base growth point ``point`` (``block`` ``"copy"`` or
    ``"identity"``), stored under ``key``. ``after``: the number of plan edits applied before it.
    """

    kind: str
    key: str
    after: int
    layers: tuple[tuple[str, int], ...] = ()
    init: str = ""
    point: str = ""
    block: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "key": self.key, "after": self.after}
        if self.kind == "widen":
            out.update(layers=[[m, k] for m, k in self.layers], init=self.init)
        else:
            out.update(point=self.point, block=self.block)
        return out

    @classmethod
    def from_dict(cls, d: Any, n_edits: int) -> "Resize":
        """Validate one resize record (``n_edits``: the plan's number of edits)."""
        if not isinstance(d, dict) or d.get("kind") not in RESIZE_KINDS:
            raise PlanError(f"plan resize must be an object with kind one of {RESIZE_KINDS}: {str(d)[:200]}")
        key = check_edit_key(d.get("key"))
        after = d.get("after")
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= n_edits:
            raise PlanError(f"plan resize {key!r}: 'after' must be an int in [0, {n_edits}] (edits before it), "
                            f"got {after!r}")
        if d["kind"] == "widen":
            raw = d.get("layers")
            if not isinstance(raw, list) or not 0 < len(raw) <= MAX_EDITS:
                raise PlanError(f"plan resize {key!r}: 'layers' must be a non-empty list of [module path, channels]")
            layers = []
            for x in raw:
                if not (isinstance(x, list) and len(x) == 2 and isinstance(x[1], int) and not isinstance(x[1], bool)
                        and 0 < x[1] <= MAX_WIDEN_CHANNELS):
                    raise PlanError(f"plan resize {key!r}: layer entry {str(x)[:100]} is not [module path, channels "
                                    f"in 1..{MAX_WIDEN_CHANNELS}]")
                layers.append((check_module_path(x[0], "widened layer"), int(x[1])))
            init = d.get("init")
            if init not in WIDEN_INITS:
                raise PlanError(f"plan resize {key!r}: init must be one of {WIDEN_INITS}, got {init!r}")
            return cls("widen", key, after, tuple(layers), init=init)
        block = d.get("block")
        if block not in DEEPEN_BLOCKS:
            raise PlanError(f"plan resize {key!r}: block must be one of {DEEPEN_BLOCKS}, got {block!r}")
        return cls("deepen", key, after, point=check_plan_name(d.get("point"), "point"), block=block)


@dataclass
class GrowthPlan:
    """Serialisable growth record (see module docstring)."""

    base: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[list[int]] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    edits: list[Edit] = field(default_factory=list)
    resizes: list[Resize] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.edits)

    def tied_keys(self, key: str) -> list[str]:
        """Keys of the edits grown together with edit ``key`` (itself included, plan order)."""
        tie = next((e.tie for e in self.edits if e.key == key), "")
        return [e.key for e in self.edits if e.key == key or (tie and e.tie == tie)]

    def copy(self) -> "GrowthPlan":
        """An independent copy (a module's plan keeps changing as it grows; a record must not)."""
        return copy.deepcopy(self)

    @property
    def grown(self) -> bool:
        """Whether anything was grown (branch edits or resizes)."""
        return bool(self.edits or self.resizes)

    def steps(self) -> list[Edit | Resize]:
        """Edits and resizes in the order they were grown (the order a replay applies them)."""
        out: list[Edit | Resize] = []
        pending = sorted(range(len(self.resizes)), key=lambda i: (self.resizes[i].after, i))
        j = 0
        for i in range(len(self.edits) + 1):
            while j < len(pending) and self.resizes[pending[j]].after == i:
                out.append(self.resizes[pending[j]])
                j += 1
            if i < len(self.edits):
                out.append(self.edits[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "version": RESIZE_VERSION if self.resizes else VERSION,
            "base": self.base,
            "input_shapes": self.input_shapes,
            "input_dtypes": self.input_dtypes,
            "fingerprint": self.fingerprint,
            "edits": [e.to_dict() for e in self.edits],
        }
        if self.resizes:
            out["resizes"] = [r.to_dict() for r in self.resizes]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any) -> "GrowthPlan":
        """Validate and build a plan from parsed JSON; raises :class:`PlanError` on any defect."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"not a growkit plan (expected format {FORMAT!r})")
        if d.get("version") not in (VERSION, RESIZE_VERSION):
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this growkit reads "
                            f"{VERSION} and {RESIZE_VERSION})")

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
        raw_resizes = d.get("resizes", [])
        if not isinstance(raw_resizes, list) or len(raw_resizes) > MAX_EDITS:
            raise PlanError(f"plan resizes must be a list of at most {MAX_EDITS} records")
        if raw_resizes and d.get("version") != RESIZE_VERSION:
            raise PlanError(f"plan has resizes but version {d.get('version')!r}; resizes need version {RESIZE_VERSION}")
        resizes = [Resize.from_dict(r, len(edits)) for r in raw_resizes]
        for r in resizes:
            if r.key in keys:
                raise PlanError(f"plan key {r.key!r} occurs twice; every edit and resize needs its own key")
            keys.add(r.key)
        return cls(base, shapes, dtypes, fp, edits, resizes)

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
