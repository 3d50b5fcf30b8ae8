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

Which groups cannot widen exactly (and are skipped, or rejected when named): a group normalised
by LayerNorm / RMSNorm / GroupNorm (the norm's statistics would change: LEMON needs a
mean-preserving expansion there, not done), grouped (non-depthwise) convs, transposed convs,
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
"""``gm.meta`` key of the last :func:`widen` call's report: widened groups and skipped ones with why."""


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
    ``layers`` (every module path in it) and ``reason`` (why it cannot widen; ``""``: it can)."""

    layer: str
    channels: int
    layers: tuple[str, ...] = ()
    reason: str = ""
    members: list[_Member] = field(default_factory=list, repr=False)


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
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "rmsnorm" in type(m).__name__.lower() \
            or "layernorm" in type(m).__name__.lower():
        return (f"{type(m).__name__}-normalised channels: copies would change the norm's statistics "
                "(LEMON's mean-preserving expansion is not implemented)")
    return f"{type(m).__name__} layers are not widened"


def _group_of(dg: Any, group: Any, gm: nn.Module, names: tuple[dict[int, str], dict[int, tuple[str, str]]],
              ignored: set[int]) -> WidthGroup:
    mods, params = names
    root = group[0].dep.target.module
    channels = len(group[0].idxs)
    wg = WidthGroup(mods.get(id(root), "?"), channels)
    seen: set[tuple[str, str, str]] = set()
    layers: list[str] = []
    reasons: list[str] = []
    for item in group:
        dep, target = item.dep, item.dep.target.module
        if isinstance(target, nn.Parameter):
            if id(target) not in params:
                reasons.append("a parameter outside the model is coupled")
                continue
            owner, attr = params[id(target)]
            dim = item.dep.target.pruning_dim
            role, key = "param", (owner, attr, "param")
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
            else:
                role = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            key = (owner, "", role)
            layers.append(owner)
        else:
            # Torch-Pruning's stand-ins for functional ops (add, cat, flatten) have no weights; a
            # functional layer / group norm over these channels (a traced LayerNorm2d) does matter.
            op = str(getattr(dep.target, "name", ""))
            if "LayerNormBackward" in op or "GroupNormBackward" in op:
                reasons.append(f"{'LayerNorm' if 'Layer' in op else 'GroupNorm'}-normalised channels: copies would "
                               "change the norm's statistics (LEMON's mean-preserving expansion is not implemented)")
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
    wg.reason = "; ".join(dict.fromkeys(reasons))
    return wg


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

    def grow(self, wg: WidthGroup, k: int) -> None:
        """Widen group ``wg`` by ``k`` channels (in place)."""
        c = wg.channels
        if self.init == "split":
            perm = torch.randperm(c, generator=self.gen).tolist()
            src = [perm[i % c] for i in range(k)]
        else:
            src = torch.randint(c, (k,), generator=self.gen).tolist()
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
                if isinstance(owner, _ConvNd):
                    owner.in_channels += k
                else:
                    owner.in_features += k
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
                    if isinstance(owner, _ConvNd):
                        owner.out_channels += k
                        if m.role == "dw":
                            owner.in_channels += k
                            owner.groups += k
                    else:
                        owner.out_features += k
            done.append((key, at))
        for key, at in done:
            self.inserted.setdefault(key, []).append((at, k))


def _snapshot(gm: nn.Module, wg: WidthGroup) -> list[tuple[nn.Module, dict[str, Any]]]:
    out = []
    for m in wg.members:
        owner = gm.get_submodule(m.owner) if m.owner else gm
        keep = {a: getattr(owner, a) for a in ("weight", "bias", "running_mean", "running_var", "in_channels",
                                               "out_channels", "groups", "in_features", "out_features",
                                               "num_features") if hasattr(owner, a)}
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
        try:
            for wg in groups:
                editor.grow(wg, sizes[id(wg)])
            ok = all(outputs_equal(eval_outputs(gm, a), r, rtol=WIDEN_RTOL) for a, r in zip(probes, refs))
            why = "" if ok else "the output changed (an op the dependency graph does not see mixes these channels)"
        except Exception as exc:  # noqa: BLE001 - a widened group that cannot run is undone and reported
            why = f"the widened model fails to run ({type(exc).__name__}: {str(exc)[:200]})"
        if why:
            _restore(snaps)
            editor.inserted = inserted
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
    gm.meta[REPORT_KEY] = {"widened": dict(widened), "skipped": skipped}
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
    st.plan.resizes.append(rec)
    refresh_shapes(gm, args)


register_resize("widen", _replay)
