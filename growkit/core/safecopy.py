"""Deep copies of user models that do not fail on what a model picks up while it runs.

``copy.deepcopy`` refuses tensors that are not graph leaves, and models that already ran forward
with autograd on hold such tensors: timm's LeViT / EfficientViT cache attention biases computed
from parameters, ``torch.nn.utils.weight_norm`` keeps the computed ``weight`` as a plain
attribute. Hooks may be bound methods of objects that cannot be copied (loggers, locks).
:func:`copy_module` seeds ``deepcopy``'s memo so that such tensors become detached clones and
uncopyable hooks are shared; everything else is an ordinary deep copy, and the original is
never touched.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["copy_module"]

_MAX_DEPTH = 4


def _seed_tensors(obj: Any, memo: dict[int, Any], depth: int = 0) -> None:
    """Map every non-leaf tensor reachable through plain containers to a detached clone."""
    if depth > _MAX_DEPTH or id(obj) in memo:
        return
    if isinstance(obj, torch.Tensor):
        if obj.grad_fn is not None:
            # Same values, no autograd history: a cache rebuilt from parameters on next use.
            memo[id(obj)] = obj.detach().clone()
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _seed_tensors(v, memo, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _seed_tensors(v, memo, depth + 1)


def _seed_hooks(hooks: Any, memo: dict[int, Any]) -> None:
    """Share the hooks ``deepcopy`` cannot copy (the copy calls the same function)."""
    if not isinstance(hooks, dict):
        return
    for h in hooks.values():
        if id(h) in memo:
            continue
        try:
            copy.deepcopy(h)
        except Exception:  # noqa: BLE001 - any failure to copy means: share it
            memo[id(h)] = h


def copy_module(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that works after forward passes, with weight_norm and hooks.

    Non-leaf tensors held as attributes (caches, weight_norm's computed weight) are copied
    detached; hooks that cannot be deep-copied are shared with the original. Parameters and
    buffers are copied as ``copy.deepcopy`` copies them.
    """
    memo: dict[int, Any] = {}
    for m in model.modules():
        for key, value in vars(m).items():
            if key in ("_parameters", "_modules"):
                continue
            if key.endswith("hooks"):
                _seed_hooks(value, memo)
                continue
            _seed_tensors(value, memo)
    return copy.deepcopy(model, memo)
