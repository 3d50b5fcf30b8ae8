"""Trace a model with torch.fx into a :class:`LayerGraph`: shapes, growth points, eligible inputs.

The growth points are block outputs (``layer2.1``, ``stages.1.blocks.0``, ``blocks.3``), found from
the module paths that torch.fx records in ``node.meta["nn_module_stack"]``, or at layer
granularity every conv / linear unit's output after its norm and activation (plain CNNs and MLPs
have no blocks), plus any points the user names. Everything here is a
pure function of the model and the example input; the model passed in is never modified.

Why over 450 lines (about 900): tracing (timm's fx registries, untraceable-module diagnostics,
train/eval graph pairs), shape propagation and the growth-point / eligible-input rules (block and
layer granularity, user-named points) are one step with one output, the LayerGraph, and the rules
read the tracer's module stack and shapes directly. Issue 18's layer-granularity rules landed here
in the same merge as the restructure; moving the point rules into their own module
(``core/points.py``) is the next split, left out of issue 17 to keep that merge reviewable.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_flatten

from ..errors import InputError, TraceError
from .dualgraph import DualGraphModule, align_names, same_graph
from .safecopy import copy_module

__all__ = [
    "EligibleInput",
    "GrowthPoint",
    "LayerGraph",
    "find_point",
    "trace",
    "as_args",
    "outputs_equal",
    "eval_outputs",
    "GRANULARITIES",
]

logger = logging.getLogger(__name__)

GRANULARITIES = ("block", "layer")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class EligibleInput:
    """An earlier growth point that may feed a candidate at a later point.

    ``relation`` is ``"same"`` (same spatial size / token count) or ``"down"`` (spatially larger by
    the integer ``factor``; a candidate op resamples it with stride ``factor``).
    """

    name: str
    shape: tuple[int, ...]
    relation: str
    factor: int
    channels: int


@dataclass(frozen=True)
class GrowthPoint:
    """A block output where a shortcut can be grown.

    ``name`` is the fx node name (stable across re-traces of the same architecture), ``module``
    the module path of the block, ``layout`` one of ``"nchw"``, ``"nhwc"``, ``"tokens"``.
    ``kind`` is the qualified class name of the module at ``module`` (``""`` when the point is
    a node, not a module): cell mode ties only blocks of one kind (:mod:`growkit.core.tie`).
    """

    name: str
    module: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    stage: int
    inputs: tuple[EligibleInput, ...] = ()
    kind: str = ""

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == "nchw" else self.shape[-1]

    @property
    def spatial(self) -> tuple[int, ...]:
        if self.layout == "nchw":
            return tuple(self.shape[2:])
        if self.layout == "nhwc":
            return tuple(self.shape[1:3])
        return (self.shape[1],)


def find_point(points: Sequence[GrowthPoint], name: str) -> GrowthPoint:
    """The point of ``points`` called ``name`` (fx node name or module path); else a PointError listing them."""
    for p in points:
        if p.name == name or p.module == name:
            return p
    from ..errors import PointError

    raise PointError(f"no growth point named {name!r}; growth points of this model: "
                     f"{', '.join(p.name for p in points) or '(none)'}")


@dataclass
class LayerGraph:
    """Plain-data view of a traced model.

    Attributes:
        graph_module: the traced ``torch.fx.GraphModule`` (exactly equal to the model, eval mode).
        nodes: fx node name -> ``{"op", "target", "module", "shape", "dtype"}``.
        points: growth points in topological order.
        skipped: block module path -> why its output is not a growth point.
        model_name: a re-creatable name for the model (``timm:resnet18``) when one is known.
        granularity: ``"block"`` or ``"layer"``: the level the heuristic points were found at.
    """

    graph_module: torch.fx.GraphModule
    nodes: dict[str, dict[str, Any]]
    points: list[GrowthPoint]
    skipped: dict[str, str] = field(default_factory=dict)
    model_name: str | None = None
    granularity: str = "block"

    def point(self, name: str) -> GrowthPoint:
        """The growth point called ``name`` (fx node name or block module path)."""
        return find_point(self.points, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (everything but the GraphModule)."""
        return {
            "model_name": self.model_name,
            "granularity": self.granularity,
            "points": [dataclasses.asdict(p) for p in self.points],
            "skipped": dict(self.skipped),
            "num_nodes": len(self.nodes),
        }

    def table(self) -> str:
        """A fixed-width table: one row per growth point with shape, stage and eligible inputs."""
        rows = [("#", "point (fx node)", "module", "layout", "shape", "stage", "eligible inputs")]
        for i, p in enumerate(self.points):
            ins = ", ".join(
                f"{z.name}({'=' if z.relation == 'same' else '/' + str(z.factor)},c{z.channels})"
                for z in p.inputs
            )
            rows.append(
                (str(i), p.name, p.module, p.layout, "x".join(map(str, p.shape)), str(p.stage), ins or "-")
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        lines = []
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(len(widths))) + "  " + r[-1])
        lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"LayerGraph({self.model_name or type(self.graph_module).__name__}: "
            f"{len(self.nodes)} nodes, {len(self.points)} growth points, "
            f"{len(self.skipped)} {self.granularity}s skipped)"
        )
        out = [head, self.table()]
        if any(p.inputs for p in self.points):
            out.append("eligible inputs: name(=,cC) has the point's resolution; name(/F,cC) has F times the "
                       "point's height and width and is down-sampled by F; C = its channels (projected to the point's)")
        if self.skipped:
            out.append(f"skipped {self.granularity}s:")
            out.extend(f"  {k}: {v}" for k, v in self.skipped.items())
        return "\n".join(out)

    __repr__ = __str__


