"""The two jobs of a Petridish growth round, as functions of plain data.

A round draws parents from the gallery (the parent queue), then for every child runs a
**weak-learning job** (inject candidates on the parent, keep training, score, choose points,
finalize) and a **fine-tuning job** (train the finalized child, evaluate it, measure its cost).
Jobs carry only plans (JSON-able dicts), weights (tensor dicts; safetensors bytes between
processes, see :func:`pack_state`) and a seed, so the same job gives the same child in the driver
process (``executor="local"``) and on a Ray worker. Everything random inside a job is drawn from
its own seed: torch's, Python's and numpy's global generators and the loaders' generators are
seeded at job start and restored afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..checkpoint import loader_generators, restore_training, snapshot
from ..core.candidates import inject
from ..core.cost import Cost, measure
from ..core.finalize import finalize
from ..core.plan import BRANCHES, GrowthPlan
from ..core.selection import choose_points
from ..core.deepen import DEPTH, new_parameters
from ..core.surgery import apply_plan, state_of
from ..errors import NonFiniteLoss, ResourceError
from ..newparams import OldFrozen, growth_optimizer
from ..runsetup import RunSetup
from ..train import PhaseStats, cosine_schedule, evaluate, num_batches, train_steps
from .config import GrowConfig

__all__ = ["WeakJob", "WeakResult", "TuneJob", "TuneResult", "ChildTrainer", "pack_state", "unpack_state",
           "job_seed_scope", "STOPPED", "RETRIED"]

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
STOPPED = "stopped and rolled back to the last good model: "
"""How a job's note starts when a non-finite loss or an exploding eta stopped it."""
RETRIED = "rolled back to before the growth and retried with the new parameters' learning rate halved: "
"""How a child's note starts when its first fine-tuning diverged and the retry succeeded."""
SaveHook = Callable[..., None]


def pack_state(state: State | None) -> bytes | None:
    """Tensor dict -> safetensors bytes (how weights travel between processes; no pickle)."""
    if state is None:
        return None
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def unpack_state(blob: bytes | State | None) -> State | None:
    """Inverse of :func:`pack_state` (a dict passes through)."""
    if blob is None or isinstance(blob, dict):
        return blob
    from safetensors.torch import load

    return load(blob)


@dataclass
class WeakJob:
    """Weak learning for child ``index`` of round ``round`` on gallery entry ``parent``."""

    round: int
    index: int
    parent: int
    plan: GrowthPlan
    state: Any  # State, or safetensors bytes in transit
    parent_cost: Cost
    seed: int


@dataclass
class WeakResult:
    """The finalized child (``plan`` is ``None`` when nothing was grown; ``rec`` says why)."""

    round: int
    index: int
    parent: int
    plan: GrowthPlan | None
    state: Any
    rec: dict[str, Any] = field(default_factory=dict)


@dataclass
class TuneJob:
    """Fine-tuning of a finalized child; ``new_edits`` / ``new_resizes``: where the edits / resizes
    grown in this round start in its plan (``new_resizes=None``: no resize is new)."""

    round: int
    index: int
    parent: int
    plan: GrowthPlan
    state: Any
    new_edits: int
    seed: int
    new_resizes: int | None = None


