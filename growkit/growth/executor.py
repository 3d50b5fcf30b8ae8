"""Executors: where the jobs of a Petridish round run.

A round's schedule is fixed by the driver before any job starts: ``children`` parents drawn from
the gallery's epsilon-hull (the parent queue), each with a seed. Every child is one weak-learning
job (the candidate queue) followed by one fine-tuning job (the children queue); see
:mod:`growkit.growth.jobs`. An executor sees only the jobs and a :class:`ChildHost` (the round,
:mod:`growkit.growth.petridish`), never the run. Results are handed back in child order as soon
as every earlier child of the round is in, so the gallery, its hull and the next round's parents do not depend
on which worker finished first, and ``executor="local"`` and ``executor="ray"`` give the same
gallery for the same seed.

* :class:`LocalExecutor` (default) runs the jobs one after another in the calling process and
  checkpoints after every epoch of every job.
* :class:`RayExecutor` runs them on a pool of Ray actors (``num_workers``, CPUs and GPUs per
  worker), weak-learning and fine-tuning jobs of different children at the same time. Models
  travel as plans plus safetensors bytes; the base architecture travels once per worker (pickled
  by Ray) and is traced there again. A worker that dies is replaced and its job retried
  ``max_retries`` times, then that child is dropped with a note in the history; the gallery,
  which lives in the driver, is never lost. An exception raised by a job itself (a bug, out of
  memory) is raised in the driver, as the local executor would. Checkpoints are written whenever
  a child is added; a resumed run re-runs the children that were still in flight.

Bit-identical galleries across executors need the same torch thread count in the driver and in
the workers (``threads=``; CPU kernels reduce in a thread-dependent order) and no latency cost
axis (latencies measured on busy workers differ).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from ..core.cost import Cost
from ..core.surgery import growable, trace_options
from ..errors import InputError, ResourceError
from ..runsetup import RunSetup
from .config import GrowConfig
from .jobs import ChildTrainer, TuneJob, TuneResult, WeakJob, WeakResult, pack_state, unpack_state

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "get_executor", "ChildHost", "WorkerSpec", "build_trainer"]

logger = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a worker process needs to build its :class:`ChildTrainer`: the base architecture (the
    user's model, pickled by Ray once per worker; its recorded timm name alone would not carry
    constructor arguments such as ``channels``), the run's data set-up and config. Weights always
    travel as safetensors with each job."""

    module: nn.Module
    setup: RunSetup
    cfg: GrowConfig
    base_cost: Cost
    threads: int


class ChildHost(Protocol):
    """The round an executor runs: where its jobs come from and where finished children go.

    Children are handed back with :meth:`done` in the order of the round's jobs.
    """

    def run_here(self, job: WeakJob) -> None:
        """Run a whole child (weak learning, then fine-tuning) in this process, checkpointed."""

    def tune_job(self, weak: WeakResult) -> TuneJob:
        """The fine-tuning job of a child whose weak learning grew something."""

    def done(self, weak: WeakResult | None, tune: TuneResult | None, index: int, note: str = "") -> None:
        """Record a finished (or dropped) child."""

    def worker_spec(self, device: str, threads: int) -> WorkerSpec:
        """What a worker needs to build its trainer (see :class:`WorkerSpec`)."""


class Executor:
    """Runs the child jobs of one round and hands finished children to the host in child order."""

    name = ""

    def run_round(self, jobs: Sequence[WeakJob], host: ChildHost) -> None:
        """Run ``jobs`` (the round's children not yet done, in child order)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (called once, when grow() ends)."""


class LocalExecutor(Executor):
    """Every job in the calling process, in child order, checkpointed after every epoch."""

    name = "local"

    def run_round(self, jobs: Sequence[WeakJob], host: ChildHost) -> None:
        for job in jobs:
            host.run_here(job)


@dataclass
class _Worker:
    actor: Any
    id: int


