"""Graph surgery shared by inject, finalize and plan replay (:func:`apply_plan`).

A growable module is a ``torch.fx.GraphModule`` whose ``meta["growkit"]`` holds a
:class:`GrowState`: the base model's growth points, the growth plan applied so far and, for every
base point, the fx node that currently carries its value (after growth, the branch node that
replaced it). Points and plan always speak in the *base* model's node names, so a plan replays on
a fresh trace of the base model.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import InputError, OpError, PlanError, PointError
from .branch import GrownBranch
from .dualgraph import graphs_of
from .graph import GRANULARITIES, GrowthPoint, LayerGraph, as_args, find_point, model_name, trace
from .ops import DEFAULT_REGISTRY, OpRegistry
from .plan import BRANCHES, Edit, GrowthPlan, Resize, graph_fingerprint
from .safecopy import copy_module

__all__ = ["GrowState", "growable", "state_of", "insert_at_point", "remove_inserted", "apply_edit", "apply_plan",
           "trace_options", "META_KEY", "register_resize", "refresh_shapes", "ResizeReplay"]

META_KEY = "growkit"


@dataclass
class GrowState:
    """What growkit knows about a growable GraphModule (see module docstring)."""

    points: list[GrowthPoint]
    plan: GrowthPlan
    node_of: dict[str, str] = field(default_factory=dict)
    node_shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)

    def point(self, name: str) -> GrowthPoint:
        return find_point(self.points, name)

    def copy(self) -> "GrowState":
        return dataclasses.replace(
            self, plan=copy.deepcopy(self.plan), node_of=dict(self.node_of), node_shapes=dict(self.node_shapes)
        )


def state_of(gm: nn.Module) -> GrowState | None:
    """The :class:`GrowState` of a growable module, or ``None`` for any other module."""
    meta = getattr(gm, "meta", None)
    if isinstance(gm, torch.fx.GraphModule) and isinstance(meta, dict):
        st = meta.get(META_KEY)
        if isinstance(st, GrowState):
            return st
    return None


def from_layer_graph(lg: LayerGraph, example_input: Any, base: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Turn a traced :class:`LayerGraph` into a growable module with an empty plan."""
    gm = lg.graph_module
    args = as_args(example_input)
    plan = GrowthPlan(
        base=dict(base or ({"source": lg.model_name} if lg.model_name else {})),
        input_shapes=[[1, *a.shape[1:]] if a.dim() else [] for a in args],  # per example: batch 1
        input_dtypes=[str(a.dtype).replace("torch.", "") for a in args],
        fingerprint=graph_fingerprint(gm),
    )
    gm.meta[META_KEY] = GrowState(
        points=list(lg.points), plan=plan, node_shapes={k: v["shape"] for k, v in lg.nodes.items()}
    )
    return gm


def growable(model: nn.Module, example_input: Any = None, **trace_kwargs: Any) -> torch.fx.GraphModule:
    """A deep copy of ``model`` as a growable GraphModule (traced unless it already is one)."""
    if state_of(model) is not None:
        gm = copy_module(model)
        gm.meta[META_KEY] = state_of(model).copy()  # type: ignore[union-attr]
        return gm
    if example_input is None:
        raise InputError(
            "example_input is required to trace a model that growkit has not traced before; "
            "pass one batch-1 input, e.g. torch.randn(1, 3, 224, 224)"
        )
    lg = trace(model, example_input, **trace_kwargs)
    base = _base_record(model, example_input)
    # How to find the same points on a fresh trace (growkit.load): only where not the default.
    user_points = trace_kwargs.get("points")
    if lg.granularity != "block" or user_points:
        base["trace"] = {"granularity": trace_kwargs.get("granularity", "block")}
        if user_points:
            base["trace"]["points"] = [user_points] if isinstance(user_points, str) else list(user_points)
    return from_layer_graph(lg, example_input, base)


def growable_with_args(model: nn.Module, example_input: Any, names: Any, what: str,
                       ) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], list[str] | None]:
    """What a resize (widen, deepen) starts from: the growable copy of ``model``, the example input
    (the plan's own when ``None``) as args on the model's device, and ``names`` (a string, strings
    or ``None`` for all) checked and listed; ``what`` names them in the error."""
    named = [names] if isinstance(names, str) else None if names is None else list(names)
    if named is not None and (not named or not all(isinstance(x, str) for x in named)):
        raise InputError(f"{what} must be names (strings) or None, got {names!r}")
    gm = growable(model, example_input)
    st = state_of(gm)
    assert st is not None
    if example_input is None:
        example_input = st.plan.example_input()
    dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
    return gm, tuple(a.to(dev) for a in as_args(example_input)), named


def trace_options(granularity: str | None, points: Any = None) -> dict[str, Any]:
    """The :func:`trace` keywords for a run's ``granularity`` and ``points`` settings."""
    out: dict[str, Any] = {"granularity": granularity or "block"}
    if points:
        out["points"] = list(points)
    return out


