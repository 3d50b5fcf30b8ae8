"""Petridish weak learning (Algorithm 1): candidates injected with stop-gradient / stop-forward.

At a growth point x_k the candidate computes ``x_c = sum_ij alpha_ij * BN(op_j(sg(z_i)))`` and the
point becomes ``x_k + sf(x_c)``, with ``sg(x) = x.detach()`` and ``sf(x) = x - x.detach()``. The
forward value is exactly x_k, the base model's gradients are untouched, and the candidate's
parameters receive ``d/dtheta <dL/dx_k, x_c>``: ordinary backprop trains the weak learner to fit the
negative gradient while the base model keeps training.

Cell mode (``inject(tie="stage" | "all")``): the candidates of a tie group share one ``alpha`` (one
weight per relative edge, its gradient pooled over the copies) and keep their own ops and norms;
why a shared alpha rather than pooled scores is in :mod:`growkit.core.tie`.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from ..errors import InputError, PointError
from .graph import EligibleInput, GrowthPoint
from .plan import Edge, ScoredEdge
from .ops import DEFAULT_REGISTRY, OpRegistry, add_keep_strides, build_edge_op, canonical, decanonical, feature_norm, resolve_ops
from .surgery import GrowState, growable, insert_at_point, state_of
from .tie import TieGroup, check_tie, tie_groups

__all__ = ["sg", "sf", "sf_normalized", "Candidate", "CandidateModel", "inject", "CANDIDATES"]

CANDIDATES = "growkit_candidates"
"""Name of the ModuleDict holding candidates inside a candidate model's GraphModule."""


def sg(x: torch.Tensor) -> torch.Tensor:
    """Stop-gradient: forward ``x``, no gradient."""
    return x.detach()


def sf(x: torch.Tensor) -> torch.Tensor:
    """Stop-forward: forward exactly 0 (for finite ``x``), gradient identity."""
    return x - x.detach()


