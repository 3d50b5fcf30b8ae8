"""Growth plans: the serialisable record of what was grown (data only).

A plan is a list of edits against fx node names of the *base* model. Each edit adds one grown
branch ``x_k <- x_k + eta * proj(concat(BN(op_e(z_e)) for e in edges))`` at point ``x_k``. The plan
is data only (JSON): replaying it (:func:`growkit.core.surgery.apply_plan`) never executes anything
from the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ..errors import PlanError

__all__ = ["Edge", "Edit", "GrowthPlan", "graph_fingerprint", "BRANCHES"]

FORMAT = "growkit.plan"
VERSION = 1
BRANCHES = "growkit_branches"
"""Name of the ModuleDict holding grown branches inside a grown GraphModule."""


@dataclass(frozen=True)
class Edge:
    """One shortcut of a grown branch: ``op`` applied to base node ``input``."""

    input: str
    op: str


@dataclass(frozen=True)
class Edit:
    """A grown branch at base point ``point``, merging ``edges`` by concat + 1x1 projection."""

    point: str
    edges: tuple[Edge, ...]
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "key": self.key, "edges": [asdict(e) for e in self.edges]}


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

        def ident(v: Any, what: str) -> str:
            if not isinstance(v, str) or not v.replace("_", "a").isalnum():
                raise PlanError(f"plan {what} {v!r} is not a node/op identifier")
            return v

        edits = []
        for i, e in enumerate(d.get("edits", [])):
            if not isinstance(e, dict) or not isinstance(e.get("edges"), list) or not e["edges"]:
                raise PlanError(f"plan edit {i} is malformed: {e!r}")
            edges = tuple(
                Edge(ident(x.get("input") if isinstance(x, dict) else None, "input"),
                     ident(x.get("op") if isinstance(x, dict) else None, "op"))
                for x in e["edges"]
            )
            edits.append(Edit(ident(e.get("point"), "point"), edges, ident(e.get("key"), "key")))
        shapes = d.get("input_shapes", [])
        if not (isinstance(shapes, list) and all(isinstance(s, list) and all(isinstance(v, int) and v > 0 for v in s) for s in shapes)):
            raise PlanError(f"plan input_shapes {shapes!r} must be lists of positive ints")
        dtypes = d.get("input_dtypes", [])
        for dt in dtypes:
            if not isinstance(dt, str) or not isinstance(getattr(torch, dt, None), torch.dtype):
                raise PlanError(f"plan input dtype {dt!r} is not a torch dtype")
        base = d.get("base", {})
        if not isinstance(base, dict):
            raise PlanError("plan 'base' must be an object")
        return cls(base, shapes, list(dtypes), str(d.get("fingerprint", "")), edits)

    @classmethod
    def from_json(cls, text: str) -> "GrowthPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "GrowthPlan":
        return cls.from_json(Path(path).read_text())

    def example_input(self) -> tuple[torch.Tensor, ...]:
        """Zero tensors of the recorded input shapes (enough to re-trace the base model)."""
        if not self.input_shapes:
            raise PlanError("plan records no input shape; pass example_input explicitly")
        dts = self.input_dtypes or ["float32"] * len(self.input_shapes)
        return tuple(torch.zeros(s, dtype=getattr(torch, dt)) for s, dt in zip(self.input_shapes, dts))


def graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """Hash of the base graph's node names, ops and targets: detects a plan replayed on another model."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(("growkit_", BRANCHES)):
            continue
        h.update(f"{n.name}|{n.op}|{n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)}\n".encode())
    return h.hexdigest()[:16]
