"""``growkit.grow``: the end-to-end Petridish growth loop over a trained model.

Each round: draw ``children`` parents from the gallery's epsilon-hull; for each, inject candidates
at its growth points and keep training the whole model while the candidates learn (weak learning,
amortised); score every point by how well its weak learner fits the negative gradient per unit
of added cost; finalize the best points that fit the budget (concat + projection, eta = 0:
exact); fine-tune with a fresh schedule and a higher learning rate on the new parameters;
evaluate; add to the gallery. The children's jobs (:mod:`growkit.jobs`) run in this process or on
Ray workers (:mod:`growkit.executor`), with the same result for the same seed.

With ``checkpoint_dir`` the run state (gallery, history, working model, optimizer and scheduler
states, every RNG state) is written atomically after every epoch of every phase;
``resume=True`` continues from the last complete checkpoint and, on CPU with a seed, ends with
the same plan and bit-identical weights as an uninterrupted run. Exceptions: a ``latency_ms``
cost axis or budget (measured times differ between runs) and data loaders whose randomness
growkit cannot see (a sampler with a private generator that is not ``loader.generator`` or
``loader.sampler.generator``; worker processes seeded from elsewhere).
"""
from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.candidates import CandidateModel
from ..checkpoint import (
    CheckpointDir,
    capture_rng,
    full_state,
    load_full_state,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
)
from ..core.cost import Budget, Cost, measure
from ..errors import InputError
from .executor import Executor, LocalExecutor, get_executor
from .gallery import Entry, Gallery
from ..core.graph import as_args
from .jobs import ChildTrainer, TuneJob, TuneResult, WeakJob, WeakResult
from .methods import get_method
from ..core.plan import GrowthPlan
from ..core.surgery import growable, state_of
from ..train import BatchFn, evaluate, first_input

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
    children: int = 1,
    executor: str | Executor = "local",
    executor_options: dict[str, Any] | None = None,
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
            Points are taken by fit per added parameter while they fit; a point whose
            ``max_ops`` edges do not fit keeps its leading edges that do.
        rounds: growth rounds (generations).
        children: children per round: that many parents are drawn from the epsilon-hull at the
            round's start, and each gets a weak-learning job and a fine-tuning job.
        executor: ``"local"`` (in this process, checkpointed every epoch), ``"ray"`` (parallel
            Ray workers; ``pip install "growkit[ray]"``) or a :class:`growkit.growth.executor.Executor`.
            The same seed gives the same gallery with either (see :mod:`growkit.executor`).
        executor_options: for ``"ray"``: ``num_workers``, ``address``, ``num_cpus``,
            ``num_gpus``, ``threads``, ``max_retries``, ``runtime_env``.
        search_epochs / finetune_epochs: epochs of each phase per round.
        lr: base learning rate (SGD, cosine schedule restarted each phase).
        new_lr_mult: learning-rate multiplier for newly grown parameters while fine-tuning.
        candidate_lr: Adam learning rate of the candidates during weak learning.
        l1, ops, max_inputs, max_ops: weak-learner settings (see :func:`growkit.inject`). ``ops``
            defaults to the paper's full op set: with inject's cheap default (two ops) top-|alpha|
            keeps 3 of 4 edges, so there is little left to select; the richer set costs more per
            weak-learning step. (On the small benchmarks in benchmarks/results/grow_vs_finetune*.md
            top-|alpha| edges were no better than random edges at the same points with either set.)
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
    if not isinstance(children, int) or children < 1:
        raise InputError(f"children must be an int >= 1, got {children!r}")
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
        "children": children,
    }
    ex = get_executor(executor, executor_options)
    if method != "petridish" and (children != 1 or not isinstance(ex, LocalExecutor)):
        raise InputError(f"method {method!r} runs one child per round in this process; children= and "
                         "executor= apply to method='petridish'")
    run = GrowRun(model, loader, val_loader, example_input, budget, config, loss_fn, batch_fn, device, progress,
                  checkpoint_dir, seed, growth_method, ex)
    try:
        return run.run(rounds, resume)
    finally:
        ex.close()


