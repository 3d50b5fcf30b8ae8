"""ENAS (Pham et al. 2018) over growkit's candidate space.

One supernet holds every atom of every growth point with shared weights: an op, a BatchNorm and a
1x1 projection per (input, op), and a gate ``eta`` per point initialised to 0 (inserting the
cells is exact). An LSTM controller decides, for each (point, input) edge in turn, ``none`` or
one op; the sampled atoms are the ones switched on. Training alternates shared-weight steps
(a fresh sample per training batch) with controller steps: REINFORCE with reward = validation
accuracy of the sample on a validation batch minus ``cost_penalty`` x its added cost relative to
the base (and ``infeasible_penalty`` when it breaks the budget or ``max_ops``), a moving-average
baseline and an entropy bonus. Logits use ENAS's temperature and tanh constant.

Derivation: the controller's greedy proposal and ``final_samples`` samples are evaluated on the
validation data with the shared weights; the best-rewarded one (repaired to fit the budget)
becomes grown branches warm-started from the shared weights (ops, BatchNorms, projection blocks,
eta), i.e. the supernet under that sample. The controller persists across rounds (the space is
the base model's points, the same every round) and is part of the checkpointed method state.

Cell mode (``tie=``): the controller decides the edges of a tie group's first member only, and a
sampled atom switches on its copy at every member (each copy with its own shared weights), so the
controller samples cells, as ENAS does.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..growth.methods import register_method
from ..core.ops import canonical
from ..train import forward, logits_of
from ..train import cosine_schedule
from .cells import AtomCell, cells_of, derive_from_cells, insert_cells
from .common import Child, SearchContext, SearchMethod, check_int, check_number
from ..core.plan import Atom
from .space import SearchSpace, Proposal

__all__ = ["Enas", "EnasCell", "Controller"]

logger = logging.getLogger(__name__)


class EnasCell(AtomCell):
    """Shared weights of every atom at one point; ``active`` (atom indices) picks the sample."""

    def __init__(self, point, inputs, ops, registry) -> None:
        super().__init__(point, inputs, ops, registry)
        c = self.channels
        # Per-atom projection (one block of the finalized branch's concat projection), started at
        # the identity: the branch starts as the plain sum of its normalised ops.
        self.projs = nn.ModuleList(_identity_proj(c, self.layout) for _ in self.ops)
        self.active: list[int] = []

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        n = len(self.op_names)
        y = None
        for e in self.active:
            zc = canonical(zs[e // n], self.layout)
            t = self.projs[e](self.term(e, zc))
            y = t if y is None else y + t
        assert y is not None
        return self.gated(x, y)

    def block(self, e: int) -> torch.Tensor:
        w = self.projs[e].weight.detach()
        return (w[:, :, 0, 0] if w.dim() == 4 else w).clone()


def _identity_proj(c: int, layout: str) -> nn.Module:
    proj: nn.Module = nn.Linear(c, c, bias=False) if layout == "tokens" else nn.Conv2d(c, c, 1, bias=False)
    with torch.no_grad():
        w = proj.weight
        w.zero_()
        eye = torch.eye(c)
        if w.dim() == 4:
            w[:, :, 0, 0] = eye
        else:
            w.copy_(eye)
    return proj


class Controller(nn.Module):
    """LSTM controller: one categorical decision per (point, input) edge, each conditioned on the
    previous ones (the embedding of the last choice is the next input, plus a per-step embedding
    that says which edge is decided). Choice 0 is ``none``, choice ``j`` the ``j``-th op."""

    def __init__(self, n_decisions: int, n_choices: int, hidden: int = 64,
                 valid: list[int] | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_decisions, self.n_choices, self.hidden = n_decisions, n_choices, hidden
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.pos = nn.Embedding(n_decisions, hidden)
        self.choice = nn.Embedding(n_choices, hidden)
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, n_choices)
        # choices a decision may take (points with fewer ops than others mask the rest)
        self.valid = list(valid) if valid is not None else [n_choices] * n_decisions
        with torch.no_grad():
            for p in self.parameters():  # ENAS: uniform(-0.1, 0.1)
                p.uniform_(-0.1, 0.1, generator=generator)

    def sample(self, generator: torch.Generator | None = None, greedy: bool = False, tanh_c: float = 2.5,
               temperature: float = 5.0) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Choices, their summed log-probability and the summed entropy of the decisions."""
        h = torch.zeros(1, self.hidden)
        c = torch.zeros(1, self.hidden)
        inp = self.start
        choices: list[int] = []
        logp = torch.zeros(())
        ent = torch.zeros(())
        for t in range(self.n_decisions):
            h, c = self.lstm(inp + self.pos.weight[t:t + 1], (h, c))
            logits = tanh_c * torch.tanh(self.head(h)[0] / temperature)
            if self.valid[t] < self.n_choices:
                logits = logits.masked_fill(torch.arange(self.n_choices) >= self.valid[t], float("-inf"))
            lp = torch.log_softmax(logits, -1)
            p = lp.exp()
            k = int(torch.argmax(p)) if greedy else int(torch.multinomial(p.detach(), 1, generator=generator))
            choices.append(k)
            logp = logp + lp[k]
            ent = ent - (p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum()
            inp = self.choice.weight[k:k + 1]
        return choices, logp, ent


@register_method
class Enas(SearchMethod):
    """ENAS over the growth points (see the module docstring).

    Options: ``hidden`` (LSTM size), ``controller_lr`` (Adam), ``controller_every`` (shared-weight
    steps between controller phases), ``controller_steps`` (controller updates per phase),
    ``entropy_weight``, ``baseline_decay``, ``cost_penalty`` (reward per unit of relative added
    cost), ``infeasible_penalty``, ``final_samples``, ``tanh_c``, ``temperature``, plus the common
    ``size`` / ``steps`` / ``eval_batches``.
    """

    name = "enas"
    defaults = {
        "hidden": 64, "controller_lr": 5e-3, "controller_every": 10, "controller_steps": 10,
        "entropy_weight": 1e-3, "baseline_decay": 0.95, "cost_penalty": 0.05, "infeasible_penalty": 1.0,
        "final_samples": 8, "tanh_c": 2.5, "temperature": 5.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.controller: Controller | None = None
        self.baseline: float | None = None
        self._pending: dict[str, Any] | None = None
        self._signature: list[Any] | None = None

    def validate(self) -> None:
        o = self.opts
        for k in ("hidden", "controller_every", "controller_steps"):
            check_int(k, o[k])
        check_int("final_samples", o["final_samples"], minimum=0)
        for k in ("controller_lr", "tanh_c", "temperature"):
            check_number(k, o[k])
        for k in ("entropy_weight", "cost_penalty", "infeasible_penalty"):
            check_number(k, o[k], strict=False)
        if not 0 <= o["baseline_decay"] < 1:
            raise InputError(f"option baseline_decay must be in [0, 1), got {o['baseline_decay']!r}")

    # ------------------------------------------------------------------ method state
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return dict(self._pending or {})
        return {
            "signature": self._signature,
            "baseline": self.baseline,
            "controller": {k: v.tolist() for k, v in self.controller.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller = None
        self.baseline = state.get("baseline") if state else None
        self._pending = dict(state) if state else None

    # ------------------------------------------------------------------ the search
    @staticmethod
    def decisions(space: SearchSpace) -> list[tuple[str, str]]:
        return [(p.name, z) for p in space.decision_points for z in space.inputs[p.name]]

    def _controller(self, ctx: SearchContext, decisions: list[tuple[str, str]]) -> Controller:
        n_choices = 1 + max(len(v) for v in ctx.space.ops.values())
        valid = [1 + len(ctx.space.ops[p]) for p, _ in decisions]
        signature = [[p, z, list(ctx.space.ops[p])] for p, z in decisions]
        if self.controller is not None and self._signature == signature:
            return self.controller
        pending = self._pending
        if pending and pending.get("controller") is not None:
            if pending.get("signature") != signature:
                raise InputError("the checkpointed ENAS controller was trained on another search space "
                                 "(points, inputs or ops differ); resume with the original settings")
            # Its own generator: restoring must not draw from the run's RNG (an uninterrupted run
            # does not draw here either).
            ctrl = Controller(len(decisions), n_choices, self.opts["hidden"], valid, torch.Generator())
            ctrl.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in pending["controller"].items()})
        else:
            ctrl = Controller(len(decisions), n_choices, self.opts["hidden"], valid, ctx.generator())
        self._pending = None
        self.controller, self._signature = ctrl, signature
        return ctrl

    def proposal_of(self, ctx: SearchContext, decisions: list[tuple[str, str]], choices: list[int]) -> Proposal:
        return frozenset(Atom(p, z, ctx.space.ops[p][k - 1]) for (p, z), k in zip(decisions, choices) if k > 0)

    def reward(self, ctx: SearchContext, acc: float, proposal: Proposal) -> float:
        """Validation accuracy minus the cost penalty (relative added cost on the run's cost axis)."""
        axis = 1 if ctx.run.cfg.cost_axis == "flops" else 0
        base = (ctx.run.base_cost.params, ctx.run.base_cost.flops)[axis]
        rel = ctx.space.added_cost(proposal)[axis] / max(base, 1)
        r = acc - self.opts["cost_penalty"] * rel
        if not (ctx.space.structurally_valid(proposal) and ctx.space.within_budget(proposal)):
            r -= self.opts["infeasible_penalty"]
        return r

    def reinforce(self, opt: torch.optim.Optimizer, reward: float, logp: torch.Tensor, entropy: torch.Tensor) -> None:
        """One REINFORCE step: ``-(R - b) log p - entropy_weight * H``, then the baseline moves
        towards ``R`` (exponential moving average; the first reward starts it)."""
        b = reward if self.baseline is None else self.baseline
        loss = -(reward - b) * logp - self.opts["entropy_weight"] * entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d = self.opts["baseline_decay"]
        self.baseline = d * b + (1 - d) * reward

    def search(self, ctx: SearchContext) -> Child | None:
        o = self.opts
        reg = ctx.space.registry
        supernet = insert_cells(ctx.parent_model, ctx.space, lambda p, ins, ops: EnasCell(p, ins, ops, reg)).to(ctx.dev)
        cells = cells_of(supernet)
        decisions = self.decisions(ctx.space)
        ctrl = self._controller(ctx, decisions)
        opt_c = torch.optim.Adam(ctrl.parameters(), lr=o["controller_lr"])
        opt_w = ctx.optimizer(supernet, extra_new=[p for c in cells.values() for p in c.parameters()])
        sched = cosine_schedule(opt_w, ctx.steps)
        gen = ctx.generator()
        sample_kw = {"tanh_c": o["tanh_c"], "temperature": o["temperature"]}

        def activate(proposal: Proposal) -> None:
            atoms = ctx.space.expand(proposal)  # cell mode: every copy of a tied atom
            for cell in cells.values():
                cell.active = sorted(cell.atom_index(a) for a in atoms if a.point == cell.point)

        rewards: list[float] = []
        entropies: list[float] = []
        supernet.train()
        for step in range(ctx.steps):
            with torch.no_grad():
                choices, _, _ = ctrl.sample(gen, **sample_kw)
            activate(self.proposal_of(ctx, decisions, choices))
            x, y = ctx.train_stream.next()
            opt_w.zero_grad(set_to_none=True)
            loss, _ = ctx.loss(supernet, x, y)
            loss.backward()
            opt_w.step()
            sched.step()
            if (step + 1) % o["controller_every"] == 0 or step == ctx.steps - 1:
                for _ in range(o["controller_steps"]):
                    choices, logp, ent = ctrl.sample(gen, **sample_kw)
                    proposal = self.proposal_of(ctx, decisions, choices)
                    activate(proposal)
                    r = self.reward(ctx, self._batch_accuracy(ctx, supernet), proposal)
                    self.reinforce(opt_c, r, logp, ent)
                    rewards.append(r)
                    entropies.append(float(ent.detach()))
        ctx.steps_used += ctx.steps

        # Derive: the greedy proposal and a few samples, scored with the shared weights.
        with torch.no_grad():
            cands = [self.proposal_of(ctx, decisions, ctrl.sample(gen, greedy=True, **sample_kw)[0])]
            cands += [self.proposal_of(ctx, decisions, ctrl.sample(gen, **sample_kw)[0]) for _ in range(o["final_samples"])]
        best: tuple[float, Proposal, float] | None = None
        seen: set[Proposal] = set()
        for proposal in cands:
            if not ctx.space.feasible(proposal) or (ctx.size is not None and len(proposal) > ctx.size):
                # repair: keep the sample's atoms, in the space's order, while they fit
                proposal = ctx.space.greedy(sorted(proposal, key=ctx.space.index.__getitem__), ctx.size)
            if not proposal or proposal in seen:
                continue
            seen.add(proposal)
            activate(proposal)
            acc = ctx.evaluate(supernet)
            r = self.reward(ctx, acc, proposal)
            ctx.record(proposal, acc, reward=r)
            if best is None or r > best[0]:
                best = (r, proposal, acc)
        activate(frozenset())
        info = {
            "controller_updates": len(rewards),
            "reward_mean_last": sum(rewards[-o["controller_steps"]:]) / max(1, len(rewards[-o["controller_steps"]:])),
            "baseline": self.baseline,
            "entropy_last": entropies[-1] if entropies else None,
        }
        if best is None:
            return None
        _, proposal, acc = best
        model = derive_from_cells(supernet, ctx.space, proposal, ctx.first_key).to(ctx.dev)
        return ctx.child(proposal, model, acc, **info)

    @staticmethod
    def _batch_accuracy(ctx: SearchContext, supernet: nn.Module) -> float:
        """Accuracy of the active sample on the next validation batch (eval mode, as ENAS)."""
        xv, yv = ctx.val_stream.next()
        was = supernet.training
        supernet.eval()
        try:
            with torch.no_grad():
                logits = logits_of(forward(supernet, xv))
        finally:
            supernet.train(was)
        if logits.dim() != 2 or yv.dim() != 1:
            raise InputError("enas rewards need classification outputs (batch, classes) and integer targets")
        acc = float((logits.argmax(1) == yv).float().mean())
        return acc if math.isfinite(acc) else 0.0