def _base_record(model: nn.Module, example_input: Any) -> dict[str, Any]:
    """How to re-create the base model: timm architecture and constructor arguments when known."""
    name = model_name(model)
    if not name:
        return {}
    kwargs: dict[str, Any] = {}
    nc = getattr(model, "num_classes", None)
    if isinstance(nc, int):
        kwargs["num_classes"] = nc
    args = as_args(example_input)
    if args[0].dim() == 4:
        kwargs["in_chans"] = int(args[0].shape[1])
    return {"source": name, "kwargs": kwargs}


def insert_at_point(
    gm: torch.fx.GraphModule,
    point: str,
    input_names: Sequence[str],
    module: nn.Module,
    container: str,
    key: str,
) -> torch.fx.Node:
    """Insert ``module(x_point, *z)`` right after the point's current node and reroute its users.

    ``point`` and ``input_names`` are base node names; they are mapped to the nodes that carry
    their values now. The module is stored as ``gm.<container>[key]``.
    """
    st = state_of(gm)
    assert st is not None, "insert_at_point needs a growable module"

    def current(name: str, named: dict[str, torch.fx.Node]) -> torch.fx.Node:
        cur = st.node_of.get(name, name)
        if cur not in named:
            raise PointError(f"node {name!r} is not in this model's graph")
        return named[cur]

    sites = []
    for graph in graphs_of(gm):
        named = {n.name: n for n in graph.nodes}
        sites.append((graph, current(point, named), [current(z, named) for z in input_names]))
    if not hasattr(gm, container):
        gm.add_module(container, nn.ModuleDict())
    ref = next((t for t in gm.parameters() if t.is_floating_point()), None)
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)
    module.train(gm.training)
    getattr(gm, container)[key] = module
    # The same node, under the same name, in every graph (train and eval graphs of a dual module).
    new_name = None
    for graph, x, zs in sites:
        with graph.inserting_after(x):
            new = graph.create_node("call_module", f"{container}.{key}", (x, *zs), name=new_name)
        if new_name is None:
            new_name = new.name
        elif new.name != new_name:
            raise PointError(f"node {new_name!r} cannot be named the same in the train and eval graphs")
        # the new node takes the place of x for all its users, so it has x's shape: later passes that
        # read shapes (a block copy cut after this one, in a plan replay) see it as they saw x
        if "tensor_meta" in x.meta:
            new.meta["tensor_meta"] = x.meta["tensor_meta"]
        x.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    assert new_name is not None
    st.node_of[point] = new_name
    return new


def remove_inserted(gm: torch.fx.GraphModule, container: str) -> None:
    """Remove every node calling ``gm.<container>.*`` (restoring its first argument) and the modules."""
    st = state_of(gm)
    for graph in graphs_of(gm):
        for n in list(graph.nodes):
            if n.op == "call_module" and str(n.target).startswith(container + "."):
                x = n.args[0]
                n.replace_all_uses_with(x)
                graph.erase_node(n)
                if st is not None:
                    for p, cur in list(st.node_of.items()):
                        if cur == n.name:
                            st.node_of[p] = x.name
    if hasattr(gm, container):
        delattr(gm, container)
    for graph in graphs_of(gm):
        graph.lint()
    gm.recompile()


def apply_edit(gm: torch.fx.GraphModule, edit: Edit, registry: OpRegistry | None = None) -> nn.Module:
    """Grow one branch onto growable ``gm`` (eta = 0: output unchanged); returns the branch."""
    st = state_of(gm)
    if st is None:
        raise PlanError("apply_edit needs a growable module (from growkit.trace / inject / finalize)")
    try:
        p = st.point(edit.point)
    except PointError as exc:
        raise PlanError(f"plan names growth point {edit.point!r} that the base model does not have") from exc
    eligible = {z.name: z for z in p.inputs}
    specs = []
    for e in edit.edges:
        if e.input not in eligible:
            raise PlanError(
                f"plan edge input {e.input!r} is not an eligible input of point {p.name!r} "
                f"(eligible: {', '.join(eligible) or 'none'})"
            )
        specs.append((eligible[e.input], e.op))
    try:
        branch = GrownBranch(p, specs, registry or DEFAULT_REGISTRY)
    except OpError as exc:
        raise PlanError(f"plan edit at {p.name!r}: {exc}") from exc
    insert_at_point(gm, p.name, [e.input for e in edit.edges], branch, BRANCHES, edit.key)
    st.plan.edits.append(edit)
    return branch


ResizeReplay = Callable[[torch.fx.GraphModule, Resize, Any], None]
"""Replays one :class:`Resize` record on a growable module (``(gm, record, example_input)``), in
place, appending the record to the module's plan."""

