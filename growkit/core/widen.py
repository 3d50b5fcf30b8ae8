"""``growkit.widen``: add channels / features to a model without changing its function.

The channels that must grow together are a Torch-Pruning dependency group (growth is pruning's
inverse): the layers writing them (conv / linear output rows, BatchNorm entries, depthwise convs,
channel-wise parameters) and the layers reading them (conv / linear input columns). Each chosen
group grows from ``C`` to ``C + k`` channels, the new ones placed right after the group's block in
every layer (after it inside a concat too), so every reader sees them where every writer put them.

Two initialisations, both exact:

* ``"split"`` (Net2WiderNet; LEMON's symmetry breaking): a new channel copies a source channel
  in every writer, and every reader splits the source's input weights between the copies, with
  opposite-signed random perturbations that sum to zero. The copies carry equal values, so the
  reader's sum is unchanged; their outgoing weights differ, so their gradients differ.
* ``"zero"``: new writer rows random (the tensor's own scale), new reader columns zero. The new
  units compute something new that no reader uses yet; the readers' zero columns get gradient.

A LayerNorm-normalised group (a transformer's residual stream) takes LEMON's average expansion
instead, whatever ``init`` says (see "LayerNorm groups" below): new channels carry the mean of the
old ones, each LayerNorm's gamma and eps are rescaled, and the new units learn from the first step.

Which groups cannot widen exactly (and are skipped, or rejected when named): a group normalised
by RMSNorm / GroupNorm (the norm's statistics would change), a LayerNorm group that also passes a
BatchNorm, a depthwise conv, or a parameter used other than as a sum or a per-channel scale of one writer
(LayerScale is folded into its writer), grouped (non-depthwise) convs, transposed convs,
channels that pass a split / reshape that does not keep them contiguous (attention heads), and
the classifier's output. The chosen groups grow and are checked together on the example input and
a random input of its shape (eval mode, relative 1e-5); when that check fails, each group is
checked alone, and one that changes the output or fails to run is undone and reported. Torch-
Pruning's group search runs under a deadline (:data:`growkit.core.depgraph.GROUP_TIMEOUT_S`).

The widened model is a growable GraphModule whose plan records a ``widen`` :class:`Resize`
(module paths and channel counts), so ``growkit.save`` / ``load`` replay it exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..errors import InputError, PlanError, PointError
from .depgraph import GroupTimeout, dependency_graph, out_channel_group, out_channel_groups, output_layers, quiet_tp
from .graph import as_args, eval_outputs, outputs_equal
from .plan import WIDEN_INITS, Resize
from .surgery import growable, growable_with_args, refresh_shapes, register_resize, state_of

__all__ = ["widen", "width_groups", "WidthGroup", "WIDEN_RTOL", "REPORT_KEY"]

logger = logging.getLogger(__name__)

WIDEN_RTOL = 1e-5
"""Largest relative output change a widened group may cause on the example input (eval mode)."""
REPORT_KEY = "growkit_widen_report"
"""``gm.meta`` key of the last :func:`widen` call's report: widened groups, skipped ones with why, and
``layer_norm``: the widened groups that took LEMON's average expansion."""


@dataclass
class _Member:
    """One tensor dimension of a group: where the group's channels sit in it."""

    owner: str          # module path (or parameter's owner module path)
    attr: str           # "" for a module member; the parameter name for a parameter member
    role: str           # "out" (writes the channels), "in" (reads them), "dw" (depthwise: both), "param"
    offset: int         # the group's channel r is index offset + r here
    dim: int = 0        # parameter members: the channel dimension


@dataclass
class WidthGroup:
    """A coupled channel group: ``layer`` (a module path writing it), ``channels`` (its width now),
    ``layers`` (every module path in it), ``reason`` (why it cannot widen; ``""``: it can) and
    ``norm`` (``"layer"`` when a LayerNorm normalises the channels)."""

    layer: str
    channels: int
    layers: tuple[str, ...] = ()
    reason: str = ""
    members: list[_Member] = field(default_factory=list, repr=False)
    norm: str = ""  # "layer": LayerNorm-normalised channels (LEMON's average expansion)
    scales: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)  # (owner, attr) -> writer


# ---------------------------------------------------------------------------------------- groups
def _names(gm: nn.Module) -> tuple[dict[int, str], dict[int, tuple[str, str]]]:
    mods = {id(m): n for n, m in gm.named_modules(remove_duplicate=False) if n}
    params: dict[int, tuple[str, str]] = {}
    for n, p in gm.named_parameters(remove_duplicate=False):
        owner, _, attr = n.rpartition(".")
        params.setdefault(id(p), (owner, attr))
    return mods, params


