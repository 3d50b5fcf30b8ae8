"""``growkit.grow_stream``: learn a stream of experiences, growing at experience boundaries.

The loop growkit drives for lifelong learning: per experience, train (optionally mixing in a
reservoir replay buffer) while Petridish candidates warm up; at the boundary, finalize the
candidates that pay within the budget and inject fresh ones (exact); evaluate on every
experience to fill the accuracy matrix. ``grow=False`` runs the same loop without growth (naive
fine-tuning, with or without replay) so baselines share every other detail.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..checkpoint import (CheckpointDir, capture_rng, check_same_settings, full_state, load_full_state,
                          optimizer_from_flat, optimizer_to_flat, restore_rng)
from ..core.cost import Budget, measure
from ..errors import InputError, NonFiniteLoss
from .metrics import AccuracyMatrix
from .grower import Grower, GrowthEvent
from ..core.plan import GrowthPlan
from .streams import Stream
from ..core.surgery import growable, state_of
from ..runsetup import set_up_run
from ..train import BatchFn, default_batch_fn, evaluate, train_steps

__all__ = ["grow_stream", "StreamResult", "ReplayBuffer"]

logger = logging.getLogger(__name__)


class ReplayBuffer:
    """Reservoir sampling buffer of ``(x, y)`` samples (Vitter's algorithm R), kept on CPU."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise InputError(f"replay capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return 0 if self.y is None else int(self.y.shape[0])

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().cpu(), y.detach().cpu()
        for i in range(y.shape[0]):
            self.seen += 1
            if len(self) < self.capacity:
                self.x = x[i:i + 1].clone() if self.x is None else torch.cat([self.x, x[i:i + 1]])
                self.y = y[i:i + 1].clone() if self.y is None else torch.cat([self.y, y[i:i + 1]])
            else:
                j = int(torch.randint(0, self.seen, (1,), generator=self.gen))
                if j < self.capacity:
                    assert self.x is not None and self.y is not None
                    self.x[j], self.y[j] = x[i], y[i]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.x is not None and self.y is not None
        idx = torch.randint(0, len(self), (n,), generator=self.gen)
        return self.x[idx], self.y[idx]

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        t = {} if self.x is None else {"replay.x": self.x.contiguous(), "replay.y": self.y.contiguous()}  # type: ignore[union-attr]
        import base64

        gen = base64.b64encode(self.gen.get_state().numpy().tobytes()).decode("ascii")
        return {"capacity": self.capacity, "seen": self.seen, "gen": gen}, t

    def load(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        import base64

        import numpy as np

        self.capacity, self.seen = int(meta["capacity"]), int(meta["seen"])
        self.x, self.y = tensors.get("replay.x"), tensors.get("replay.y")
        self.gen.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(meta["gen"]), dtype=np.uint8).copy()))


class _Mixed:
    """One pass over ``loader`` with replay samples appended to each batch; fills the buffer."""

    def __init__(self, loader: Iterable, batch_fn: BatchFn, buffer: ReplayBuffer | None, fill: bool) -> None:
        self.loader, self.batch_fn, self.buffer, self.fill = loader, batch_fn, buffer, fill

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            x, y = self.batch_fn(batch)
            if self.buffer is not None and not isinstance(x, torch.Tensor):
                raise InputError("replay needs single-tensor inputs; pass replay=0 for multi-input models")
            raw = (x, y)
            if self.buffer is not None and len(self.buffer):
                rx, ry = self.buffer.sample(int(y.shape[0]))
                x, y = torch.cat([x, rx.to(x.device)]), torch.cat([y, ry.to(y.device)])
            if self.buffer is not None and self.fill:
                self.buffer.add(*raw)
            yield x, y


