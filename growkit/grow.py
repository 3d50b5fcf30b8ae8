"""``growkit.grow``: the end-to-end Petridish growth loop over a trained model.

Each round: draw a parent from the gallery's epsilon-hull; inject candidates at its growth
points and keep training the whole model while the candidates learn (weak learning, amortised);
score every point by how well its weak learner fits the negative gradient per unit of added cost;
finalize the best points that fit the budget (concat + projection, eta = 0: exact); fine-tune with
a fresh schedule and a higher learning rate on the new parameters; evaluate; add to the gallery.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .candidates import CandidateModel, inject
from .cost import Budget, Cost, count_params, measure
from .errors import InputError
from .finalize import finalize
from .gallery import Entry, Gallery
from .graph import as_args
from .plan import BRANCHES, GrowthPlan, apply_plan
from .surgery import growable, state_of
from .train import BatchFn, NonFiniteLoss, evaluate, first_input, train_steps

__all__ = ["grow", "GrowResult", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("petridish",)


@dataclass
class GrowResult:
    """What :func:`grow` returns.

    Attributes:
        model: best model within budget (an ``nn.Module``; the base itself if nothing fit).
        gallery: every evaluated model (cost, validation error, plan).
        plan: the growth plan of ``model``.
        history: one dict per round (parent, scores, chosen points, costs, metrics, timings).
        base: the gallery entry of the base model.
    """

    model: nn.Module
    gallery: Gallery
    plan: GrowthPlan
    history: list[dict[str, Any]] = field(default_factory=list)
    base: Entry | None = None
    budget: Budget | None = None

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
        head = (
            f"base: val acc {100 * (1 - b.val_error):.2f} %, {b.cost.params:,} params, "
            f"{b.cost.flops / 1e6:.2f} MFLOPs\n"
            f"best: val acc {100 * (1 - g.val_error):.2f} %, {g.cost.params:,} params "
            f"(+{100 * (g.cost.params / b.cost.params - 1):.1f} %), {g.cost.flops / 1e6:.2f} MFLOPs, "
            f"{len(g.plan.get('edits', []))} grown branches (entry {g.id})\n\n"
        )
        return head + self.gallery.report()


def _check_example(example: tuple[torch.Tensor, ...], loader_x: Any) -> None:
    xs = as_args(loader_x)
    if len(xs) != len(example) or any(tuple(a.shape[1:]) != tuple(b.shape[1:]) for a, b in zip(example, xs)):
        raise InputError(
            f"example_input shapes {[tuple(a.shape) for a in example]} do not match the loader's "
            f"inputs {[tuple(b.shape) for b in xs]} (beyond the batch axis); pass a batch-1 slice of "
            "a real batch, or leave example_input=None"
        )


def _branch_costs(grown: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> dict[str, tuple[int, int]]:
    """Point -> (params, FLOPs) of each grown branch, from one FlopCounterMode pass."""
    st = state_of(grown)
    assert st is not None
    branches = dict(getattr(grown, BRANCHES).items()) if hasattr(grown, BRANCHES) else {}
    grown.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        grown(*example)
    counts = fc.get_flop_counts()
    out = {}
    key_of = {e.key: e.point for e in st.plan.edits}
    for key, br in branches.items():
        name = f"{BRANCHES}.{key}"
        flops = sum(v for k, d in counts.items() if k.endswith(name) for v in d.values())
        out[key_of[key]] = (count_params(br), int(flops))
    return out


def _optimizer(groups: list[dict[str, Any]], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))


def grow(
    model: nn.Module,
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    example_input: Any = None,
    method: str = "petridish",
    budget: Budget | None = None,
    rounds: int = 2,
    search_epochs: int = 1,
    finetune_epochs: int = 1,
    lr: float = 0.01,
    new_lr_mult: float = 10.0,
    candidate_lr: float = 3e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    l1: float = 1e-3,
    ops: Iterable[str] | str | None = None,
    max_inputs: int | None = 2,
    max_ops: int = 3,
    points_per_round: int | None = None,
    selection: str = "alpha",
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    seed: int | None = None,
    cost_axis: str = "params",
    eps: float = 0.025,
) -> GrowResult:
    """Grow ``model`` (not modified) with Petridish on ``loader``; see the module docstring.

    Args:
        model: a trained ``nn.Module`` (timm, torchvision, or any fx-traceable model).
        loader: training batches ``(x, y)`` or dicts (see ``batch_fn``).
        val_loader: batches for model selection (default: ``loader``, with a warning).
        example_input: batch-1 input for tracing (default: sliced from the first batch).
        budget: limits relative to (or absolute beside) the base cost; ``None`` = no limit.
        rounds: growth rounds; each round is one weak-learning phase and one fine-tuning phase.
        search_epochs / finetune_epochs: epochs of each phase per round.
        lr: base learning rate (SGD, cosine schedule restarted each phase).
        new_lr_mult: learning-rate multiplier for newly grown parameters while fine-tuning.
        candidate_lr: Adam learning rate of the candidates during weak learning.
        l1, ops, max_inputs, max_ops: weak-learner settings (see :func:`growkit.inject`).
        points_per_round: most points grown per round (default: every positive-score point that fits).
        selection: ``"alpha"`` (L1 / top |alpha|) or ``"random"`` edge selection (ablation).
        loss_fn: ``loss_fn(output, target)``; default cross entropy.
        batch_fn: maps a loader batch to ``(inputs, targets)``.
        device: where to train (default: the model's device).
        checkpoint_dir: where the gallery and best model are written after every round.
        seed: makes the run reproducible on CPU.
        cost_axis: gallery / hull cost axis: ``"params"``, ``"flops"`` or ``"latency_ms"``.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, CandidateModel):
        raise InputError("model carries un-finalized candidates; call growkit.finalize first")
    if not isinstance(rounds, int) or rounds < 0:
        raise InputError(f"rounds must be an int >= 0, got {rounds!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise InputError(f"budget must be a growkit.Budget, got {type(budget).__name__}")
    rng = random.Random(seed)
    if seed is not None:
        torch.manual_seed(seed)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if val_loader is None:
        logger.warning("no val_loader given: models are selected on the training data")
        val_loader = loader

    loader_x = first_input(loader, batch_fn)
    example = as_args(example_input if example_input is not None else loader_x)
    _check_example(example, loader_x)
    base_gm = growable(model, example).to(dev)
    example_dev = tuple(a.to(dev) for a in example)
    want_latency = cost_axis == "latency_ms" or (budget is not None and budget.needs_latency)

    def entry_for(m: nn.Module, *, parent: int | None, rnd: int, kind: str, note: str = "") -> Entry:
        metrics = evaluate(m, val_loader, loss_fn=loss_fn, batch_fn=batch_fn, device=dev)
        plan = state_of(m).plan.to_dict()  # type: ignore[union-attr]
        e = Entry(
            gallery.next_id(), parent, measure(m, example_dev, latency=want_latency), 1.0 - metrics["accuracy"],
            metrics["loss"], plan, rnd, kind, state={k: v.detach().cpu().clone() for k, v in m.state_dict().items()},
            note=note,
        )
        return gallery.add(e)

    def materialize(e: Entry) -> torch.fx.GraphModule:
        m = apply_plan(base_gm, GrowthPlan.from_dict(e.plan), example_dev)
        m.load_state_dict(e.state)
        return m.to(dev)

    gallery = Gallery(cost_axis=cost_axis, eps=eps)
    t0 = time.perf_counter()
    base_entry = entry_for(base_gm, parent=None, rnd=0, kind="base")
    base_cost = base_entry.cost
    if budget is not None:
        logger.info("budget limits: %s", budget.limits(base_cost))
    history: list[dict[str, Any]] = []
    logger.info("base: val acc %.4f, %d params", 1 - base_entry.val_error, base_cost.params)

    for rnd in range(1, rounds + 1):
        parent = gallery.sample_parent(rng, budget, base_cost)
        rec: dict[str, Any] = {"round": rnd, "parent": parent.id}
        history.append(rec)
        parent_model = materialize(parent)
        try:
            # --- weak learning: the whole model keeps training while candidates learn
            t = time.perf_counter()
            cm = inject(parent_model, ops=ops, max_inputs=max_inputs, l1=l1, normalize_grad=True).to(dev)
            cand_ids = {id(p) for p in cm.candidate_parameters()}
            opt = _optimizer([{"params": [p for p in cm.parameters() if id(p) not in cand_ids]}], lr, momentum, weight_decay)
            # Candidates get their own Adam: their (normalised) boosting gradient has another
            # scale than the loss gradient of the base weights.
            cand_opt = torch.optim.Adam(cm.candidate_parameters(), lr=candidate_lr)
            steps = search_epochs * _num_batches(loader)
            sched = _cosine(opt, steps)
            counter = {"n": 0}

            def after_step() -> None:
                # Score only the second half of weak learning: early fits are from random init.
                counter["n"] += 1
                if counter["n"] == steps // 2:
                    cm.reset_scores()

            st = train_steps(cm, loader, [opt, cand_opt], epochs=search_epochs, scheduler=sched, loss_fn=loss_fn,
                             extra_loss=cm.extra_loss, batch_fn=batch_fn, device=dev, progress=progress,
                             desc=f"round {rnd} weak learning", after_step=after_step)
            rec["search_s"] = time.perf_counter() - t
            rec["search_train_acc"] = st.train_accuracy
            scores = cm.scores()
            rec["scores"] = scores

            # --- choose where to grow: fit to the negative gradient per unit of added cost
            full = finalize(cm, max_ops=max_ops, selection=selection, generator=_gen(rng))
            costs = _branch_costs(full, example_dev)
            parent_cost = parent.cost
            ranked = sorted(
                (p for p in scores if scores[p] == scores[p] and scores[p] > 0 and p in costs),
                key=lambda p: scores[p] / (costs[p][0] / max(base_cost.params, 1) + 1e-9),
                reverse=True,
            )
            chosen: list[str] = []
            add_p, add_f = 0, 0
            for p in ranked:
                if points_per_round is not None and len(chosen) >= points_per_round:
                    break
                trial = Cost(parent_cost.params + add_p + costs[p][0], parent_cost.flops + add_f + costs[p][1], None)
                if budget is not None and not budget.allows(trial, base_cost):
                    continue
                chosen.append(p)
                add_p += costs[p][0]
                add_f += costs[p][1]
            rec["chosen"] = chosen
            if not chosen:
                why = "no candidate fits the budget" if ranked else "no candidate fits the negative gradient"
                logger.warning("round %d: %s; nothing grown", rnd, why)
                rec["note"] = why
                continue
            gen = _gen(rng)
            grown = finalize(cm, max_ops=max_ops, points=chosen, selection=selection, generator=gen).to(dev)
            if budget is not None and budget.needs_latency:
                if not budget.allows(measure(grown, example_dev, latency=True), base_cost):
                    logger.warning("round %d: grown model exceeds the latency budget; discarded", rnd)
                    rec["note"] = "latency over budget"
                    continue

            # --- fine-tune: fresh schedule, new parameters at a higher learning rate
            t = time.perf_counter()
            branches = getattr(grown, BRANCHES)
            new_keys = [e.key for e in state_of(grown).plan.edits[len(parent.plan["edits"]):]]  # type: ignore[union-attr]
            new_params = [p for k in new_keys for p in branches[k].parameters()]
            fresh = {id(p) for p in new_params}
            opt = _optimizer(
                [
                    {"params": [p for p in grown.parameters() if id(p) not in fresh]},
                    {"params": new_params, "lr": lr * new_lr_mult},
                ],
                lr, momentum, weight_decay,
            )
            steps = finetune_epochs * _num_batches(loader)
            st = train_steps(grown, loader, opt, epochs=finetune_epochs, scheduler=_cosine(opt, steps),
                             loss_fn=loss_fn, batch_fn=batch_fn, device=dev, progress=progress,
                             desc=f"round {rnd} fine-tune")
            rec["finetune_s"] = time.perf_counter() - t
            rec["finetune_train_acc"] = st.train_accuracy
            rec["etas"] = {e.point: float(getattr(grown, BRANCHES)[e.key].eta.detach()) for e in state_of(grown).plan.edits[len(parent.plan["edits"]):]}  # type: ignore[union-attr]
        except NonFiniteLoss as exc:
            logger.warning("round %d stopped: %s; keeping the last good model", rnd, exc)
            rec["note"] = f"stopped: {exc}"
            continue
        entry = entry_for(grown, parent=parent.id, rnd=rnd, kind="grown")
        rec.update(entry=entry.id, val_accuracy=1 - entry.val_error, params=entry.cost.params, flops=entry.cost.flops)
        logger.info("round %d: grew %s, val acc %.4f, params %d", rnd, chosen, 1 - entry.val_error, entry.cost.params)
        if checkpoint_dir is not None:
            _write_checkpoint(Path(checkpoint_dir), gallery, history, budget, base_cost, materialize)

    best = gallery.best(budget, base_cost)
    if budget is not None and best.kind == "base" and rounds > 0:
        logger.warning("no grown model beat the base within the budget; returning the base model")
    result = GrowResult(materialize(best), gallery, GrowthPlan.from_dict(best.plan), history, base_entry, budget)
    result.history.append({"total_s": time.perf_counter() - t0})
    if checkpoint_dir is not None:
        _write_checkpoint(Path(checkpoint_dir), gallery, history, budget, base_cost, materialize)
    return result


def _gen(rng: random.Random) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(rng.getrandbits(63))
    return g


def _num_batches(loader: Iterable) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 1000


def _write_checkpoint(out: Path, gallery: Gallery, history: list, budget: Budget | None, base_cost: Cost, materialize) -> None:
    from .io import save, write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gallery.json", {"gallery": gallery.to_dict(), "history": history})
    save(materialize(gallery.best(budget, base_cost)), out / "best")