_RESIZE_REPLAY: dict[str, ResizeReplay] = {}


def register_resize(kind: str, replay: ResizeReplay) -> None:
    """Register how plan replay applies resize records of ``kind`` (the widen / deepen modules
    register themselves: this module, which they build on, does not import them)."""
    _RESIZE_REPLAY[kind] = replay


@torch.no_grad()
def refresh_shapes(gm: torch.fx.GraphModule, example_input: Any) -> None:
    """Re-measure the shapes of a growable module's points and nodes after a resize changed them,
    so later edits (inject, finalize, replay) build their branches for the new widths."""
    st = state_of(gm)
    assert st is not None
    was = gm.training
    gm.eval()
    try:
        ShapeProp(gm).propagate(*as_args(example_input))
    finally:
        gm.train(was)
    shapes: dict[str, tuple[int, ...]] = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            shapes[n.name] = tuple(int(v) for v in meta.shape)

    def now(name: str, old: tuple[int, ...]) -> tuple[int, ...]:
        got = shapes.get(st.node_of.get(name, name))
        # Points keep the batch size they were traced with; only the other dimensions move.
        return old if got is None or len(got) != len(old) or not old else (old[0], *got[1:])

    for name in list(st.node_shapes):
        old = st.node_shapes[name]
        if old is not None and name in shapes:
            st.node_shapes[name] = now(name, old)
    resized = {p.name: dataclasses.replace(p, shape=now(p.name, p.shape)) for p in st.points}
    pts = []
    for p in resized.values():
        ins = []
        for z in p.inputs:
            zp = resized.get(z.name)
            if zp is not None:
                ins.append(dataclasses.replace(z, shape=zp.shape, channels=zp.channels))
                continue
            # an input that is not a point itself: its channels sit where they sat before
            zs = now(z.name, z.shape)
            axis = 1 if len(z.shape) == 4 and z.shape[1] == z.channels else len(z.shape) - 1
            ins.append(dataclasses.replace(z, shape=zs, channels=zs[axis]))
        pts.append(dataclasses.replace(p, inputs=tuple(ins)))
    st.points = pts


def _trace_record(base: dict[str, Any]) -> dict[str, Any]:
    """The validated ``granularity`` / ``points`` a plan's base was traced with (data only)."""
    rec = base.get("trace")
    if rec is None:
        return {}
    if not isinstance(rec, dict) or set(rec) - {"granularity", "points"}:
        raise PlanError("plan base 'trace' must be an object with 'granularity' and optional 'points'")
    out: dict[str, Any] = {}
    if rec.get("granularity") is not None:
        if rec["granularity"] not in GRANULARITIES:
            raise PlanError(f"plan base granularity {rec['granularity']!r} is not one of {GRANULARITIES}")
        out["granularity"] = rec["granularity"]
    pts = rec.get("points")
    if pts is not None:
        if not (isinstance(pts, list) and len(pts) <= 10_000 and all(
                isinstance(v, str) and 0 < len(v) <= 500 and v.replace("_", "a").replace(".", "a").isalnum() for v in pts)):
            raise PlanError("plan base points must be a list of module paths / node names")
        out["points"] = list(pts)
    return out


def apply_plan(
    base_model: nn.Module,
    plan: GrowthPlan,
    example_input: Any = None,
    *,
    registry: OpRegistry | None = None,
    **trace_kwargs: Any,
) -> torch.fx.GraphModule:
    """Replay ``plan`` onto a fresh trace of ``base_model`` (which is not modified).

    The result has freshly initialised branches with eta = 0 (so it computes the base function);
    load the grown model's ``state_dict`` to get its weights. Raises :class:`PlanError` when the
    plan does not belong to this base model.
    """
    if example_input is None:
        example_input = plan.example_input()
    if state_of(base_model) is None:
        trace_kwargs = {**_trace_record(plan.base), **trace_kwargs}
    gm = growable(base_model, example_input, **trace_kwargs)
    st = state_of(gm)
    assert st is not None
    if st.plan.grown:
        raise PlanError("apply_plan expects an ungrown base model; this one already carries a plan")
    if plan.fingerprint and st.plan.fingerprint != plan.fingerprint:
        raise PlanError(
            f"plan was made for a different base graph (fingerprint {plan.fingerprint}, this model "
            f"traces to {st.plan.fingerprint}); pass the base model the plan was grown from"
        )
    if plan.base:
        st.plan.base = dict(plan.base)
    for step in plan.steps():
        if isinstance(step, Resize):
            if step.kind not in _RESIZE_REPLAY:
                raise PlanError(f"plan resize {step.key!r} of kind {step.kind!r} cannot be replayed by this growkit")
            _RESIZE_REPLAY[step.kind](gm, step, example_input)
        else:
            apply_edit(gm, step, registry)
    gm.graph.lint()
    gm.recompile()
    return gm
