"""Torch-Pruning's dependency graph, shared by channel pruning and width growth.

Growth is pruning's inverse: the channels that must be removed together (residual adds, concat,
norms, depthwise convs) are the channels that must be added together, so both use Torch-Pruning's
``DependencyGraph`` rather than a second dependency analysis.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import InputError
from .graph import as_args

__all__ = ["torch_pruning", "quiet_tp", "output_layers", "dependency_graph", "out_channel_group", "out_channel_groups",
           "GROUP_TIMEOUT_S", "GroupTimeout"]

GROUP_TIMEOUT_S = 3.0
"""Longest one dependency group may take to collect. Torch-Pruning's group search does not end on
some graphs (timm's halo attention, an unfold feeding a reshape); such a group is skipped."""


class GroupTimeout(Exception):
    """Torch-Pruning's group search for one layer ran past :data:`GROUP_TIMEOUT_S`."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    # Process CPU time (ITIMER_VIRTUAL), not wall time: a busy machine must not cut a normal search
    # short. A signal deadline needs the main thread (elsewhere the search runs unguarded).
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(_sig: int, _frame: Any) -> None:
        raise GroupTimeout(f"the dependency search did not finish within {seconds:g} s of CPU time")

    old = signal.signal(signal.SIGVTALRM, fire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def out_channel_group(dg: Any, module: nn.Module, timeout_s: float = GROUP_TIMEOUT_S) -> Any:
    """Torch-Pruning's group of every output channel of ``module`` (raises :class:`GroupTimeout`,
    or returns ``None`` when the module has no output channels)."""
    pruner = dg.get_pruner_of_module(module)
    n = pruner.get_out_channels(module) if pruner is not None else None
    if n is None:
        return None
    with quiet_tp(), _deadline(timeout_s):
        return dg.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))


def out_channel_groups(dg: Any, timeout_s: float = GROUP_TIMEOUT_S) -> Iterator[tuple[nn.Module, Any]]:
    """``(root, group)`` for every coupled channel group rooted at a conv / linear layer, as
    Torch-Pruning's ``get_all_groups`` finds them, each search under a deadline (``group`` is the
    exception instead when the search ran out of time or failed)."""
    tp = torch_pruning()
    roots = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
    visited: set[int] = set()
    for m in list(dg.module2node.keys()):
        if m in dg.IGNORED_LAYERS_IN_TRACING or not isinstance(m, roots) or id(m) in visited:
            continue
        try:
            group = out_channel_group(dg, m, timeout_s)
        except Exception as exc:  # noqa: BLE001 - a deadline, or Torch-Pruning failing on this group
            visited.add(id(m))
            yield m, exc
            continue
        if group is None:
            continue
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(id(item.dep.target.module))
        yield m, group


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or an :class:`InputError` saying how to install it."""
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("this needs Torch-Pruning: pip install 'growkit[prune]' (or torch-pruning>=1.5)") from exc
    return tp


@contextlib.contextmanager
def quiet_tp() -> Iterator[None]:
    """Silence Torch-Pruning's warning about "unwrapped" parameters: in growkit models those are the
    branch gates eta, 0-d scalars with no channel to prune or grow."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*[Uu]nwrapped parameters")
        yield


def output_layers(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """The last conv / linear layer whose output carries the logits (never pruned or widened: that
    would change the number of classes)."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, o: seen.append((mod, o)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            flat = [t for t in tree_flatten(model(*example))[0] if isinstance(t, torch.Tensor)]
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not flat:
        return []
    logits = flat[0]
    for mod, o in reversed(seen):
        if isinstance(o, torch.Tensor) and o.dim() >= 2 and logits.dim() >= 2 and o.shape[1] == logits.shape[1] \
                and o.shape[0] == logits.shape[0]:
            return [mod]
    return []


def dependency_graph(model: nn.Module, example_input: Any) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model`` (traced on ``example_input``; eval mode)."""
    tp = torch_pruning()
    args = as_args(example_input)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        with quiet_tp():
            return tp.DependencyGraph().build_dependency(model, example_inputs=tuple(a.to(dev) for a in args),
                                                         verbose=False)
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's tracer fails in many ways on unusual graphs
        raise InputError(f"Torch-Pruning cannot build this model's channel dependency graph ({type(exc).__name__}: "
                         f"{str(exc)[:300]}); its channels cannot be grown or pruned as groups") from exc
    finally:
        model.train(was)
