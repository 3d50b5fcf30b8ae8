"""Finalize candidates (Algorithm 2): keep the top-Imax edges, rewrite to concat + projection.

Each chosen point gets a :class:`~growkit.core.branch.GrownBranch` whose ops and BatchNorm statistics
are warm-started from weak learning, whose 1x1 projection starts as the alpha-weighted sum the
candidate learned, and whose gate ``eta`` starts at 0: the result computes exactly the model's
function at the moment of growth, and ``d loss / d eta = <dL/dx_k, x_c>`` is the fit that weak
learning made large.

Cell mode (``inject(tie=...)``): the members of a tie group grow the same relative edges (one
selection per group, translated slot by slot), each with its own ops, norms, projection and gate
warm-started from its own candidate; their edits carry the group's ``tie`` id (the key of the
group's first edit) so the plan records the cell.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import torch
import torch.fx

from .candidates import CANDIDATES, CandidateModel
from ..errors import InputError, PointError
from .ops import DEFAULT_REGISTRY, OpRegistry
from .plan import Edit, ScoredEdge
from .safecopy import copy_module
from .surgery import apply_edit, remove_inserted, state_of
from .tie import group_of

__all__ = ["finalize", "selected_edges"]

logger = logging.getLogger(__name__)


def selected_edges(
    candidate_model: CandidateModel,
    max_ops: int = 3,
    points: Iterable[str] | None = None,
    selection: str = "alpha",
    generator: torch.Generator | None = None,
) -> dict[str, list[ScoredEdge]]:
    """Point -> the scored edges finalize keeps.

    ``selection="alpha"`` keeps the top-``max_ops`` by |alpha| (the paper's L1 feature
    selection); ``"random"`` keeps ``max_ops`` edges drawn uniformly (the paper's ablation).
    A tie group is chosen by one member's selection (its alpha is shared; one random draw)
    translated to every member; naming one member in ``points`` grows the whole group.
    """
    if selection not in ("alpha", "random"):
        raise InputError(f"selection must be 'alpha' or 'random', got {selection!r}")
    if not isinstance(max_ops, int) or isinstance(max_ops, bool) or max_ops < 1:
        raise InputError(f"max_ops must be an int >= 1, got {max_ops!r}")
    cands = candidate_model.candidates
    if points is None:
        names = list(cands)
    else:
        names = [points] if isinstance(points, str) else list(points)
        for n in names:
            if n not in cands:
                # accept module paths too
                match = [k for k in cands if candidate_model.state.point(k).module == n]
                if not match:
                    raise PointError(f"no candidate at point {n!r}; candidates are at: {', '.join(cands)}")
        names = [k for k in cands if k in names or candidate_model.state.point(k).module in names]
    tied = group_of(candidate_model.ties)
    names = [k for k in cands if k in names or (k in tied and set(tied[k].points) & set(names))]
    if selection == "alpha":
        out = {k: cands[k].top_edges(max_ops) for k in names if k not in tied or tied[k].points[0] == k}
    else:
        out = {}
        for k, c in cands.items():
            if k in tied and tied[k].points[0] != k:
                continue  # the group's first member draws for all of them
            flat = c.alpha.detach().flatten().tolist()
            pick = torch.randperm(len(flat), generator=generator)[:max_ops].tolist()
            if k in names:
                out[k] = [ScoredEdge(*c.edges()[i], flat[i]) for i in pick]
    for g in candidate_model.ties:
        if g.points[0] in out:
            first = out[g.points[0]]
            for p, es in g.translate(g.points[0], [e.edge for e in first]).items():
                out[p] = [ScoredEdge(z, op, e.alpha) for (z, op), e in zip(es, first)]
    return {k: out[k] for k in names if k in out}


def _check_tied(candidate_model: CandidateModel, chosen: Mapping[str, Sequence[ScoredEdge]]) -> None:
    """Explicit ``edges`` must grow a tie group whole, with the same relative edges everywhere."""
    for g in candidate_model.ties:
        present = [p for p in g.points if p in chosen]
        if not present:
            continue
        if len(present) != len(g.points):
            missing = [p for p in g.points if p not in chosen]
            raise InputError(f"points {present} are tied with {missing} (cell mode); give edges for every "
                             "member of the group, or inject with tie='none'")
        first = g.points[0]
        want = g.translate(first, [e.edge for e in chosen[first]])
        bad = [p for p in g.points if [tuple(e.edge) for e in chosen[p]] != [tuple(w) for w in want[p]]]
        if bad:
            raise InputError(f"tied points {bad} do not grow the same relative edges as {first!r}; "
                             f"expected {[want[p] for p in bad]}")


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def finalize(
    candidate_model: CandidateModel,
    max_ops: int = 3,
    points: Iterable[str] | None = None,
    *,
    selection: str = "alpha",
    generator: torch.Generator | None = None,
    registry: OpRegistry | None = None,
    edges: Mapping[str, Sequence[ScoredEdge | tuple[str, str, float]]] | None = None,
) -> torch.fx.GraphModule:
    """Grow the chosen points of ``candidate_model`` (not modified) into a new module.

    Args:
        candidate_model: result of :func:`growkit.inject`, after weak learning.
        max_ops: Imax, the number of (input, op) edges kept per point (top |alpha|).
        points: points to grow (default: every candidate); unchosen points get nothing.
        selection: ``"alpha"`` (top |alpha|) or ``"random"`` edges (ablation baseline).
        generator: RNG for ``selection="random"``.
        edges: point -> :class:`~growkit.core.plan.ScoredEdge` (or ``(input, op, alpha)``) to keep,
            as :func:`selected_edges` returns them;
            given, it replaces ``max_ops``, ``points``, ``selection`` and ``generator``, so a
            selection that was costed first (random draws included) is the one that is grown.

    Returns:
        A ``torch.fx.GraphModule`` computing exactly the candidate model's function, with the
        growth recorded in its plan (``growkit.plan_of(module)``).
    """
    if not isinstance(candidate_model, CandidateModel):
        raise InputError(
            f"finalize expects the CandidateModel returned by growkit.inject, got {type(candidate_model).__name__}"
        )
    cands = candidate_model.candidates
    if edges is None:
        chosen = selected_edges(candidate_model, max_ops, points, selection, generator)
    else:
        chosen = {k: [ScoredEdge(*e) for e in v] for k, v in edges.items()}
        for k, es in chosen.items():
            if k not in cands:
                raise PointError(f"no candidate at point {k!r}; candidates are at: {', '.join(cands)}")
            known = set(cands[k].edges())
            bad = [tuple(e.edge) for e in es if e.edge not in known]
            if bad:
                raise InputError(f"point {k!r} has no candidate edge(s) {bad}; its edges are {sorted(known)}")
        _check_tied(candidate_model, chosen)
    gm = copy_module(candidate_model.module)
    gm.meta["growkit"] = candidate_model.state.copy()
    remove_inserted(gm, CANDIDATES)
    st = state_of(gm)
    assert st is not None
    tied = group_of(candidate_model.ties)
    tie_id: dict[int, str] = {}  # id(group) -> key of its first grown edit
    for point, edges in chosen.items():
        if not edges:
            logger.info("point %s: every alpha is zero, nothing to grow", point)
            continue
        cand = cands[point]
        src = dict(zip(cand.edges(), zip(cand.ops, cand.norms)))
        if not _finite([cand.alpha, *(t for e in edges for m in src[e.edge] for t in m.state_dict().values())]):
            # Copying them would put NaN / inf into the grown model (eta * NaN is NaN).
            logger.warning("point %s: its candidate's weights are not finite; nothing grown there", point)
            continue
        key = f"g{len(st.plan.edits)}"
        tie = tie_id.setdefault(id(tied[point]), key) if point in tied else ""
        edit = Edit(point, tuple(e.edge for e in edges), key, tie)
        branch = apply_edit(gm, edit, registry or DEFAULT_REGISTRY)
        with torch.no_grad():
            for e, scored in enumerate(edges):
                op_mod, norm = src[scored.edge]
                branch.ops[e].load_state_dict(op_mod.state_dict())
                branch.norms[e].load_state_dict(norm.state_dict())
            branch.init_proj_from_alphas([e.alpha for e in edges])
    gm.graph.lint()
    gm.recompile()
    gm.train(candidate_model.training)
    return gm
