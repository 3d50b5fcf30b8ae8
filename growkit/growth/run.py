"""``GrowRun``: the context of one grow() call (gallery, parent sampling, checkpoints, fine-tuning).

A :class:`growkit.growth.methods.GrowthMethod` runs each round against it: Petridish through
:mod:`growkit.growth.petridish`, search passes through :mod:`growkit.search.common`. The run owns
the gallery and the resumable progress; what one child needs travels as jobs
(:mod:`growkit.growth.jobs`), never as the run itself.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..checkpoint import (CheckpointDir, capture_rng, check_same_settings, data_fingerprint, full_state, optimizer_to_flat,
                          restore_rng, snapshot)
from ..core.cost import Cost, measure
from ..core.plan import GrowthPlan
from ..core.surgery import growable, state_of, trace_options
from ..errors import InputError
from ..io import save as save_model
from ..io import write_json_atomic
from ..newparams import check_finite_outputs
from ..runsetup import RunSetup
from ..train import evaluate
from .config import GrowConfig
from .executor import Executor, LocalExecutor
from .gallery import Entry, Gallery
from .jobs import STOPPED, ChildTrainer, TuneJob, TuneResult
from .result import GrowResult

__all__ = ["GrowRun", "Saved", "RoundMethod"]

logger = logging.getLogger(__name__)

Saved = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""A checkpoint as read back: ``(state, tensors)``."""