class _StopForwardNormalized(torch.autograd.Function):
    """Stop-forward whose backward rescales the gradient to unit RMS, averaged over elements.

    The weak learner then minimises mean(dL/dx_k / rms(dL/dx_k) * x_c): the paper's objective
    <dL/dx_k, x_c> up to a positive per-batch factor, at a scale that does not depend on how
    small the loss gradient is at an intermediate layer (or on the tensor size), so one learning
    rate and one L1 weight fit every point. The alpha gradient is then about cos(op, -grad).

    With a process ``group`` (data-parallel training, see :mod:`growkit.distributed`) the RMS and
    the element count are those of the global batch (one all-reduce over ``group``), and the
    result is scaled by the group size so that DDP's gradient average reproduces the
    single-process gradient of the same global batch.

    The forward is zeros of ``dtype`` (the point's dtype) whatever ``x`` holds, so a weak learner
    that overflows can never reach the model's output; the backward works in ``x``'s dtype (fp32
    for candidates: in fp16 the element count alone overflows) and gives non-finite entries of the
    incoming gradient no weight. ``normalize=False`` is plain :func:`sf` with those two guards.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any = None, dtype: torch.dtype | None = None,  # type: ignore[override]
                normalize: bool = True) -> torch.Tensor:
        ctx.group, ctx.dtype, ctx.normalize = group, x.dtype, normalize
        return torch.zeros_like(x, dtype=dtype or x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        g = g.to(ctx.dtype)
        g = torch.where(torch.isfinite(g), g, torch.zeros((), dtype=g.dtype, device=g.device))
        if not ctx.normalize:
            return g, None, None, None
        if ctx.group is None:
            return g / (g.pow(2).mean().sqrt().clamp_min(1e-30) * g.numel()), None, None, None
        # Rank r holds g_r = dL_r/dx on its samples; DDP trains on (1/W) sum_r L_r. Global
        # sum of squares S and count N: the single-process value g / (rms * N) on the effective
        # gradient is g_r * W / (sqrt(S / N) * N) once DDP divides the parameter gradients by W.
        acc = torch.promote_types(g.dtype, torch.float32)
        s = torch.stack([g.to(acc).pow(2).sum(), torch.tensor(float(g.numel()), dtype=acc, device=g.device)])
        dist.all_reduce(s, group=ctx.group)
        rms = (s[0] / s[1]).sqrt().clamp_min(1e-30)
        return g * (dist.get_world_size(ctx.group) / (rms * s[1])).to(g.dtype), None, None, None


def sf_normalized(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """:func:`sf` with the gradient normalised to unit RMS (see ``_StopForwardNormalized``).

    ``group``: a process group whose ranks hold the other parts of the batch (``None``: this
    process holds the whole batch).
    """
    return _StopForwardNormalized.apply(x, group, x.dtype, True)


class Candidate(nn.Module):
    """The joint weak learner at one growth point.

    Attributes:
        alpha: (inputs, ops) weights; the L1 penalty on them selects edges.
        score: running mean over training steps of cos(x_c, -dL/dx_k) (how well the weak
            learner fits the negative gradient); ``nan`` before any backward pass.
        stats_group: ``None``, or the process group over which the gradient RMS and the scores
            are reduced when the batch is split across processes (set by
            :func:`growkit.distributed.prepare_ddp`; a deep copy does not keep it).
    """

    stats_group: Any = None

    def __init__(
        self,
        point: GrowthPoint,
        inputs: Sequence[EligibleInput],
        ops: Sequence[str],
        registry: OpRegistry,
        normalize_grad: bool = False,
    ) -> None:
        super().__init__()
        self.point = point.name
        self.normalize_grad = normalize_grad
        self.layout = point.layout
        self.input_names = [z.name for z in inputs]
        self.op_names = list(ops)
        n = len(inputs) * len(ops)
        self.ops = nn.ModuleList(build_edge_op(registry, op, z, point) for z in inputs for op in ops)
        self.norms = nn.ModuleList(feature_norm(point.channels, point.layout) for _ in range(n))
        # Small random alphas: with all-zero alphas the op weights would get no gradient at first.
        self.alpha = nn.Parameter(1e-2 * torch.randn(len(inputs), len(ops)))
        self.register_buffer("score_sum", torch.zeros(()), persistent=False)
        self.register_buffer("score_count", torch.zeros(()), persistent=False)
        self.register_buffer("fit_sum", torch.zeros(()), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> "Candidate":
        # .half() / .to(bfloat16) on the model leave candidates in fp32 (see forward).
        super()._apply(fn, recurse)
        if self.alpha.dtype in (torch.float16, torch.bfloat16):
            super()._apply(lambda t: t.float() if t.is_floating_point() else t, recurse)
        return self

    def edges(self) -> list[Edge]:
        """The edge of every entry of ``alpha``, row-major."""
        return [Edge(z, op) for z in self.input_names for op in self.op_names]

    def weak_learner(self, *zs: torch.Tensor) -> torch.Tensor:
        """x_c computed from (already stop-gradiented) inputs, in the point's layout."""
        j = len(self.op_names)
        xc = None
        for i, z in enumerate(zs):
            zc = canonical(z, self.layout)
            for jj in range(j):
                e = i * j + jj
                term = self.alpha[i, jj] * self.norms[e](self.ops[e](zc))
                xc = term if xc is None else xc + term
        assert xc is not None
        return decanonical(xc, self.layout)

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        # The weak learner runs in fp32 whatever autocast or the model's dtype say (its
        # parameters are fp32, see inject): its gradient normalisation overflows in fp16.
        with torch.autocast(x.device.type, enabled=False):
            dt = self.alpha.dtype
            xc = self.weak_learner(*(sg(z).to(dt) if z.is_floating_point() else sg(z) for z in zs))
            zero = _StopForwardNormalized.apply(xc, self.stats_group, x.dtype, self.normalize_grad)
        out = add_keep_strides(x, zero)
        if out.requires_grad and self.training:
            target = xc.detach()
            out.register_hook(lambda g: self._record(target, g))
        return out

    @torch.no_grad()
    def _record(self, xc: torch.Tensor, grad: torch.Tensor) -> None:
        acc = torch.promote_types(torch.promote_types(xc.dtype, grad.dtype), torch.float32)
        a = xc.flatten().to(acc)
        b = -grad.flatten().to(acc)
        dot = torch.dot(a, b)
        group = self.stats_group
        if group is None:
            cos = dot / (a.norm() * b.norm()).clamp_min(1e-30)
            fit = dot / max(1, xc.shape[0])
        else:
            # Global batch: sum the per-rank dot products and squared norms. Each rank's gradient
            # is W x that of DDP's averaged loss, a factor cos ignores and fit divides out.
            s = torch.stack([dot, a.dot(a), b.dot(b), torch.tensor(float(xc.shape[0]), dtype=acc, device=a.device)])
            dist.all_reduce(s, group=group)
            cos = s[0] / (s[1].sqrt() * s[2].sqrt()).clamp_min(1e-30)
            fit = s[0] / (dist.get_world_size(group) * s[3].clamp_min(1))
        # A non-finite gradient (an fp16 overflow upstream) says nothing about the fit: skip it.
        ok = torch.isfinite(cos) & torch.isfinite(fit)
        self.score_sum += torch.where(ok, cos, 0.0).to(self.score_sum.dtype)
        self.score_count += ok.to(self.score_count.dtype)
        self.fit_sum += torch.where(ok, fit, 0.0).to(self.fit_sum.dtype)

    @property
    def score(self) -> float:
        n = float(self.score_count)
        return float(self.score_sum) / n if n else float("nan")

    def reset_score(self) -> None:
        self.score_sum.zero_()
        self.score_count.zero_()
        self.fit_sum.zero_()

    def top_edges(self, k: int) -> list[ScoredEdge]:
        """The ``k`` edges of largest |alpha| that are not exactly zero."""
        flat = self.alpha.detach().flatten()
        order = torch.argsort(flat.abs(), descending=True, stable=True).tolist()
        edges = self.edges()
        return [ScoredEdge(*edges[i], float(flat[i])) for i in order[:k] if float(flat[i]) != 0.0]

    def extra_repr(self) -> str:
        return f"point={self.point}, inputs={self.input_names}, ops={self.op_names}"

    def __getstate__(self) -> dict[str, Any]:
        # Copies (finalize, deepcopy, pickle) are single-process: a process group does not copy.
        state = super().__getstate__()
        state.pop("stats_group", None)
        return state


