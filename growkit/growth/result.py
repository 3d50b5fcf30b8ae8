"""``GrowResult``: what grow() (and prune()) return."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.cost import Budget
from ..core.plan import GrowthPlan
from .baseline import FinetuneBaseline
from .gallery import Entry, Gallery

__all__ = ["GrowResult"]


@dataclass
class GrowResult:
    """What :func:`grow` returns.

    Attributes:
        model: best model within budget (an ``nn.Module``; the base itself if nothing fit).
        gallery: every evaluated model (cost, validation error, plan).
        plan: the growth plan of ``model``.
        history: one dict per round (parent, scores, chosen points, costs, metrics, timings).
        base: the gallery entry of the base model.
        finetune: with ``grow(compare_finetune=True)``: the base fine-tuned for the same
            wall-clock (its model, steps and validation metrics); else ``None``.
    """

    model: nn.Module
    gallery: Gallery
    plan: GrowthPlan
    history: list[dict[str, Any]] = field(default_factory=list)
    base: Entry | None = None
    budget: Budget | None = None
    finetune: FinetuneBaseline | None = None

    @property
    def best(self) -> Entry:
        return self.gallery.best(self.budget, self.base.cost if self.base else None)

    def plot(self, path: str | Path) -> Path:
        """Gallery and hull as a PNG."""
        return self.gallery.plot(path)

    def report(self) -> str:
        """Markdown summary: base vs best, then the whole gallery."""
        b, g = self.base, self.best
        assert b is not None
        base_label, best_label = self._report_labels()
        head = (
            f"{base_label}: val acc {100 * (1 - b.val_error):.2f} %, {b.cost.params:,} params, "
            f"{b.cost.flops / 1e6:.2f} MFLOPs\n"
            f"{best_label}: val acc {100 * (1 - g.val_error):.2f} %, {g.cost.params:,} params "
            f"({100 * (g.cost.params / b.cost.params - 1):+.1f} %), {g.cost.flops / 1e6:.2f} MFLOPs"
            f"{self._report_detail(g)} (entry {g.id})\n"
            f"{self._finetune_line(g)}\n"
        )
        return head + self.gallery.report()

    def _finetune_line(self, best: Entry) -> str:
        ft = self.finetune
        if ft is None:
            return ""
        d = 100 * ((1 - best.val_error) - ft.val_accuracy)
        verdict = (f"growth beat it by {d:.2f} points" if d > 0 else
                   f"growth did not beat it ({d:.2f} points): it did not pay for its compute here "
                   "(result.finetune.model is the fine-tuned base). Growth adds capacity; while fine-tuning "
                   "still gains, the model is not capacity-limited: train it further first, and grow once its "
                   "training accuracy has stopped improving" if d < 0 else "a tie")
        return (f"fine-tuned for the same time ({ft.seconds:.1f} s, {ft.steps} steps): val acc "
                f"{100 * ft.val_accuracy:.2f} %; {verdict}\n")

    def _report_labels(self) -> tuple[str, str]:
        return "base", "best"

    def _report_detail(self, best: Entry) -> str:
        kinds = [r.kind for r in best.plan.resizes]
        extra = "".join(f", {kinds.count(k)} {k}{'s' if kinds.count(k) > 1 else ''}" for k in ("widen", "deepen")
                        if k in kinds)
        return f", {len(best.plan)} grown branches{extra}"