class RayExecutor(Executor):
    """Child jobs on Ray actors (see the module docstring).

    Args:
        num_workers: actors running jobs at once.
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``); ``None`` joins a running
            ``ray.init`` of this process or starts a local Ray with ``num_workers * num_cpus`` CPUs.
        num_cpus / num_gpus: Ray resources per worker (a worker with GPUs trains on ``cuda``).
        threads: torch threads per worker (default: ``num_cpus``, rounded up). Use the driver's
            count for results bit-identical to ``executor="local"``.
        max_retries: how often a job whose worker died is retried on a fresh worker before its
            child is dropped.
        runtime_env: passed to ``ray.init`` when growkit starts or joins a cluster (e.g. to ship
            growkit's code to a cluster that does not have it installed).
        start_timeout_s: how long to wait for the workers to start before raising
            :class:`growkit.ResourceError` (e.g. a cluster without the CPUs / GPUs asked for).
    """

    name = "ray"

    def __init__(self, num_workers: int = 2, *, address: str | None = None, num_cpus: float = 1,
                 num_gpus: float = 0, threads: int | None = None, max_retries: int = 1,
                 runtime_env: dict[str, Any] | None = None, start_timeout_s: float = 300.0) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise InputError(f"num_workers must be a positive int, got {num_workers!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise InputError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if importlib.util.find_spec("ray") is None:
            raise InputError('executor="ray" needs Ray: pip install "growkit[ray]"')
        self.num_workers, self.address = num_workers, address
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        if not num_cpus > 0 or num_gpus < 0:
            raise InputError(f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus!r} / {num_gpus!r}")
        self.threads = threads if threads is not None else max(1, math.ceil(num_cpus))
        self.start_timeout_s = start_timeout_s
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self._owns_ray = False
        self._spec_ref: Any = None
        self._workers: list[_Worker] = []
        self._next_worker_id = 0
        self._actor_cls: Any = None
        self.stats: dict[str, Any] = {}

    # ---------------------------------------------------------------- workers
    def _start(self, host: ChildHost) -> None:
        import ray

        if not ray.is_initialized():
            kw: dict[str, Any] = {"runtime_env": self.runtime_env} if self.runtime_env else {}
            if self.address is None:
                ray.init(num_cpus=math.ceil(self.num_workers * self.num_cpus),
                         num_gpus=math.ceil(self.num_workers * self.num_gpus) or None,
                         include_dashboard=False, log_to_driver=True, **kw)
            else:
                ray.init(address=self.address, **kw)
            self._owns_ray = True
        if self._spec_ref is None:  # a new grow() call
            self.stats = {"jobs": 0, "retries": 0, "dropped": 0, "workers_started": 0, "startup_s": 0.0}
            self._spec_ref = ray.put(host.worker_spec("cuda" if self.num_gpus else "cpu", self.threads))
            self._actor_cls = ray.remote(_RayWorker).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                               max_restarts=0, max_task_retries=0)
        t = time.perf_counter()
        new = [self._new_worker() for _ in range(self.num_workers - len(self._workers))]
        # Wait until the workers have built their trainers, so start-up is reported on its own.
        refs = [w.actor.ready.remote() for w in new]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if len(ready) < len(refs):
            raise ResourceError(
                f"{len(refs) - len(ready)} of {len(refs)} Ray workers did not start within {self.start_timeout_s:.0f} s: "
                f"each needs {self.num_cpus} CPU(s) and {self.num_gpus} GPU(s), the cluster has "
                f"{ray.cluster_resources()}; use fewer num_workers or smaller num_cpus / num_gpus"
            )
        ray.get(ready)  # a worker that failed to build its trainer raises here
        self.stats["startup_s"] += time.perf_counter() - t

    def _new_worker(self) -> _Worker:
        w = _Worker(self._actor_cls.remote(self._spec_ref), self._next_worker_id)
        self._next_worker_id += 1
        self._workers.append(w)
        self.stats["workers_started"] += 1
        return w

    def _replace(self, dead: _Worker) -> _Worker:
        import ray

        self._workers = [w for w in self._workers if w is not dead]
        try:
            ray.kill(dead.actor, no_restart=True)
        except Exception:  # already gone
            pass
        return self._new_worker()

    def close(self) -> None:
        import ray

        for w in self._workers:
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:
                pass
        self._workers = []
        self._spec_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # ---------------------------------------------------------------- the round
    def run_round(self, jobs: Sequence[WeakJob], host: ChildHost) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        # Jobs in flight at a crash are re-run from their start (the host hands them in again).
        self._start(host)
        order = [j.index for j in jobs]
        queue: list[tuple[str, Any, int]] = [("weak", j, 0) for j in jobs]  # (kind, job, attempt)
        idle = list(self._workers)
        inflight: dict[Any, tuple[str, Any, int, _Worker]] = {}
        finished: dict[int, tuple[WeakResult | None, TuneResult | None, str]] = {}
        weak_of: dict[int, WeakResult] = {}
        nxt = 0

        while queue or inflight:
            while idle and queue:
                kind, job, attempt = queue.pop(0)
                w = idle.pop(0)
                packed = _packed(job)
                ref = (w.actor.weak.remote(packed) if kind == "weak" else w.actor.tune.remote(packed))
                inflight[ref] = (kind, job, attempt, w)
                self.stats["jobs"] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                kind, job, attempt, w = inflight.pop(ref)
                try:
                    res = ray.get(ref)
                except RayTaskError as exc:
                    # The job itself raised: as deterministic as in the local executor, so raise it.
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else exc) from exc
                except (RayActorError, WorkerCrashedError) as exc:
                    w = self._replace(w)
                    why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                    if attempt < self.max_retries:
                        logger.warning("round %d child %d: worker died in a %s job (%s); retrying on a new worker",
                                       job.round, job.index, kind, why)
                        self.stats["retries"] += 1
                        queue.insert(0, (kind, job, attempt + 1))
                    else:
                        logger.warning("round %d child %d: %s job lost its worker %d times (%s); child dropped",
                                       job.round, job.index, kind, attempt + 1, why)
                        self.stats["dropped"] += 1
                        finished[job.index] = (weak_of.get(job.index), None,
                                               f"dropped: its worker died in the {kind} job "
                                               f"({attempt + 1} attempt{'s' if attempt else ''})")
                    idle.append(w)
                    continue
                idle.append(w)
                if kind == "weak":
                    res.state = unpack_state(res.state)
                    weak_of[res.index] = res
                    if res.plan is None:
                        finished[res.index] = (res, None, "")
                    else:
                        # Children first: a finished child frees memory and reaches the gallery sooner.
                        queue.insert(0, ("tune", host.tune_job(res), 0))
                        res.state = None  # the fine-tuning job holds the weights now
                else:
                    res.state = unpack_state(res.state)
                    finished[res.index] = (weak_of[res.index], res, "")
            while nxt < len(order) and order[nxt] in finished:
                i = order[nxt]
                weak, tune, note = finished.pop(i)
                host.done(weak, tune, i, note)
                nxt += 1