@dataclass
class TuneResult:
    """A trained child with its validation metrics and cost (``state`` is ``None`` if it was stopped)."""

    round: int
    index: int
    parent: int
    plan: GrowthPlan
    state: Any
    metrics: dict[str, float] | None
    cost: Cost | None
    rec: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def job_seed_scope(seed: int, loaders: Iterable[Any], device: torch.device) -> Iterator[None]:
    """Seed torch (CPU, and ``device`` if CUDA), Python's and numpy's global generators and the
    loaders' generators for one job; restore all of them afterwards."""
    import numpy as np

    gens = [g for g in loader_generators(loaders) if g is not None]
    saved = [g.get_state() for g in gens]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            # Not torch.manual_seed: that also reseeds every CUDA device, which fork_rng only
            # restores for ``devices``.
            torch.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (2 ** 32))
            for i, g in enumerate(gens):
                g.manual_seed((seed + 1 + i) % (2 ** 63))
            yield
    finally:
        for g, s in zip(gens, saved):
            g.set_state(s)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _rng_restore_point(loaders: Iterable[Any], device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields a function that puts torch's (CPU and ``device``), Python's, numpy's and the loaders'
    generators back to their state at entry (the RNG part of a rollback)."""
    import numpy as np

    gens = [g for g in loader_generators(loaders) if g is not None]
    saved = ([g.get_state() for g in gens], torch.get_rng_state(), random.getstate(), np.random.get_state(),
             torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore() -> None:
        for g, st in zip(gens, saved[0]):
            g.set_state(st)
        torch.set_rng_state(saved[1])
        random.setstate(saved[2])
        np.random.set_state(saved[3])
        if saved[4] is not None:
            torch.cuda.set_rng_state(saved[4], device)

    yield restore


class ChildTrainer:
    """Runs weak-learning and fine-tuning jobs against one base model, data and grow() config.

    The driver holds one (``executor="local"``); each Ray worker builds its own from the same
    pieces. A ``save`` hook (driver only) checkpoints a job after every epoch; ``resume`` continues
    it from such a checkpoint, restoring ``run_rng`` (the run's generator, driver only) with it.
    """

    def __init__(self, base_gm: torch.fx.GraphModule, setup: RunSetup, cfg: GrowConfig, *, base_cost: Cost,
                 run_rng: random.Random | None = None) -> None:
        self.base_gm = base_gm
        self.setup = setup
        self.example = setup.example_on_device()
        self.loader, self.val_loader = setup.loader, setup.val_loader
        self.cfg = cfg
        self.base_cost, self.budget = base_cost, cfg.budget
        self.loss_fn, self.batch_fn = setup.loss_fn, setup.batch_fn
        self.dev = setup.device
        self.progress = setup.progress
        self.run_rng = run_rng

    def model_from(self, plan: GrowthPlan, state: State | None) -> torch.fx.GraphModule:
        """Replay ``plan`` on the base model and load ``state`` (if given)."""
        m = apply_plan(self.base_gm, plan, self.example)
        if state is not None:
            m.load_state_dict(state)
        return m.to(self.dev)

    def scope(self, seed: int) -> contextlib.AbstractContextManager[None]:
        return job_seed_scope(seed, (self.loader, self.val_loader), self.dev)

    # ------------------------------------------------------------------ weak learning
    def weak_learn(self, job: WeakJob, *, save: SaveHook | None = None,
                   resume: tuple[dict[str, Any], State] | None = None) -> WeakResult:
        """Inject candidates on the parent, train (weak learning), choose points and finalize.

        ``save(prog, work, opts, sched)`` is called after every epoch; ``resume`` is such a
        checkpoint (``(state, tensors)``, its progress holding ``epoch``, ``counter``, ``stats``).
        """
        with self.scope(job.seed):
            return self._weak_learn(job, save, resume)

    def _weak_learn(self, job: WeakJob, save: SaveHook | None, resume) -> WeakResult:
        cfg = self.cfg
        rec: dict[str, Any] = dict(resume[0]["progress"].get("rec", {})) if resume is not None else {}
        t = time.perf_counter()
        cm = inject(self.model_from(job.plan, unpack_state(job.state)), points=cfg.points, ops=cfg.ops,
                    max_inputs=cfg.max_inputs, l1=cfg.l1, normalize_grad=True, tie=cfg.tie).to(self.dev)
        opt, _ = growth_optimizer(cm, [], exclude=list(cm.candidate_parameters()), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
        # Candidates get their own Adam: their (normalised) boosting gradient has another scale
        # than the loss gradient of the base weights.
        cand_opt = torch.optim.Adam(cm.candidate_parameters(), lr=cfg.candidate_lr)
        epochs = cfg.search_epochs
        steps = epochs * num_batches(self.loader)
        sched = cosine_schedule(opt, steps)
        opts = {"base": opt, "candidates": cand_opt}
        counter = {"n": 0}
        stats, start = PhaseStats(), 0
        if resume is not None:
            prog = resume[0]["progress"]
            self.restore(resume, cm, opts, sched)
            counter["n"], stats, start = prog["counter"], PhaseStats(**prog["stats"]), prog["epoch"]

        def after_step() -> None:
            # Score only the second half of weak learning: early fits are from random init.
            counter["n"] += 1
            if counter["n"] == steps // 2:
                cm.reset_scores()

        def on_epoch_end(ep: int, st: PhaseStats) -> None:
            if save is not None:
                save({"phase": "search", "epoch": ep + 1, "counter": counter["n"], "stats": vars(st), "rec": rec},
                     work=cm, opts=opts, sched=sched)

        try:
            st = train_steps(cm, self.loader, [opt, cand_opt], epochs=epochs, scheduler=sched, loss_fn=self.loss_fn,
                             extra_loss=cm.extra_loss, batch_fn=self.batch_fn, device=self.dev,
                             progress=self.progress, desc=f"round {job.round} weak learning", after_step=after_step,
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
                f"out of memory while training {n} candidates (round {job.round}, {len(job.plan)} grown "
                f"branches in the parent) on {self.dev}: pass points=[...] to grow at fewer points at once, "
                "max_inputs=1 or fewer ops, or use a smaller batch"
            ) from exc
        except NonFiniteLoss as exc:
            rec["note"] = STOPPED + str(exc)
            return WeakResult(job.round, job.index, job.parent, None, None, rec)
        rec["search_s"] = rec.get("search_s", 0.0) + time.perf_counter() - t
        rec["search_train_acc"] = st.train_accuracy
        rec["scores"] = cm.scores()

        # Choose where to grow: fit to the negative gradient per unit of added cost.
        chosen, why, edges = choose_points(cm, self.example, current=job.parent_cost, base=self.base_cost,
                                           budget=self.budget, max_ops=cfg.max_ops, selection=cfg.selection,
                                           generator=_gen(random.Random(job.seed)),
                                           max_points=cfg.points_per_round)
        rec["chosen"] = chosen
        if not chosen:
            rec["note"] = why
            return WeakResult(job.round, job.index, job.parent, None, None, rec)
        grown = finalize(cm, edges=edges)  # within a latency budget too: choose_points measured it
        plan = state_of(grown).plan.copy()  # type: ignore[union-attr]
        state = snapshot(grown)
        return WeakResult(job.round, job.index, job.parent, plan, state, rec)

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, job: TuneJob, *, save: SaveHook | None = None,
                 resume: tuple[dict[str, Any], State] | None = None,
                 before_train: Callable[[torch.fx.GraphModule], None] | None = None) -> TuneResult:
        """Fine-tune the child (fresh cosine schedule, new parameters under the new-parameter rule),
        then evaluate it and measure its cost; see :meth:`tune_with_rollback` for a divergence.
        ``before_train(model)`` sees the built child first (the driver checkpoints it there)."""
        with self.scope(job.seed):
            grown = self.model_from(job.plan, None if resume is not None else unpack_state(job.state))
            if before_train is not None:
                before_train(grown)
            return self.tune_with_rollback(job, grown, save=save, resume=resume)

    def tune_with_rollback(self, job: TuneJob, grown: torch.fx.GraphModule, *, save: SaveHook | None = None,
                           resume: tuple[dict[str, Any], State] | None = None) -> TuneResult:
        """:meth:`train_child`, rolled back when it diverges (a non-finite loss or an exploding eta):
        the model's weights and every RNG go back to their state before the fine-tuning (the
        optimizer and schedule are fresh anyway) and the training runs once more with the new
        parameters' learning rate halved. If that diverges too, the result has no weights and a note
        (the round keeps its last good model). A job resumed from a checkpoint mid fine-tuning no
        longer has the state before it and is not retried."""
        state0 = None if resume is not None else {k: v.detach().clone() for k, v in grown.state_dict().items()}
        with _rng_restore_point((self.loader, self.val_loader), self.dev) as restore_rng:
            try:
                return self.train_child(job, grown, save=save, resume=resume)
            except NonFiniteLoss as exc:
                first = str(exc)
                retried = resume is not None and resume[0]["progress"].get("retry", False)
            if state0 is None or retried:
                return TuneResult(job.round, job.index, job.parent, job.plan, None, None, None,
                                  {"note": STOPPED + first + ("" if retried else " (resumed: not retried)")})
            logger.warning("round %d child %d: %s; rolling back to before the growth and retrying with the new "
                           "parameters' learning rate halved", job.round, job.index, first)
            restore_rng()
            grown.load_state_dict(state0)
            if save is not None:  # a resume from here retries too
                save({"phase": "finetune", "epoch": 0, "stats": {}, "retry": True}, work=grown)
            try:
                res = self.train_child(job, grown, save=save, retry=True)
            except NonFiniteLoss as exc:
                return TuneResult(job.round, job.index, job.parent, job.plan, None, None, None,
                                  {"note": f"{STOPPED}{first}; the retry with the new parameters' learning rate "
                                           f"halved diverged too ({exc}): continued without this growth"})
        res.rec["note"] = RETRIED + first
        return res

    def train_child(self, job: TuneJob, grown: torch.fx.GraphModule, *, save: SaveHook | None = None,
                    resume: tuple[dict[str, Any], State] | None = None, retry: bool = False) -> TuneResult:
        """The training of :meth:`finetune` on a built model (in place, in the caller's RNG scope);
        raises :class:`growkit.NonFiniteLoss` when the loss or an eta blows up. ``retry``: the
        new parameters train at :data:`growkit.newparams.RETRY_LR_SCALE` x their rate."""
        cfg = self.cfg
        rec: dict[str, Any] = {}
        t = time.perf_counter()
        branches = getattr(grown, BRANCHES, {})
        plan_now = state_of(grown).plan  # type: ignore[union-attr]
        new = plan_now.edits[job.new_edits:]
        new_params = [p for e in new for p in branches[e.key].parameters()]
        # A deepening's untrained block parameters are new too (a copied block's weights are not);
        # widened tensors mix trained and new entries and train with the model (the rule sets
        # learning rates per tensor).
        blocks = getattr(grown, DEPTH, {})
        start = len(plan_now.resizes) if job.new_resizes is None else job.new_resizes
        new_params += [p for r in plan_now.resizes[start:] if r.kind == "deepen" for p in new_parameters(blocks[r.key])]
        epochs = cfg.finetune_epochs
        steps_per_epoch = num_batches(self.loader)
        rule = cfg.new_param_rule()
        if resume is not None:
            retry = bool(resume[0]["progress"].get("retry", retry))
        if retry:
            rule = rule.retry()
        opt, mgr = growth_optimizer(grown, new_params, rule=rule, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, steps_per_epoch=steps_per_epoch)
        sched = cosine_schedule(opt, epochs * steps_per_epoch)
        stats, start = PhaseStats(), 0
        if resume is not None:
            prog = resume[0]["progress"]
            self.restore(resume, grown, {"finetune": opt}, sched)
            stats, start = PhaseStats(**prog["stats"]), prog["epoch"]
            if mgr is not None and prog.get("newparams"):
                mgr.load_state_dict(prog["newparams"])

        def on_epoch_end(ep: int, st: PhaseStats) -> None:
            if save is not None:
                save({"phase": "finetune", "epoch": ep + 1, "stats": vars(st), "retry": retry,
                      "newparams": mgr.state_dict() if mgr is not None else []},
                     work=grown, opts={"finetune": opt}, sched=sched)

        # cfg.new_only: the phase's first steps train the new parameters alone (a resumed phase
        # counts the steps already done)
        new_ids = {id(p) for p in new_params}
        frozen_steps = int(round(cfg.new_only * epochs * steps_per_epoch)) - start * steps_per_epoch if new_params else 0
        freeze = OldFrozen((p for p in grown.parameters() if id(p) not in new_ids), frozen_steps)
        try:
            st = train_steps(grown, self.loader, opt, epochs=epochs, scheduler=sched, loss_fn=self.loss_fn,
                             batch_fn=self.batch_fn, device=self.dev, progress=self.progress,
                             desc=f"round {job.round} fine-tune", start_epoch=start,
                             stats=stats, on_epoch_end=on_epoch_end, after_step=freeze.after_step)
        finally:
            freeze.release()
        rec["finetune_s"] = time.perf_counter() - t
        rec["finetune_train_acc"] = st.train_accuracy
        rec["etas"] = {e.point: float(branches[e.key].eta.detach()) for e in new}
        metrics = evaluate(grown, self.val_loader, loss_fn=self.loss_fn, batch_fn=self.batch_fn, device=self.dev)
        cost = measure(grown, self.example, latency=cfg.wants_latency)
        state = snapshot(grown)
        plan = state_of(grown).plan.copy()  # type: ignore[union-attr]
        return TuneResult(job.round, job.index, job.parent, plan, state, metrics, cost, rec)

    # ------------------------------------------------------------------ checkpoint restore
    def restore(self, saved: tuple[dict[str, Any], State], work: nn.Module, opts: dict[str, Any], sched: Any) -> None:
        if self.run_rng is None:
            raise RuntimeError("this ChildTrainer has no run generator: jobs resume only in the driver process")
        restore_training(saved[0], saved[1], work, opts, sched, self.run_rng, (self.loader, self.val_loader))


def _gen(rng: random.Random) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(rng.getrandbits(63))
    return g