@dataclass
class StreamResult:
    """What :func:`grow_stream` returns."""

    model: nn.Module
    matrix: AccuracyMatrix
    events: list[GrowthEvent] = field(default_factory=list)
    plan: GrowthPlan | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    task_matrix: AccuracyMatrix | None = None

    def growth(self) -> list[dict[str, Any]]:
        """Per experience: parameters after its boundary (``params``), how many that boundary's
        growth added (``params_grown``) and how many the next experience trains (``trainable_params``)."""
        keys = ("experience", "params", "params_grown", "trainable_params")
        return [{k: h.get(k) for k in keys} for h in self.history]

    def save(self, path: str | Path) -> Path:
        """``metrics.json``, ``accuracy.png`` and the final model (plan + safetensors)."""
        from ..io import save, write_json_atomic

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "metrics.json", {**self.matrix.to_dict(), "events": [e.to_dict() for e in self.events],
                                                 "history": self.history, "growth": self.growth(),
                                                 "task_incremental": None if self.task_matrix is None
                                                 else self.task_matrix.to_dict()})
        self.matrix.plot(out / "accuracy.png")
        save(self.model, out / "model")
        return out


def grow_stream(
    model: nn.Module,
    stream: Stream,
    *,
    example_input: Any = None,
    grow: bool = True,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    replay: int = 0,
    budget: Budget | None = None,
    grower_options: dict[str, Any] | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    eval_split: str = "test",
    task_incremental: bool = False,
) -> StreamResult:
    """Train ``model`` (not modified) through ``stream``, growing at experience boundaries.

    Args:
        model: the (pretrained) model; a copy is trained.
        stream: a :class:`growkit.lifelong.streams.Stream`.
        grow: ``False`` runs the identical loop without candidates or growth (baselines).
        epochs: epochs per experience (SGD with ``lr``, ``momentum``, ``weight_decay``; one
            optimizer for the whole stream, grown parameters added by the grower).
        replay: reservoir buffer size; each batch gets as many replayed samples appended.
        budget: growth limits relative to ``model``.
        grower_options: passed to :class:`growkit.Grower` (ops, max_ops, l1, points, granularity,
            ``freeze_grown`` / ``freeze_base`` / ``keep_trainable`` for DER-like isolation, ...).
        checkpoint_dir / resume: write the run state after every experience / continue from it.

    When training diverges (a non-finite loss, an exploding grown gate) in the experience after a
    growth, the experience is rolled back to before that growth (model, optimizer, grower, replay
    buffer, RNG) and rerun with the growth retried at half the new parameters' learning rate, then
    without it; the event and the history say so. A divergence without growth to undo (or after
    a resume from a checkpoint) raises :class:`growkit.NonFiniteLoss`.
        eval_split: ``"test"`` or ``"val"`` loaders fill the accuracy matrix.
        task_incremental: also fill ``result.task_matrix`` with task-incremental accuracies: on
            experience ``j``'s test data only the logits of ``stream[j].classes`` compete (the task id
            picks the classes of the single shared head, the usual protocol for one head; see
            :func:`growkit.train.evaluate`'s ``classes``). ``result.matrix`` stays class-incremental
            (all logits compete). On a domain-incremental stream every experience has every class, so
            the two matrices agree.
    """
    if not isinstance(stream, Stream):
        raise InputError(f"stream must be a growkit.lifelong.streams.Stream, got {type(stream).__name__}")
    if eval_split not in ("test", "val"):
        raise InputError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    evals = [getattr(e, eval_split) for e in stream]
    if any(ld is None for ld in evals):
        raise InputError(f"every experience needs a {eval_split} loader to fill the accuracy matrix")
    if not isinstance(task_incremental, bool):
        raise InputError(f"task_incremental must be True or False, got {task_incremental!r}")
    if task_incremental and any(not e.classes for e in stream):
        raise InputError("task_incremental=True needs every experience's classes (Experience.classes)")
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir=")
    fn = batch_fn or default_batch_fn
    setup = set_up_run(model, stream[0].train, None, example_input=example_input, loss_fn=loss_fn, batch_fn=batch_fn,
                       device=device, seed=seed, progress=progress, selects=None, check=False)
    rng = random.Random(seed)
    example, dev = setup.example, setup.device
    # The grower raises on a divergence after a growth; the loop below rolls the experience back.
    gopts = {"budget": budget, "seed": seed, "on_divergence": "raise", "steps_per_epoch": _len(stream[0].train),
             **(grower_options or {})}
    ckpt = CheckpointDir(checkpoint_dir) if checkpoint_dir is not None else None
    # One run per checkpoint directory: a second writer would interleave its checkpoints with ours.
    with ckpt.lock() if ckpt is not None else contextlib.nullcontext():
        config = {"grow": grow, "epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                  "replay": replay, "budget": repr(budget), "grower_options": repr(sorted((grower_options or {}).items())),
                  "seed": seed, "experiences": [e.id for e in stream], "task_incremental": task_incremental}
        saved = None
        if ckpt is not None:
            if ckpt.latest_name() is not None and not resume:
                raise InputError(f"{checkpoint_dir} holds an earlier run: pass resume=True or use an empty directory")
            saved = ckpt.read() if resume else None
            if saved is not None:
                check_same_settings(saved[0].get("config") or {}, config,
                                    api=f"pass the settings of the run checkpointed in {checkpoint_dir} or use a new directory")

        grower: Grower | None = None
        if grow:
            ex_cpu = tuple(a.cpu() for a in example)
            if saved is not None:
                grower = Grower.from_state(model, ex_cpu, saved[0]["grower"], saved[1], **gopts)
            else:
                grower = Grower(model, ex_cpu, **gopts)
            grower.to(dev)
            net: nn.Module = grower.model
            params = list(grower.parameters())
        else:
            net = growable(model, example).to(dev)
            params = list(net.parameters())
        named = {n: p for n, p in net.named_parameters()}
        if saved is not None:
            groups = saved[0]["opt_groups"]
            opt = torch.optim.SGD([{"params": [named[n] for n in g]} for g in groups], lr=lr, momentum=momentum,
                                  weight_decay=weight_decay)
            optimizer_from_flat(opt, saved[0]["optimizer"], saved[1])
            if grower is None:
                load_full_state(net, saved[1], "net.")
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if grower is not None:
            grower.attach(opt)
            if saved is not None:
                grower.load_new_group_state(opt, saved[0].get("new_groups", []))
        buffer = ReplayBuffer(replay, seed=seed or 0) if replay > 0 else None

        n = len(stream)
        matrix = AccuracyMatrix(n)
        task_matrix = AccuracyMatrix(n) if task_incremental else None

        def accuracies(task: bool = False) -> list[float]:
            """The current model's accuracy on every experience (task-incremental: its classes only)."""
            return [evaluate(net, ld, loss_fn=loss_fn, batch_fn=batch_fn, device=dev,
                             classes=e.classes if task else None)["accuracy"] for ld, e in zip(evals, stream)]

        history: list[dict[str, Any]] = []
        start = 0
        if saved is not None:
            st = saved[0]
            matrix = AccuracyMatrix.from_dict(st["matrix"])
            if task_matrix is not None:
                task_matrix = AccuracyMatrix.from_dict(st["task_matrix"])
            history = st["history"]
            if buffer is not None:
                buffer.load(st["replay"], saved[1])
            restore_rng(st["rng"], rng, [e.train for e in stream])
            start = st["progress"]["experience"] + 1
            logger.info("resuming the stream at experience %d of %d", start, n)
        else:
            matrix.initial = accuracies()
            if task_matrix is not None:
                task_matrix.initial = accuracies(task=True)

        grew = False  # whether the last boundary grew: only then can a divergence be rolled back
        for i in range(start, n):
            exp = stream[i]
            t0 = time.perf_counter()
            # The stream's own state at the start of the experience, for a rollback of the growth before it.
            start_state = _stream_state(rng, stream, buffer) if grower is not None and grew else None
            while True:
                try:
                    for ep in range(epochs):
                        mixed = _Mixed(exp.train, fn, buffer, fill=ep == 0)
                        train_steps(net, mixed, opt, epochs=1, loss_fn=loss_fn,
                                    extra_loss=grower.extra_loss if grower is not None else None, device=dev,
                                    progress=progress, desc=f"experience {exp.id} ({i + 1}/{n})",
                                    after_step=grower.after_step if grower is not None else None)
                    break
                except NonFiniteLoss as exc:
                    # Growth's doing only if the grower can undo its last growth: retried once at half
                    # the new parameters' rate, then skipped; a divergence without growth stops the run.
                    if start_state is None or grower is None or not grower.rollback(str(exc)):
                        raise
                    _restore_stream(start_state, rng, stream, buffer)
                    net = grower.model
                    ev = grower.events[-1]
                    history[-1].update(grown=ev.chosen, note=ev.note, params=grower.cost.params,
                                       params_grown=ev.params_after - ev.params_before,
                                       trainable_params=grower.trainable_count())
                    matrix.costs[-1] = {"params": grower.cost.params, "flops": grower.cost.flops}
                    logger.warning("experience %s: %s", exp.id, ev.note)
            accs = accuracies()
            taccs = accuracies(task=True) if task_matrix is not None else None
            ev = None
            if grower is not None and i < n - 1:
                ev = grower.end_experience(exp.id)
                net = grower.model
                grew = bool(ev.chosen)
            cost = grower.cost if grower is not None else measure(net, tuple(a.to(dev) for a in example))
            matrix.add_row(accs, {"params": cost.params, "flops": cost.flops})
            if task_matrix is not None and taccs is not None:
                task_matrix.add_row(taccs, {"params": cost.params, "flops": cost.flops})
            trainable = (grower.trainable_count() if grower is not None
                         else sum(p.numel() for p in net.parameters() if p.requires_grad))
            history.append({"experience": exp.id, "train_s": time.perf_counter() - t0, "accuracies": accs,
                            "grown": ev.chosen if ev is not None else [], "note": ev.note if ev is not None else "",
                            "params": cost.params,
                            "params_grown": ev.params_after - ev.params_before if ev is not None else 0,
                            "trainable_params": trainable})
            logger.info("after experience %s: accuracies %s, avg %.2f %%, %s params", exp.id,
                        " / ".join(f"{100 * a:.2f} %" for a in accs), 100 * matrix.average_accuracy(), f"{cost.params:,}")
            if ckpt is not None:
                _save(ckpt, config, i, matrix, history, grower, net, opt, buffer, rng, stream, task_matrix)

        final = grower.grown_model() if grower is not None else net
        plan = state_of(final).plan if state_of(final) is not None else None  # type: ignore[union-attr]
        return StreamResult(final, matrix, list(grower.events) if grower is not None else [], plan, history,
                            task_matrix)