def _packed(job: WeakJob | TuneJob) -> WeakJob | TuneJob:
    out = type(job)(**vars(job))
    out.state = pack_state(unpack_state(job.state))
    return out


class _RayWorker:
    """A Ray actor holding one :class:`ChildTrainer` (built once from the run's worker spec)."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(int(spec.threads))
        self.trainer: ChildTrainer = build_trainer(spec)
        self.pid = os.getpid()

    def ready(self) -> int:
        return self.pid

    def weak(self, job: WeakJob) -> WeakResult:
        job.state = unpack_state(job.state)
        res = self.trainer.weak_learn(job)
        res.state = pack_state(res.state)
        return res

    def tune(self, job: TuneJob) -> TuneResult:
        job.state = unpack_state(job.state)
        res = self.trainer.finetune(job)
        res.state = pack_state(res.state)
        return res


def build_trainer(spec: WorkerSpec) -> ChildTrainer:
    """A :class:`ChildTrainer` from a :class:`WorkerSpec` (in a worker process)."""
    setup = spec.setup
    base_gm = growable(spec.module, setup.example, **trace_options(spec.cfg.granularity, spec.cfg.points))
    return ChildTrainer(base_gm.to(setup.device), setup, spec.cfg, base_cost=spec.base_cost)


def get_executor(executor: "str | Executor", options: dict[str, Any] | None = None) -> Executor:
    """``"local"``, ``"ray"`` (``options`` go to :class:`RayExecutor`) or an :class:`Executor`."""
    if isinstance(executor, Executor):
        if options:
            raise InputError("executor_options apply to executor names; configure an Executor instance directly")
        return executor
    if executor == "local":
        if options:
            raise InputError(f"the local executor takes no options, got {sorted(options)}")
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor(**(options or {}))
    raise InputError(f"unknown executor {executor!r}; use 'local', 'ray' or a growkit.growth.executor.Executor")