def _short_reason(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _module_reason(m: nn.Module) -> str:
    if isinstance(m, _ConvTransposeNd):
        return f"transposed conv {type(m).__name__} is not widened"
    if isinstance(m, _ConvNd):
        if m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            return f"grouped conv ({m.groups} groups) couples channels in blocks; only depthwise convs widen"
        return ""
    if isinstance(m, nn.Linear) or isinstance(m, _BatchNorm):
        return ""
    if _is_layer_norm(m):
        return ""
    if isinstance(m, nn.GroupNorm) or "norm" in type(m).__name__.lower():
        return (f"{type(m).__name__}-normalised channels: copies would change the norm's statistics "
                "(only LayerNorm has an exact expansion, LEMON's average expansion)")
    return f"{type(m).__name__} layers are not widened"


def _is_layer_norm(m: Any) -> bool:
    """A LayerNorm over the last dimension (torch's, timm's and their subclasses; not RMSNorm)."""
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _group_of(dg: Any, group: Any, gm: nn.Module, names: tuple[dict[int, str], dict[int, tuple[str, str]]],
              ignored: set[int]) -> WidthGroup:
    mods, params = names
    root = group[0].dep.target.module
    channels = len(group[0].idxs)
    wg = WidthGroup(mods.get(id(root), "?"), channels)
    seen: set[tuple[str, str, str]] = set()
    layers: list[str] = []
    reasons: list[str] = []
    ln_ops = 0
    for item in group:
        dep, target = item.dep, item.dep.target.module
        if isinstance(target, nn.Parameter):
            if id(target) not in params:
                reasons.append("a parameter outside the model is coupled")
                continue
            owner, attr = params[id(target)]
            dim = item.dep.target.pruning_dim
            role, key = "param", (owner, attr, "param")
            om = gm.get_submodule(owner) if owner else gm
            if attr in ("weight", "bias") and (_is_layer_norm(om) or _layer_norm_nodes(gm, owner)):
                role, key, attr = "ln", (owner, "", "ln"), ""  # a functional LayerNorm's affine parameters
            elif "norm" in type(om).__name__.lower() and not isinstance(om, _BatchNorm):
                reasons.append(f"{owner}: {_module_reason(om)}")  # e.g. RMSNorm's scale
                continue
        elif id(target) in mods:
            owner, attr = mods[id(target)], ""
            if id(target) in ignored and dg.is_out_channel_pruning_fn(dep.handler):
                reasons.append(f"{owner} outputs the model's logits")
                continue
            why = _module_reason(target)
            if why:
                reasons.append(f"{owner}: {why}")
                continue
            dim = 0
            if isinstance(target, _ConvNd) and target.groups > 1:
                role = "dw"
            elif isinstance(target, _BatchNorm):
                role = "out"
            elif _is_layer_norm(target):
                role = "ln"
            else:
                role = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            key = (owner, "", role)
            layers.append(owner)
        else:
            # Torch-Pruning's stand-ins for functional ops (add, cat, flatten) have no weights; a
            # functional layer / group norm over these channels (a traced LayerNorm2d) does matter.
            op = str(getattr(dep.target, "name", ""))
            if "LayerNormBackward" in op:
                ln_ops += 1
            elif "GroupNormBackward" in op:
                reasons.append("GroupNorm-normalised channels: copies would change the norm's statistics")
            continue
        pairs = sorted(zip(item.root_idxs, item.idxs))
        roots = [r for r, _ in pairs]
        off = pairs[0][1] - pairs[0][0] if pairs else 0
        if roots != list(range(channels)) or any(i - r != off for r, i in pairs) or off < 0:
            reasons.append(f"{owner}{'.' + attr if attr else ''}: the channels reach it reordered, split or "
                           "reshaped (e.g. into attention heads), not as one contiguous block")
            continue
        if key in seen:
            continue
        seen.add(key)
        wg.members.append(_Member(owner, attr, role, off, dim if role == "param" else 0))
    wg.layers = tuple(dict.fromkeys(layers))
    if not any(m.role in ("out", "dw", "param") for m in wg.members) and not reasons:
        reasons.append("no layer writes these channels")
    lns = [m for m in wg.members if m.role == "ln"]
    if lns or ln_ops:
        wg.norm = "layer"
        reasons += _layer_norm_reasons(gm, wg, ln_ops)
    wg.reason = "; ".join(dict.fromkeys(reasons))
    return wg


# ------------------------------------------------------------------------------ LayerNorm groups
# LEMON's average expansion (Wang et al., ICLR 2024, Prop. 1). Every writer of a LayerNorm-
# normalised group gives each new channel the mean of the group's C channels, so every residual
# sum keeps that form: y* = [y, mean(y), ...] with d* = C + k entries. Then mean(y*) = mean(y) and
# var(y*) = (C / d*) var(y), so LayerNorm(y*) with eps* = eps C / d* and gamma* = gamma
# sqrt(C / d*) on the old entries returns the old outputs, and bias 0 on the new entries makes the
# new outputs exactly 0 (whatever their gamma). Readers of the LayerNorm's output may then take
# any new input weights (random: symmetry breaking); readers of the raw sum get zero new weights.

_PASS_METHODS = {"flatten", "transpose", "permute", "reshape", "view", "contiguous", "mean", "to", "float", "type_as"}
_PASS_FUNCTIONS = {"getitem", "flatten", "transpose", "permute", "reshape", "mean", "dropout"}
_ADD_FUNCTIONS = {"add", "iadd", "cat", "concat"}


def _ln_param_name(owner: str) -> str:
    return f"{owner}.weight" if owner else "weight"


def _layer_norm_nodes(gm: nn.Module, owner: str) -> list[torch.fx.Node]:
    """The fx nodes computing LayerNorm ``owner``: its ``call_module`` nodes, or the functional
    ``layer_norm`` calls that read its weight (timm's LayerNorm traces through)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    out = []
    for n in graph.nodes:
        if n.op == "call_module" and n.target == owner:
            if _is_layer_norm(gm.get_submodule(owner)):
                out.append(n)
        elif n.op == "call_function" and getattr(n.target, "__name__", "") == "layer_norm":
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            if isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target == _ln_param_name(owner):
                out.append(n)
    return out


def _layer_norm_size(gm: nn.Module, owner: str) -> tuple[int, float] | None:
    """LayerNorm ``owner``'s normalised size and eps: the module's, or (traced through, its
    parameters held by a bare module) those its ``layer_norm`` calls pass; ``None`` if unknown."""
    m = gm.get_submodule(owner) if owner else gm
    if _is_layer_norm(m):
        return m.normalized_shape[0], m.eps
    sizes = set()
    for n in _layer_norm_nodes(gm, owner):
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
        if not isinstance(shape, (tuple, list)) or len(shape) != 1 or not isinstance(shape[0], int) \
                or not isinstance(eps, (int, float)):
            return None
        sizes.add((shape[0], float(eps)))
    return sizes.pop() if len(sizes) == 1 else None


def _additive(gm: nn.Module, owner: str, attr: str) -> bool:
    """Whether parameter ``owner.attr`` only enters the graph through sums / concats (a
    position embedding, a class token), not as a per-channel scale (LayerScale)."""
    graph = getattr(gm, "graph", None)
    name = f"{owner}.{attr}" if owner else attr
    starts = [n for n in graph.nodes if n.op == "get_attr" and n.target == name] if graph is not None else []
    if not starts:
        return False  # used inside a leaf module: its role is unknown
    todo = list(starts)
    while todo:
        n = todo.pop()
        for u in n.users:
            t = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
            if u.op == "call_method" and t in ("expand", "reshape", "view", "to", "type_as", "contiguous", "repeat") \
                    or u.op == "call_function" and t == "resample_abs_pos_embed":  # interpolates per channel
                todo.append(u)
            elif u.op not in ("call_function", "call_method") or t.strip("_") not in _ADD_FUNCTIONS:
                return False
    return True


def _passes_through(m: nn.Module) -> bool:
    """Modules that are the identity in eval mode (identity, dropout, timm's DropPath)."""
    return isinstance(m, (nn.Identity, nn.Dropout)) or type(m).__name__ == "DropPath"


def _scaled_writer(gm: nn.Module, m: _Member, writers: list[str]) -> str | None:
    """The one writer whose output per-channel parameter ``m`` scales (a LayerScale module called on
    it, or a ``mul`` by the parameter), through dropout / identity; ``None`` if not exactly one."""
    graph = getattr(gm, "graph", None)
    owner = gm.get_submodule(m.owner) if m.owner else gm
    t = getattr(owner, m.attr, None)
    if graph is None or t is None or t.numel() != t.shape[m.dim]:
        return None
    name = f"{m.owner}.{m.attr}" if m.owner else m.attr
    inputs: list[Any] = []
    for n in graph.nodes:
        if n.op == "call_module" and m.owner and n.target == m.owner:
            if len(dict(owner.named_parameters())) != 1:
                return None  # a module scaling by this parameter alone, like timm's LayerScale
            inputs.append(n.args[0] if n.args else None)
        elif n.op == "get_attr" and n.target == name:
            for u in n.users:
                t_name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
                others = [a for a in u.args if a is not n]
                if t_name.strip("_") != "mul" or len(others) != 1:
                    return None
                inputs.append(others[0])
    found = set()
    for x in inputs:
        while isinstance(x, torch.fx.Node) and x.op == "call_module" \
                and _passes_through(gm.get_submodule(str(x.target))):
            x = x.args[0] if x.args else None
        if not (isinstance(x, torch.fx.Node) and x.op == "call_module"):
            return None
        hit = [w for w in writers if w == x.target or w.startswith(str(x.target) + ".")]
        if len(hit) != 1:
            return None
        found.add(hit[0])
    return found.pop() if len(found) == 1 else None


def _layer_norm_reasons(gm: nn.Module, wg: WidthGroup, ln_ops: int) -> list[str]:
    """Why a LayerNorm-normalised group cannot take the average expansion (empty: it can)."""
    out = []
    for m in wg.members:
        owner = gm.get_submodule(m.owner) if m.owner else gm
        if m.role == "dw" or isinstance(owner, _BatchNorm):
            out.append(f"{m.owner}: a LayerNorm-normalised group also passes a "
                       f"{'depthwise conv' if m.role == 'dw' else 'BatchNorm'}, which does not keep new channels "
                       "at the mean of the old ones (LEMON's average expansion)")
        elif m.role == "ln":
            size = _layer_norm_size(gm, m.owner)
            if size is None or not (_is_layer_norm(owner) or _layer_norm_nodes(gm, m.owner)):
                out.append(f"{m.owner}: its LayerNorm call is not in the traced graph with a constant shape")
            elif m.offset != 0 or size[0] != wg.channels:
                out.append(f"{m.owner}: the LayerNorm normalises more than this channel group")
        elif m.role == "param" and not _additive(gm, m.owner, m.attr):
            writer = _scaled_writer(gm, m, [w.owner for w in wg.members if w.role == "out"])
            if writer is None:
                out.append(f"{m.owner + '.' if m.owner else ''}{m.attr}: a per-channel scale whose writer is not "
                           "found, or a parameter used otherwise, in a LayerNorm-normalised group")
            else:
                wg.scales[(m.owner, m.attr)] = writer
    lns = sum(1 for m in wg.members if m.role == "ln")
    calls = sum(max(1, len(_layer_norm_nodes(gm, m.owner))) for m in wg.members if m.role == "ln")
    if ln_ops > calls or not lns:
        out.append("a LayerNorm without affine parameters normalises these channels (its call cannot be found)")
    return out


def _reads_normalized(gm: nn.Module, path: str) -> bool:
    """Whether layer ``path`` reads its input from a LayerNorm's output (through pooling,
    indexing, reshapes or dropout), found in the fx graph; a layer inside a leaf module reads
    that module's input."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return False
    node = next((n for n in graph.nodes if n.op == "call_module"
                 and (n.target == path or path.startswith(str(n.target) + "."))), None)
    x = node.args[0] if node is not None and node.args else None
    while isinstance(x, torch.fx.Node):
        if x.op == "call_module":
            m = gm.get_submodule(str(x.target))
            if _is_layer_norm(m):
                return True
            if not _passes_through(m):
                return False
        elif x.op == "call_function":
            name = getattr(x.target, "__name__", "")
            if name == "layer_norm":
                return True
            if name not in _PASS_FUNCTIONS:
                return False
        elif x.op != "call_method" or x.target not in _PASS_METHODS:
            return False
        x = x.args[0] if x.args else None
    return False


def _groups(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...]) -> tuple[Any, list[WidthGroup]]:
    dg = dependency_graph(gm, args)
    ignored = {id(m) for m in output_layers(gm, args)}
    names = _names(gm)
    found = []
    with quiet_tp():
        for root, g in out_channel_groups(dg):
            if isinstance(g, Exception):
                why = str(g) if isinstance(g, GroupTimeout) else f"its group search failed ({type(g).__name__}: {g})"
                found.append(WidthGroup(names[0].get(id(root), "?"), 0, reason=_short_reason(f"Torch-Pruning: {why}")))
            else:
                found.append(_group_of(dg, g, gm, names, ignored))
    return dg, found


def _group_at(dg: Any, gm: torch.fx.GraphModule, path: str, args: tuple[torch.Tensor, ...]) -> WidthGroup:
    """The group whose channels ``path``'s output carries."""
    try:
        m = gm.get_submodule(path)
    except AttributeError:
        m = None
    if m is None or m not in dg.module2node:
        raise PointError(f"{path!r} is not a layer of this model that the dependency graph sees")
    try:
        g = out_channel_group(dg, m)
    except Exception as exc:  # noqa: BLE001 - a deadline, or Torch-Pruning failing on this group
        raise InputError(f"{path!r}: Torch-Pruning could not collect its channel group "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if g is None:
        raise InputError(f"{path!r} ({type(m).__name__}) has no output channels to widen")
    ignored = {id(x) for x in output_layers(gm, args)}
    with quiet_tp():
        wg = _group_of(dg, g, gm, _names(gm), ignored)
    wg.layer = path
    return wg


def width_groups(model: nn.Module, example_input: Any) -> list[WidthGroup]:
    """Every coupled channel group of ``model`` and whether it can widen (``reason == ""``)."""
    gm = growable(model, example_input)
    return _groups(gm, as_args(example_input))[1]


# ---------------------------------------------------------------------------------------- editing
class _Editor:
    """Inserts channels in place, remembering where earlier insertions of the same call went (the
    groups' positions all speak of the model as it was when the call began)."""

    def __init__(self, gm: nn.Module, init: str, generator: torch.Generator, noise: float) -> None:
        self.gm, self.init, self.gen, self.noise = gm, init, generator, noise
        self.inserted: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
        self.node_edits: list[tuple[torch.fx.Node, tuple[Any, ...], dict[str, Any]]] = []  # (node, old args, kwargs)

    def undo_nodes(self, keep: int) -> None:
        """Restore the fx nodes edited after the first ``keep`` edits."""
        while len(self.node_edits) > keep:
            node, a, kw = self.node_edits.pop()
            node.args, node.kwargs = a, kw

    def now(self, key: tuple[str, str, int], pos: int) -> int:
        return pos + sum(c for q, c in self.inserted.get(key, []) if q <= pos)

    def _randn(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float32).to(device=like.device, dtype=like.dtype)

    def _insert(self, t: torch.Tensor, dim: int, at: int, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.narrow(dim, 0, at), new, t.narrow(dim, at, t.shape[dim] - at)], dim)

    def _set(self, owner: nn.Module, attr: str, value: torch.Tensor) -> None:
        old = getattr(owner, attr)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            setattr(owner, attr, value)

    def copy_rows(self, owner: nn.Module, attr: str, key: tuple[str, str, int], dim: int, at: int,
                  src: list[int], random: bool = False) -> None:
        """Insert at ``at`` copies of entries ``src`` along ``dim`` (random entries of the tensor's
        scale instead when ``random``; for biases: zeros)."""
        t = getattr(owner, attr, None)
        if t is None:
            return
        with torch.no_grad():
            idx = torch.tensor([self.now(key, s) for s in src], device=t.device)
            new = t.detach().index_select(dim, idx).clone()
            if random:
                std = float(t.detach().float().std()) if t.numel() > 1 else 0.0
                new = self._randn(new.shape, t) * std if t.dim() > 1 else torch.zeros_like(new)
            self._set(owner, attr, self._insert(t.detach(), dim, self.now(key, at), new))

    def split_columns(self, owner: nn.Module, key: tuple[str, str, int], at: int, src: list[int]) -> None:
        """A reader's input weights: ``"split"`` shares each source column among its copies (plus
        perturbations summing to zero), ``"zero"`` adds zero columns."""
        w = owner.weight
        with torch.no_grad():
            t = w.detach()
            cols = [self.now(key, s) for s in src]
            if self.init == "zero":
                new = torch.zeros_like(t.index_select(1, torch.tensor(cols, device=t.device)))
            else:
                counts: dict[int, int] = {}
                for c in cols:
                    counts[c] = counts.get(c, 0) + 1
                t = t.clone()
                for c, n in counts.items():
                    t[:, c] /= n + 1
                new = t.index_select(1, torch.tensor(cols, device=t.device)).clone()
                scale = self.noise * (float(w.detach().float().std()) if w.numel() > 1 else 0.0)
                eps = self._randn(new.shape, t) * scale
                new += eps
                for j, c in enumerate(cols):
                    t[:, c] -= eps[:, j]
            self._set(owner, "weight", self._insert(t, 1, self.now(key, at), new))

    def mean_rows(self, owner: nn.Module, attr: str, key: tuple[str, str, int], dim: int, at: int, c: int,
                  k: int, weights: torch.Tensor | None = None) -> None:
        """Insert at ``at`` ``k`` copies of the mean of entries ``at - c .. at - 1`` along ``dim``
        (each entry times its ``weights`` first, when given)."""
        t = getattr(owner, attr, None)
        if t is None:
            return
        with torch.no_grad():
            start = self.now(key, at - c)
            block = t.detach().narrow(dim, start, c).float()
            if weights is not None:
                block = block * weights.float().reshape([c if d == dim else 1 for d in range(t.dim())])
            mean = block.mean(dim, keepdim=True).to(t.dtype)
            new = mean.expand(*[k if d == dim else -1 for d in range(t.dim())]).clone()
            self._set(owner, attr, self._insert(t.detach(), dim, start + c, new))

    def grow_layer_norm(self, owner: nn.Module, path: str, key: tuple[str, str, int], at: int, c: int,
                        src: list[int], k: int) -> None:
        """LEMON's LayerNorm for average-expanded inputs: old gamma x sqrt(C / d*), new gamma
        copies of the sources' (scaled likewise), new bias 0, eps x C / d*."""
        scale = math.sqrt(c / (c + k))
        size = _layer_norm_size(self.gm, path)
        assert size is not None  # checked when the group was found
        shape, eps = (size[0] + k,), size[1] * c / (c + k)
        with torch.no_grad():
            w = getattr(owner, "weight", None)
            if w is not None:
                w = w.detach()
                new = w.index_select(0, torch.tensor([self.now(key, i) for i in src], device=w.device)) * scale
                self._set(owner, "weight", self._insert(w * scale, 0, self.now(key, at), new))
            b = getattr(owner, "bias", None)
            if b is not None:
                b = b.detach()
                self._set(owner, "bias", self._insert(b, 0, self.now(key, at), torch.zeros(k, dtype=b.dtype,
                                                                                            device=b.device)))
        if _is_layer_norm(owner):
            owner.normalized_shape, owner.eps = shape, eps
        for n in _layer_norm_nodes(self.gm, path):
            if n.op != "call_function":
                continue
            self.node_edits.append((n, n.args, dict(n.kwargs)))
            args, kw = list(n.args), dict(n.kwargs)
            if len(args) > 1:
                args[1] = shape
            else:
                kw["normalized_shape"] = shape
            if len(args) > 4:
                args[4] = eps
            else:
                kw["eps"] = eps
            n.args, n.kwargs = tuple(args), kw

    def grow_averaged(self, wg: WidthGroup, k: int, src: list[int]) -> list[tuple[tuple[str, str, int], int]]:
        """A LayerNorm-normalised group: LEMON's average expansion (see above)."""
        c = wg.channels
        done = []
        # A writer scaled per channel (LayerScale) adds mean(gamma_c W_c) as its new rows, its scale 1s.
        scale_of: dict[str, torch.Tensor] = {}
        for m in wg.members:
            if (m.owner, m.attr) in wg.scales:
                t = getattr(self.gm.get_submodule(m.owner) if m.owner else self.gm, m.attr).detach()
                start = self.now((m.owner, m.attr, m.dim), m.offset)
                scale_of[wg.scales[(m.owner, m.attr)]] = t.narrow(m.dim, start, c).reshape(-1).clone()
        for m in wg.members:
            owner = self.gm.get_submodule(m.owner) if m.owner else self.gm
            at = m.offset + c
            if m.role == "param":
                key = (m.owner, m.attr, m.dim)
                if (m.owner, m.attr) in wg.scales:
                    t = getattr(owner, m.attr).detach()
                    ones = torch.ones([k if d == m.dim else t.shape[d] for d in range(t.dim())], dtype=t.dtype,
                                      device=t.device)
                    with torch.no_grad():
                        self._set(owner, m.attr, self._insert(t, m.dim, self.now(key, at), ones))
                else:
                    self.mean_rows(owner, m.attr, key, m.dim, at, c, k)
            elif m.role == "ln":
                key = (m.owner, "", 0)
                self.grow_layer_norm(owner, m.owner, key, at, c, [m.offset + i for i in src], k)
            elif m.role == "in":
                key = (m.owner, "", 1)
                w = owner.weight.detach()
                shape = list(w.shape)
                shape[1] = k
                if _reads_normalized(self.gm, m.owner):  # its new inputs are exactly 0
                    std = float(w.float().std()) if w.numel() > 1 else 0.0
                    new = self._randn(tuple(shape), w) * std
                else:  # its new inputs are the mean of the old ones
                    new = torch.zeros(shape, dtype=w.dtype, device=w.device)
                with torch.no_grad():
                    self._set(owner, "weight", self._insert(w, 1, self.now(key, at), new))
                _count_inputs(owner, k)
            else:
                key = (m.owner, "", 0)
                self.mean_rows(owner, "weight", key, 0, at, c, k, scale_of.get(m.owner))
                self.mean_rows(owner, "bias", key, 0, at, c, k, scale_of.get(m.owner))
                _count_outputs(owner, k)
            done.append((key, at))
        return done

    def grow(self, wg: WidthGroup, k: int) -> None:
        """Widen group ``wg`` by ``k`` channels (in place)."""
        c = wg.channels
        if self.init == "split":
            perm = torch.randperm(c, generator=self.gen).tolist()
            src = [perm[i % c] for i in range(k)]
        else:
            src = torch.randint(c, (k,), generator=self.gen).tolist()
        if wg.norm == "layer":
            for key, at in self.grow_averaged(wg, k, src):
                self.inserted.setdefault(key, []).append((at, k))
            return
        random = self.init == "zero"
        done: list[tuple[tuple[str, str, int], int]] = []
        for m in wg.members:
            owner = self.gm.get_submodule(m.owner) if m.owner else self.gm
            at, s = m.offset + c, [m.offset + i for i in src]
            if m.role == "param":
                key = (m.owner, m.attr, m.dim)
                self.copy_rows(owner, m.attr, key, m.dim, at, s)
            elif m.role == "in":
                key = (m.owner, "", 1)
                self.split_columns(owner, key, at, s)
                _count_inputs(owner, k)
            else:
                key = (m.owner, "", 0)
                if isinstance(owner, _BatchNorm):
                    for a in ("weight", "bias", "running_mean", "running_var"):
                        self.copy_rows(owner, a, key, 0, at, s)
                    owner.num_features += k
                else:
                    rnd = random and m.role == "out"
                    self.copy_rows(owner, "weight", key, 0, at, s, random=rnd)
                    self.copy_rows(owner, "bias", key, 0, at, s, random=rnd)
                    _count_outputs(owner, k)
                    if m.role == "dw":
                        owner.in_channels += k
                        owner.groups += k
            done.append((key, at))
        for key, at in done:
            self.inserted.setdefault(key, []).append((at, k))


def _count_inputs(layer: nn.Module, k: int) -> None:
    if isinstance(layer, _ConvNd):
        layer.in_channels += k
    else:
        layer.in_features += k


def _count_outputs(layer: nn.Module, k: int) -> None:
    if isinstance(layer, _ConvNd):
        layer.out_channels += k
    else:
        layer.out_features += k


def _snapshot(gm: nn.Module, wg: WidthGroup) -> list[tuple[nn.Module, dict[str, Any]]]:
    out = []
    for m in wg.members:
        owner = gm.get_submodule(m.owner) if m.owner else gm
        keep = {a: getattr(owner, a) for a in ("weight", "bias", "running_mean", "running_var", "in_channels",
                                               "out_channels", "groups", "in_features", "out_features",
                                               "num_features", "normalized_shape", "eps") if hasattr(owner, a)}
        if m.attr:
            keep[m.attr] = getattr(owner, m.attr)
        out.append((owner, keep))
    return out


def _restore(snap: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for owner, keep in reversed(snap):
        for a, v in keep.items():
            if isinstance(v, nn.Parameter) or a in owner._parameters:
                owner._parameters[a] = v
            elif a in owner._buffers:
                owner._buffers[a] = v
            else:
                setattr(owner, a, v)


def _added(c: int, ratio: float) -> int:
    return max(1, int(math.ceil(c * ratio - 1e-9)) - c)


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1 \
            or ratio > 64:
        raise InputError(f"ratio must be a number in [1, 64] (1.25: 25 % more channels), got {ratio!r}")
    return float(ratio)


# ---------------------------------------------------------------------------------------- widen()
def widen(model: nn.Module, example_input: Any = None, *, layers: Iterable[str] | str | None = None,
          ratio: float = 1.25, init: str = "split", seed: int | None = None, noise: float = 0.01,
          ) -> torch.fx.GraphModule:
    """A copy of ``model`` with ``ratio`` times the channels at ``layers`` computing the same function.

    Args:
        model: any traceable ``nn.Module`` (or a model growkit grew; it is not modified).
        example_input: one batch-1 input (not needed for a growkit model that records its inputs).
        layers: module paths of layers whose output channels grow (their whole coupled group grows
            with them); ``None``: every group that can widen exactly.
        ratio: each chosen group grows from ``C`` to ``ceil(C * ratio)`` channels (at least one).
        init: ``"split"`` (copies with split, perturbed outgoing weights) or ``"zero"`` (random
            incoming, zero outgoing weights); see the module docstring.
        seed: seeds the choice of copied channels and the random weights (``None``: torch's RNG).
        noise: ``"split"``'s perturbation, relative to each reader weight's standard deviation.

    Raises:
        InputError: ``ratio < 1``, an unknown ``init``, a named layer that cannot widen exactly,
            or no layer that can.
        PointError: a named layer that the model does not have.
    """
    ratio = _check_ratio(ratio)
    if init not in WIDEN_INITS:
        raise InputError(f"init must be one of {', '.join(WIDEN_INITS)}, got {init!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
        raise InputError(f"noise must be a number in [0, 1], got {noise!r}")
    gm, args, named = growable_with_args(model, example_input, layers, "layers (module paths)")
    st = state_of(gm)
    assert st is not None
    if ratio == 1:
        return gm
    dg, found = _groups(gm, args)
    if named is None:
        chosen = [g for g in found if not g.reason]
        if not chosen:
            reasons = "; ".join(sorted({g.reason for g in found}))[:2000]
            raise InputError(f"no layer of this model can widen exactly ({reasons or 'no channel groups found'})")
    else:
        chosen, seen = [], set()
        for path in named:
            wg = _group_at(dg, gm, path, args)
            if wg.reason:
                raise InputError(f"layer {path!r} cannot widen exactly: {wg.reason}")
            if frozenset(wg.layers) not in seen:
                seen.add(frozenset(wg.layers))
                chosen.append(wg)
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
    editor = _Editor(gm, init, gen, float(noise))
    # Checked on the example and on a random input of its shape: a zero or constant example
    # would hide a change.
    probes = [args]
    if all(a.is_floating_point() for a in args):
        g0 = torch.Generator().manual_seed(0)
        probes.append(tuple(torch.randn(a.shape, generator=g0, dtype=a.dtype).to(a.device) for a in args))
    refs = [eval_outputs(gm, a) for a in probes]
    sizes = {id(wg): _added(wg.channels, ratio) for wg in chosen}

    def attempt(groups: list[WidthGroup]) -> str:
        """Grow ``groups``; keep them if the output is unchanged, else undo them and say why."""
        snaps = [s for wg in groups for s in _snapshot(gm, wg)]
        inserted = {key: list(v) for key, v in editor.inserted.items()}
        edits = len(editor.node_edits)
        try:
            for wg in groups:
                editor.grow(wg, sizes[id(wg)])
            if len(editor.node_edits) > edits:
                gm.recompile()  # a functional LayerNorm's shape and eps are constants of the code
            ok = all(outputs_equal(eval_outputs(gm, a), r, rtol=WIDEN_RTOL) for a, r in zip(probes, refs))
            why = "" if ok else "the output changed (an op the dependency graph does not see mixes these channels)"
        except Exception as exc:  # noqa: BLE001 - a widened group that cannot run is undone and reported
            why = f"the widened model fails to run ({type(exc).__name__}: {str(exc)[:200]})"
        if why:
            _restore(snaps)
            editor.undo_nodes(edits)
            editor.inserted = inserted
            gm.recompile()
        return why

    widened: list[tuple[str, int]] = []
    skipped: dict[str, str] = {g.layer: g.reason for g in found if g.reason} if named is None else {}
    # All groups at once (one check); only when that fails, one at a time to find the culprits.
    if len(chosen) > 1 and not attempt(chosen):
        widened = [(wg.layer, sizes[id(wg)]) for wg in chosen]
    else:
        for wg in chosen:
            why = attempt([wg])
            if why:
                if named is not None:
                    raise InputError(f"layer {wg.layer!r} cannot widen exactly: {why}")
                skipped[wg.layer] = why
                continue
            widened.append((wg.layer, sizes[id(wg)]))
    if not widened:
        raise InputError("no layer of this model widened exactly: "
                         + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:10]))
    rec = Resize("widen", f"w{len(st.plan.resizes)}", len(st.plan.edits), tuple(widened), init=init)
    st.plan.resizes.append(rec)
    refresh_shapes(gm, args)
    gm.graph.lint()
    gm.recompile()
    averaged = [wg.layer for wg in chosen if wg.norm == "layer" and any(wg.layer == k for k, _ in widened)]
    gm.meta[REPORT_KEY] = {"widened": dict(widened), "skipped": skipped, "layer_norm": averaged}
    logger.info("widened %d channel groups (%d skipped)", len(widened), len(skipped))
    return gm


def _replay(gm: torch.fx.GraphModule, rec: Resize, example_input: Any) -> None:
    """Apply a recorded widen to growable ``gm`` in place (fresh weights; the state dict brings them)."""
    st = state_of(gm)
    assert st is not None
    gm.recompile()  # replay inserts nodes without recompiling; the dependency graph runs the code
    dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
    args = tuple(a.to(dev) for a in as_args(example_input))
    dg = dependency_graph(gm, args)
    editor = _Editor(gm, rec.init, torch.Generator().manual_seed(0), 0.01)
    groups = []
    for path, k in rec.layers:  # all positions first: they speak of the model before this resize
        try:
            wg = _group_at(dg, gm, path, args)
        except (InputError, PointError) as exc:
            raise PlanError(f"plan resize {rec.key!r}: {exc}") from exc
        if wg.reason:
            raise PlanError(f"plan resize {rec.key!r} widens {path!r}, which cannot widen: {wg.reason}")
        groups.append((wg, k))
    for wg, k in groups:
        editor.grow(wg, k)
    gm.recompile()
    st.plan.resizes.append(rec)
    refresh_shapes(gm, args)


register_resize("widen", _replay)