def _len(loader: Iterable) -> int | None:
    try:
        return max(1, len(loader))  # type: ignore[arg-type]
    except TypeError:
        return None


def _stream_state(rng: random.Random, stream: Stream, buffer: ReplayBuffer | None) -> tuple[Any, ...]:
    buf = None
    if buffer is not None:
        meta, t = buffer.state()
        buf = (meta, {k: v.clone() for k, v in t.items()})
    return capture_rng(rng, [e.train for e in stream]), buf


def _restore_stream(state: tuple[Any, ...], rng: random.Random, stream: Stream, buffer: ReplayBuffer | None) -> None:
    restore_rng(state[0], rng, [e.train for e in stream])
    if buffer is not None and state[1] is not None:
        buffer.load(state[1][0], {k: v.clone() for k, v in state[1][1].items()})


def _save(ckpt: CheckpointDir, config: dict[str, Any], i: int, matrix: AccuracyMatrix, history: list,
          grower: Grower | None, net: nn.Module, opt: torch.optim.Optimizer, buffer: ReplayBuffer | None,
          rng: random.Random, stream: Stream, task_matrix: AccuracyMatrix | None = None) -> None:
    names = {id(p): n for n, p in net.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    opt_meta, tensors = optimizer_to_flat(opt, "opt")
    state: dict[str, Any] = {"format": "growkit.stream-checkpoint", "config": config, "progress": {"experience": i},
                             "matrix": matrix.to_dict(), "history": history,
                             "task_matrix": None if task_matrix is None else task_matrix.to_dict(), "opt_groups": groups, "optimizer": opt_meta,
                             "rng": capture_rng(rng, [e.train for e in stream])}
    if grower is not None:
        gmeta, gt = grower.state_dict()
        state["grower"] = gmeta
        state["new_groups"] = grower.new_group_state(opt)
        tensors.update(gt)
    else:
        tensors.update(full_state(net, "net."))
    if buffer is not None:
        bmeta, bt = buffer.state()
        state["replay"] = bmeta
        tensors.update(bt)
    ckpt.write(state, tensors)
