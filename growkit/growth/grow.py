"""``growkit.grow``: the end-to-end Petridish growth loop over a trained model.

Each round: draw ``children`` parents from the gallery's epsilon-hull; for each, inject candidates
at its growth points and keep training the whole model while the candidates learn (weak learning,
amortised); score every point by how well its weak learner fits the negative gradient per unit
of added cost; finalize the best points that fit the budget (concat + projection, eta = 0:
exact); fine-tune with a fresh schedule and a higher learning rate on the new parameters;
evaluate; add to the gallery. The children's jobs (:mod:`growkit.growth.jobs`) run in this process or on
Ray workers (:mod:`growkit.growth.executor`), with the same result for the same seed.

With ``checkpoint_dir`` the run state (gallery, history, working model, optimizer and scheduler
states, every RNG state) is written atomically after every epoch of every phase;
``resume=True`` continues from the last complete checkpoint and, on CPU with a seed, ends with
the same plan and bit-identical weights as an uninterrupted run. Exceptions: a ``latency_ms``
cost axis or budget (measured times differ between runs) and data loaders whose randomness
growkit cannot see (a sampler with a private generator that is not ``loader.generator`` or
``loader.sampler.generator``; worker processes seeded from elsewhere).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..core.candidates import CandidateModel
from ..core.cost import Budget
from ..errors import InputError
from ..newparams import DEFAULT_CLIP, DEFAULT_MAX_ETA, DEFAULT_MAX_LR, DEFAULT_WARMUP
from ..outputs import OutputLoss
from ..runsetup import set_up_run
from ..train import BatchFn
from ..validate import check_int, check_loader
from .baseline import finetune_for
from .config import GrowConfig
from .executor import Executor, LocalExecutor, get_executor
from .methods import get_method
from .result import GrowResult
from .run import GrowRun

__all__ = ["grow", "GrowResult", "GrowConfig"]

logger = logging.getLogger(__name__)


def grow(
    model: nn.Module,
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    example_input: Any = None,
    method: str | Sequence[str] = "petridish",
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
    new_lr_max: float = DEFAULT_MAX_LR,
    new_lr_warmup: float = DEFAULT_WARMUP,
    new_grad_clip: float | None = DEFAULT_CLIP,
    new_only: float = 0.0,
    candidate_lr: float = 3e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    l1: float = 1e-3,
    ops: Iterable[str] | str | None = None,
    max_inputs: int | None = 1,
    max_ops: int = 3,
    points: Iterable[str] | None = None,
    granularity: str = "block",
    points_per_round: int | None = None,
    selection: str = "alpha",
    tie: str = "none",
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int | None = None,
    cost_axis: str = "params",
    eps: float = 0.025,
    output: str | int | Callable[[Any], torch.Tensor] | None = None,
    allow_new_data: bool = False,
    max_eta: float = DEFAULT_MAX_ETA,
    compare_finetune: bool = False,
) -> GrowResult:
    """Grow ``model`` (not modified) with Petridish on ``loader``; see the module docstring.

    Args:
        model: a trained ``nn.Module`` (timm, torchvision, or any fx-traceable model).
        loader: training batches ``(x, y)`` or dicts (see ``batch_fn``).
        val_loader: batches for model selection (default: ``loader``, with a warning).
        example_input: batch-1 input for tracing (default: sliced from the first batch).
        method: ``"petridish"`` (default), a search pass (``"darts"``, ``"enas"``, ``"pnas"``, ``"random"``,
            ``"evolution"``), ``"widen"`` / ``"deepen"`` (width / depth growth, :mod:`growkit.growth.resize`),
            or a list of them (one drawn per round); ``method_options`` are the method's own settings.
        budget: limits relative to (or absolute beside) the base cost; ``None`` = no limit.
            Points are taken by fit per added parameter while they fit; a point whose
            ``max_ops`` edges do not fit keeps its leading edges that do.
        rounds: growth rounds (generations).
        children: children per round: that many parents are drawn from the epsilon-hull at the
            round's start, and each gets a weak-learning job and a fine-tuning job.
        executor: ``"local"`` (in this process, checkpointed every epoch), ``"ray"`` (parallel
            Ray workers; ``pip install "growkit[ray]"``) or a :class:`growkit.growth.executor.Executor`.
            The same seed gives the same gallery with either (see :mod:`growkit.growth.executor`).
        executor_options: for ``"ray"``: ``num_workers``, ``address``, ``num_cpus``,
            ``num_gpus``, ``threads``, ``max_retries``, ``runtime_env``.
        search_epochs / finetune_epochs: epochs of each phase per round.
        lr: base learning rate (SGD, cosine schedule restarted each phase).
        new_lr_mult / new_lr_max / new_lr_warmup / new_grad_clip: newly grown parameters (branches,
            projections, eta) fine-tune at ``new_lr_mult`` x the base rate, never above
            ``new_lr_max``, ramped from 0 over ``new_lr_warmup`` of an epoch, gradient norm clipped
            at ``new_grad_clip`` (see :mod:`growkit.newparams`). A child whose fine-tuning diverges
            is rolled back and retried once with that rate halved, then dropped.
        new_only: the first ``new_only`` of each fine-tuning phase trains only the new parameters, the
            old ones frozen (LLaMA Pro's phase), then everything trains. ``0``: none; ``1``: the
            old weights never move after a growth. The new parameters are grown branches and a
            deepening's untrained ones (an identity block's body and projection; of a copied block
            only its gate, the copy's trained weights wait with the model); a widening's new units
            sit inside old tensors and train with them. Measured at 0.5
            (benchmarks/results/grow_at_scale_newonly.md): it did not beat fine-tuning for the same
            time (-0.16 / -0.28 points) nor the default 0, which stays.
        candidate_lr: Adam learning rate of the candidates during weak learning.
        l1, ops, max_inputs, max_ops: weak-learner settings (see :func:`growkit.inject`). The
            defaults (inject's cheap ops, the nearest input only) cost 1.24x (resnet18), 1.53x
            (mobilenetv3_small_100) and 1.32x (vit_tiny) a plain train step on an idle machine
            (benchmarks/results/weak_learning_overhead_idle.md, ``grow-default``); every candidate
            edge of a chosen point is then kept, so what is selected is *where* to grow, by fit
            per unit of cost. ``ops="paper", max_inputs=2`` is the paper's richer set: 3.3-4.8x
            a plain step; in a one-seed pilot (KMNIST, mobilenetv3_small_050) it reached 79.3 %
            against the defaults' 79.1 % in 1.6x their wall-clock (nor were its top-|alpha|
            edges better than random ones in benchmarks/results/grow_vs_finetune*.md).
        points: growth points to consider (fx node names or module paths; default: all of them).
        granularity: ``"block"`` or ``"layer"`` growth points (see :func:`growkit.trace`).
        points_per_round: most points grown per round (default: every positive-score point that fits).
        selection: ``"alpha"`` (L1 / top |alpha|) or ``"random"`` edge selection (ablation).
        tie: ``"none"`` (macro search: each point grows on its own), ``"stage"`` (cell mode: the
            repeated blocks of a stage with the same relative structure grow one pattern, each
            copy with its own weights) or ``"all"`` (one pattern per cell type across stages);
            see :mod:`growkit.core.tie`. The budget counts every copy.
        loss_fn: ``loss_fn(output, target)``; default cross entropy.
        batch_fn: maps a loader batch to ``(inputs, targets)``.
        device: where to train (default: the model's device).
        checkpoint_dir: where the resumable run state, the gallery and the best model are written.
        resume: continue from the last complete checkpoint in ``checkpoint_dir`` (if any).
        seed: makes the run reproducible on CPU.
        cost_axis: gallery / hull cost axis: ``"params"``, ``"flops"`` or ``"latency_ms"``.
        output: which model output holds the logits when the model returns several: a dict key,
            a tuple index, or a callable ``output(model_output) -> logits``.
        allow_new_data: resume on data whose fingerprint (sizes, hash of a few examples) differs
            from the checkpointed run's; by default that is refused.
        max_eta: a grown gate with ``|eta|`` above this (or non-finite) counts as a divergence,
            like a NaN loss.
        compare_finetune: after growing, also fine-tune the base for the wall-clock this call
            took (plain SGD at ``lr``, cosine over time; :mod:`growkit.growth.baseline`) and
            evaluate it on ``val_loader``: ``result.finetune`` holds it and ``result.report()``
            says whether growth beat it. Costs as much time again.

    Raises:
        NonFiniteLoss: the model's outputs are already non-finite (it is not grown).
    """
    if isinstance(method, (list, tuple)):
        # Several methods: one is drawn each round (growkit.growth.resize.Mixed).
        method_options = {"methods": list(method), **(method_options or {})}
        method = "mixed"
    growth_method = get_method(method, **(method_options or {}))
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, CandidateModel):
        raise InputError("model carries un-finalized candidates; call growkit.finalize first")
    check_int("rounds", rounds, lo=0)
    check_int("children", children, lo=1)
    if not isinstance(compare_finetune, bool):
        raise InputError(f"compare_finetune must be True or False, got {compare_finetune!r}")
    check_loader(loader, "loader")
    if val_loader is not None:
        check_loader(val_loader, "val_loader")
    cfg = GrowConfig(
        method=method, method_options=method_options or {}, budget=budget, search_epochs=search_epochs,
        finetune_epochs=finetune_epochs, lr=lr, new_lr_mult=new_lr_mult, new_lr_max=new_lr_max,
        new_lr_warmup=new_lr_warmup, new_grad_clip=new_grad_clip, new_only=new_only, candidate_lr=candidate_lr,
        momentum=momentum, weight_decay=weight_decay, l1=l1, ops=ops, max_inputs=max_inputs, max_ops=max_ops,
        points=points, granularity=granularity, points_per_round=points_per_round, selection=selection, tie=tie, seed=seed, cost_axis=cost_axis,
        eps=eps, max_eta=max_eta, children=children, output=output,
    )
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir= (the directory of the interrupted run)")
    if output is not None:
        loss_fn = OutputLoss(output, loss_fn)
    ex = get_executor(executor, executor_options)
    if method != "petridish" and (children != 1 or not isinstance(ex, LocalExecutor)):
        raise InputError(f"method {method!r} runs one child per round in this process; children= and "
                         "executor= apply to method='petridish'")
    setup = set_up_run(model, loader, val_loader, example_input=example_input, loss_fn=loss_fn, batch_fn=batch_fn,
                       device=device, seed=seed, progress=progress, per_example=True)
    run = GrowRun(model, setup, cfg, growth_method, ex, checkpoint_dir, allow_new_data=allow_new_data)
    try:
        t0 = time.perf_counter()
        result = run.run(rounds, resume)
        spent = time.perf_counter() - t0  # the growth's wall-clock (not the executor's shutdown)
    finally:
        ex.close()
    if compare_finetune:
        logger.info("fine-tuning the base for %.1f s (the growth's wall-clock) to compare", spent)
        result.finetune = finetune_for(run.base_gm, setup, cfg, spent)
    return result
