"""The gallery of models met while growing: cost vs error, lower convex hull, parent sampling.

Every evaluated model is one :class:`Entry`. The lower convex hull of (cost, error) holds the
models worth serving at some budget; parents for the next round are drawn from the epsilon-hull
(entries within ``eps`` error of the hull) with probability ~ 1 / (1 + times chosen), as in
Petridish's parallel search.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cost import Budget, Cost

__all__ = ["Entry", "Gallery", "lower_convex_hull"]

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """One evaluated model: its cost, validation metrics and growth plan."""

    id: int
    parent: int | None
    cost: Cost
    val_error: float
    val_loss: float | None
    plan: dict[str, Any]
    round: int
    kind: str = "grown"  # "base", "grown", "pruned", ...
    times_chosen: int = 0
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "kind": self.kind,
            "round": self.round,
            "params": self.cost.params,
            "flops": self.cost.flops,
            "latency_ms": self.cost.latency_ms,
            "val_error": self.val_error,
            "val_accuracy": 1.0 - self.val_error,
            "val_loss": self.val_loss,
            "times_chosen": self.times_chosen,
            "num_edits": len(self.plan.get("edits", [])),
            "plan": self.plan,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> "Entry":
        """Inverse of :meth:`to_dict` (weights are stored separately)."""
        return cls(
            int(d["id"]), d["parent"], Cost(int(d["params"]), int(d["flops"]), d.get("latency_ms")),
            float(d["val_error"]), d.get("val_loss"), d["plan"], int(d["round"]), d.get("kind", "grown"),
            int(d.get("times_chosen", 0)), state, d.get("note", ""),
        )


def lower_convex_hull(points: list[tuple[float, float, int]]) -> list[int]:
    """Ids on the lower convex hull of (cost, error, id), left to right (Andrew's monotone chain).

    Only the part that descends in error as cost grows is kept: a costlier model that is not
    more accurate is never worth serving.
    """
    pts = sorted(points)
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    out: list[tuple[float, float, int]] = []
    for p in hull:
        if out and p[1] >= out[-1][1]:
            continue
        if out and p[0] == out[-1][0]:
            out[-1] = p if p[1] < out[-1][1] else out[-1]
            continue
        out.append(p)
    return [p[2] for p in out]


class Gallery:
    """Entries plus the hull / sampling / selection logic (see module docstring)."""

    def __init__(self, cost_axis: str = "params", eps: float = 0.025) -> None:
        if cost_axis not in ("params", "flops", "latency_ms"):
            raise ValueError(f"cost_axis must be params, flops or latency_ms, got {cost_axis!r}")
        self.cost_axis = cost_axis
        self.eps = eps
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i: int) -> Entry:
        return self.entries[i]

    def add(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        return entry

    def next_id(self) -> int:
        return len(self.entries)

    def _x(self, e: Entry) -> float:
        v = getattr(e.cost, self.cost_axis)
        return float(v if v is not None else e.cost.params)

    def hull(self) -> list[Entry]:
        """Entries on the lower convex hull of (cost, error), by increasing cost."""
        ids = lower_convex_hull([(self._x(e), e.val_error, e.id) for e in self.entries])
        by_id = {e.id: e for e in self.entries}
        return [by_id[i] for i in ids]

    def _hull_error_at(self, x: float, hull: list[Entry]) -> float:
        pts = [(self._x(e), e.val_error) for e in hull]
        if x <= pts[0][0]:
            return pts[0][1]
        for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
            if x1 <= x <= x2:
                return y1 + (y2 - y1) * (x - x1) / (x2 - x1) if x2 > x1 else min(y1, y2)
        return pts[-1][1]

    def eps_hull(self) -> list[Entry]:
        """Entries within ``eps`` error of the hull at their cost."""
        hull = self.hull()
        if not hull:
            return []
        return [e for e in self.entries if e.val_error <= self._hull_error_at(self._x(e), hull) + self.eps]

    def sample_parent(self, rng: random.Random, budget: Budget | None = None, base: Cost | None = None) -> Entry:
        """Draw a parent from the eps-hull with probability ~ 1/(1 + times chosen)."""
        pool = self.eps_hull()
        if budget is not None and base is not None:
            within = [e for e in pool if budget.allows(e.cost, base)]
            pool = within or pool
        weights = [1.0 / (1 + e.times_chosen) for e in pool]
        parent = rng.choices(pool, weights=weights, k=1)[0]
        parent.times_chosen += 1
        return parent

    def best(self, budget: Budget | None = None, base: Cost | None = None) -> Entry:
        """Lowest validation error within budget (ties: cheaper)."""
        pool = [e for e in self.entries if budget is None or base is None or budget.allows(e.cost, base)]
        if not pool:
            pool = [e for e in self.entries if e.kind == "base"] or self.entries
        return min(pool, key=lambda e: (e.val_error, self._x(e), e.id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cost_axis": self.cost_axis,
            "eps": self.eps,
            "hull": [e.id for e in self.hull()],
            "entries": [e.to_dict() for e in self.entries],
        }

    def report(self) -> str:
        """Markdown table of all entries, hull members marked."""
        hull = {e.id for e in self.hull()}
        lines = [
            "| id | kind | parent | round | params | MFLOPs | latency ms | val acc % | edits | hull |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in self.entries:
            lat = f"{e.cost.latency_ms:.2f}" if e.cost.latency_ms is not None else "-"
            lines.append(
                f"| {e.id} | {e.kind} | {'-' if e.parent is None else e.parent} | {e.round} | "
                f"{e.cost.params:,} | {e.cost.flops / 1e6:.2f} | {lat} | {100 * (1 - e.val_error):.2f} | "
                f"{len(e.plan.get('edits', []))} | {'*' if e.id in hull else ''} |"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Scatter of (cost, validation error) with the lower convex hull, saved as PNG."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        kinds = sorted({e.kind for e in self.entries})
        markers = {"base": "s", "grown": "o", "pruned": "v"}
        for k in kinds:
            es = [e for e in self.entries if e.kind == k]
            ax.scatter([self._x(e) for e in es], [100 * e.val_error for e in es], marker=markers.get(k, "o"), label=k, alpha=0.8)
        hull = self.hull()
        ax.plot([self._x(e) for e in hull], [100 * e.val_error for e in hull], "k--", lw=1, label="lower convex hull")
        for e in self.entries:
            ax.annotate(str(e.id), (self._x(e), 100 * e.val_error), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel({"params": "parameters", "flops": "FLOPs", "latency_ms": "latency (ms)"}[self.cost_axis])
        ax.set_ylabel("validation error (%)")
        ax.set_title(title or "growkit gallery")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
