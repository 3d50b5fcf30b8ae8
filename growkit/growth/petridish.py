"""The Petridish round: draw the round's parents and seeds, hand the children's jobs to the
executor, keep the books of finished children.

A round's schedule is fixed before any job runs: ``children`` parents drawn from the gallery's
epsilon-hull, each child with a weak-learning seed and a fine-tuning seed. :class:`PetridishRound`
is the :class:`growkit.growth.executor.ChildHost` the executor works with: it turns the schedule
into jobs (:mod:`growkit.growth.jobs`), runs a child in this process with a checkpoint after every
epoch, and records finished children in the run's history and gallery.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..core.plan import GrowthPlan
from ..core.safecopy import copy_module
from ..errors import InputError
from .executor import WorkerSpec
from .jobs import TuneJob, TuneResult, WeakJob, WeakResult
from .methods import GrowthMethod, register_method
from .run import GrowRun, Saved

__all__ = ["Petridish", "PetridishRound"]

logger = logging.getLogger(__name__)


@register_method
class Petridish(GrowthMethod):
    """Petridish (the default): weak learning of candidates while the model trains, L1 selection,
    concat + projection finalization, fine-tuning."""

    name = "petridish"

    def __init__(self, **options: Any) -> None:
        if options:
            raise InputError(f"petridish takes its settings as grow() arguments, not method_options {sorted(options)}")
        super().__init__()

    def round(self, run: GrowRun, rnd: int, saved: Saved | None) -> None:
        PetridishRound(run, rnd, saved).run()


class PetridishRound:
    """One Petridish round of a run (see the module docstring); ``saved`` resumes it mid-way."""

    def __init__(self, run: GrowRun, rnd: int, saved: Saved | None) -> None:
        self.grow_run, self.rnd, self.saved = run, rnd, saved
        self.prog: dict[str, Any] = {}

    def run(self) -> None:
        """Draw the round's parents and seeds (the schedule), then let the executor run the children."""
        run, rnd, saved = self.grow_run, self.rnd, self.saved
        if saved is None:
            jobs = []
            for i in range(run.cfg.children):
                parent = run.gallery.sample_parent(run.rng, run.budget, run.base_cost)
                jobs.append({"index": i, "parent": parent.id, "seed": run.rng.getrandbits(63),
                             "tune_seed": run.rng.getrandbits(63)})
            self.prog = {"round": rnd, "phase": "jobs", "jobs": jobs, "done": []}
            run.save(self.prog)
        else:
            p = saved[0]["progress"]
            self.prog = {"round": rnd, "phase": "jobs", "jobs": p["jobs"], "done": list(p["done"])}
            # The run's generator moved on when the round was drawn; every job re-seeds its own.
            run.restore_rng(saved)
        pending = [self.weak_job(s) for s in self.prog["jobs"] if s["index"] not in self.prog["done"]]
        run.executor.run_round(pending, self)
        run.save({"round": rnd, "phase": "round_end"})

    # ---------------------------------------------------------------- jobs
    def spec(self, index: int) -> dict[str, Any]:
        return next(s for s in self.prog["jobs"] if s["index"] == index)

    def weak_job(self, spec: dict[str, Any]) -> WeakJob:
        parent = self.grow_run.gallery[spec["parent"]]
        return WeakJob(self.rnd, spec["index"], parent.id, parent.plan, parent.state, parent.cost, spec["seed"])

    def tune_job(self, weak: WeakResult) -> TuneJob:
        assert weak.plan is not None
        spec = self.spec(weak.index)
        parent = self.grow_run.gallery[spec["parent"]]
        return TuneJob(self.rnd, spec["index"], parent.id, weak.plan, weak.state, len(parent.plan),
                       spec["tune_seed"])

    def worker_spec(self, device: str, threads: int) -> WorkerSpec:
        run = self.grow_run
        model = run.user_model
        if any(t.device.type != "cpu" for t in model.state_dict().values()):
            model = copy_module(model).cpu()
        setup = dataclasses.replace(run.setup, example=tuple(a.cpu() for a in run.setup.example),
                                    device=torch.device(device), progress=False)
        assert run.base_cost is not None
        return WorkerSpec(model, setup, run.cfg, run.base_cost, threads)

    # ---------------------------------------------------------------- a child in this process
    def resume_of(self, index: int) -> Saved | None:
        """The checkpoint to continue child ``index`` from, if the run stopped inside it."""
        saved = self.saved
        if saved is not None and saved[0]["progress"].get("job") == index:
            return saved
        return None

    def run_here(self, job: WeakJob) -> None:
        """One child in this process, checkpointed after every epoch of both of its jobs."""
        run, i = self.grow_run, job.index
        resume = self.resume_of(i)

        def hook(extra: dict[str, Any]):
            def save(p: dict[str, Any], work: nn.Module | None = None, opts: Any = None, sched: Any = None) -> None:
                run.save({**self.prog, "job": i, **extra, **p}, work=work, opts=opts, sched=sched)
            return save

        phase = resume[0]["progress"]["phase"] if resume is not None else "search"
        if phase == "search":
            weak = run.trainer.weak_learn(job, save=hook({}), resume=resume)
            if weak.plan is None:
                self.done(weak, None, i)
                return
            save = hook({"plan": weak.plan.to_dict(), "rec": weak.rec})
            tune = run.trainer.finetune(self.tune_job(weak), save=save,
                                        before_train=lambda m: save({"phase": "finetune", "epoch": 0, "stats": {}},
                                                                    work=m))
        else:
            assert resume is not None
            p = resume[0]["progress"]
            # A checkpoint is a file: its plan is validated like any other plan read from disk.
            weak = WeakResult(self.rnd, i, job.parent, GrowthPlan.from_dict(p["plan"]), None, p["rec"])
            tune = run.trainer.finetune(self.tune_job(weak), save=hook({"plan": p["plan"], "rec": p["rec"]}),
                                        resume=resume)
        self.done(weak, tune, i)

    # ---------------------------------------------------------------- bookkeeping
    def done(self, weak: WeakResult | None, tune: TuneResult | None, index: int, note: str = "") -> None:
        """Record a finished child (history; gallery if it has weights) and checkpoint the round."""
        run, spec = self.grow_run, self.spec(index)
        rec: dict[str, Any] = {"round": self.rnd, "child": index, "parent": spec["parent"]}
        rec.update(weak.rec if weak is not None else {})
        rec.update(tune.rec if tune is not None else {})
        if note:
            rec["note"] = note
        if tune is not None and tune.state is not None:
            run.add_trained(tune, rec)
        else:
            logger.warning("round %d child %d: %s; nothing grown", self.rnd, index, rec.get("note", "no result"))
        run.history.append(rec)
        self.prog["done"].append(index)
        run.save(self.prog)
