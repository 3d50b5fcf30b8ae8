"""``growkit.prune``: pruning passes whose models enter a gallery like grown ones.

Two methods:

* ``"branches"``: backward elimination of grown branches. The model must be grown by growkit.
  Each step scores every branch (``criterion="contribution"``: mean ``||eta * branch(x)|| / ||x_k||``
  over a few validation batches, the share of the point's value the branch adds; or
  ``"eta"``: ``|eta|``), removes the weakest, fine-tunes, evaluates and adds the model to the
  gallery. The result is still a growkit model: its plan replays onto the base model.
* ``"channels"``: structured channel pruning of the whole model (grown branches included) with
  Torch-Pruning (``pip install growkit[prune]``): its dependency graph keeps coupled layers
  consistent, ``importance="l1"`` ranks filters by L1 norm, ``"bn_scale"`` by BatchNorm scale.
  Pruning is iterative (``steps`` steps up to ``max_ratio`` of the channels, fine-tuning after
  each). Channel-pruned models no longer match a growth plan's architecture: they are plain
  modules (``growkit.save`` refuses them); each gallery entry records Torch-Pruning's pruning
  history, and :func:`rebuild_pruned` (or ``result.model_of(entry)``) re-creates the model from the
  unpruned one, that history and the entry's weights.

Both stop at the first model within ``budget``, or go on for ``steps`` steps (the whole curve)
when there is none. ``result.model`` is the most accurate model within the budget (validation).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn

from .checkpoint import snapshot
from .core.cost import Budget, Cost, measure
from .core.depgraph import output_layers, quiet_tp, torch_pruning
from .core.graph import as_args
from .core.plan import BRANCHES, GrowthPlan
from .core.safecopy import copy_module
from .core.surgery import META_KEY, apply_plan, growable, remove_inserted, state_of
from .errors import InputError
from .growth.gallery import Entry, Gallery
from .growth.result import GrowResult
from .runsetup import set_up_run
from .train import BatchFn, NonFiniteLoss, cosine_schedule, evaluate, forward, iter_batches, num_batches, train_steps

__all__ = ["prune", "PruneResult", "rebuild_pruned", "PRUNE_METHODS", "IMPORTANCES"]

logger = logging.getLogger(__name__)

PRUNE_METHODS = ("branches", "channels")
IMPORTANCES = ("l1", "bn_scale")


@dataclass
class PruneResult(GrowResult):
    """What :func:`prune` returns: a :class:`GrowResult` whose gallery holds the pruned models
    (``kind="pruned"``) beside the model given (``kind="base"``), plus how to rebuild any entry."""

    method: str = "branches"
    source: nn.Module | None = None
    example: tuple[torch.Tensor, ...] | None = None

    def _report_labels(self) -> tuple[str, str]:
        return f"{self.method} pruning; given model", "selected"

    def _report_detail(self, best: Entry) -> str:
        return ""

    def model_of(self, entry: Entry | int) -> nn.Module:
        """The model of a gallery entry (rebuilt from the unpruned model and the entry)."""
        e = self.gallery[entry] if isinstance(entry, int) else entry
        assert self.source is not None and self.example is not None
        return rebuild_pruned(self.source, e, self.example)


# ---------------------------------------------------------------------------------------- helpers
def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without growkit's plan metadata (a channel-pruned model no longer fits it)."""
    m = growable(model) if state_of(model) is not None else copy_module(model)
    meta = getattr(m, "meta", None)
    if isinstance(meta, dict):
        meta.pop(META_KEY, None)
    return m


