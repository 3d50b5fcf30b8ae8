"""Width and depth growth as grow() methods: ``method="widen"``, ``"deepen"``, or several mixed.

Each round draws a parent from the gallery's epsilon-hull (as Petridish does), scores where to
grow on a few training batches, grows the best locations that fit the budget together (greedy in
score order, as Petridish grows every point that fits) with
:func:`growkit.widen` / :func:`growkit.deepen` (exact: the child starts as the parent's
function), fine-tunes it (new blocks under the new-parameter rule; the cosine schedule restarts
each round, LEMON's shorter re-warmed schedule) and adds it to the gallery.

Where to grow (``where="score"``): the gradient norm of the loss at the location per added
parameter. For a channel group, the gradient of the layers reading its channels (the weights a
new channel's outgoing weights join: GradMax's criterion, up to its SVD); for a block, the
gradient of the block's weights (how much the loss still pulls on that stage). ``where="random"``
draws the location at random (the ablation).

``method=["petridish", "widen", "deepen"]`` runs :class:`Mixed`: each round draws one of the
methods (uniformly, from the run's generator; the draw is checkpointed, so a resumed run continues
with the same method), sharing the budget, gallery, resume and executor.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.cost import measure
from ..core.deepen import IdentityBlock, deepen, deepenable_points
from ..core.graph import find_point
from ..core.plan import DEEPEN_BLOCKS, WIDEN_INITS, GrowthPlan
from ..core.surgery import state_of
from ..core.widen import WidthGroup, width_groups, widen
from ..errors import GrowkitError, InputError, NonFiniteLoss
from ..train import default_loss, forward, iter_batches
from .methods import GrowthMethod, get_method, register_method
from .run import GrowRun, Saved

__all__ = ["Widen", "Deepen", "Mixed", "gradient_norms"]

logger = logging.getLogger(__name__)

WHERE = ("score", "random")


def gradient_norms(model: nn.Module, run: GrowRun, batches: int) -> dict[str, float]:
    """Parameter name -> squared gradient norm of the training loss, summed over ``batches``
    batches (eval mode: scoring does not move BatchNorm statistics)."""
    s = run.setup
    was = model.training
    model.eval()
    sq: dict[str, float] = {}
    try:
        for i, (x, y) in enumerate(iter_batches(s.loader, s.batch_fn, run.dev)):
            if i >= batches:
                break
            model.zero_grad(set_to_none=True)
            loss = (s.loss_fn or default_loss)(forward(model, x), y)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss {float(loss)} while scoring where to grow")
            loss.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    sq[n] = sq.get(n, 0.0) + float(p.grad.detach().float().pow(2).sum())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return sq


def _under(sq: dict[str, float], path: str) -> float:
    return sum(v for k, v in sq.items() if k == path or k.startswith(path + "."))


class _Resize(GrowthMethod):
    """A round that grows one kind of location (see the module docstring)."""

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise InputError(f"{self.name}: unknown method_options {unknown}; valid: {', '.join(sorted(self.defaults))}")
        super().__init__(**options)
        self.opts: dict[str, Any] = {**self.defaults, **options}
        if self.opts["where"] not in WHERE:
            raise InputError(f"{self.name}: where must be one of {WHERE}, got {self.opts['where']!r}")
        for k in ("count", "score_batches", "tries"):
            v = self.opts[k]
            if k == "count" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{self.name}: {k} must be an int >= 1{' or None' if k == 'count' else ''}, got {v!r}")
        self.validate()

    def validate(self) -> None:
        """Check the method's own options."""

    def candidates(self, model: torch.fx.GraphModule, run: GrowRun) -> list[tuple[str, float]]:
        """Locations that can grow with their score per added parameter (not yet ordered)."""
        raise NotImplementedError

    def grow_at(self, model: torch.fx.GraphModule, run: GrowRun, where: list[str], seed: int) -> torch.fx.GraphModule:
        raise NotImplementedError

    def round(self, run: GrowRun, rnd: int, saved: Saved | None) -> None:
        prog = saved[0]["progress"] if saved is not None else None
        try:
            if prog is not None and prog.get("phase") == "finetune" and "plan" in prog:
                # Resumed mid fine-tune: the checkpoint holds the plan and the weights.
                grown = run.model_from(GrowthPlan.from_dict(prog["plan"]), None)
                run.finetune(rnd, grown, run.gallery[prog["parent"]], run.history[-1], saved)
                return
            self._grow(run, rnd)
        except NonFiniteLoss as exc:
            logger.warning("round %d stopped: %s", rnd, exc)
            if run.history and run.history[-1].get("round") == rnd:
                run.history[-1]["note"] = f"stopped: {exc}"
            run.save({"round": rnd, "phase": "round_end"})

    def _grow(self, run: GrowRun, rnd: int) -> None:
        parent = run.gallery.sample_parent(run.rng, run.budget, run.base_cost)
        rec: dict[str, Any] = {"round": rnd, "parent": parent.id, "method": self.name}
        run.history.append(rec)
        t = time.perf_counter()
        model = run.materialize(parent)
        cands = self.candidates(model, run)
        if self.opts["where"] == "random":
            order = [c for c, _ in cands]
            run.rng.shuffle(order)
        else:
            order = [c for c, _ in sorted(cands, key=lambda c: (-c[1], c[0]))]
        rec["scores"] = {c: s for c, s in sorted(cands, key=lambda c: -c[1])[:10]}
        seed = run.rng.getrandbits(62)
        # Greedy fill, as Petridish grows every point that fits: locations in score order join the
        # round while the whole child stays within the budget; `tries` misses in a row end it.
        limit = self.opts["count"] or run.cfg.points_per_round or len(order)
        grown, chosen, misses = None, [], 0
        assert run.base_cost is not None
        if len(order) > 1 and limit > 1:  # everything at once first: one trace when the budget allows it all
            try:
                g = self.grow_at(model, run, order[:limit], seed)
                if run.budget is None or run.budget.allows(measure(g, run.example, latency=run.cfg.wants_latency),
                                                           run.base_cost):
                    grown, chosen = g, order[:limit]
            except GrowkitError as exc:
                logger.info("round %d: %s at all %d locations failed (%s); adding them one by one", rnd, self.name,
                            min(limit, len(order)), exc)
        for loc in ([] if grown is not None else order):
            if len(chosen) >= limit or misses >= self.opts["tries"]:
                break
            try:
                g = self.grow_at(model, run, chosen + [loc], seed)
            except GrowkitError as exc:
                logger.info("round %d: %s at %s failed: %s", rnd, self.name, loc, exc)
                misses += 1
                continue
            cost = measure(g, run.example, latency=run.cfg.wants_latency)
            assert run.base_cost is not None
            if run.budget is None or run.budget.allows(cost, run.base_cost):
                grown, chosen, misses = g, chosen + [loc], 0
            else:
                misses += 1
        rec["search_s"] = time.perf_counter() - t
        rec["chosen"] = chosen
        if grown is None:
            rec["note"] = (f"no {self.name} location fits the budget" if order
                           else f"nothing in this model can {self.name}")
            logger.warning("round %d: %s; nothing grown", rnd, rec["note"])
            run.save({"round": rnd, "phase": "round_end"})
            return
        run.finetune(rnd, grown, parent, rec, None)


