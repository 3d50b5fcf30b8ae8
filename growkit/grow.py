"""``growkit.grow``: the end-to-end Petridish growth loop over a trained model.

Each round: draw a parent from the gallery's epsilon-hull; inject candidates at its growth
points and keep training the whole model while the candidates learn (weak learning, amortised);
score every point by how well its weak learner fits the negative gradient per unit of added cost;
finalize the best points that fit the budget (concat + projection, eta = 0: exact); fine-tune with
a fresh schedule and a higher learning rate on the new parameters; evaluate; add to the gallery.

With ``checkpoint_dir`` the run state (gallery, history, working model, optimizer and scheduler
states, every RNG state) is written atomically after every epoch of every phase;
``resume=True`` continues from the last complete checkpoint and, on CPU with a seed, ends with
the same plan and bit-identical weights as an uninterrupted run. Exceptions: a ``latency_ms``
cost axis or budget (measured times differ between runs) and data loaders whose randomness
growkit cannot see (a sampler with a private generator that is not ``loader.generator`` or
``loader.sampler.generator``; worker processes seeded from elsewhere).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .candidates import CandidateModel, inject
from .checkpoint import (
    CheckpointDir,
    capture_rng,
    full_state,
    load_full_state,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
)
from .cost import Budget, Cost, measure
from .errors import InputError, ResourceError
from .finalize import finalize
from .gallery import Entry, Gallery
from .methods import get_method
from .graph import as_args
from .plan import BRANCHES, GrowthPlan, apply_plan
from .selection import choose_points
from .surgery import growable, state_of
from .train import BatchFn, NonFiniteLoss, PhaseStats, evaluate, first_input, train_steps

__all__ = ["grow", "GrowResult", "GrowRun"]

logger = logging.getLogger(__name__)


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
        base_label, best_label = self._report_labels()
        head = (
            f"{base_label}: val acc {100 * (1 - b.val_error):.2f} %, {b.cost.params:,} params, "
            f"{b.cost.flops / 1e6:.2f} MFLOPs\n"
            f"{best_label}: val acc {100 * (1 - g.val_error):.2f} %, {g.cost.params:,} params "
            f"({100 * (g.cost.params / b.cost.params - 1):+.1f} %), {g.cost.flops / 1e6:.2f} MFLOPs"
            f"{self._report_detail(g)} (entry {g.id})\n\n"
        )
        return head + self.gallery.report()

    def _report_labels(self) -> tuple[str, str]:
        return "base", "best"

    def _report_detail(self, best: Entry) -> str:
        return f", {len(best.plan.get('edits', []))} grown branches"


def _check_example(example: tuple[torch.Tensor, ...], loader_x: Any) -> None:
    xs = as_args(loader_x)
    if len(xs) != len(example) or any(tuple(a.shape[1:]) != tuple(b.shape[1:]) for a, b in zip(example, xs)):
        raise InputError(
            f"example_input shapes {[tuple(a.shape) for a in example]} do not match the loader's "
            f"inputs {[tuple(b.shape) for b in xs]} (beyond the batch axis); pass a batch-1 slice of "
            "a real batch, or leave example_input=None"
        )




def grow(
    model: nn.Module,
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    example_input: Any = None,
    method: str = "petridish",
    method_options: dict[str, Any] | None = None,
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
    ops: Iterable[str] | str | None = "paper",
    max_inputs: int | None = 2,
    max_ops: int = 3,
    points: Iterable[str] | None = None,
    points_per_round: int | None = None,
    selection: str = "alpha",
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int | None = None,
    cost_axis: str = "params",
    eps: float = 0.025,
    max_eta: float = 100.0,
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
        l1, ops, max_inputs, max_ops: weak-learner settings (see :func:`growkit.inject`). ``ops``
            defaults to the paper's full op set: with inject's cheap default (two ops) top-|alpha|
            keeps 3 of 4 edges and is no better than random edges (benchmarks/results/
            grow_vs_finetune*.md); the richer set costs more per weak-learning step.
        points: growth points to consider (fx node names; default: all of them).
        points_per_round: most points grown per round (default: every positive-score point that fits).
        selection: ``"alpha"`` (L1 / top |alpha|) or ``"random"`` edge selection (ablation).
        loss_fn: ``loss_fn(output, target)``; default cross entropy.
        batch_fn: maps a loader batch to ``(inputs, targets)``.
        device: where to train (default: the model's device).
        checkpoint_dir: where the resumable run state, the gallery and the best model are written.
        resume: continue from the last complete checkpoint in ``checkpoint_dir`` (if any).
        seed: makes the run reproducible on CPU.
        cost_axis: gallery / hull cost axis: ``"params"``, ``"flops"`` or ``"latency_ms"``.
        max_eta: a grown gate with ``|eta|`` above this (or non-finite) stops the round and
            rolls back to the last good model, like a NaN loss.
    """
    growth_method = get_method(method, **(method_options or {}))
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, CandidateModel):
        raise InputError("model carries un-finalized candidates; call growkit.finalize first")
    if not isinstance(rounds, int) or rounds < 0:
        raise InputError(f"rounds must be an int >= 0, got {rounds!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise InputError(f"budget must be a growkit.Budget, got {type(budget).__name__}")
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir= (the directory of the interrupted run)")
    config = {
        "method": method, "method_options": method_options or {}, "budget": None if budget is None else repr(budget), "search_epochs": search_epochs,
        "finetune_epochs": finetune_epochs, "lr": lr, "new_lr_mult": new_lr_mult, "candidate_lr": candidate_lr,
        "momentum": momentum, "weight_decay": weight_decay, "l1": l1,
        "ops": ops if ops is None or isinstance(ops, str) else list(ops), "max_inputs": max_inputs,
        "max_ops": max_ops, "points": None if points is None else list(points), "points_per_round": points_per_round,
        "selection": selection, "seed": seed, "cost_axis": cost_axis, "eps": eps, "max_eta": max_eta,
    }
    run = GrowRun(model, loader, val_loader, example_input, budget, config, loss_fn, batch_fn, device, progress,
                  checkpoint_dir, seed, growth_method)
    return run.run(rounds, resume)


def _optimizer(groups: list[dict[str, Any]], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))