class GrowRun:
    """One grow() call: the loop, its gallery and its (resumable) progress.

    This is the context a :class:`growkit.growth.methods.GrowthMethod` works with: ``gallery``, ``rng``,
    ``budget``, ``base_cost``, ``cfg`` (the grow() settings), ``loader`` / ``val_loader``,
    ``history``; :meth:`materialize` (entry -> model), :meth:`model_from` (plan + weights ->
    model), :meth:`finetune` (train a grown model and add it to the gallery), :meth:`save`.
    """

    def __init__(self, model, loader, val_loader, example_input, budget, config, loss_fn, batch_fn, device,
                 progress, checkpoint_dir, seed, method, executor: Executor | None = None) -> None:
        self.cfg = config
        self.method = method
        self.executor = executor or get_executor("local")
        self.user_model = model
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
        self.trainer = ChildTrainer(self.base_gm, self.example, loader, val_loader, config, base_cost=Cost(0, 0),
                                    budget=budget, loss_fn=loss_fn, batch_fn=batch_fn, device=self.dev,
                                    progress=progress, restore=self.restore)

    # ---------------------------------------------------------------- models and entries
    def model_from(self, plan: dict[str, Any], state: dict[str, torch.Tensor] | None) -> torch.fx.GraphModule:
        return self.trainer.model_from(plan, state)

    def worker_spec(self, device: str, threads: int) -> dict[str, Any]:
        """What a worker process needs to build its :class:`ChildTrainer`: the base architecture
        (the user's model, pickled by Ray once per worker; its recorded timm name alone would not
        carry constructor arguments such as ``channels``), data, loss and the settings. Weights
        always travel as safetensors with each job."""
        model = self.user_model
        if any(t.device.type != "cpu" for t in model.state_dict().values()):
            model = copy.deepcopy(model).cpu()
        return {
            "module": model, "example": tuple(a.cpu() for a in self.example), "loader": self.loader,
            "val_loader": self.val_loader, "cfg": self.cfg, "base_cost": self.base_cost, "budget": self.budget,
            "loss_fn": self.loss_fn, "batch_fn": self.batch_fn, "device": device, "threads": threads,
        }

    def materialize(self, e: Entry) -> torch.fx.GraphModule:
        assert e.state is not None
        return self.model_from(e.plan, e.state)

    def add_entry(self, m: nn.Module, *, parent: int | None, rnd: int, kind: str) -> Entry:
        metrics = evaluate(m, self.val_loader, loss_fn=self.loss_fn, batch_fn=self.batch_fn, device=self.dev)
        self.gallery.val_size = int(metrics["n"])
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
                + "; pass the original settings or use a new checkpoint_dir",
                cli="--resume with settings that differ from the interrupted run: "
                + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                + "; pass the original options or use a new --out directory",
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
                "or choose an empty checkpoint_dir",
                cli=f"{self.out} holds the checkpoint of an earlier run: add --resume to continue it, "
                "or choose an empty --out directory",
            )
        saved = self.load() if resume else None
        if saved is None:
            base_entry = self.add_entry(self.base_gm, parent=None, rnd=0, kind="base")
            self.save({"round": 0, "phase": "round_end"})
        else:
            base_entry = self.gallery[0]
            logger.info("resuming from %s: %s", self.out, saved[0]["progress"])
        self.base_cost = self.trainer.base_cost = base_entry.cost
        if self.budget is not None:
            logger.info("budget limits: %s", self.budget.describe(self.base_cost))
        logger.info("base: val acc %.2f %%, %s params", 100 * (1 - base_entry.val_error), f"{self.base_cost.params:,}")
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
        tail: dict[str, Any] = {"total_s": time.perf_counter() - t0, "executor": self.executor.name}
        tail.update(getattr(self.executor, "stats", {}))
        history = [dict(h) for h in self.history] + [tail]
        result = GrowResult(self.materialize(best), self.gallery, GrowthPlan.from_dict(best.plan), history,
                            base_entry, self.budget)
        if self.out is not None:
            self.write_summary()
        return result

    def round(self, rnd: int, saved: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
        self.method.round(self, rnd, saved)

    def petridish_round(self, rnd: int, saved: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
        """Draw the round's parents and seeds (the schedule), then let the executor run the children."""
        if saved is None:
            jobs = []
            for i in range(self.cfg["children"]):
                parent = self.gallery.sample_parent(self.rng, self.budget, self.base_cost)
                jobs.append({"index": i, "parent": parent.id, "seed": self.rng.getrandbits(63),
                             "tune_seed": self.rng.getrandbits(63)})
            prog: dict[str, Any] = {"round": rnd, "phase": "jobs", "jobs": jobs, "done": []}
            self.save(prog)
        else:
            p = saved[0]["progress"]
            prog = {"round": rnd, "phase": "jobs", "jobs": p["jobs"], "done": list(p["done"])}
            # The run's generator moved on when the round was drawn; every job re-seeds its own.
            restore_rng(saved[0]["rng"], self.rng, (self.loader, self.val_loader))
        self.executor.run_round(self, rnd, prog, saved)
        self.save({"round": rnd, "phase": "round_end"})

    def weak_job(self, rnd: int, spec: dict[str, Any]) -> WeakJob:
        parent = self.gallery[spec["parent"]]
        return WeakJob(rnd, spec["index"], parent.id, parent.plan, parent.state, parent.cost, spec["seed"])

    def tune_job(self, rnd: int, spec: dict[str, Any], weak: WeakResult) -> TuneJob:
        assert weak.plan is not None
        parent = self.gallery[spec["parent"]]
        return TuneJob(rnd, spec["index"], parent.id, weak.plan, weak.state, len(parent.plan["edits"]),
                       spec["tune_seed"])

    def run_child_here(self, rnd: int, prog: dict[str, Any], spec: dict[str, Any], resume: Any) -> None:
        """One child in this process, checkpointed after every epoch of both of its jobs."""
        i = spec["index"]

        def hook(extra: dict[str, Any]):
            def save(p: dict[str, Any], work: nn.Module | None = None, opts: Any = None, sched: Any = None) -> None:
                self.save({**prog, "job": i, **extra, **p}, work=work, opts=opts, sched=sched)
            return save

        phase = resume[0]["progress"]["phase"] if resume is not None else "search"
        if phase == "search":
            weak = self.trainer.weak_learn(self.weak_job(rnd, spec), save=hook({}), resume=resume)
            if weak.plan is None:
                self.child_done(rnd, prog, spec, weak, None)
                return
            save = hook({"plan": weak.plan, "rec": weak.rec})
            tune = self.trainer.finetune(self.tune_job(rnd, spec, weak), save=save,
                                         before_train=lambda m: save({"phase": "finetune", "epoch": 0, "stats": {}},
                                                                     work=m))
        else:
            p = resume[0]["progress"]
            weak = WeakResult(rnd, i, spec["parent"], p["plan"], None, p["rec"])
            tune = self.trainer.finetune(self.tune_job(rnd, spec, weak), save=hook({"plan": p["plan"], "rec": p["rec"]}),
                                         resume=resume)
        self.child_done(rnd, prog, spec, weak, tune)

    def child_done(self, rnd: int, prog: dict[str, Any], spec: dict[str, Any], weak: WeakResult | None,
                   tune: TuneResult | None, note: str = "") -> Entry | None:
        """Record a finished child (history; gallery if it has weights) and checkpoint the round."""
        rec: dict[str, Any] = {"round": rnd, "child": spec["index"], "parent": spec["parent"]}
        rec.update(weak.rec if weak is not None else {})
        rec.update(tune.rec if tune is not None else {})
        if note:
            rec["note"] = note
        entry = None
        if tune is not None and tune.state is not None:
            entry = self.add_trained(tune, rec)
        else:
            logger.warning("round %d child %d: %s; nothing grown", rnd, spec["index"], rec.get("note", "no result"))
        self.history.append(rec)
        prog["done"].append(spec["index"])
        self.save(prog)
        return entry

    def finetune(self, rnd: int, grown: torch.fx.GraphModule, parent: Entry, rec: dict[str, Any], saved) -> None:
        """Fine-tune a grown model in place (checkpointed every epoch), add its entry, end the round.

        For growth methods that search in this process; ``rec`` is the round's history record.
        A non-finite loss or an exploding eta raises :class:`NonFiniteLoss`.
        """
        plan = state_of(grown).plan.to_dict()  # type: ignore[union-attr]
        job = TuneJob(rnd, 0, parent.id, plan, None, len(parent.plan["edits"]), 0)

        def save(p: dict[str, Any], work: nn.Module | None = None, opts: Any = None, sched: Any = None) -> None:
            self.save({"round": rnd, "parent": parent.id, "plan": plan, **p}, work=work, opts=opts, sched=sched)

        res = self.trainer.train_child(job, grown, save=save, resume=saved)
        rec.update(res.rec)
        self.add_trained(res, rec)
        self.save({"round": rnd, "phase": "round_end"})

    def add_trained(self, res: TuneResult, rec: dict[str, Any]) -> Entry:
        """Gallery entry for a fine-tuned child (metrics and cost as its job measured them)."""
        assert res.metrics is not None and res.cost is not None and res.state is not None
        entry = Entry(self.gallery.next_id(), res.parent, res.cost, 1.0 - res.metrics["accuracy"],
                      res.metrics["loss"], res.plan, res.round, "grown", state=res.state)
        if self.ckpt is not None:
            self.ckpt.write_entry(entry.id, entry.state)
        self.gallery.add(entry)
        rec.update(entry=entry.id, val_accuracy=1 - entry.val_error, params=entry.cost.params, flops=entry.cost.flops)
        logger.info("round %d: grew %s, val acc %.2f %%, %s params", res.round, rec.get("chosen"),
                    100 * (1 - entry.val_error), f"{entry.cost.params:,}")
        return entry

    def write_summary(self) -> None:
        """Human-facing files beside the checkpoints: gallery.json and the best model."""
        from ..io import save, write_json_atomic

        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "gallery.json", {"gallery": self.gallery.to_dict(), "history": self.history})
        # Re-building a model draws initial weights: keep the run's RNG stream untouched by it, so a
        # resumed run (which does not re-write these files) draws the same numbers.
        with torch.random.fork_rng(devices=[]):
            save(self.materialize(self.gallery.best(self.budget, self.base_cost)), self.out / "best")