@register_method
class Widen(_Resize):
    """Width growth (:func:`growkit.widen`). Options: ``ratio`` (channels x ratio at each chosen
    group, default 1.5), ``init`` (``"split"``/``"zero"``), ``count`` (most groups per round;
    None: every group that fits the budget, capped by ``points_per_round``), ``where``
    (``"score"``/``"random"``), ``score_batches`` (4), ``tries`` (locations in a row that fail or
    exceed the budget before the round stops adding, 8)."""

    name = "widen"
    defaults = {"ratio": 1.5, "init": "split", "count": None, "where": "score", "score_batches": 4, "tries": 8}

    def validate(self) -> None:
        r = self.opts["ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 1 < r <= 64:
            raise InputError(f"widen: ratio must be a number in (1, 64], got {r!r}")
        if self.opts["init"] not in WIDEN_INITS:
            raise InputError(f"widen: init must be one of {WIDEN_INITS}, got {self.opts['init']!r}")

    def candidates(self, model: torch.fx.GraphModule, run: GrowRun) -> list[tuple[str, float]]:
        groups = [g for g in width_groups(model, run.example) if not g.reason]
        if not groups:
            return []
        sq = gradient_norms(model, run, self.opts["score_batches"]) if self.opts["where"] == "score" else {}
        out = []
        for g in groups:
            added = _added_params(model, g, self.opts["ratio"])
            reads = sum(_under(sq, m.owner + ".weight") for m in g.members if m.role == "in")
            out.append((g.layer, (reads ** 0.5) / max(added, 1)))
        return out

    def grow_at(self, model: torch.fx.GraphModule, run: GrowRun, where: list[str], seed: int) -> torch.fx.GraphModule:
        return widen(model, run.example, layers=where, ratio=self.opts["ratio"], init=self.opts["init"], seed=seed)


def _added_params(model: nn.Module, g: WidthGroup, ratio: float) -> int:
    """Parameters a widening of group ``g`` adds (from the shapes of its members)."""
    k = max(1, int(-(-g.channels * ratio // 1)) - g.channels)
    n = 0
    for m in g.members:
        owner = model.get_submodule(m.owner) if m.owner else model
        if m.role == "param":
            t = getattr(owner, m.attr)
            n += t.numel() // max(t.shape[m.dim], 1) * k
            continue
        for name, t in owner.named_parameters(recurse=False):
            dim = 1 if m.role == "in" and name == "weight" else 0
            if m.role == "in" and name != "weight":
                continue
            n += t.numel() // max(t.shape[dim], 1) * k
    return n


@register_method
class Deepen(_Resize):
    """Depth growth (:func:`growkit.deepen`). Options: ``block`` (``"copy"``/``"identity"``),
    ``count`` (most blocks per round; None: every point that fits, as for widen), ``where``
    (``"score"``/``"random"``), ``score_batches`` (4), ``tries`` (8)."""

    name = "deepen"
    defaults = {"block": "identity", "count": None, "where": "score", "score_batches": 4, "tries": 8}

    def validate(self) -> None:
        if self.opts["block"] not in DEEPEN_BLOCKS:
            raise InputError(f"deepen: block must be one of {DEEPEN_BLOCKS}, got {self.opts['block']!r}")

    def candidates(self, model: torch.fx.GraphModule, run: GrowRun) -> list[tuple[str, float]]:
        ok = [p for p, why in deepenable_points(model, run.example, self.opts["block"]).items() if not why]
        if not ok:
            return []
        st = state_of(model)
        assert st is not None
        sq = gradient_norms(model, run, self.opts["score_batches"]) if self.opts["where"] == "score" else {}
        out = []
        for name in ok:
            p = find_point(st.points, name)
            if self.opts["block"] == "copy":
                added = sum(t.numel() for n, t in model.named_parameters() if n.startswith(p.module + "."))
            else:
                added = sum(t.numel() for t in IdentityBlock(p.channels, p.layout).parameters())
            pull = _under(sq, p.module) if p.module else 0.0
            out.append((name, (pull ** 0.5) / max(added, 1)))
        return out

    def grow_at(self, model: torch.fx.GraphModule, run: GrowRun, where: list[str], seed: int) -> torch.fx.GraphModule:
        del seed  # the new block's weights come from torch's generator, which the run seeds
        return deepen(model, run.example, points=where, block=self.opts["block"])


@register_method
class Mixed(GrowthMethod):
    """Several methods in one run: each round draws one (see the module docstring).

    Options: ``methods`` (names, e.g. ``["petridish", "widen", "deepen"]``) and, per method
    name, that method's own options (``{"widen": {"ratio": 1.25}}``).
    """

    name = "mixed"

    def __init__(self, **options: Any) -> None:
        names = options.get("methods")
        if not isinstance(names, (list, tuple)) or len(names) < 1 or not all(isinstance(n, str) for n in names) \
                or len(set(names)) != len(names) or "mixed" in names:
            raise InputError(f"mixed: methods must be a list of distinct method names, got {names!r}")
        extra = sorted(set(options) - {"methods"} - set(names))
        if extra:
            raise InputError(f"mixed: unknown method_options {extra}; give per-method options under the method's name")
        super().__init__(**options)
        self.names = list(names)
        self.methods = {n: get_method(n, **dict(options.get(n) or {})) for n in self.names}
        self.draws: dict[str, str] = {}

    def round(self, run: GrowRun, rnd: int, saved: Saved | None) -> None:
        key = str(rnd)
        if key not in self.draws:
            self.draws[key] = random.Random(run.rng.getrandbits(62)).choice(self.names)
        name = self.draws[key]
        logger.info("round %d: method %s", rnd, name)
        n_before = len(run.history)
        self.methods[name].round(run, rnd, saved)
        for rec in run.history[n_before:]:
            rec.setdefault("method", name)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": dict(self.draws), "methods": {n: m.state_dict() for n, m in self.methods.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        draws = state.get("draws") or {}
        if not isinstance(draws, dict) or not all(isinstance(v, str) and v in self.methods for v in draws.values()):
            raise InputError("checkpoint's mixed-method state does not match this run's methods")
        self.draws = {str(k): v for k, v in draws.items()}
        for n, s in (state.get("methods") or {}).items():
            if n in self.methods and isinstance(s, dict):
                self.methods[n].load_state_dict(s)