class CandidateModel(nn.Module):
    """A model with Petridish candidates: forward is exactly the original's.

    Train it like the original, adding :meth:`extra_loss` to the loss. Give
    :meth:`candidate_parameters` their own optimizer or param group if you like; the base
    parameters are :meth:`base_parameters`.
    """

    def __init__(self, module: torch.fx.GraphModule, l1: float, ties: Sequence[TieGroup] = ()) -> None:
        super().__init__()
        self.module = module
        self.l1 = float(l1)
        self.ties: list[TieGroup] = list(ties)
        """Tie groups (cell mode): their candidates share one ``alpha`` (see :func:`inject`)."""

    @property
    def state(self) -> GrowState:
        st = state_of(self.module)
        assert st is not None
        return st

    @property
    def candidates(self) -> dict[str, Candidate]:
        """Growth point name -> :class:`Candidate`, in topological order."""
        return dict(getattr(self.module, CANDIDATES).items())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def extra_loss(self) -> torch.Tensor:
        """``l1 * sum |alpha|`` over all candidates (add it to the training loss).

        A shared alpha counts once per tied candidate: its data gradient sums over the copies
        too, so the balance between fit and L1 is the one each copy has in macro mode.
        """
        alphas = [c.alpha.abs().sum() for c in self.candidates.values()]
        return self.l1 * torch.stack(alphas).sum()

    def candidate_parameters(self) -> Iterator[nn.Parameter]:
        return getattr(self.module, CANDIDATES).parameters()

    def base_parameters(self) -> Iterator[nn.Parameter]:
        ids = {id(p) for p in self.candidate_parameters()}
        return (p for p in self.module.parameters() if id(p) not in ids)

    def scores(self) -> dict[str, float]:
        """Point -> running cosine of x_c with the negative gradient at the point."""
        return {k: c.score for k, c in self.candidates.items()}

    def reset_scores(self) -> None:
        for c in self.candidates.values():
            c.reset_score()


