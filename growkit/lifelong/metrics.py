"""Continual-learning metrics over an accuracy matrix (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018).

``R[i][j]`` is the accuracy on experience ``j`` after training on experiences ``0..i``;
``initial[j]`` the accuracy on ``j`` before any training on the stream (for FWT).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AccuracyMatrix"]


@dataclass
class AccuracyMatrix:
    """Rows are filled as the stream advances; metrics use the rows filled so far."""

    n: int
    rows: list[list[float]] = field(default_factory=list)
    initial: list[float] | None = None
    costs: list[dict[str, Any]] = field(default_factory=list)

    def add_row(self, accs: list[float], cost: dict[str, Any] | None = None) -> None:
        if len(accs) != self.n:
            raise ValueError(f"a row needs {self.n} accuracies, got {len(accs)}")
        self.rows.append([float(a) for a in accs])
        self.costs.append(dict(cost or {}))

    @property
    def t(self) -> int:
        """Index of the last experience trained on."""
        return len(self.rows) - 1

    def average_accuracy(self) -> float:
        """Mean accuracy over the experiences seen so far, after the last one."""
        t = self.t
        return sum(self.rows[t][: t + 1]) / (t + 1)

    def forgetting(self) -> float:
        """Mean over earlier experiences of (best earlier accuracy - current accuracy)."""
        t = self.t
        if t == 0:
            return 0.0
        return sum(max(self.rows[i][j] for i in range(j, t)) - self.rows[t][j] for j in range(t)) / t

    def bwt(self) -> float:
        """Backward transfer: mean of R[t][j] - R[j][j] over earlier experiences."""
        t = self.t
        if t == 0:
            return 0.0
        return sum(self.rows[t][j] - self.rows[j][j] for j in range(t)) / t

    def fwt(self) -> float | None:
        """Forward transfer: mean of R[j-1][j] - initial[j] over later experiences."""
        t = self.t
        if self.initial is None or t == 0:
            return None
        return sum(self.rows[j - 1][j] - self.initial[j] for j in range(1, t + 1)) / t

    def summary(self) -> dict[str, Any]:
        return {"average_accuracy": self.average_accuracy(), "forgetting": self.forgetting(), "bwt": self.bwt(),
                "fwt": self.fwt()}

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "matrix": self.rows, "initial": self.initial, "costs": self.costs, **self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccuracyMatrix":
        return cls(int(d["n"]), [list(map(float, r)) for r in d["matrix"]], d.get("initial"), list(d.get("costs", [])))

    def save(self, path: str | Path) -> Path:
        from ..io import write_json_atomic

        write_json_atomic(path, self.to_dict())
        return Path(path)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Heatmap of R and the average accuracy / parameter count per experience (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        m = [r + [float("nan")] * (self.n - len(r)) for r in self.rows]
        im = a.imshow(m, vmin=0, vmax=1, cmap="viridis")
        a.set_xlabel("evaluated on experience j")
        a.set_ylabel("after training on experience i")
        for i, r in enumerate(self.rows):
            for j, v in enumerate(r):
                a.text(j, i, f"{100 * v:.0f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=a)
        avg = [sum(r[: i + 1]) / (i + 1) for i, r in enumerate(self.rows)]
        b.plot(range(len(avg)), [100 * v for v in avg], marker="o", label="average accuracy %")
        b.set_xlabel("experience")
        b.set_ylabel("average accuracy %")
        params = [c.get("params") for c in self.costs]
        if all(p is not None for p in params) and params:
            b2 = b.twinx()
            b2.plot(range(len(params)), params, color="tab:orange", marker="s", label="params")
            b2.set_ylabel("parameters")
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def __str__(self) -> str:
        return json.dumps(self.summary())
