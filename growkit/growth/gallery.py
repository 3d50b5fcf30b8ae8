"""The gallery of models met while growing: cost vs error, lower convex hull, parent sampling.

Every evaluated model is one :class:`Entry`. The lower convex hull of (cost, error) holds the
models worth serving at some budget; parents for the next round are drawn from the epsilon-hull
(entries within ``eps`` error of the hull) with probability ~ 1 / (1 + times chosen), as in
Petridish's parallel search.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.cost import Budget, Cost
from ..core.plan import GrowthPlan
from ..errors import BudgetError, PlanError

__all__ = ["Entry", "Gallery", "lower_convex_hull", "describe_plan"]

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """One evaluated model: its cost, validation metrics and growth plan.

    ``pruning`` is the record a pruning pass leaves (Torch-Pruning's method and history), which
    replays a pruned entry; ``None`` for grown and base entries.
    """

    id: int
    parent: int | None
    cost: Cost
    val_error: float
    val_loss: float | None
    plan: GrowthPlan
    round: int
    kind: str = "grown"  # "base", "grown", "pruned", ...
    times_chosen: int = 0
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    note: str = ""
    pruning: dict[str, Any] | None = None

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
            "num_edits": len(self.plan.edits),
            "plan": self.plan.to_dict(),
            "pruning": self.pruning,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> "Entry":
        """Inverse of :meth:`to_dict` (weights are stored separately); the plan is validated."""
        # Before the field existed, pruning rode inside the plan dict.
        pruning = d.get("pruning", d["plan"].get("pruning") if isinstance(d.get("plan"), dict) else None)
        if pruning is not None and not isinstance(pruning, dict):
            raise PlanError(f"gallery entry {d.get('id')!r}: 'pruning' must be an object")
        return cls(
            int(d["id"]), d["parent"], Cost(int(d["params"]), int(d["flops"]), d.get("latency_ms")),
            float(d["val_error"]), d.get("val_loss"), GrowthPlan.from_dict(d["plan"]), int(d["round"]),
            d.get("kind", "grown"), int(d.get("times_chosen", 0)), state, d.get("note", ""), pruning,
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


def describe_plan(plan: GrowthPlan, limit: int = 3) -> str:
    """What a plan grew, short: ``layer2_1 +3, layer3_0 +2`` (point, edges merged there)."""
    edits = plan.edits
    if not edits:
        return "-"
    parts = [f"{e.point} +{len(e.edges)}" for e in edits[:limit]]
    if len(edits) > limit:
        parts.append(f"... ({len(edits)} branches)")
    return ", ".join(parts)


class Gallery:
    """Entries plus the hull / sampling / selection logic (see module docstring).

    ``val_size`` is the number of validation examples behind every ``val_error`` (set by the
    run that evaluates the entries); the report and plot use it for the binomial standard error.
    """

    def __init__(self, cost_axis: str = "params", eps: float = 0.025, val_size: int | None = None) -> None:
        if cost_axis not in ("params", "flops", "latency_ms"):
            raise BudgetError(f"cost_axis must be params, flops or latency_ms, got {cost_axis!r}")
        self.cost_axis = cost_axis
        self.eps = eps
        self.val_size = val_size
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        if not self.entries:
            return f"Gallery(0 entries, cost_axis={self.cost_axis!r})"
        base = self.base_entry()
        best = self.best()
        n = f", {self.val_size} val examples" if self.val_size else ""
        return (f"Gallery({len(self.entries)} entries{n}, hull {[e.id for e in self.hull()]}; "
                f"base #{base.id} val acc {100 * (1 - base.val_error):.2f} %, "
                f"best #{best.id} val acc {100 * (1 - best.val_error):.2f} % at "
                f"{self._rel(best, base)} {self.cost_axis})")

    def base_entry(self) -> Entry:
        """The un-grown model the run started from (the first entry if none is marked ``base``)."""
        return next((e for e in self.entries if e.kind == "base"), self.entries[0])

    def std_error(self, e: Entry) -> float | None:
        """Binomial standard error of ``e.val_error`` (None when the validation size is unknown)."""
        if not self.val_size:
            return None
        return math.sqrt(max(e.val_error * (1 - e.val_error), 0.0) / self.val_size)

    def _rel(self, e: Entry, base: Entry) -> str:
        b = self._x(base)
        return f"{100 * (self._x(e) / b - 1):+.1f} %" if b else "-"

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
            "val_size": self.val_size,
            "hull": [e.id for e in self.hull()],
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gallery":
        """Inverse of :meth:`to_dict` (entries without weights)."""
        vs = d.get("val_size")
        gal = cls(cost_axis=d.get("cost_axis", "params"), eps=float(d.get("eps", 0.025)),
                  val_size=int(vs) if isinstance(vs, int) and vs > 0 else None)
        for e in d.get("entries", []):
            gal.add(Entry.from_dict(e))
        return gal

    def report(self) -> str:
        """Markdown table of all entries: accuracy in %, cost relative to the base, hull marked."""
        if not self.entries:
            return "(empty gallery)"
        hull = {e.id for e in self.hull()}
        base = self.base_entry()
        se = self.std_error(base)
        head = (f"validation set: {self.val_size} examples (1 example = {100 / self.val_size:.2f} percentage points; "
                f"binomial s.e. of the base {100 * se:.2f} points)\n\n" if self.val_size and se is not None else "")
        lines = [
            "| id | kind | parent | round | params | params vs base | MFLOPs | FLOPs vs base | latency ms "
            "| val acc % | grown | hull |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in self.entries:
            lat = f"{e.cost.latency_ms:.2f}" if e.cost.latency_ms is not None else "-"
            dp = f"{100 * (e.cost.params / base.cost.params - 1):+.1f} %" if base.cost.params else "-"
            df = f"{100 * (e.cost.flops / base.cost.flops - 1):+.1f} %" if base.cost.flops else "-"
            lines.append(
                f"| {e.id} | {e.kind} | {'-' if e.parent is None else e.parent} | {e.round} | "
                f"{e.cost.params:,} | {dp} | {e.cost.flops / 1e6:.2f} | {df} | {lat} | {100 * (1 - e.val_error):.2f} | "
                f"{describe_plan(e.plan)} | {'*' if e.id in hull else ''} |"
            )
        return head + "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Cost vs validation error with binomial error bars and the lower convex hull, saved as PNG."""
        import matplotlib.pyplot as plt

        fig = self.figure(title)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def figure(self, title: str | None = None) -> Any:
        """The matplotlib figure :meth:`plot` saves (the caller closes it)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, (ax, side) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
        markers = {"base": "s", "grown": "o", "pruned": "v"}
        ses = [self.std_error(e) for e in self.entries]
        for k in sorted({e.kind for e in self.entries}):
            es = [(e, se) for e, se in zip(self.entries, ses) if e.kind == k]
            ax.errorbar([self._x(e) for e, _ in es], [100 * e.val_error for e, _ in es],
                        yerr=[100 * se for _, se in es] if self.val_size else None, fmt=markers.get(k, "o"),
                        capsize=3, label=k, alpha=0.85)
        hull = self.hull()
        if len(hull) >= 2:  # a one-point hull is just the best entry: nothing to draw
            ax.plot([self._x(e) for e in hull], [100 * e.val_error for e in hull], "k--", lw=1,
                    label="lower convex hull")
        for i, e in enumerate(self.entries):
            # Ids only on the points (staggered so neighbours do not overprint); what was grown is
            # listed beside the plot, where long point names have room.
            ax.annotate(f"#{e.id}", (self._x(e), 100 * e.val_error), fontsize=7,
                        xytext=(4, 4 + 8 * (i % 3)), textcoords="offset points")
        ys = [100 * e.val_error for e in self.entries]
        if self.val_size and ys:
            # Keep the axis at least +-3 s.e. around the data, so that a 1- or 2-example difference
            # does not fill the plot and look like a large effect.
            pad = 3 * 100 * max(se or 0.0 for se in ses) or 1.0
            lo, hi = min(ys) - pad, max(ys) + pad
            ax.set_ylim(max(lo, 0.0), min(hi, 100.0))
        xs = [self._x(e) for e in self.entries]
        span = (max(xs) - min(xs)) or max(xs) * 0.1 or 1.0
        ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.12 * span)
        base = self.base_entry()
        shown = 14
        rows = []
        for e in self.entries[:shown]:
            what = "base" if e.kind == "base" else f"{e.kind}: {describe_plan(e.plan, limit=2)}"
            rows.append(f"#{e.id}  {100 * (1 - e.val_error):.2f} %  {self._rel(e, base)}  {what}")
        if len(self.entries) > shown:
            rows.append(f"... {len(self.entries) - shown} more: see Gallery.report()")
        side.axis("off")
        side.text(0.0, 1.0, f"id  val acc  {self.cost_axis} vs base  grown\n" + "\n".join(rows), va="top",
                  ha="left", family="monospace", fontsize=7, transform=side.transAxes, wrap=True)
        ax.set_xlabel({"params": "parameters", "flops": "FLOPs", "latency_ms": "latency (ms)"}[self.cost_axis])
        ylabel = "validation error (%)"
        if self.val_size:
            ylabel += f"\n{self.val_size} examples; bars: ±1 binomial s.e."
        ax.set_ylabel(ylabel)
        ax.set_title(title or "growkit gallery")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
