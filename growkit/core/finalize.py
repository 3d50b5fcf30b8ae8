"""Finalize candidates (Algorithm 2): keep the top-Imax edges, rewrite to concat + projection.

Each chosen point gets a :class:`~growkit.core.branch.GrownBranch` whose ops and BatchNorm statistics
are warm-started from weak learning, whose 1x1 projection starts as the alpha-weighted sum the
candidate learned, and whose gate ``eta`` starts at 0: the result computes exactly the model's
function at the moment of growth, and ``d loss / d eta = <dL/dx_k, x_c>`` is the fit that weak
learning made large.
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
    if selection == "alpha":
        return {k: cands[k].top_edges(max_ops) for k in names}
    out = {}
    for k, c in cands.items():
        flat = c.alpha.detach().flatten().tolist()
        pick = torch.randperm(len(flat), generator=generator)[:max_ops].tolist()
        if k in names:
            out[k] = [ScoredEdge(*c.edges()[i], flat[i]) for i in pick]
    return out


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
    gm = copy_module(candidate_model.module)
    gm.meta["growkit"] = candidate_model.state.copy()
    remove_inserted(gm, CANDIDATES)
    st = state_of(gm)
    assert st is not None
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
        edit = Edit(point, tuple(e.edge for e in edges), f"g{len(st.plan.edits)}")
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