def _select_points(st: GrowState, points: Iterable[str] | None) -> list[GrowthPoint]:
    if points is None:
        return [p for p in st.points if p.inputs]
    if isinstance(points, str):
        points = [points]
    chosen = []
    for name in points:
        p = st.point(name)  # raises PointError naming the available points
        if not p.inputs:
            raise PointError(f"growth point {p.name!r} has no eligible inputs; choose another point")
        chosen.append(p)
    if not chosen:
        raise PointError("points is empty; pass None to use every growth point")
    order = {p.name: i for i, p in enumerate(st.points)}
    return sorted({p.name: p for p in chosen}.values(), key=lambda p: order[p.name])


def inject(
    model: nn.Module,
    example_input: Any = None,
    points: Iterable[str] | None = None,
    ops: Iterable[str] | str | None = None,
    max_inputs: int | None = 2,
    l1: float = 1e-3,
    *,
    normalize_grad: bool = False,
    registry: OpRegistry | None = None,
    tie: str = "none",
    **trace_kwargs: Any,
) -> CandidateModel:
    """Add Petridish candidates at growth points of a copy of ``model``.

    Args:
        model: a trained ``nn.Module`` or a model grown by growkit (not modified).
        example_input: a batch-1 input (needed unless ``model`` came from growkit).
        points: growth point names (fx node or module path); ``None`` = every point with inputs.
            On a model not traced yet, names the heuristic did not pick become points too.
        ops: op names, ``"paper"`` for the paper's full set, or ``None`` for the cheap default.
        max_inputs: keep only the nearest this many eligible inputs per point (``None``: all).
            The defaults (2 inputs, ``DEFAULT_OPS``) keep a train step near 1.5x a plain one.
        l1: weight of the L1 penalty on alphas (the paper's lambda).
        normalize_grad: give candidates dL/dx_k scaled to unit RMS per batch (same direction,
            scale-free; what :func:`growkit.grow` uses). ``False`` is the paper's exact identity.
        registry: op registry to build ops from (default: growkit's).
        tie: ``"none"`` (macro search: every point on its own), ``"stage"`` or ``"all"`` (cell
            mode: the points of a tie group, see :mod:`growkit.core.tie`, share one ``alpha``,
            one weight per relative edge, while each keeps its own ops and norms; finalize then
            grows the same relative edges at every member).
        **trace_kwargs: forwarded to :func:`growkit.trace` (``granularity=``, ``leaf_modules=``).
    """
    if isinstance(model, CandidateModel):
        raise InputError("model already carries candidates; call growkit.finalize(model) first")
    if max_inputs is not None and (not isinstance(max_inputs, int) or max_inputs < 1):
        raise InputError(f"max_inputs must be a positive int or None, got {max_inputs!r}")
    if not (isinstance(l1, (int, float)) and l1 >= 0):
        raise InputError(f"l1 must be a non-negative number, got {l1!r}")
    check_tie(tie)
    registry = registry or DEFAULT_REGISTRY
    points = [points] if isinstance(points, str) else (None if points is None else list(points))
    if points and state_of(model) is None:
        trace_kwargs = {**trace_kwargs, "points": points}  # names the heuristic missed become points
    gm = growable(model, example_input, **trace_kwargs)
    st = state_of(gm)
    assert st is not None
    chosen = _select_points(st, points)
    if not chosen:
        raise PointError(f"{type(model).__name__} has no growth point with eligible inputs")
    inputs = {p.name: list(p.inputs)[-max_inputs:] if max_inputs is not None else list(p.inputs) for p in chosen}
    ties = tie_groups(st.points, chosen, inputs, tie)
    shared = {m: g.points[0] for g in ties for m in g.points[1:]}
    cands: dict[str, Candidate] = {}
    for p in chosen:
        cand = Candidate(p, inputs[p.name], resolve_ops(ops, p.layout), registry, normalize_grad)
        if p.name in shared:
            # One alpha per relative edge: members' inputs are slot-aligned, so entry (i, j) is
            # the same relative edge everywhere and its gradient pools every copy's evidence.
            cand.alpha = cands[shared[p.name]].alpha
        cands[p.name] = cand
        insert_at_point(gm, p.name, cand.input_names, cand, CANDIDATES, p.name)
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return CandidateModel(gm, l1, ties)