# ----------------------------------------------------------------------------------------------
# tracing


class _GrowkitTracer(torch.fx.Tracer):
    """fx Tracer with user / timm leaf modules; keeps the module stack for error messages."""

    def __init__(self, leaf_classes: tuple[type, ...], leaf_names: set[str], autowrap: Iterable[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap))
        self._leaf_classes = leaf_classes
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_classes and isinstance(m, self._leaf_classes):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _timm_registries() -> tuple[list[type], list[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm missing or changed layout: plain fx still works
        return [], []
    return list(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


def as_args(example_input: Any) -> tuple[torch.Tensor, ...]:
    """Normalise ``example_input`` (a tensor or a tuple/list of tensors) to positional args."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise InputError(
        f"example_input must be a torch.Tensor or a tuple of tensors (the model's positional "
        f"inputs), got {type(example_input).__name__}; pass e.g. torch.randn(1, 3, 224, 224)"
    )


def eval_outputs(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    """``model(*args)`` in eval mode without gradients, its training flag restored: the outputs an
    exactness check compares."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        model.train(was)


def outputs_equal(a: Any, b: Any, rtol: float = 0.0) -> bool:
    """True when two (nested) model outputs have the same structure and equal tensors."""
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb or len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            if x != y:
                return False
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if rtol == 0.0:
            if not torch.equal(x, y):
                return False
        else:
            scale = y.abs().max().item() if y.numel() else 0.0
            if (x - y).abs().max().item() > rtol * max(scale, 1e-12):
                return False
    return True


def _user_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame outside torch, as ``file:line: code``."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not fr.filename.startswith(_TORCH_DIR) and "/growkit/" not in fr.filename:
            return f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return None


def _training_dependent(model: nn.Module) -> list[type]:
    """Module classes (below the root) whose forward branches on ``self.training``.

    fx freezes such a branch at trace time (DropPath traced in train mode drops paths in eval
    too), so they are traced as leaves and keep switching with ``.train()`` / ``.eval()``.
    """
    seen: dict[type, bool] = {}
    for name, m in model.named_modules():
        cls = type(m)
        if not name or cls in seen or isinstance(m, _CONTAINERS) or cls.__module__.startswith("torch.nn"):
            continue
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        seen[cls] = "self.training" in src
    return [c for c, dep in seen.items() if dep]


def _optional_args(model: nn.Module, n_inputs: int) -> dict[str, Any] | None:
    """Forward parameters beyond the example inputs, fixed to their defaults.

    Without this fx turns ``forward(x, mask=None)`` into a two-input graph whose ``mask`` branch
    is traced as if a mask were given.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    fixed = {}
    for prm in params[n_inputs:]:
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        if prm.default is not inspect.Parameter.empty:
            fixed[prm.name] = prm.default
    return fixed or None


def _symbolic_trace(
    model: nn.Module,
    leaf_modules: Sequence[type | str],
    autowrap_functions: Sequence[Callable],
    n_inputs: int = 1,
) -> torch.fx.GraphModule:
    timm_leaves, timm_fns = _timm_registries()
    classes = (
        tuple(timm_leaves)
        + tuple(_training_dependent(model))
        + tuple(m for m in leaf_modules if isinstance(m, type))
    )
    names = {m for m in leaf_modules if isinstance(m, str)}
    bad = [m for m in leaf_modules if not isinstance(m, (type, str))]
    if bad:
        raise InputError(f"leaf_modules must hold nn.Module classes or module paths, got {bad!r}")
    tracer = _GrowkitTracer(classes, names, list(timm_fns) + list(autowrap_functions))
    try:
        graph = tracer.trace(model, concrete_args=_optional_args(model, n_inputs))
    except Exception as exc:
        stack = list(tracer.module_stack.values())
        where = _user_frame(exc)
        if stack:
            path, cls = stack[-1]
            cls_name = getattr(cls, "__qualname__", str(cls))
            what = f"module '{path or '<root>'}' ({cls_name})"
            remedy = (
                f"register it as a leaf so fx calls it without tracing inside: "
                f"growkit.trace(model, x, leaf_modules=[{cls_name}]) (or the path {path!r}), or "
                f"timm.layers.register_notrace_module({cls_name})"
            )
        else:
            what = f"the model's own forward ({type(model).__name__})"
            remedy = (
                "move the data-dependent Python (if/for on tensor values, len() of tensors) into a "
                "submodule and register that as a leaf, or wrap the function with "
                "autowrap_functions=[fn]"
            )
        raise TraceError(
            f"torch.fx could not trace {what}"
            + (f" at {where}" if where else "")
            + f": {type(exc).__name__}: {exc}. Remedy: {remedy}."
        ) from exc
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


# ----------------------------------------------------------------------------------------------
# growth points


def _block_paths(model: nn.Module) -> list[str]:
    """Module paths at block granularity.

    A block is a repeated unit with at least two weight layers (conv / linear): a child of a
    container (Sequential / ModuleList / ModuleDict, or a module whose parametrised children are
    all of one block class, like timm's RegStage) that has no such unit nested inside it that is
    itself composite, and no block above it. This picks ``layer2.1`` (not ``layer2``),
    ``stages.1.blocks.0`` (not ``stages.1``) and ``features.3`` of torchvision's MobileNet (whose
    conv-bn-act sub-sequences have one weight layer and are not blocks).
    """
    mods = dict(model.named_modules())
    weights: dict[int, int] = {}

    def n_weights(m: nn.Module) -> int:
        if id(m) not in weights:
            weights[id(m)] = sum(
                1
                for sub in m.modules()
                if not any(True for _ in sub.children())
                and isinstance(getattr(sub, "weight", None), torch.Tensor)
                and sub.weight.dim() >= 2
            )
        return weights[id(m)]

    def unit(m: nn.Module) -> bool:
        return any(True for _ in m.children()) and n_weights(m) >= 2

    def repeats(m: nn.Module) -> bool:
        kids = [c for c in m.children() if any(True for _ in c.parameters())]
        return len(kids) >= 2 and len({type(c) for c in kids}) == 1 and all(unit(c) for c in kids)

    # Classes seen repeating (RegStage) are containers even where a stage holds a single block.
    stage_classes = {type(m) for m in mods.values() if repeats(m)}
    # A root holding its blocks directly as attributes (Inception's Mixed_5b, ...) is a container.
    root_is_container = sum(1 for c in model.children() if unit(c)) >= 2
    indexed: set[str] = set()
    for name, m in mods.items():
        if isinstance(m, _CONTAINERS) or type(m) in stage_classes or (name == "" and root_is_container):
            for child_name, child in m.named_children():
                if any(True for _ in child.children()) and n_weights(child) >= 1:
                    indexed.add(f"{name}.{child_name}" if name else child_name)

    def composite(path: str) -> bool:
        return any(any(True for _ in c.children()) for c in mods[path].children())

    def repeated_unit(path: str) -> bool:
        parent = mods[path.rsplit(".", 1)[0]] if "." in path else model
        cls = type(mods[path])
        return unit(mods[path]) and sum(1 for c in parent.children() if type(c) is cls) >= 2

    # A stage holds blocks: composite units, or units repeated side by side (layer1.0, layer1.1).
    blocks = [
        path for path in indexed
        if not any(o.startswith(path + ".") and (composite(o) or repeated_unit(o)) for o in indexed)
    ]
    return [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]


def _channel_hint(model: nn.Module, node_modules: list[str]) -> int | None:
    """Output feature count of the last parametrised leaf module run in a block."""
    mods = dict(model.named_modules())
    for path in reversed(node_modules):
        m = mods.get(path)
        if m is None:
            continue
        for attr in ("out_features", "out_channels", "num_features"):
            v = getattr(m, attr, None)
            if isinstance(v, int):
                return v
        ns = getattr(m, "normalized_shape", None)
        if ns:
            return int(ns[-1])
    return None


def _layout(shape: tuple[int, ...], hint: int | None) -> tuple[str | None, str]:
    """Layout of a block output from its shape and the block's last output-feature count."""
    if len(shape) == 4:
        if hint is None or shape[1] == hint:
            return "nchw", ""
        if shape[-1] == hint and hint != shape[2]:
            return "nhwc", ""
        # Concatenating blocks (DenseNet, Inception, GhostNet, DPN) end in fewer channels than
        # they output; fall back to the square-spatial convention of the two layouts.
        if shape[2] == shape[3] or shape[1] != shape[2]:
            return "nchw", ""
        return "nhwc", ""
    if len(shape) == 3:
        if hint is None or shape[-1] == hint:
            return "tokens", ""
        return None, f"3-D output {shape} is not a (B, N, C) token tensor"
    return None, f"{len(shape)}-D output {tuple(shape)}: only NCHW/NHWC feature maps and (B, N, C) tokens grow"


def _spatial(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return GrowthPoint("", "", shape, "", layout, 0).spatial


def _relation(z: GrowthPoint, p: GrowthPoint) -> tuple[str, int] | None:
    if z.dtype != p.dtype or z.layout != p.layout:  # e.g. gcvit mixes NHWC and NCHW blocks
        return None
    zs, ps = z.spatial, p.spatial
    if zs == ps:
        return "same", 1
    if z.layout == "tokens":
        return None
    if all(a % b == 0 for a, b in zip(zs, ps)):
        factors = {a // b for a, b in zip(zs, ps)}
        if len(factors) == 1:
            return "down", factors.pop()
    return None


# Layers whose output (after the norm and activation that follow) is a layer-level growth point.
_WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_WEIGHT_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d}
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.Identity)
_NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
_ACT_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu,
    F.celu, F.hardtanh, F.softplus, F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def _is_norm_or_act(n: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        m = mods.get(str(n.target))
        if m is None or isinstance(m, _NOT_ACTIVATIONS):
            return False
        cls_mod = type(m).__module__
        return (
            isinstance(m, _NORM_MODULES)
            or cls_mod == "torch.nn.modules.activation"
            or cls_mod.startswith(("timm.layers.activations", "timm.layers.norm"))
        )
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in _ACT_METHODS
    return False


def _layer_units(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, str]]:
    """(weight node, unit output, module path) for every conv / linear call in the graph.

    The unit output follows the weight layer through the norm and activation that only it feeds
    (conv -> bn -> relu ends at relu; a conv feeding a residual add ends at the conv).
    """
    mods = dict(gm.named_modules())
    units = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods.get(str(n.target)), _WEIGHT_MODULES):
            path = str(n.target)
        elif n.op == "call_function" and n.target in _WEIGHT_FUNCTIONS:
            stack = n.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else n.name
        else:
            continue
        end = n
        while len(end.users) == 1:
            user = next(iter(end.users))
            if not (user.args and user.args[0] is end and _is_norm_or_act(user, mods)):
                break
            end = user
        units.append((n, end, path))
    return units


def _output_of(path: str, members: dict[str, list[torch.fx.Node]]) -> tuple[torch.fx.Node | None, list[torch.fx.Node], str]:
    """The single node through which module ``path`` hands its value on, its nodes, or why not."""
    inside = members.get(path)
    if not inside:
        return None, [], "module is not called in forward"
    inset = set(inside)
    outs = [n for n in inside if any(u not in inset for u in n.users)]
    if len(outs) != 1:
        return None, inside, f"module has {len(outs)} outputs; growth needs exactly one tensor"
    return outs[0], inside, ""


def _tensor_layout(node: torch.fx.Node, hint: int | None) -> tuple[str | None, str]:
    """Layout of a node's value, or why it cannot be a growth point."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata):
        return None, "output is not a single tensor"
    if not meta.dtype.is_floating_point:
        return None, f"output has dtype {meta.dtype}"
    return _layout(tuple(meta.shape), hint)


def _stages(found: list[tuple[int, str, torch.fx.Node, str]]) -> list[int]:
    """Stage numbers: a new stage starts where the grouping key (layout, container, size) changes."""
    stages, stage, last = [], -1, None
    for _, _, node, key in found:
        layout = key.split("|", 1)[0]
        shape = tuple(int(s) for s in node.meta["tensor_meta"].shape)
        stage_key = (key, _spatial(shape, layout))
        if stage_key != last:
            stage += 1
            last = stage_key
        stages.append(stage)
    return stages


def _kind(module: nn.Module | None) -> str:
    """Qualified class name of a point's module (``""`` for none)."""
    return "" if module is None else f"{type(module).__module__}.{type(module).__qualname__}"


def _find_points(
    gm: torch.fx.GraphModule,
    model: nn.Module,
    granularity: str = "block",
    user_points: Sequence[str] = (),
    usable: set[str] | None = None,
) -> tuple[list[GrowthPoint], dict[str, str]]:
    """Growth points (with eligible inputs) at ``granularity`` plus the user-named ones.

    ``usable``: node names allowed as points and inputs (those the train- and eval-mode graphs
    share); ``None`` allows all.
    """
    nodes = [n for n in gm.graph.nodes]
    order = {n: i for i, n in enumerate(nodes)}
    members: dict[str, list[torch.fx.Node]] = {}
    shared_paths = set()
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        for key, (path, _cls) in stack.items():
            members.setdefault(path, []).append(n)
            if "@" in key:  # a second call of the same module: not a well-defined block
                shared_paths.add(path)

    found: list[tuple[int, str, torch.fx.Node, str]] = []
    block_inputs: dict[str, torch.fx.Node | None] = {}
    skipped: dict[str, str] = {}
    mode_note = "its value differs between the train-mode and eval-mode graphs"

    def external_input(inside: list[torch.fx.Node]) -> torch.fx.Node | None:
        inset = set(inside)
        ext = {a for n in inside for a in n.all_input_nodes if a not in inset}
        ext_t = [a for a in ext if isinstance(a.meta.get("tensor_meta"), TensorMetadata)]
        return ext_t[0] if len(ext_t) == 1 else None

    if granularity == "block":
        for path in _block_paths(model):
            if path not in members:
                continue  # not called in forward
            if path in shared_paths:
                skipped[path] = "module is called more than once in forward"
                continue
            out, inside, why = _output_of(path, members)
            if out is None:
                skipped[path] = why.replace("module", "block")
                continue
            leaf_paths = [n.target for n in inside if n.op == "call_module"]
            layout, why = _tensor_layout(out, _channel_hint(model, leaf_paths))
            if layout is None:
                skipped[path] = "block " + why if why.startswith("output") else why
                continue
            if usable is not None and out.name not in usable:
                skipped[path] = mode_note
                continue
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            block_inputs[out.name] = external_input(inside)
            found.append((order[out], path, out, layout + "|" + parent))
    else:
        mods = dict(model.named_modules())
        seen: set[str] = set()
        for w, out, path in _layer_units(gm):
            if out.name in seen:
                continue
            m = mods.get(path)
            hint = next((getattr(m, a) for a in ("out_channels", "out_features") if isinstance(getattr(m, a, None), int)), None)
            layout, why = _tensor_layout(out, hint)
            if layout is None:
                skipped[path] = why
                continue
            if usable is not None and out.name not in usable:
                skipped[path] = mode_note
                continue
            seen.add(out.name)
            x_in = w.args[0] if w.args and isinstance(w.args[0], torch.fx.Node) else None
            block_inputs[out.name] = x_in if x_in is not None and isinstance(x_in.meta.get("tensor_meta"), TensorMetadata) else None
            found.append((order[out], path, out, layout))

    found.sort(key=lambda t: t[0])
    if user_points:
        found = _add_user_points(found, user_points, gm, model, members, shared_paths, usable, block_inputs, external_input)
    stages = _stages(found)
    all_mods = dict(model.named_modules())
    points = [
        GrowthPoint(node.name, path, tuple(int(s) for s in node.meta["tensor_meta"].shape),
                    str(node.meta["tensor_meta"].dtype).replace("torch.", ""), key.split("|", 1)[0], st,
                    kind=_kind(all_mods.get(path)))
        for (_, path, node, key), st in zip(found, stages)
    ]

    with_inputs = []
    for k, p in enumerate(points):
        earlier = points[:k]
        same_stage = [z for z in earlier if z.stage == p.stage]
        prev_stage_outs = []
        for s in (p.stage - 1, p.stage - 2):
            outs = [z for z in earlier if z.stage == s]
            if outs:
                prev_stage_outs.append(outs[-1])
        elig = []
        # The block's own input (e.g. the stem output for the first block) when it is no point.
        bin_node = block_inputs.get(p.name)
        if (
            bin_node is not None
            and all(z.name != bin_node.name for z in earlier)
            and (usable is None or bin_node.name in usable)
        ):
            meta = bin_node.meta["tensor_meta"]
            shape = tuple(int(s) for s in meta.shape)
            layout = p.layout if len(shape) == len(p.shape) else "?"
            z = GrowthPoint(bin_node.name, "", shape, str(meta.dtype).replace("torch.", ""), layout, p.stage)
            rel = _relation(z, p) if layout != "?" else None
            if rel is not None:
                elig.append(EligibleInput(z.name, z.shape, rel[0], rel[1], z.channels))
        for z in prev_stage_outs[::-1] + same_stage:
            rel = _relation(z, p)
            if rel is not None:
                elig.append(EligibleInput(z.name, z.shape, rel[0], rel[1], z.channels))
        with_inputs.append(dataclasses.replace(p, inputs=tuple(elig)))
    return with_inputs, skipped


def _valid_point_names(gm: torch.fx.GraphModule, usable: set[str] | None, limit: int = 40) -> str:
    """Node names that could be growth points, for error messages."""
    names = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output") or (usable is not None and n.name not in usable):
            continue
        if _tensor_layout(n, None)[0] is not None:
            names.append(n.name)
    more = f", ... ({len(names)} in all; LayerGraph.nodes lists every node)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none)"


def _add_user_points(
    found: list[tuple[int, str, torch.fx.Node, str]],
    user_points: Sequence[str],
    gm: torch.fx.GraphModule,
    model: nn.Module,
    members: dict[str, list[torch.fx.Node]],
    shared_paths: set[str],
    usable: set[str] | None,
    block_inputs: dict[str, torch.fx.Node | None],
    external_input: Callable[[list[torch.fx.Node]], torch.fx.Node | None],
) -> list[tuple[int, str, torch.fx.Node, str]]:
    """``found`` plus the points the user named (module paths or fx node names), in graph order.

    A named point joins the stage of its neighbour in graph order when layout and size match
    (so it does not split a stage), else it starts one of its own.
    """
    from ..errors import PointError

    named = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mods = dict(model.named_modules())
    have = {node.name for _, _, node, _ in found}
    extra: list[tuple[int, str, torch.fx.Node, str]] = []

    def bad(name: str, why: str) -> PointError:
        found_names = ", ".join(f"{node.name} ({path})" for _, path, node, _ in found) or "(none)"
        return PointError(
            f"no growth point named {name!r}: {name!r} {why}. Name a module path (e.g. 'layer1.0') or "
            f"an fx node name whose value is one floating NCHW / NHWC / (B, N, C) tensor. Growth points "
            f"found: {found_names}; valid names include: {_valid_point_names(gm, usable)}"
        )

    for name in user_points:
        if not isinstance(name, str) or not name:
            raise PointError(f"points must be module paths or fx node names (strings), got {name!r}")
        if name in named and named[name].op not in ("placeholder", "output"):
            node, path, inside = named[name], "", [named[name]]
            stack = node.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else ""
            hint = None
        elif name in mods and name in members:
            if name in shared_paths:
                raise bad(name, "is a module called more than once in forward")
            node, inside, why = _output_of(name, members)
            if node is None:
                raise bad(name, "is a module whose " + why.replace("module has", "forward has"))
            path = name
            hint = _channel_hint(model, [n.target for n in inside if n.op == "call_module"])
        elif name in mods:
            raise bad(name, "is a module that forward never calls (or that fx traced as part of another call)")
        else:
            raise bad(name, f"is neither a module path nor an fx node name of {type(model).__name__}")
        layout, why = _tensor_layout(node, hint)
        if layout is None:
            raise bad(name, "is not a growth point: its " + why)
        if usable is not None and node.name not in usable:
            raise bad(name, "computes different values in train and eval mode")
        if node.name in have:
            continue
        have.add(node.name)
        if path == name:
            block_inputs[node.name] = external_input(inside)
        extra.append((order[node], path or name, node, layout + "|user:" + node.name))
    if not extra:
        return found
    merged = sorted(found + extra, key=lambda t: t[0])

    def group(i: int) -> tuple[str, tuple[int, ...]]:
        _, _, node, key = merged[i]
        layout = key.split("|", 1)[0]
        return layout, _spatial(tuple(int(s) for s in node.meta["tensor_meta"].shape), layout)

    user_keys = {t[3] for t in extra}
    for i, (o, path, node, key) in enumerate(merged):
        if key not in user_keys:
            continue
        for j in (i - 1, i + 1):  # previous neighbour first, already resolved
            if 0 <= j < len(merged) and group(j) == group(i) and merged[j][3] not in user_keys:
                merged[i] = (o, path, node, merged[j][3])
                break
        else:
            if i > 0 and group(i - 1) == group(i):
                merged[i] = (o, path, node, merged[i - 1][3])
    return merged


def model_name(model: nn.Module) -> str | None:
    """``timm:<arch>`` for timm models (from ``pretrained_cfg``), else ``None``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    return None


def _infos(gm: torch.fx.GraphModule) -> dict[str, dict[str, Any]]:
    infos: dict[str, dict[str, Any]] = OrderedDict()
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        stack = n.meta.get("nn_module_stack") or {}
        infos[n.name] = {
            "op": n.op,
            "target": n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)),
            "module": next(reversed(stack.values()))[0] if stack else "",
            "shape": tuple(int(s) for s in meta.shape) if isinstance(meta, TensorMetadata) else None,
            "dtype": str(meta.dtype).replace("torch.", "") if isinstance(meta, TensorMetadata) else None,
        }
    return infos


def _exact(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...], eager: Any) -> bool:
    """Whether ``gm`` run in eval mode reproduces ``eager`` exactly."""
    gm.eval()
    try:
        with torch.no_grad():
            return outputs_equal(gm(*args), eager)
    except Exception:  # noqa: BLE001 - a graph that cannot run in eval mode is not exact
        return False


def trace(
    model: nn.Module,
    example_input: Any,
    *,
    granularity: str = "block",
    points: Sequence[str] | str | None = None,
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable] = (),
    check: bool = True,
) -> LayerGraph:
    """Trace ``model`` with torch.fx and find its growth points.

    Args:
        model: any ``nn.Module``; it is copied (:func:`growkit.safecopy.copy_module`), never
            modified, also when it already ran forward and caches tensors.
        example_input: a tensor (or tuple of tensors) the model accepts; used for shapes.
        granularity: ``"block"``: growth points are block outputs (``layer1.0``); where no block
            point has an eligible input (plain CNNs, MLPs) it falls back to ``"layer"``: every
            conv / linear unit's output after its norm and activation.
        points: extra growth points by module path or fx node name (kept with the heuristic ones).
        leaf_modules: extra module classes or module paths fx should not trace into
            (timm's own registry is always used).
        autowrap_functions: extra free functions fx should record as calls instead of tracing.
        check: verify that the traced module gives exactly the eager output (eval mode).

    Where ``forward`` branches on ``self.training`` (``F.dropout(training=self.training)``), the
    train-mode and eval-mode traces differ; the result is then a
    :class:`~growkit.dualgraph.DualGraphModule` that switches graphs with ``.train()`` /
    ``.eval()``, and growth points are the nodes both graphs share.

    Raises:
        TraceError: fx cannot trace the model (the message names the module and line and the
            remedy), or the traced module is not exact.
        InputError: ``example_input`` is not a tensor, or the model rejects it, or
            ``granularity`` is unknown.
        PointError: a name in ``points`` is not a module path or node name, or its value is not
            one floating tensor of a supported layout (the message lists valid names).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    user_points = [points] if isinstance(points, str) else list(points or [])
    args = as_args(example_input)
    work = copy_module(model)
    work.eval()
    try:
        with torch.no_grad():
            eager = work(*args)
    except Exception as exc:
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise InputError(
            f"{type(model).__name__} rejected example_input of shape {shapes}: "
            f"{type(exc).__name__}: {exc}. Pass an input the model accepts (same as a training batch, "
            f"e.g. batch 1)."
        ) from exc
    # Modules below the root that branch on self.training are traced as leaves (they switch
    # themselves); the root's own branches are kept by tracing both modes (torchvision's
    # feature-extraction train/eval graph pair).
    graphs = {}
    for mode in (True, False):
        work.train(mode)
        tracer_gm = _symbolic_trace(work, leaf_modules, autowrap_functions, len(args))
        graphs[mode] = tracer_gm
    work.eval()
    train_gm, eval_gm = graphs[True], graphs[False]
    usable: set[str] | None = None
    if same_graph(train_gm.graph, eval_gm.graph) or (check and _exact(train_gm, args, eager)):
        # One graph serves both modes (branches that only pick equal values, like LeViT's
        # cached attention biases, need no second graph).
        gm: torch.fx.GraphModule = train_gm
    else:
        train_graph, usable = align_names(train_gm.graph, eval_gm.graph)
        gm = DualGraphModule(work, train_graph, eval_gm.graph, type(model).__name__)
    gm.eval()
    try:
        ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {type(model).__name__} fails to run on example_input: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if check:
        with torch.no_grad():
            traced = gm(*args)
        if not outputs_equal(traced, eager):
            raise TraceError(
                f"the fx trace of {type(model).__name__} does not reproduce the eager output "
                "exactly (a Python branch on input values was frozen at trace time); register the "
                "module with that branch as a leaf via leaf_modules=[...]"
            )
    used = granularity
    found, skipped = _find_points(gm, work, granularity, user_points, usable)
    if granularity == "block" and not any(p.inputs for p in found):
        layer_points, layer_skipped = _find_points(gm, work, "layer", user_points, usable)
        if any(p.inputs for p in layer_points):
            logger.info(
                "%s: no block growth point has an eligible input; using layer granularity "
                "(every conv / linear unit's output)", type(model).__name__,
            )
            used, found, skipped = "layer", layer_points, layer_skipped
    infos = _infos(gm)  # of the eval graph, which ShapeProp annotated
    gm.train(model.training)
    return LayerGraph(gm, infos, found, skipped, model_name(model), used)