def _ungrown(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The base model under a grown one: a copy with every grown branch removed and an empty plan."""
    gm = growable(model)
    remove_inserted(gm, BRANCHES)
    st = state_of(gm)
    assert st is not None
    st.plan.edits = []
    return gm


def rebuild_pruned(source: nn.Module, entry: Entry, example_input: Any) -> nn.Module:
    """Re-create the model of a :func:`prune` gallery entry from the model that was pruned."""
    example = as_args(example_input)
    pruning = entry.pruning
    if pruning and pruning.get("method") == "channels":
        tp = torch_pruning()
        m = _plain_copy(source)
        dev = next(m.parameters()).device
        with quiet_tp():
            dg = tp.DependencyGraph().build_dependency(m, example_inputs=tuple(a.to(dev) for a in example))
        dg.load_pruning_history(pruning["history"])
    elif state_of(source) is not None:
        m = apply_plan(_ungrown(source), entry.plan, example)  # type: ignore[arg-type]
    else:
        m = copy_module(source)
    assert entry.state is not None
    m.load_state_dict(entry.state)
    return m


@torch.no_grad()
def branch_scores(model: torch.fx.GraphModule, loader: Iterable, criterion: str, batches: int,
                  batch_fn: BatchFn | None, device: torch.device) -> dict[str, float]:
    """Edit key -> how much the branch contributes (see the module docstring)."""
    branches = dict(getattr(model, BRANCHES).items())
    if criterion == "eta":
        return {k: abs(float(b.eta)) for k, b in branches.items()}
    sums = {k: 0.0 for k in branches}
    counts = {k: 0 for k in branches}

    def hook(key: str):
        def f(_mod, args, out):
            x = args[0]
            d = (out - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            sums[key] += float(d.sum())
            counts[key] += int(d.numel())
        return f

    hooks = [b.register_forward_hook(hook(k)) for k, b in branches.items()]
    was = model.training
    model.eval()
    try:
        for i, (x, _) in enumerate(iter_batches(loader, batch_fn, device)):
            if i >= batches:
                break
            forward(model, x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {k: sums[k] / max(counts[k], 1) for k in branches}


# --------------------------------------------------------------------------------------- prune()
def prune(
    model: nn.Module,
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    method: str = "branches",
    budget: Budget | float | None = None,
    example_input: Any = None,
    steps: int | None = None,
    criterion: str = "contribution",
    importance: str = "l1",
    max_ratio: float = 0.8,
    global_pruning: bool = False,
    ignored_layers: Iterable[str] | None = None,
    finetune_epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    score_batches: int = 4,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    cost_axis: str = "params",
    gallery: Gallery | None = None,
) -> PruneResult:
    """Prune ``model`` (not modified); see the module docstring.

    Args:
        model: a model grown by growkit (``"branches"``), or any ``nn.Module`` (``"channels"``).
        loader / val_loader: fine-tuning batches / batches for scoring and selection.
        method: ``"branches"`` or ``"channels"``.
        budget: a float in (0, 1] keeps at most that fraction of the model's cost (on
            ``cost_axis``); a :class:`Budget` with ``relative=False`` gives absolute limits;
            for ``"branches"`` a relative :class:`Budget` is relative to the *ungrown* base model
            (``Budget(params=1.2)``: prune until at most +20 % over the base). ``None``: prune for
            ``steps`` steps (branches: until none is left) and keep every model.
        steps: most pruning steps (channels default 5; ratio ``max_ratio * i / steps`` at step i).
        criterion: branch score, ``"contribution"`` or ``"eta"``.
        importance: channel importance, ``"l1"`` (filter L1 norm) or ``"bn_scale"``.
        max_ratio / global_pruning: Torch-Pruning's pruning ratio at the last step / global ranking.
        ignored_layers: module names never pruned (default: the layer that outputs the logits).
        finetune_epochs / lr / momentum / weight_decay: fine-tuning after each step (SGD, cosine).
        score_batches: validation batches used to score branch contributions.
        gallery: add the pruned models to this gallery (e.g. ``grow(...).gallery``, whose cost axis
            is then used) so grown and pruned models share one hull. The model given is found in it
            by plan and weights (``grow(...).model`` is) and becomes the first pruned model's parent;
            otherwise it is added as ``kind="base"``.
    """
    if method not in PRUNE_METHODS:
        raise InputError(f"unknown pruning method {method!r}; choose from {', '.join(PRUNE_METHODS)}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if criterion not in ("contribution", "eta"):
        raise InputError(f"criterion must be 'contribution' or 'eta', got {criterion!r}")
    if importance not in IMPORTANCES:
        raise InputError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if cost_axis not in ("params", "flops"):
        raise InputError(f"cost_axis must be 'params' or 'flops' for pruning, got {cost_axis!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be an int >= 1 or None, got {steps!r}")
    if not (isinstance(max_ratio, (int, float)) and 0 < max_ratio < 1):
        raise InputError(f"max_ratio must be in (0, 1), got {max_ratio!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise InputError(f"finetune_epochs must be an int >= 0, got {finetune_epochs!r}")
    if method == "branches":
        st = state_of(model)
        if st is None or not st.plan.edits:
            raise InputError("method='branches' prunes grown branches, and this model has none; "
                             "use method='channels' to prune channels of any model")
        if st.plan.resizes:
            raise InputError("method='branches' cannot yet prune a model that was also widened or deepened (its "
                             "base is no longer the model under the branches); use method='channels'")
    setup = set_up_run(model, loader, val_loader, example_input=example_input, loss_fn=loss_fn, batch_fn=batch_fn,
                       device=device, seed=seed, progress=progress, selects="pruned models")
    dev, val_loader, example = setup.device, setup.val_loader, setup.example_on_device()

    source = growable(model).to(dev) if state_of(model) is not None else copy_module(model).to(dev)
    if gallery is None:
        gallery = Gallery(cost_axis=cost_axis)
    elif not isinstance(gallery, Gallery):
        raise InputError(f"gallery must be a growkit Gallery, got {type(gallery).__name__}")
    else:
        cost_axis = gallery.cost_axis if gallery.cost_axis in ("params", "flops") else "params"

    def add(m: nn.Module, parent: int | None, rnd: int, kind: str, plan: GrowthPlan, note: str = "",
            pruning: dict[str, Any] | None = None) -> Entry:
        metrics = evaluate(m, val_loader, loss_fn=loss_fn, batch_fn=batch_fn, device=dev)
        gallery.val_size = int(metrics["n"])
        e = Entry(gallery.next_id(), parent, measure(m, example), 1.0 - metrics["accuracy"], metrics["loss"], plan,
                  rnd, kind, state=snapshot(m), note=note, pruning=pruning)
        return gallery.add(e)

    st0 = state_of(source)
    plan0 = st0.plan.copy() if st0 is not None else GrowthPlan()
    base = _find(gallery, source, plan0) or add(source, None, 0, "base", plan0)
    limit = _limits(budget, method, base.cost, source, example, cost_axis)
    history: list[dict[str, Any]] = []

    def finetune(m: nn.Module, desc: str) -> None:
        if finetune_epochs <= 0:
            return
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = cosine_schedule(opt, finetune_epochs * num_batches(loader))
        train_steps(m, loader, opt, epochs=finetune_epochs, scheduler=sched, loss_fn=loss_fn, batch_fn=batch_fn,
                    device=dev, progress=progress, desc=desc)

    kw = dict(add=add, finetune=finetune, limit=limit, history=history, steps=steps)
    try:
        if method == "branches":
            _prune_branches(source, base, val_loader, criterion, score_batches, batch_fn, dev, example, **kw)
        else:
            _prune_channels(source, base, example, importance, max_ratio, global_pruning, ignored_layers, **kw)
    except NonFiniteLoss as exc:
        logger.warning("pruning stopped: %s; the gallery keeps the models before it", exc)
        history.append({"note": f"stopped: {exc}"})
    best = gallery.best(limit, base.cost)
    if limit is not None and not limit.allows(best.cost, base.cost):
        logger.warning("no pruned model meets the budget %s; returning the most accurate model", limit.limits(base.cost))
    result = PruneResult(
        model=rebuild_pruned(source, best, example), gallery=gallery, plan=best.plan.copy(),
        history=history, base=base, budget=limit, method=method, source=source, example=example,
    )
    return result


def _find(gallery: Gallery, model: nn.Module, plan: GrowthPlan) -> Entry | None:
    """The gallery entry holding exactly this model (same plan, same weights), if any."""
    sd = model.state_dict()
    for e in gallery:
        if e.state is None or e.plan.edits != plan.edits or e.pruning or set(e.state) != set(sd):
            continue
        if all(e.state[k].shape == v.shape and torch.equal(e.state[k], v.detach().cpu()) for k, v in sd.items()):
            return e
    return None


def _limits(budget: Budget | float | None, method: str, cost: Cost, source: nn.Module,
            example: tuple[torch.Tensor, ...], axis: str) -> Budget | None:
    """The budget as absolute limits (see :func:`prune`)."""
    if budget is None:
        return None
    if isinstance(budget, Budget):
        if budget.needs_latency:
            raise InputError("pruning budgets are on params and FLOPs; latency_ms is not supported here")
        if not budget.relative:
            return budget
        if method != "branches":
            raise InputError(
                "a relative Budget (ratios >= 1) cannot ask channel pruning to shrink the model: pass a fraction "
                "such as budget=0.5 (at most half the cost) or Budget(params=..., relative=False)")
        base_cost = measure(_ungrown(source), example)  # type: ignore[arg-type]
        return Budget(**budget.limits(base_cost), relative=False)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise InputError(f"budget must be a fraction in (0, 1] of the model's cost, a Budget, or None; got {budget!r}")
    return Budget(**{axis: budget * getattr(cost, axis)}, relative=False)


def _prune_branches(source: torch.fx.GraphModule, base: Entry, val_loader: Iterable, criterion: str, batches: int,
                    batch_fn: BatchFn | None, dev: torch.device, example: tuple[torch.Tensor, ...], *, add, finetune,
                    limit: Budget | None, history: list[dict[str, Any]], steps: int | None) -> None:
    root = _ungrown(source)
    cur: torch.fx.GraphModule = source
    parent = base
    step = 0
    while True:
        st = state_of(cur)
        assert st is not None
        if not st.plan.edits or (limit is not None and limit.allows(parent.cost, base.cost)):
            break
        if steps is not None and step >= steps:
            break
        step += 1
        scores = branch_scores(cur, val_loader, criterion, batches, batch_fn, dev)
        # A tied edit (cell mode) is one decision: its group is scored by its mean and goes at once.
        unit = {k: st.plan.tied_keys(k) for k in scores}
        score_of = {k: sum(scores[u] for u in unit[k]) / len(unit[k]) for k in scores}
        key = min(score_of, key=lambda k: (score_of[k], k))
        gone = set(unit[key])
        edit = next(e for e in st.plan.edits if e.key == key)
        plan = st.plan.copy()
        plan.edits = [e for e in plan.edits if e.key not in gone]
        drop = tuple(f"{BRANCHES}.{k}." for k in gone)
        state = {k: v for k, v in cur.state_dict().items() if not k.startswith(drop)}
        nxt = apply_plan(root, plan, example).to(dev)
        nxt.load_state_dict(state)
        finetune(nxt, f"prune step {step} fine-tune")
        what = f"branch {key} at {edit.point}" if len(gone) == 1 else \
            f"tied branches {', '.join(unit[key])} ({len(gone)} blocks)"
        note = f"removed {what} ({criterion} {score_of[key]:.4g})"
        e = add(nxt, parent.id, step, "pruned", plan.copy(), note)
        history.append({"step": step, "removed": key, "point": edit.point, "scores": scores, "entry": e.id,
                        "val_accuracy": 1 - e.val_error, "params": e.cost.params, "flops": e.cost.flops})
        logger.info("prune step %d: %s; val acc %.2f %%, %s params", step, note, 100 * (1 - e.val_error),
                    f"{e.cost.params:,}")
        cur, parent = nxt, e


def _prune_channels(source: nn.Module, base: Entry, example: tuple[torch.Tensor, ...], importance: str,
                    max_ratio: float, global_pruning: bool, ignored_layers: Iterable[str] | None, *, add, finetune,
                    limit: Budget | None, history: list[dict[str, Any]], steps: int | None) -> None:
    tp = torch_pruning()
    n_steps = steps if steps is not None else 5
    m = _plain_copy(source)
    mods = dict(m.named_modules())
    if ignored_layers is None:
        ignored = output_layers(m, example)
    else:
        missing = [n for n in ignored_layers if n not in mods]
        if missing:
            raise InputError(f"ignored_layers {missing} are not modules of the model")
        ignored = [mods[n] for n in ignored_layers]
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else tp.importance.BNScaleImportance()
    with quiet_tp():
        pruner = tp.pruner.BasePruner(m, example, importance=imp, pruning_ratio=max_ratio, iterative_steps=n_steps,
                                      ignored_layers=ignored, global_pruning=global_pruning)
    parent = base
    for step in range(1, n_steps + 1):
        if limit is not None and limit.allows(parent.cost, base.cost):
            break
        pruner.step()
        finetune(m, f"prune step {step} fine-tune")
        ratio = max_ratio * step / n_steps
        pruning = {"method": "channels", "importance": importance, "ratio": ratio, "global": global_pruning,
                   # a copy: Torch-Pruning keeps extending its own list
                   "history": json.loads(json.dumps(pruner.pruning_history()))}
        e = add(m, parent.id, step, "pruned", base.plan.copy(), f"channels pruned to ratio {ratio:.3g} ({importance})",
                pruning)
        history.append({"step": step, "ratio": ratio, "entry": e.id, "val_accuracy": 1 - e.val_error,
                        "params": e.cost.params, "flops": e.cost.flops})
        logger.info("prune step %d: ratio %.3g; val acc %.2f %%, %s params", step, ratio, 100 * (1 - e.val_error),
                    f"{e.cost.params:,}")
        parent = e