class GrowRun:
    """One grow() call: the loop, its gallery and its (resumable) progress.

    This is the context a :class:`growkit.methods.GrowthMethod` works with: ``gallery``, ``rng``,
    ``budget``, ``base_cost``, ``cfg`` (the grow() settings), ``loader`` / ``val_loader``,
    ``history``; :meth:`materialize` (entry -> model), :meth:`model_from` (plan + weights ->
    model), :meth:`finetune` (train a grown model and add it to the gallery), :meth:`save`.
    """

    def __init__(self, model, loader, val_loader, example_input, budget, config, loss_fn, batch_fn, device,
                 progress, checkpoint_dir, seed, method) -> None:
        self.cfg = config
        self.method = method
        self.loader = loader
        self.budget = budget
        self.loss_fn, self.batch_fn, self.progress = loss_fn, batch_fn, progress
        self.rng = random.Random(seed)
        if seed is not None:
            torch.manual_seed(seed)
        self.dev = torch.device(device) if device is not None else next(model.parameters()).device
        if val_loader is None:
            logger.warning("no val_loader given: models are selected on the training data")
            val_loader = loader
        self.val_loader = val_loader
        loader_x = first_input(loader, batch_fn)
        example = as_args(example_input if example_input is not None else loader_x)
        _check_example(example, loader_x)
        self.base_gm = growable(model, example).to(self.dev)
        self.example = tuple(a.to(self.dev) for a in example)
        self.want_latency = config["cost_axis"] == "latency_ms" or (budget is not None and budget.needs_latency)
        self.gallery = Gallery(cost_axis=config["cost_axis"], eps=config["eps"])
        self.history: list[dict[str, Any]] = []
        self.out = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.ckpt = CheckpointDir(self.out) if self.out is not None else None
        self.base_cost: Cost | None = None

    # ---------------------------------------------------------------- models and entries
    def model_from(self, plan: dict[str, Any], state: dict[str, torch.Tensor] | None) -> torch.fx.GraphModule:
        m = apply_plan(self.base_gm, GrowthPlan.from_dict(plan), self.example)
        if state is not None:
            m.load_state_dict(state)
        return m.to(self.dev)

    def materialize(self, e: Entry) -> torch.fx.GraphModule:
        assert e.state is not None
        return self.model_from(e.plan, e.state)

    def add_entry(self, m: nn.Module, *, parent: int | None, rnd: int, kind: str) -> Entry:
        metrics = evaluate(m, self.val_loader, loss_fn=self.loss_fn, batch_fn=self.batch_fn, device=self.dev)
        plan = state_of(m).plan.to_dict()  # type: ignore[union-attr]
        e = Entry(
            self.gallery.next_id(), parent, measure(m, self.example, latency=self.want_latency),
            1.0 - metrics["accuracy"], metrics["loss"], plan, rnd, kind,
            state={k: v.detach().cpu().clone() for k, v in m.state_dict().items()},
        )
        if self.ckpt is not None:
            self.ckpt.write_entry(e.id, e.state)
        return self.gallery.add(e)

    # ---------------------------------------------------------------- checkpoints
    def save(self, prog: dict[str, Any], work: nn.Module | None = None,
             opts: dict[str, torch.optim.Optimizer] | None = None, sched: Any = None) -> None:
        if self.ckpt is None:
            return
        tensors = full_state(work, "work.") if work is not None else {}
        opt_meta = {}
        for name, opt in (opts or {}).items():
            meta, t = optimizer_to_flat(opt, f"opt.{name}")
            opt_meta[name] = meta
            tensors.update(t)
        state = {
            "format": "growkit.grow-checkpoint", "version": 1, "config": self.cfg, "progress": prog,
            "gallery": self.gallery.to_dict(), "history": self.history, "optimizers": opt_meta,
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": capture_rng(self.rng, (self.loader, self.val_loader)),
            "method_state": self.method.state_dict(),
        }
        self.ckpt.write(state, tensors)

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        assert self.ckpt is not None
        got = self.ckpt.read()
        if got is None:
            logger.info("no checkpoint in %s: starting a new run", self.out)
            return None
        state, tensors = got
        if state.get("format") != "growkit.grow-checkpoint":
            raise InputError(f"{self.out} does not hold a grow() checkpoint")
        old = json.loads(json.dumps(state["config"]))
        new = json.loads(json.dumps(self.cfg, default=str))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise InputError(
                "resume=True with settings that differ from the checkpointed run: "
                + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                + "; pass the original settings or use a new checkpoint_dir"
            )
        assert self.ckpt is not None
        for d in state["gallery"]["entries"]:
            self.gallery.add(Entry.from_dict(d, self.ckpt.read_entry(int(d["id"]))))
        self.history[:] = state["history"]
        self.method.load_state_dict(state.get("method_state") or {})
        return state, tensors

    def restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], work: nn.Module | None,
                opts: dict[str, torch.optim.Optimizer], sched: Any) -> None:
        if work is not None:
            load_full_state(work, tensors, "work.")
        for name, opt in opts.items():
            if name in state["optimizers"]:  # absent at a phase's start: the optimizer is fresh
                optimizer_from_flat(opt, state["optimizers"][name], tensors)
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], self.rng, (self.loader, self.val_loader))

    # ---------------------------------------------------------------- the loop
    def run(self, rounds: int, resume: bool) -> GrowResult:
        t0 = time.perf_counter()
        if not resume and self.ckpt is not None and self.ckpt.latest_name() is not None:
            raise InputError(
                f"{self.out} holds the checkpoint of an earlier run: pass resume=True to continue it, "
                "or choose an empty checkpoint_dir"
            )
        saved = self.load() if resume else None
        if saved is None:
            base_entry = self.add_entry(self.base_gm, parent=None, rnd=0, kind="base")
            self.save({"round": 0, "phase": "round_end"})
        else:
            base_entry = self.gallery[0]
            logger.info("resuming from %s: %s", self.out, saved[0]["progress"])
        self.base_cost = base_entry.cost
        if self.budget is not None:
            logger.info("budget limits: %s", self.budget.limits(self.base_cost))
        logger.info("base: val acc %.4f, %d params", 1 - base_entry.val_error, self.base_cost.params)
        first = 1
        if saved is not None:
            prog = saved[0]["progress"]
            first = prog["round"] + 1 if prog["phase"] == "round_end" else prog["round"]
            if prog["phase"] == "round_end":
                restore_rng(saved[0]["rng"], self.rng, (self.loader, self.val_loader))
                saved = None
        for rnd in range(first, rounds + 1):
            self.round(rnd, saved)
            saved = None
            if self.out is not None:
                self.write_summary()
        best = self.gallery.best(self.budget, self.base_cost)
        if self.budget is not None and best.kind == "base" and rounds > 0:
            logger.warning("no grown model beat the base within the budget; returning the base model")
        history = [dict(h) for h in self.history] + [{"total_s": time.perf_counter() - t0}]
        result = GrowResult(self.materialize(best), self.gallery, GrowthPlan.from_dict(best.plan), history,
                            base_entry, self.budget)
        if self.out is not None:
            self.write_summary()
        return result

    def round(self, rnd: int, saved: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
        self.method.round(self, rnd, saved)

    def petridish_round(self, rnd: int, saved: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
        prog = saved[0]["progress"] if saved is not None else None
        try:
            if prog is None or prog["phase"] == "search":
                grown, parent, rec = self.search(rnd, saved)
                if grown is None:
                    self.save({"round": rnd, "phase": "round_end"})
                    return
                self.save({"round": rnd, "phase": "finetune", "epoch": 0, "parent": parent.id,
                           "plan": state_of(grown).plan.to_dict(), "stats": {}}, work=grown)  # type: ignore[union-attr]
                self.finetune(rnd, grown, parent, rec, None)
            else:
                parent = self.gallery[prog["parent"]]
                rec = self.history[-1]
                grown = self.model_from(prog["plan"], None)  # weights: restored by finetune()
                self.finetune(rnd, grown, parent, rec, saved)
        except NonFiniteLoss as exc:
            logger.warning("round %d stopped: %s; rolled back to the last good model", rnd, exc)
            self.history[-1]["note"] = f"stopped and rolled back: {exc}"
            self.save({"round": rnd, "phase": "round_end"})

    def search(self, rnd: int, saved) -> tuple[torch.fx.GraphModule | None, Entry, dict[str, Any]]:
        """Weak learning on a parent, then the choice of points; returns the finalized model."""
        cfg = self.cfg
        prog = saved[0]["progress"] if saved is not None else None
        if prog is None:
            parent = self.gallery.sample_parent(self.rng, self.budget, self.base_cost)
            rec: dict[str, Any] = {"round": rnd, "parent": parent.id}
            self.history.append(rec)
        else:
            parent = self.gallery[prog["parent"]]
            rec = self.history[-1]
        t = time.perf_counter()
        cm = inject(self.materialize(parent), points=cfg["points"], ops=cfg["ops"], max_inputs=cfg["max_inputs"],
                    l1=cfg["l1"], normalize_grad=True).to(self.dev)
        cand_ids = {id(p) for p in cm.candidate_parameters()}
        opt = _optimizer([{"params": [p for p in cm.parameters() if id(p) not in cand_ids]}], cfg["lr"],
                         cfg["momentum"], cfg["weight_decay"])
        # Candidates get their own Adam: their (normalised) boosting gradient has another scale
        # than the loss gradient of the base weights.
        cand_opt = torch.optim.Adam(cm.candidate_parameters(), lr=cfg["candidate_lr"])
        epochs = cfg["search_epochs"]
        steps = epochs * _num_batches(self.loader)
        sched = _cosine(opt, steps)
        opts = {"base": opt, "candidates": cand_opt}
        counter = {"n": 0}
        stats = PhaseStats()
        start = 0
        if saved is not None:
            self.restore(saved[0], saved[1], cm, opts, sched)
            counter["n"] = prog["counter"]
            stats = PhaseStats(**prog["stats"])
            start = prog["epoch"]

        def after_step() -> None:
            # Score only the second half of weak learning: early fits are from random init.
            counter["n"] += 1
            if counter["n"] == steps // 2:
                cm.reset_scores()

        def on_epoch_end(ep: int, st: PhaseStats) -> None:
            self.save({"round": rnd, "phase": "search", "epoch": ep + 1, "parent": parent.id,
                       "counter": counter["n"], "stats": vars(st)}, work=cm, opts=opts, sched=sched)

        try:
            st = train_steps(cm, self.loader, [opt, cand_opt], epochs=epochs, scheduler=sched, loss_fn=self.loss_fn,
                             extra_loss=cm.extra_loss, batch_fn=self.batch_fn, device=self.dev,
                             progress=self.progress, desc=f"round {rnd} weak learning", after_step=after_step,
                             start_epoch=start, stats=stats, on_epoch_end=on_epoch_end)
        except torch.OutOfMemoryError as exc:
            n = len(cm.candidates)
            # Drop the candidate graph and optimizer state before the error propagates: the
            # traceback keeps this frame (and its locals) alive.
            cm.module = nn.Module()
            for o in (opt, cand_opt):
                o.param_groups.clear()
                o.state.clear()
            raise ResourceError(
                f"out of memory while training {n} candidates (round {rnd}, {len(parent.plan['edits'])} grown "
                f"branches in the parent) on {self.dev}: pass points=[...] to grow at fewer points at once, "
                "max_inputs=1 or fewer ops, or use a smaller batch"
            ) from exc
        rec["search_s"] = rec.get("search_s", 0.0) + time.perf_counter() - t
        rec["search_train_acc"] = st.train_accuracy
        scores = cm.scores()
        rec["scores"] = scores

        # Choose where to grow: fit to the negative gradient per unit of added cost.
        assert self.base_cost is not None
        chosen, why = choose_points(cm, self.example, current=parent.cost, base=self.base_cost, budget=self.budget,
                                    max_ops=cfg["max_ops"], selection=cfg["selection"], generator=_gen(self.rng),
                                    max_points=cfg["points_per_round"])
        rec["chosen"] = chosen
        if not chosen:
            logger.warning("round %d: %s; nothing grown", rnd, why)
            rec["note"] = why
            return None, parent, rec
        grown = finalize(cm, max_ops=cfg["max_ops"], points=chosen, selection=cfg["selection"],
                         generator=_gen(self.rng))
        if self.budget is not None and self.budget.needs_latency:
            if not self.budget.allows(measure(grown, self.example, latency=True), self.base_cost):
                logger.warning("round %d: grown model exceeds the latency budget; discarded", rnd)
                rec["note"] = "latency over budget"
                return None, parent, rec
        # Rebuilt from its plan, as a resumed run does, so both train the very same module.
        plan = state_of(grown).plan.to_dict()  # type: ignore[union-attr]
        return self.model_from(plan, grown.state_dict()), parent, rec

    def finetune(self, rnd: int, grown: torch.fx.GraphModule, parent: Entry, rec: dict[str, Any], saved) -> None:
        """Fine-tune with a fresh schedule, new parameters at a higher learning rate; add the entry."""
        cfg = self.cfg
        t = time.perf_counter()
        branches = getattr(grown, BRANCHES)
        new_keys = [e.key for e in state_of(grown).plan.edits[len(parent.plan["edits"]):]]  # type: ignore[union-attr]
        new_params = [p for k in new_keys for p in branches[k].parameters()]
        fresh = {id(p) for p in new_params}
        opt = _optimizer(
            [
                {"params": [p for p in grown.parameters() if id(p) not in fresh]},
                {"params": new_params, "lr": cfg["lr"] * cfg["new_lr_mult"]},
            ],
            cfg["lr"], cfg["momentum"], cfg["weight_decay"],
        )
        epochs = cfg["finetune_epochs"]
        sched = _cosine(opt, epochs * _num_batches(self.loader))
        stats, start = PhaseStats(), 0
        if saved is not None:
            prog = saved[0]["progress"]
            self.restore(saved[0], saved[1], grown, {"finetune": opt}, sched)
            stats, start = PhaseStats(**prog["stats"]), prog["epoch"]
        plan = state_of(grown).plan.to_dict()  # type: ignore[union-attr]
        etas = {k: branches[k].eta for k in new_keys}

        def after_step() -> None:
            for k, eta in etas.items():
                v = float(eta.detach())
                if not math.isfinite(v) or abs(v) > cfg["max_eta"]:
                    raise NonFiniteLoss(f"eta of the branch grown at {k} exploded to {v:.3g} (max_eta {cfg['max_eta']})")

        def on_epoch_end(ep: int, st: PhaseStats) -> None:
            self.save({"round": rnd, "phase": "finetune", "epoch": ep + 1, "parent": parent.id, "plan": plan,
                       "stats": vars(st)}, work=grown, opts={"finetune": opt}, sched=sched)

        st = train_steps(grown, self.loader, opt, epochs=epochs, scheduler=sched, loss_fn=self.loss_fn,
                         batch_fn=self.batch_fn, device=self.dev, progress=self.progress,
                         desc=f"round {rnd} fine-tune", after_step=after_step, start_epoch=start, stats=stats,
                         on_epoch_end=on_epoch_end)
        rec["finetune_s"] = rec.get("finetune_s", 0.0) + time.perf_counter() - t
        rec["finetune_train_acc"] = st.train_accuracy
        rec["etas"] = {e.point: float(branches[e.key].eta.detach())
                       for e in state_of(grown).plan.edits[len(parent.plan["edits"]):]}  # type: ignore[union-attr]
        entry = self.add_entry(grown, parent=parent.id, rnd=rnd, kind="grown")
        rec.update(entry=entry.id, val_accuracy=1 - entry.val_error, params=entry.cost.params, flops=entry.cost.flops)
        logger.info("round %d: grew %s, val acc %.4f, params %d", rnd, rec.get("chosen"), 1 - entry.val_error,
                    entry.cost.params)
        self.save({"round": rnd, "phase": "round_end"})

    def write_summary(self) -> None:
        """Human-facing files beside the checkpoints: gallery.json and the best model."""
        from .io import save, write_json_atomic

        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "gallery.json", {"gallery": self.gallery.to_dict(), "history": self.history})
        # Re-building a model draws initial weights: keep the run's RNG stream untouched by it, so a
        # resumed run (which does not re-write these files) draws the same numbers.
        with torch.random.fork_rng(devices=[]):
            save(self.materialize(self.gallery.best(self.budget, self.base_cost)), self.out / "best")


def _gen(rng: random.Random) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(rng.getrandbits(63))
    return g


def _num_batches(loader: Iterable) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 1000