class RoundMethod(Protocol):
    """What the run needs of its growth method (:class:`growkit.growth.methods.GrowthMethod` is one)."""

    name: str

    def round(self, run: "GrowRun", rnd: int, saved: Saved | None) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GrowRun:
    """One grow() call: the loop, its gallery and its (resumable) progress.

    This is the context a :class:`growkit.growth.methods.GrowthMethod` works with: ``cfg`` (the
    :class:`GrowConfig`), ``setup`` (loaders, loss, device: :class:`growkit.runsetup.RunSetup`),
    ``gallery``, ``rng``, ``budget``, ``base_cost``, ``history``, ``trainer`` (the
    :class:`ChildTrainer` of this process); :meth:`materialize` (entry -> model),
    :meth:`model_from` (plan + weights -> model), :meth:`finetune` (train a grown model and add it
    to the gallery), :meth:`add_trained`, :meth:`save`.
    """

    def __init__(self, model: nn.Module, setup: RunSetup, cfg: GrowConfig, method: RoundMethod,
                 executor: Executor | None = None, checkpoint_dir: str | Path | None = None, *,
                 allow_new_data: bool = False) -> None:
        self.cfg = cfg
        self.setup = setup
        self.method = method
        self.executor = executor or LocalExecutor()
        self.user_model = model
        self.budget = cfg.budget
        self.rng = random.Random(cfg.seed)
        self.dev = setup.device
        mdev = next(model.parameters()).device
        check_finite_outputs(model, tuple(a.to(mdev) for a in setup.example), "the model passed to grow()")
        self.base_gm = growable(model, setup.example, **trace_options(cfg.granularity, cfg.points)).to(self.dev)
        self.example = setup.example_on_device()
        self.gallery = Gallery(cost_axis=cfg.cost_axis, eps=cfg.eps)
        self.history: list[dict[str, Any]] = []
        self.out = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.ckpt = CheckpointDir(self.out) if self.out is not None else None
        self.allow_new_data = allow_new_data
        # The training loader is not read again for it: a wrapper may count or log its reads.
        first = setup.first_batch
        self.data = ({"train": data_fingerprint(setup.loader, setup.batch_fn, first=first),
                      "val": data_fingerprint(setup.val_loader, setup.batch_fn,
                                              first=first if setup.val_loader is setup.loader else None)}
                     if self.ckpt is not None else None)
        self.base_cost: Cost | None = None
        self.trainer = ChildTrainer(self.base_gm, setup, cfg, base_cost=Cost(0, 0), run_rng=self.rng)

    @property
    def loaders(self) -> tuple[Any, Any]:
        return (self.setup.loader, self.setup.val_loader)

    # ---------------------------------------------------------------- models and entries
    def model_from(self, plan: GrowthPlan, state: dict[str, torch.Tensor] | None) -> torch.fx.GraphModule:
        return self.trainer.model_from(plan, state)

    def materialize(self, e: Entry) -> torch.fx.GraphModule:
        assert e.state is not None
        return self.model_from(e.plan, e.state)

    def add_entry(self, m: nn.Module, *, parent: int | None, rnd: int, kind: str) -> Entry:
        s = self.setup
        metrics = evaluate(m, s.val_loader, loss_fn=s.loss_fn, batch_fn=s.batch_fn, device=self.dev)
        self.gallery.val_size = int(metrics["n"])
        plan = state_of(m).plan.copy()  # type: ignore[union-attr]
        e = Entry(
            self.gallery.next_id(), parent, measure(m, self.example, latency=self.cfg.wants_latency),
            1.0 - metrics["accuracy"], metrics["loss"], plan, rnd, kind, state=snapshot(m),
        )
        if self.ckpt is not None:
            self.ckpt.write_entry(e.id, e.state)
        return self.gallery.add(e)

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
            "format": "growkit.grow-checkpoint", "version": 1, "config": self.cfg.to_json(), "progress": prog,
            "gallery": self.gallery.to_dict(), "history": self.history, "optimizers": opt_meta,
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": capture_rng(self.rng, self.loaders),
            "method_state": self.method.state_dict(), "data": self.data,
        }
        self.ckpt.write(state, tensors)

    def load(self) -> Saved | None:
        assert self.ckpt is not None
        got = self.ckpt.read()
        if got is None:
            logger.info("no checkpoint in %s: starting a new run", self.out)
            return None
        state, tensors = got
        if state.get("format") != "growkit.grow-checkpoint":
            raise InputError(f"{self.out} does not hold a grow() checkpoint")
        check_same_settings(state["config"], self.cfg.to_json(),
                            api="pass the original settings or use a new checkpoint_dir",
                            cli="pass the original options or use a new --out directory")
        if state.get("data") != self.data:
            if not self.allow_new_data:
                raise InputError(
                    f"resume=True on other data than the checkpointed run's (its data: {state.get('data')}; "
                    f"now: {self.data}); pass the same loaders, or allow_new_data=True to continue on these"
                )
            logger.warning("resuming %s on other data than it was checkpointed with (allow_new_data=True)", self.out)
        for d in state["gallery"]["entries"]:
            self.gallery.add(Entry.from_dict(d, self.ckpt.read_entry(int(d["id"]))))
        self.history[:] = state["history"]
        self.method.load_state_dict(state.get("method_state") or {})
        return state, tensors

    def restore_rng(self, saved: Saved) -> None:
        """Every RNG state of ``saved`` (the run's generator, torch's, the loaders')."""
        restore_rng(saved[0]["rng"], self.rng, self.loaders)

    # ---------------------------------------------------------------- the loop
    def run(self, rounds: int, resume: bool) -> GrowResult:
        """The loop, holding ``checkpoint_dir``'s lock (a second run on it gets a LockError)."""
        with self.ckpt.lock() if self.ckpt is not None else contextlib.nullcontext():
            return self._run(rounds, resume)

    def _run(self, rounds: int, resume: bool) -> GrowResult:
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
                self.restore_rng(saved)
                saved = None
        for rnd in range(first, rounds + 1):
            self.method.round(self, rnd, saved)
            saved = None
            if self.out is not None:
                self.write_summary()
        best = self.gallery.best(self.budget, self.base_cost)
        if best.kind == "base" and rounds > 0:
            self.warn_base_returned(base_entry)
        tail: dict[str, Any] = {"total_s": time.perf_counter() - t0, "executor": self.executor.name}
        tail.update(getattr(self.executor, "stats", {}))
        history = [dict(h) for h in self.history] + [tail]
        result = GrowResult(self.materialize(best), self.gallery, best.plan.copy(), history,
                            base_entry, self.budget)
        if self.out is not None:
            self.write_summary()
        return result

    def warn_base_returned(self, base: Entry) -> None:
        """Say why the base comes back: every child scored below it, or every child collapsed
        (diverged, or fell below half the base's accuracy), which points at the learning rate."""
        grown = [e for e in self.gallery if e.kind == "grown"]
        stopped = [h for h in self.history if str(h.get("note", "")).startswith(STOPPED[:7])]
        base_acc = 1 - base.val_error
        collapsed = [e for e in grown if 1 - e.val_error < 0.5 * base_acc]
        tried = len(grown) + len(stopped)
        cfg = self.cfg
        if tried and len(collapsed) + len(stopped) == tried:
            logger.warning(
                "every grown child collapsed (%d of %d diverged, the others fell below half the base's validation "
                "accuracy %.4f): the likely cause is the learning rate (lr=%g; new parameters at most %g); try a "
                "lower lr, or lower new_lr_max / new_lr_mult; returning the base model",
                len(stopped), tried, base_acc, cfg.lr, min(cfg.lr * cfg.new_lr_mult, cfg.new_lr_max))
        elif grown:
            best = max(grown, key=lambda e: 1 - e.val_error)
            within = "" if self.budget is None else " within the budget"
            logger.warning("no grown model beat the base%s (best child: val acc %.4f, base %.4f); returning the "
                           "base model", within, 1 - best.val_error, base_acc)
        elif self.budget is not None:
            logger.warning("no grown model beat the base within the budget; returning the base model")

    def finetune(self, rnd: int, grown: torch.fx.GraphModule, parent: Entry, rec: dict[str, Any],
                 saved: Saved | None) -> None:
        """Fine-tune a grown model in place (checkpointed every epoch), add its entry, end the round.

        For growth methods that search in this process; ``rec`` is the round's history record.
        A divergence is rolled back and retried once (:meth:`ChildTrainer.tune_with_rollback`).
        """
        plan = state_of(grown).plan.copy()  # type: ignore[union-attr]
        job = TuneJob(rnd, 0, parent.id, plan, None, len(parent.plan), 0, new_resizes=len(parent.plan.resizes))

        def save(p: dict[str, Any], work: nn.Module | None = None, opts: Any = None, sched: Any = None) -> None:
            self.save({"round": rnd, "parent": parent.id, "plan": plan.to_dict(), **p}, work=work, opts=opts,
                      sched=sched)

        res = self.trainer.tune_with_rollback(job, grown, save=save, resume=saved)
        rec.update(res.rec)
        if res.state is not None:
            self.add_trained(res, rec)
        else:
            logger.warning("round %d: %s; nothing grown", rnd, rec["note"])
        self.save({"round": rnd, "phase": "round_end"})

    def write_summary(self) -> None:
        """Human-facing files beside the checkpoints: gallery.json and the best model."""
        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "gallery.json", {"gallery": self.gallery.to_dict(), "history": self.history})
        # Re-building a model draws initial weights: keep the run's RNG stream untouched by it, so a
        # resumed run (which does not re-write these files) draws the same numbers.
        with torch.random.fork_rng(devices=[]):
            save_model(self.materialize(self.gallery.best(self.budget, self.base_cost)), self.out / "best")
